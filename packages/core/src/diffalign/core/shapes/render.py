"""Renderer of the shapes world: 32x32 RGB, objects of fixed size on a 3x3 grid, white background.

A scene is a list of ``(kind, row, col)`` with ``kind = kind_index(color, shape)`` and row/col in
0..2 (row 0 at the top). Rendering is batched in torch at 4x supersampling, then averaged down, so
edges are anti-aliased. Images come back as float tensors in [-1, 1], shape [B, 3, 32, 32].
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from .grammar import COLORS, KINDS, SHAPES, PromptSpec, kind_index

IMAGE_SIZE = 32
GRID = 3
CELL_CENTERS = (5.5, 16.0, 26.5)
RADIUS = 4.5  # circle radius; the square's half side is 4, the triangle is ~9.7 x 8.4 px
SUPERSAMPLE = 4
POSITION_JITTER = 0.5
COLOR_JITTER = 8.0
RGB = {
    "red": (220.0, 40.0, 40.0),
    "green": (40.0, 170.0, 60.0),
    "blue": (40.0, 70.0, 220.0),
    "yellow": (230.0, 190.0, 20.0),
}
_KIND_COLOR = torch.tensor([RGB[c] for c, _ in KINDS])
_KIND_SHAPE = torch.tensor([SHAPES.index(s) for _, s in KINDS])

Scene = list[tuple[int, int, int]]


def scene_for_spec(spec: PromptSpec, rng: random.Random) -> Scene:
    """A random scene that satisfies a prompt's content exactly (no extra objects)."""
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    kinds = [kind_index(e.color, e.shape) for e in spec.entities]
    if spec.skill == "object":
        (r, c) = rng.choice(cells)
        return [(kinds[0], r, c)]
    if spec.skill == "count":
        picked = rng.sample(cells, spec.count)
        return [(kinds[0], r, c) for r, c in picked]
    if spec.skill == "color":
        (a, b) = rng.sample(cells, 2)
        return [(kinds[0], *a), (kinds[1], *b)]
    if spec.skill == "spatial":
        i, rel, j = spec.relation
        pairs = [(a, b) for a in cells for b in cells if a != b and relation_holds(rel, a, b)]
        a, b = rng.choice(pairs)
        return [(kinds[i], *a), (kinds[j], *b)]
    raise ValueError(f"unknown skill {spec.skill!r}")


def relation_holds(rel: str, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether the object in cell a=(row, col) is ``rel`` of the one in cell b.

    The objects must differ more along the relation's axis than along the other axis.
    """
    dr, dc = b[0] - a[0], b[1] - a[1]
    if rel == "left":
        return dc > abs(dr)
    if rel == "right":
        return -dc > abs(dr)
    if rel == "above":
        return dr > abs(dc)
    if rel == "below":
        return -dr > abs(dc)
    raise ValueError(f"unknown relation {rel!r}")


def random_scene(rng: random.Random, max_objects: int = 3, p_empty: float = 0.03) -> Scene:
    """A random scene of 0-3 objects of any kinds (repeats allowed) in distinct cells."""
    if rng.random() < p_empty:
        return []
    n = rng.randint(1, max_objects)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    # favour scenes with repeated kinds so that counting is exercised
    base = rng.randrange(len(KINDS))
    return [(base if rng.random() < 0.4 else rng.randrange(len(KINDS)), r, c) for r, c in cells]


def render_scenes(
    scenes: list[Scene],
    seed: int | torch.Generator = 0,
    position_jitter: float = POSITION_JITTER,
    color_jitter: float = COLOR_JITTER,
    scale_jitter: float = 0.0,
) -> torch.Tensor:
    """Render scenes into a [B, 3, 32, 32] float tensor in [-1, 1]."""
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    b = len(scenes)
    m = max([len(s) for s in scenes] + [1])
    kind = torch.full((b, m), -1, dtype=torch.long)
    rows = torch.zeros(b, m)
    cols = torch.zeros(b, m)
    for i, scene in enumerate(scenes):
        for j, (k, r, c) in enumerate(scene):
            if not (0 <= k < len(KINDS) and 0 <= r < GRID and 0 <= c < GRID):
                raise ValueError(f"bad scene object {(k, r, c)}")
            kind[i, j] = k
            rows[i, j] = r
            cols[i, j] = c
    centers = torch.tensor(CELL_CENTERS)
    cy = centers[rows.long()] + (torch.rand(b, m, generator=gen) * 2 - 1) * position_jitter
    cx = centers[cols.long()] + (torch.rand(b, m, generator=gen) * 2 - 1) * position_jitter
    scale = 1.0 + (torch.rand(b, m, generator=gen) * 2 - 1) * scale_jitter
    valid = kind >= 0
    kc = kind.clamp(min=0)
    color = _KIND_COLOR[kc] + (torch.rand(b, m, 3, generator=gen) * 2 - 1) * color_jitter
    color = color.clamp(0, 255) / 127.5 - 1.0
    shape = _KIND_SHAPE[kc]

    n = IMAGE_SIZE * SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    ys = coords.view(1, 1, n, 1)
    xs = coords.view(1, 1, 1, n)
    dx = xs - cx[..., None, None]
    dy = ys - cy[..., None, None]
    s = scale[..., None, None]
    circle = dx * dx + dy * dy <= (RADIUS * s) ** 2
    square = (dx.abs() <= 4.0 * s) & (dy.abs() <= 4.0 * s)
    half_h, half_w = 4.2 * s, 4.85 * s
    tri = (dy <= half_h) & (dy >= -half_h) & (dx.abs() <= half_w * (dy + half_h) / (2 * half_h))
    sh = shape[..., None, None]
    mask = torch.where(sh == 0, circle, torch.where(sh == 1, square, tri)) & valid[..., None, None]

    canvas = torch.ones(b, 3, n, n)
    for j in range(m):
        mj = mask[:, j].unsqueeze(1)
        canvas = torch.where(mj, color[:, j, :, None, None], canvas)
    return F.avg_pool2d(canvas, SUPERSAMPLE)


def scene_targets(scenes: list[Scene]) -> torch.Tensor:
    """Per-cell class targets [B, 9]: 0 = empty, 1 + kind otherwise."""
    t = torch.zeros(len(scenes), GRID * GRID, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for k, r, c in scene:
            t[i, r * GRID + c] = 1 + k
    return t


def perturb(images: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Light perturbations (noise, blur, colour shift, contrast) of images in [-1, 1]."""
    b = images.shape[0]
    x = images
    # blur with a random mix of the image and its 3x3 box blur
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    a = torch.rand(b, 1, 1, 1, generator=gen) * 0.6 * strength
    x = (1 - a) * x + a * blur
    shift = (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1) * 0.12 * strength
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * 0.15 * strength
    x = x * contrast + shift
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * 0.12 * strength
    x = x + torch.randn(x.shape, generator=gen) * sigma
    return x.clamp(-1, 1)


def color_name(rgb: tuple[float, float, float]) -> str:
    """Nearest palette colour name of an RGB triple (0-255)."""
    best = min(COLORS, key=lambda c: sum((u - v) ** 2 for u, v in zip(RGB[c], rgb)))
    return best
