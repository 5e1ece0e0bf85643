"""circuitlab: circuit discovery on minigpt2 models.

Algorithms take a model and a metric callable; they know nothing of the task.
The study (circuitlab.study) connects them to the Transitive Property Problem.
"""

import minigpt2  # noqa: F401  (first: it sets OMP_WAIT_POLICY=PASSIVE before torch loads; minigpt2/threads.py)
