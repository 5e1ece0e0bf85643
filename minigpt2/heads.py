"""One attention head, one name: :class:`Head` (layer, head), shown as "L3H1".

A head is written several ways in this project and the tools it reads; each converts here:

- ``Head(3, 1)``, a plain tuple ``(3, 1)``: what the API takes and returns (a Head is a tuple);
- ``"L3H1"``: the display label (reports, tables, TransformerLens's ``all_head_labels``);
- ``"a3.h1"``: MIB's and EAP-IG's graph node name, kept on disk in their circuit files;
- ``"3.1"``: the head names of older training logs (``copying`` evaluation's ``*_top``), read only;
- a flat index ``layer * n_head + head`` (layer-major): the order of ``single_head_masks`` and of
  a [L, H] tensor flattened.
"""

from __future__ import annotations

import operator
import re
from typing import NamedTuple

from clikit import Range

_PATTERNS = (re.compile(r"L(\d+)H(\d+)"), re.compile(r"a(\d+)\.h(\d+)"), re.compile(r"(\d+)\.(\d+)"))


def _whole(name: str, value) -> int:
    try:
        i = operator.index(value)  # ints, numpy and torch integers; not floats or bools
    except TypeError:
        i = None
    if i is None or isinstance(value, bool) or i < 0:
        raise TypeError(f"a head's {name} must be an integer >= 0, got {value!r} ({type(value).__name__})")
    return i


class Head(NamedTuple):
    """Head ``head`` of layer ``layer`` (both from 0); ``str(head)`` is its label, "L3H1"."""

    layer: int
    head: int

    @classmethod
    def of(cls, value) -> "Head":
        """A Head from a Head, a (layer, head) pair or a name ("L3H1", "a3.h1", "3.1"); else a TypeError/ValueError."""
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, tuple) and len(value) == 2:
            return cls(_whole("layer", value[0]), _whole("head", value[1]))
        raise TypeError(f"a head is a (layer, head) pair or a name such as 'L3H1', got {value!r}")

    @classmethod
    def parse(cls, name: str) -> "Head":
        """A head from its label "L3H1", its MIB node name "a3.h1" or a training log's "3.1"."""
        if not isinstance(name, str):
            raise TypeError(f"a head's name must be a string such as 'L3H1', got {type(name).__name__}")
        for pattern in _PATTERNS:
            m = pattern.fullmatch(name.strip())
            if m:
                return cls(int(m[1]), int(m[2]))
        raise ValueError(f"{name!r} names no head: write 'L3H1' (layer 3, head 1), MIB's 'a3.h1' or '3.1'")

    @classmethod
    def from_index(cls, index: int, n_head: int) -> "Head":
        """The head at flat (layer-major) ``index`` of a model with ``n_head`` heads per layer."""
        index, n_head = _whole("flat index", index), _whole("n_head", n_head)
        return cls(*divmod(index, Range(1, whole=True).check("n_head", n_head)))

    def flat_index(self, n_head: int) -> int:
        """The flat (layer-major) index: ``layer * n_head + head``."""
        n_head = _whole("n_head", n_head)
        if not self.head < n_head:
            raise ValueError(f"{self} has no flat index with n_head={n_head}: head {self.head} >= {n_head}")
        return self.layer * n_head + self.head

    @property
    def label(self) -> str:
        """The display label, "L3H1"."""
        return f"L{self.layer}H{self.head}"

    @property
    def mib_name(self) -> str:
        """MIB's and EAP-IG's graph node name, "a3.h1" (circuitlab.graph's sender name)."""
        return f"a{self.layer}.h{self.head}"

    def __str__(self) -> str:
        return self.label


def head_labels(n_layer: int, n_head: int) -> list[str]:
    """Every head's label in flat (layer-major) order: ["L0H0", "L0H1", ...]."""
    return [Head(l, h).label for l in range(n_layer) for h in range(n_head)]
