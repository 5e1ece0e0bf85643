"""circuitlab: circuit discovery on minigpt2 models.

Algorithms take a model and a metric callable; they know nothing of the task.
The study (circuitlab.study) connects them to the Transitive Property Problem.
"""
