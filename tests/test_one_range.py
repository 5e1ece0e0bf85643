"""One vocabulary (issue #27), its leftovers: one range rule (clikit.Range) for the library's arguments as
for the flags, and a library that speaks in its parameters ("n_eval=0 ..."), said in flags by the scripts."""

import ast
import re
from pathlib import Path

import pytest
import torch

from circuitlab.eap import threshold_circuit, top_k_circuit
from circuitlab.graph import Graph
from circuitlab.search import check_search_args
from circuitlab.study import SearchOptions
from clikit import Range, as_flags, fail
from finetune.data import add_repeats, take_fraction
from minigpt2.heads import Head
from minigpt2.masking import single_head_masks
from tpp.examples import make_examples, train_eval_split

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("minigpt2", "circuitlab", "finetune", "tpp")


def test_a_range_check_names_the_parameter_the_value_the_range_and_the_fix():
    assert Range(1, whole=True).check("top_k", 3) == 3 and Range(optional=True).check("x", None) is None
    with pytest.raises(ValueError) as e:
        Range(1, 10, whole=True).check("n_eval", 0, why="an empty eval set measures nothing", fix="ask for more")
    assert str(e.value) == ("n_eval=0 must be a whole number from 1 to 10 (an empty eval set measures nothing). "
                            "Fix: ask for more")
    with pytest.raises(ValueError, match=r"^lr=nan must be a finite number > 0$"):
        Range(0, lo_open=True).check("lr", float("nan"))
    with pytest.raises(ValueError, match=r"^x=inf must be a finite number$"):
        Range().check("x", float("inf"))
    with pytest.raises(ValueError, match=r"^k=True must be a whole number >= 0$"):  # a bool is no count
        Range(0, whole=True).check("k", True)


@pytest.mark.parametrize("call, message", [
    (lambda: single_head_masks(0, 2), "single_head_masks: n_layer=0 must be a whole number >= 1"),
    (lambda: Head.from_index(3, 0), "n_head=0 must be a whole number >= 1"),
    (lambda: top_k_circuit(Graph(2, 2), torch.zeros(1), 10**6), "k=1000000 must be a whole number from 0 to"),
    (lambda: threshold_circuit(Graph(2, 2), torch.zeros(1), -1.0), "threshold=-1.0 must be a number >= 0"),
    (lambda: check_search_args(2.0, "layer-up", "relative"), "threshold=2.0 must be a number in [0, 1]"),
    (lambda: SearchOptions(speculate=0).check(), "speculate=0 must be a whole number >= 1"),
    (lambda: take_fraction(10, 1.5), "fraction=1.5 must be a number in (0, 1]"),
    (lambda: add_repeats(torch.zeros(2, 16).long().numpy(), 0.5, 0.0, 0, repeat_length=7),
     "repeat_length=7 must be a whole number from 8 to 8"),
    (lambda: train_eval_split(make_examples(4, seed=0), 4), "eval_size=4 must be a whole number from 1 to 3"),
])
def test_library_range_errors_are_clikits_in_parameter_names(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value).startswith(message), str(e.value)
    assert not re.search(r"(?<![\w-])--[a-z]", str(e.value))  # a parameter, never a flag


def _raised_strings(path: Path):
    """The string constants inside each ``raise`` statement of a module, with their line."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for sub in ast.walk(node.exc):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    yield sub.lineno, sub.value


# Modules that are command lines (their errors name their own flags), and flags of other programs.
SCRIPTS = {"circuitlab/edge_cli.py", "circuitlab/census.py", "finetune/publish.py", "tpp/__main__.py",
           "tpp/flags.py",
           # train.py's run directories: --resume / --overwrite / --out are the run's lifecycle (issue #27 leftover)
           "finetune/checkpoint.py", "finetune/resume.py"}
OTHER_PROGRAMS = re.compile(r"pip install --|torchrun --|`circuits\.py [a-z]+ --|python -m tpp [a-z]+ --")


def test_the_library_speaks_in_parameters_not_flags():
    found = []
    for package in LIBRARY:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name in SCRIPTS:
                continue
            for line, text in _raised_strings(path):
                text = OTHER_PROGRAMS.sub("", text)
                if re.search(r"(?<![\w\-`])--[a-z]", text):
                    found.append(f"{name}:{line}: {text.strip()[:80]}")
    assert not found, ("library errors that name a flag (name the parameter; the script says its flag):\n"
                       + "\n".join(found))


def test_no_hand_written_range_messages_are_left():
    """Each range check of the library is clikit.Range's; its words are Range's ("must be a whole number >= 1")."""
    pattern = re.compile(r"must be (in [\[(]|>|<|between|at least|an integer in|a positive)")
    found = []
    for package in LIBRARY:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            found += [f"{name}:{line}: {text.strip()[:80]}" for line, text in _raised_strings(path)
                      if pattern.search(text)]
    assert not found, "\n".join(found)


def test_a_script_says_the_library_parameters_in_its_flags(capsys):
    flags = {"n_eval": "--examples", "out": "--out", "seed": "--seed", "model_specs": "--models"}
    said = as_flags("n_eval=0 must be ... (a larger n_eval); out=/x is a file; out of range; the seed; seed=-1", flags)
    assert said == ("--examples 0 must be ... (a larger --examples); --out /x is a file; out of range; the seed; "
                    "--seed -1")
    assert fail("circuits.py baseline", ValueError("model_specs=['=x']: an empty label"), flags) == 2
    assert capsys.readouterr().err == "circuits.py baseline: error: --models ['=x']: an empty label\n"
