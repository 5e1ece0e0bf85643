"""Deprecated: the command-line plumbing moved to :mod:`clikit`, shared by train.py, circuits.py and
``python -m tpp`` (tpp is the TPP data package; it has no command-line plumbing of its own)."""

import warnings

from clikit import (HelpFormatter, Parser, Range, blame, default_device, device, fail, flag, integer,  # noqa: F401
                    number, plain, shown_default, text)

warnings.warn("tpp.flags is deprecated: import clikit instead", DeprecationWarning, stacklevel=2)
