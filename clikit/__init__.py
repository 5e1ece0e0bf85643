"""Command-line plumbing shared by train.py, circuits.py and ``python -m tpp``: every bad input is named.

Torch-free (train.py checks its flags before torch loads; :func:`device` imports torch only when called).

* :class:`Parser`: argparse whose errors are one line, ``prog: error: message``, exit status 2
  (no usage block, no traceback); its sub-parsers are the same class.
* :class:`HelpFormatter` (Parser's): --help shows every option's default, "(default: X)" unless the
  help says it in words ("default: ..."), and descriptions without docstring markup.
* :class:`Range`: the one range check: an interval of numbers or whole numbers. Its ``problem(value)``
  says why a value lies outside (for values read from a file or passed to a library class), its
  ``check(name, value)`` raises that as a ValueError naming the library parameter (minigpt2, tpp,
  finetune and circuitlab check their arguments' ranges with it); the argument types below use it
  while the command line is parsed.
* argument types (``type=integer(1, 3000)``, ``type=number(0, 1)``, ``type=text``) that refuse an
  impossible value while the command line is parsed, before any work, with the range it must lie in;
  argparse puts the flag in front ("argument --examples: ...").
* :func:`dtype_flag`: the ``--dtype`` type (fp32 / bf16, torch's spellings accepted, or auto).
* :func:`device`: the ``--device`` type of every command that loads a model: a torch device this
  machine has (cpu, cuda, cuda:N, mps), refused while parsing otherwise; :func:`default_device`
  is what its absence means (cuda if available, else cpu).
* :func:`flag`: a library parameter's flag (``n_examples`` -> ``--n-examples``); :func:`in_flags`:
  a library message in parameter names, said in flags (the library never names a flag);
  :func:`as_flags`: the same, for parameters whose flags have other names (``n_eval`` -> ``--examples``).
* :func:`blame`: a library ValueError re-raised with the flag that caused it in front.
* :func:`fail`: the one line a command prints for an error found after parsing (said in its flags).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import numbers
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass


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
    option's default in --help (:class:`HelpFormatter`, sub-parsers included).

    ``error_prog``: the name errors start with (default: prog; train.py's modes say "train.py");
    ``flag_first``: "--flag: message" instead of argparse's "argument --flag: message"."""

    def __init__(self, *args, error_prog: str | None = None, flag_first: bool = False, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.error_prog, self.flag_first = error_prog, flag_first

    def error(self, message: str):
        if self.flag_first:
            message = re.sub(r"^argument ([^:]+): ", lambda m: m.group(1).split("/")[-1] + ": ", message)
        self.exit(2, f"{self.error_prog or self.prog}: error: {message}\n")


def fail(prog: str, error: BaseException, flags: Mapping[str, str] | None = None) -> int:
    """Print ``prog: error: <error>`` (one line) to stderr; return the exit status 2. ``flags`` (library
    parameter -> the script's flag): a library error is said in the flags (:func:`as_flags`)."""
    message = str(error) if flags is None else as_flags(str(error), flags)
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def run(prog: str, main, argv=None) -> int:
    """A script's exit status: ``main(argv)``'s work, then 0; a ValueError or OSError (a damaged file, a full
    disk) is one line and status 2, Ctrl-C one line and 130 (writers are atomic: nothing half-written)."""
    try:
        main(argv)
    except (ValueError, OSError) as e:
        return fail(prog, e)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


def flag(param: str) -> str:
    """The flag of a library parameter: ``n_examples`` -> ``--n-examples``."""
    return "--" + param.replace("_", "-")


def in_flags(message: str, params) -> str:
    """A library message that names parameters ("a lower lr", "lr=0: ...") with the flags that set
    them ("a lower --lr", "--lr 0: ..."), for the parameter names ``params`` only."""
    names = "|".join(sorted(map(re.escape, params), key=len, reverse=True))
    return re.sub(rf"(?<![\w.\-'\"/])({names})(?:(=)|(?![\w\-]))",
                  lambda m: flag(m.group(1)) + (" " if m.group(2) else ""), message)


def as_flags(message: str, flags: Mapping[str, str]) -> str:
    """A library message said in a script's flags (``flags``: parameter -> flag, e.g. {"n_eval": "--examples"}):
    each ``name=value`` becomes ``flag value``, and a bare name with an underscore (``n_eval``) the flag; a
    bare name that is also a word ("out", "seed") stays a word."""
    if not flags:
        return message
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))

    def said(m: re.Match) -> str:
        name, assigned = m.group(1), m.group(2)
        if assigned:
            return flags[name] + " "
        return flags[name] if "_" in name else name

    return re.sub(rf"(?<![\w.\-'\"/])({names})(?:(=)|(?![\w\-]))", said, message)


