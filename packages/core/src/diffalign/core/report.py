"""Image grids, plots and result tables used by demos and benchmarks."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["to_pil", "save_image_grid", "line_plot", "scatter_plot", "markdown_table", "write_json"]


def to_pil(images: Any) -> list[Image.Image]:
    """Convert a ``[B, 3, H, W]`` tensor in [-1, 1] (or a list of PIL images) into PIL images."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a [B, 3, H, W] tensor, got shape {tuple(images.shape)}")
        arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        arr = arr.permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]
    out = []
    for img in images:
        if not isinstance(img, Image.Image):
            raise TypeError(f"expected PIL images or a tensor, got {type(img).__name__}")
        out.append(img.convert("RGB"))
    return out


def save_image_grid(
    images: Any,
    path: str | Path,
    nrow: int | None = None,
    captions: Sequence[str] | None = None,
    scale: int = 4,
    padding: int = 2,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Tile images into one PNG; optional per-image captions and per-row labels drawn as text."""
    pil = to_pil(images)
    if not pil:
        raise ValueError("no images to save")
    if captions is not None and len(captions) != len(pil):
        raise ValueError(f"got {len(pil)} images but {len(captions)} captions")
    nrow = nrow or max(1, int(math.ceil(math.sqrt(len(pil)))))
    ncols = nrow
    rows = int(math.ceil(len(pil) / ncols))
    w, h = pil[0].width * scale, pil[0].height * scale
    cap_h = 12 if captions else 0
    label_w = 8 * max((len(s) for s in row_labels), default=0) if row_labels else 0
    grid = Image.new(
        "RGB", (label_w + ncols * (w + padding) + padding, rows * (h + cap_h + padding) + padding), "white"
    )
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(pil):
        r, c = divmod(i, ncols)
        x = label_w + padding + c * (w + padding)
        y = padding + r * (h + cap_h + padding)
        grid.paste(img.resize((w, h), Image.NEAREST), (x, y))
        if captions:
            draw.text((x, y + h), str(captions[i])[: max(4, w // 6)], fill=(0, 0, 0))
    if row_labels:
        for r, label in enumerate(row_labels[:rows]):
            draw.text((2, padding + r * (h + cap_h + padding) + h // 2), str(label), fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
) -> Path:
    """One line per named ``(x, y)`` series, saved as PNG."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def scatter_plot(
    groups: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    connect: Sequence[str] = (),
) -> Path:
    """Scatter named point groups; groups named in ``connect`` are joined by a line sorted by x."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, (xs, ys) in groups.items():
        xs, ys = np.asarray(list(xs), dtype=float), np.asarray(list(ys), dtype=float)
        ax.scatter(xs, ys, s=18, label=name)
        if name in connect and len(xs):
            order = np.argsort(xs)
            ax.plot(xs[order], ys[order], linewidth=1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "" if value is None else str(value)


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 3
) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (dicts) in ``columns`` order."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
