"""Figures: layer x head heatmaps (sweep effects, circuits, class scores, the paper's Figure 2)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _axes_grid(n: int, size: float = 3.6):
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 0.6, size * rows * 0.92), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _draw(ax, values: torch.Tensor, title: str, cmap: str, vmin, vmax, marks=None):
    L, H = values.shape
    im = ax.imshow(values.float().numpy(), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", origin="upper")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, H, max(1, H // 6)))
    ax.set_yticks(range(0, L, max(1, L // 6)))
    for (l, h), text in (marks or {}).items():
        ax.text(h, l, text, ha="center", va="center", fontsize=6, color="tab:red", fontweight="bold")
    return im


def heatmaps(panels: dict[str, torch.Tensor], path: str | Path, title: str = "", cmap: str = "viridis",
             vmin: float | None = None, vmax: float | None = None, diverging: bool = False,
             marks: dict[str, dict[tuple[int, int], str]] | None = None, colorbar: str = "") -> Path:
    """One [L, H] heatmap per panel, side by side, on one shared colour scale; saved as a PNG.

    ``diverging`` centres the scale on 0 (for effects); ``marks`` puts short text on chosen cells.
    """
    path = Path(path)
    values = torch.stack([v.float() for v in panels.values()]) if panels else torch.zeros(1, 1, 1)
    finite = values[values.isfinite()]
    if diverging:
        bound = float(finite.abs().max()) if finite.numel() else 1.0
        vmin, vmax, cmap = -bound or -1.0, bound or 1.0, "RdBu"
    else:
        vmin = float(finite.min()) if vmin is None and finite.numel() else vmin
        vmax = float(finite.max()) if vmax is None and finite.numel() else vmax
    fig, axes = _axes_grid(len(panels))
    im = None
    for i, (ax, (name, v)) in enumerate(zip(axes, panels.items())):
        im = _draw(ax, v, name, cmap, vmin, vmax, (marks or {}).get(name))
        if i % 4:
            ax.set_ylabel("")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.85, label=colorbar)
    if title:
        import textwrap

        fig.suptitle("\n".join(textwrap.wrap(title, 30 + 40 * min(len(panels), 4))), fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def circuit_map(masks: dict[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """Each circuit as an [L, H] map: dark = head kept in the circuit, light = ablated."""
    return heatmaps(masks, path, title=title, cmap="Greys", vmin=0, vmax=1, colorbar="1 = kept in the circuit")
