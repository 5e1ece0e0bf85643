"""Figures: layer x head heatmaps (sweep effects, circuits, class scores, the paper's Figure 2).

One colour convention on every map of effects (ablated minus intact): **harm is red**, help is blue,
whichever way the metric points (accuracy falls, loss rises: both red); :func:`effect_cmap`.
Every figure is drawn to be read at 100 %: cells of at least ~30 px, text of at least 8 pt.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap, Normalize  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

DPI = 110
HARM, HELP = "red", "blue"  # the colours of an ablation that worsens / improves the metric


def effect_cmap(higher_is_better: bool) -> str:
    """The diverging colour map of an effect map: low values red when higher is better (a fall hurts),
    high values red when lower is better (a rise hurts)."""
    return "RdBu" if higher_is_better else "RdBu_r"


def effect_colour(effect: float, higher_is_better: bool, bound: float) -> tuple[float, float, float, float]:
    """The RGBA colour an effect map gives ``effect`` on a scale of -bound .. bound."""
    return plt.get_cmap(effect_cmap(higher_is_better))(Normalize(-bound, bound)(effect))


def harm_label(metric: str, higher_is_better: bool) -> str:
    """The colour bar's label of an effect map: what is drawn, and which colour is harm."""
    way = "falls" if higher_is_better else "rises"
    return f"Δ {metric}, ablated − intact\n{HARM}: ablation hurts ({metric} {way}), {HELP}: it helps"


def _axes_grid(n: int, size: float = 3.6):
    cols = min(n, 4 if size <= 4 else 2)  # large panels (legible marks) two to a row
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 0.6, size * rows * 0.92), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _text_colour(rgba) -> str:
    """Black on a light cell, white on a dark one."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _draw(ax, values: torch.Tensor, title: str, cmap, vmin, vmax, marks=None, mark_size: float = 8):
    L, H = values.shape
    im = ax.imshow(values.float().numpy(), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", origin="upper")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("head", fontsize=9)
    ax.set_ylabel("layer", fontsize=9)
    ax.set_xticks(range(0, H, max(1, H // 6)))
    ax.set_yticks(range(0, L, max(1, L // 6)))
    ax.tick_params(labelsize=8)
    for (l, h), text in (marks or {}).items():
        colour = _text_colour(im.cmap(im.norm(float(values[l, h]))))
        ax.text(h, l, text, ha="center", va="center", fontsize=mark_size if len(text) < 3 else mark_size - 2,
                color=colour, fontweight="bold")
    return im


def heatmaps(panels: dict[str, torch.Tensor], path: str | Path, title: str = "", cmap: str = "viridis",
             vmin: float | None = None, vmax: float | None = None, diverging: bool = False,
             marks: dict[str, dict[tuple[int, int], str]] | None = None, colorbar: str = "",
             higher_is_better: bool = True, size: float = 3.6) -> Path:
    """One [L, H] heatmap per panel, side by side, on one shared colour scale; saved as a PNG.

    ``diverging`` centres the scale on 0 (for effects, harm red: :func:`effect_cmap` by
    ``higher_is_better``); ``marks`` puts short text on chosen cells (larger panels: ``size``).
    """
    path = Path(path)
    values = torch.stack([v.float() for v in panels.values()]) if panels else torch.zeros(1, 1, 1)
    finite = values[values.isfinite()]
    if diverging:
        bound = float(finite.abs().max()) if finite.numel() else 1.0
        vmin, vmax, cmap = -bound or -1.0, bound or 1.0, effect_cmap(higher_is_better)
    else:
        vmin = float(finite.min()) if vmin is None and finite.numel() else vmin
        vmax = float(finite.max()) if vmax is None and finite.numel() else vmax
    fig, axes = _axes_grid(len(panels), size)
    im = None
    for i, (ax, (name, v)) in enumerate(zip(axes, panels.items())):
        im = _draw(ax, v, name, cmap, vmin, vmax, (marks or {}).get(name), mark_size=8 + 2 * (size > 4))
        if i % (4 if size <= 4 else 2):
            ax.set_ylabel("")
    if im is not None:
        bar = fig.colorbar(im, ax=axes, shrink=0.85)
        bar.set_label(colorbar, fontsize=9)
        bar.ax.tick_params(labelsize=8)
    _suptitle(fig, title, len(panels))
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _suptitle(fig, title: str, n_panels: int) -> None:
    """The figure's title, a fixed distance (in inches) above the panels' own titles, never over them."""
    if title:
        lines = textwrap.wrap(title, 30 + 40 * min(n_panels, 4))
        height = fig.get_size_inches()[1]
        fig.suptitle("\n".join(lines), fontsize=11, y=0.88 + (0.45 + 0.1 * len(lines)) / height, va="bottom")


KEPT, ABLATED = "#1f4e79", "#e8e8e8"  # circuit maps: a kept head dark blue, an ablated one light grey


def circuit_map(masks: dict[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """Each circuit as an [L, H] map, two colours with a legend: kept in the circuit, ablated; saved as a PNG."""
    path = Path(path)
    fig = circuit_figure(masks, title)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def circuit_figure(masks: dict[str, torch.Tensor], title: str = ""):
    """The figure of :func:`circuit_map`: one panel per circuit, a discrete legend, no colour bar."""
    fig, axes = _axes_grid(max(1, len(masks)))
    two = ListedColormap([ABLATED, KEPT])
    for i, (ax, (name, m)) in enumerate(zip(axes, masks.items())):
        kept = int((m > 0.5).sum())
        _draw(ax, (m > 0.5).float(), f"{name}: {kept} of {m.numel()} kept", two, 0, 1)
        ax.set_xticks([x - 0.5 for x in range(m.shape[1] + 1)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(m.shape[0] + 1)], minor=True)
        ax.grid(which="minor", color="white", linewidth=0.6)
        ax.tick_params(which="minor", length=0)
        if i % 4:
            ax.set_ylabel("")
    fig.legend(handles=[Patch(facecolor=KEPT, edgecolor="gray", label="kept in the circuit"),
                        Patch(facecolor=ABLATED, edgecolor="gray", label="ablated")],
               loc="upper center", ncol=2, fontsize=9, frameon=False, bbox_to_anchor=(0.5, 0.0))
    _suptitle(fig, title, len(masks))
    return fig