@dataclass(frozen=True)
class Range:
    """An interval that a setting must lie in: ``lo``/``hi`` (None: unbounded), each end closed unless
    ``lo_open``/``hi_open``; ``whole``: integers only; ``optional``: None is allowed too."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    whole: bool = False
    optional: bool = False

    def contains(self, v) -> bool:
        return ((self.lo is None or v > self.lo or (v == self.lo and not self.lo_open))
                and (self.hi is None or v < self.hi or (v == self.hi and not self.hi_open)))

    def where(self) -> str:
        """The range in words: "in [0, 1)", "> 0", ">= 1", "from 1 to 3,000" (whole numbers); "" unbounded."""
        lo, hi = (None if x is None else f"{x:,}" if self.whole else f"{x:g}" for x in (self.lo, self.hi))
        if lo is not None and hi is not None:
            if self.whole:
                return f"from {lo} to {hi}"
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        return f"{'<' if self.hi_open else '<='} {hi}" if hi is not None else ""

    def problem(self, value) -> str | None:
        """None if ``value`` lies in the range, else why not ("must be a whole number >= 1")."""
        if value is None and self.optional:
            return None
        if self.whole:  # ints, numpy's integers; not bools or floats
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and self.contains(value)
            return None if ok else f"must be a whole number {self.where()}".rstrip()
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            return f"must be a finite number {self.where()}".rstrip()
        return None if self.contains(value) else f"must be a number {self.where()}"

    def check(self, name: str, value, why: str = "", fix: str = ""):
        """``value``, if it lies in the range; else a ValueError naming the parameter ``name``, the value and
        the range, then ``why`` the range is what it is and ``fix``: "top_k=0 must be a whole number >= 1
        (why). Fix: fix". The library's range check, in the words of its parameters; a script says them in
        its flags (:func:`in_flags`, :func:`as_flags`: "--top-k 0 must be ...")."""
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(f"{name}={value!r} {problem}" + (f" ({why})" if why else "")
                             + (f". Fix: {fix}" if fix else ""))
        return value

    def argtype(self, why: str = ""):
        """An argparse type: a value of this range (integers or finite floats), refused while parsing."""
        kind = "an integer" if self.whole else "a number"
        because = f" ({why})" if why else ""

        def parse(s: str):
            try:
                v = int(s) if self.whole else float(s)
            except ValueError:
                v = None
            if v is None and self.whole:
                raise argparse.ArgumentTypeError(f"{s!r} is not an integer; pass {kind} {self.where()}".rstrip())
            if v is None or not math.isfinite(v):
                raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
            if not self.contains(v):
                shown = f"{v:,}" if self.whole else f"{v}"
                raise argparse.ArgumentTypeError(f"{shown} is out of range; pass {kind} {self.where()}{because}")
            return v

        parse.__name__ = "integer" if self.whole else "number"
        return parse


def integer(lo: int | None = None, hi: int | None = None, why: str = ""):
    """An argparse type: an integer in [lo, hi] (either end open when None); ``why`` explains the range."""
    return Range(lo, hi, whole=True).argtype(why)


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, why: str = ""):
    """An argparse type: a finite float in [lo, hi] ((lo, hi] with ``lo_open``)."""
    return Range(lo, hi, lo_open=lo_open).argtype(why)


def text(s: str) -> str:
    """An argparse type: a string that is not empty or blank."""
    if not s.strip():
        raise argparse.ArgumentTypeError("an empty value; pass some text")
    return s


# The precision names a --dtype flag takes, each to its canonical spelling (minigpt2.hardware.DTYPES maps the
# same names to torch dtypes; tests/test_vocabulary.py checks that the two agree).
DTYPE_SPELLINGS = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}


def dtype_flag(name: str) -> str:
    """The ``--dtype`` type: a precision name in its canonical spelling ("bfloat16" -> "bf16", "float32" ->
    "fp32", "auto"); a name it does not know comes back as it is, for the flag's choices to refuse."""
    key = name.strip().lower()
    if key in DTYPE_SPELLINGS:
        return DTYPE_SPELLINGS[key]
    return key if key == "auto" else name


def device(s: str) -> str:
    """An argparse type: a torch device this machine has, as a string ("cpu", "cuda", "cuda:1", "mps").

    Refused while parsing, with the fix: a string that is no torch device, a kind other than
    cpu / cuda / mps, cuda on a machine without CUDA (or an index past its GPUs), mps without MPS
    (minigpt2.hardware.resolve_device, the one device resolver).
    """
    from minigpt2.hardware import resolve_device

    try:
        return str(resolve_device(s, unset="(or leave --device out: cuda if available, else cpu)"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def default_device(name: str | None = None) -> str:
    """``name`` (a --device already checked by :func:`device`), else cuda if this machine has it, else cpu."""
    if name is not None:
        return name
    from minigpt2.hardware import resolve_device

    return str(resolve_device(None))


@contextlib.contextmanager
def blame(flag: str, value=None):
    """Re-raise a ValueError of the library as ``flag value: message``, so the message names the flag."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{flag}{'' if value is None else f' {value}'}: {e}") from e
