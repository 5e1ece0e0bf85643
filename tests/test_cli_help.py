"""Every command's --help, walked subcommand by subcommand: each option has help text and shows its
default (in words where it is computed), and no developer markup leaks from docstrings."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKUP = re.compile(r":func:|:class:|:data:|:meth:|``")
# entry points: (name, module, how to reach main); each main builds its parser and parses --help
ENTRY_POINTS = [("circuits.py", "circuits"), ("train.py", "train"), ("python -m tpp", "tpp.__main__"),
                ("python -m finetune.publish", "finetune.publish"), ("python -m circuitlab.census", "circuitlab.census")]


class _Captured(Exception):
    pass


def _parser_of(module: str) -> argparse.ArgumentParser:
    """The parser an entry point's main() builds: its first parse_args call is intercepted."""
    sys.path.insert(0, str(ROOT))
    try:
        mod = importlib.import_module(module)
    finally:
        sys.path.remove(str(ROOT))
    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise _Captured

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(_Captured):
            mod.main(["--help"])
    finally:
        argparse.ArgumentParser.parse_args = original
    return seen[0]


def _walk(parser: argparse.ArgumentParser, prog: str):
    """(prog, parser) for the parser and every subcommand below it."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{prog} {name}")


def _all_parsers():
    return [(prog, p) for name, module in ENTRY_POINTS for prog, p in _walk(_parser_of(module), name)]


PARSERS = _all_parsers()


def _switch(action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
                               argparse._CountAction, argparse._HelpAction, argparse._VersionAction,
                               argparse._SubParsersAction))


def test_every_subcommand_is_walked():
    progs = {prog for prog, _ in PARSERS}
    for expected in ["circuits.py acdc", "circuits.py eap", "circuits.py sweep", "circuits.py generate",
                     "circuits.py study", "train.py finetune", "train.py pretrain", "python -m tpp templates",
                     "python -m tpp build", "python -m finetune.publish", "python -m circuitlab.census"]:
        assert expected in progs, sorted(progs)


@pytest.mark.parametrize("prog,parser", PARSERS, ids=[prog for prog, _ in PARSERS])
def test_help_shows_every_default_and_no_developer_text(prog, parser):
    text = parser.format_help()
    assert not MARKUP.search(text), f"{prog} --help shows developer markup: {MARKUP.search(text).group()!r}"
    assert "circuits.py calls" not in text and "add_subcommands" not in text
    formatter = parser._get_formatter()
    problems = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not action.help:
            problems.append(f"{name} has no help text")
            continue
        if _switch(action) or action.required or not action.option_strings:
            continue
        shown = formatter._expand_help(action)
        if "default:" not in shown.lower():
            problems.append(f"{name}'s help does not say its default: {shown!r}")
        if re.search(r"\bdefault [\w'\"]", shown) and "(default: " in shown:
            problems.append(f"{name} states its default twice, in words and appended: {shown!r}")
        if "(default: None)" in shown or "(default: )" in shown:
            problems.append(f"{name} shows a meaningless default: {shown!r}")
    assert not problems, f"{prog} --help: " + "; ".join(problems)


def test_edge_commands_help_names_every_ranked_method():
    from circuitlab.methods import EDGE_METHODS

    helps = {prog: p.format_help() for prog, p in PARSERS}
    eap = " ".join(helps["circuits.py eap"].split())
    for method in EDGE_METHODS:
        if method != "acdc":
            assert f"{method}:" in eap, method
    assert "weights/welterweight" in helps["circuits.py acdc"]
