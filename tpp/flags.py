"""Command-line plumbing shared by `python -m tpp` and circuits.py: every bad input is named.

* :class:`Parser`: argparse whose errors are one line, ``prog: error: message``, exit status 2
  (no usage block, no traceback); its sub-parsers are the same class.
* :class:`HelpFormatter` (Parser's): --help shows every option's default, "(default: X)" unless the
  help says it in words ("default: ..."), and descriptions without docstring markup.
* argument types (``type=integer(1, 3000)``, ``type=number(0, 1)``, ``type=text``) that refuse an
  impossible value while the command line is parsed, before any work, with the range it must lie in;
  argparse puts the flag in front ("argument --examples: ...").
* :func:`device`: the ``--device`` type of every command that loads a model: a torch device this
  machine has (cpu, cuda, cuda:N, mps), refused while parsing otherwise; :func:`default_device`
  is what its absence means (cuda if available, else cpu).
* :func:`blame`: a library ValueError re-raised with the flag that caused it in front.
* :func:`fail`: the one line a command prints for an error found after parsing.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys


SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
            argparse._HelpAction, argparse._VersionAction, argparse._CountAction)


def shown_default(action: argparse.Action) -> str | None:
    """What --help should say an option defaults to, or None when its help must say it in words: a switch
    (present or not), a required or positional argument, a default of None (computed when absent)."""
    if isinstance(action, SWITCHES) or action.required or not action.option_strings:
        return None
    d = action.default
    if d is None or d is argparse.SUPPRESS or (isinstance(d, (str, list, tuple)) and not d):
        return None
    return " ".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)


def plain(text: str) -> str:
    """Docstring markup made plain for a terminal: :func:`name` and ``code`` -> name and code."""
    return re.sub(r"``([^`]*)``", r"\1", re.sub(r":[a-z]+:`~?([^`]*)`", r"\1", text))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with every option's default: "(default: X)" appended unless the help text already says
    its default in words (a computed default, written "default: ..."). Descriptions keep their lines,
    with docstring markup made plain (a module docstring serves as a description)."""

    def _fill_text(self, text, width, indent):
        return super()._fill_text(plain(text), width, indent)

    def _get_help_string(self, action):
        help = action.help or ""
        d = shown_default(action)
        if d is None or "default:" in help.lower():
            return help
        d = d.replace("%", "%%")  # argparse %-formats the help string
        return f"{help} (default: {d})" if help else f"default: {d}"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: message`` on stderr, exit status 2, and every
    option's default in --help (:class:`HelpFormatter`, sub-parsers included)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(prog: str, error: BaseException) -> int:
    """Print ``prog: error: <error>`` (one line) to stderr; return the exit status 2."""
    print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def _bounds(lo, hi, kind: str) -> str:
    if lo is not None and hi is not None:
        return f"{kind} from {lo:,} to {hi:,}" if kind == "an integer" else f"{kind} in [{lo}, {hi}]"
    return f"{kind} >= {lo:,}" if lo is not None else f"{kind} <= {hi:,}"


def integer(lo: int | None = None, hi: int | None = None, why: str = ""):
    """An argparse type: an integer in [lo, hi] (either end open when None); ``why`` explains the range."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer; pass {_bounds(lo, hi, 'an integer')}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v:,} is out of range; pass {_bounds(lo, hi, 'an integer')}"
                                             + (f" ({why})" if why else ""))
        return v

    parse.__name__ = "integer"
    return parse


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, why: str = ""):
    """An argparse type: a finite float in [lo, hi] ((lo, hi] with ``lo_open``)."""
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
            where = (f"in {'(' if lo_open else '['}{lo}, {hi}]" if lo is not None and hi is not None
                     else f"{'>' if lo_open else '>='} {lo}" if lo is not None else f"<= {hi}")
            raise argparse.ArgumentTypeError(f"{v} is out of range; pass a number {where}" + (f" ({why})" if why else ""))
        return v

    parse.__name__ = "number"
    return parse


def text(s: str) -> str:
    """An argparse type: a string that is not empty or blank."""
    if not s.strip():
        raise argparse.ArgumentTypeError("an empty value; pass some text")
    return s


def device(s: str) -> str:
    """An argparse type: a torch device this machine has, as a string ("cpu", "cuda", "cuda:1", "mps").

    Refused while parsing, with the fix: a string that is no torch device, a kind other than
    cpu / cuda / mps, cuda on a machine without CUDA (or an index past its GPUs), mps without MPS.
    """
    import torch

    name = s.strip()
    try:
        d = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"{s!r} is not a torch device; pass cpu, cuda or cuda:N "
                                         "(or leave --device out: cuda if available, else cpu)") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise argparse.ArgumentTypeError(f"{name}: this machine has no CUDA device; pass cpu "
                                             "(or leave --device out: cuda if available, else cpu)")
        if d.index is not None and d.index >= n:
            raise argparse.ArgumentTypeError(f"{name}: this machine has {n} CUDA device{'s' if n > 1 else ''} "
                                             f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''}); pass one of them")
    elif d.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise argparse.ArgumentTypeError(f"{name}: this machine has no MPS device; pass cpu")
    elif d.type != "cpu":
        raise argparse.ArgumentTypeError(f"{name}: a {d.type} device cannot run the model here; pass cpu, cuda "
                                         "or cuda:N")
    return str(d)


def default_device(name: str | None = None) -> str:
    """``name`` (a --device already checked by :func:`device`), else cuda if this machine has it, else cpu."""
    if name is not None:
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def blame(flag: str, value=None):
    """Re-raise a ValueError of the library as ``flag value: message``, so the message names the flag."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{flag}{'' if value is None else f' {value}'}: {e}") from e
