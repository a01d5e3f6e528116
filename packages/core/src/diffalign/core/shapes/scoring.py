"""Faithfulness, rewards and FID of the shapes world, on top of the committed verifier."""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .grammar import parse_prompt
from .questions import FaithfulnessResult, score_parsed, soft_scores
from .verifier import FEATURE_DIM, SceneParser, check_reward_verifier, load_verifier

ASSETS = Path(__file__).parent / "assets"
IMAGE_SHAPE = (3, 32, 32)
_RANGE_TOL = 1e-3


def assets_dir() -> Path:
    return ASSETS


@lru_cache(maxsize=4)
def _cached_verifier(path: str) -> SceneParser:
    return load_verifier(path)


def get_verifier(path: str | Path | None = None) -> SceneParser:
    """The verifier (committed weights unless a path is given); frozen, eval mode, cached."""
    return _cached_verifier(str(Path(path) if path is not None else ASSETS / "verifier.safetensors"))


def check_images(images, n_prompts: int | None = None) -> torch.Tensor:
    """Validate shapes-world images and return a float tensor [B, 3, 32, 32] in [-1, 1].

    Accepts a float tensor in [-1, 1] or a list of 32x32 RGB PIL images. Raises ValueError /
    TypeError with a specific message otherwise (never rescales silently).
    """
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images is empty")
        from PIL import Image

        arrs = []
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"images[{i}] is {type(im).__name__}; expected a PIL image or a tensor")
            if im.mode != "RGB":
                raise ValueError(f"images[{i}] has mode {im.mode!r}; the shapes world needs 'RGB'")
            if im.size != (32, 32):
                raise ValueError(f"images[{i}] is {im.size[0]}x{im.size[1]}; the shapes world needs 32x32")
            arrs.append(np.asarray(im, dtype=np.float32))
        images = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2) / 127.5 - 1.0
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor or a list of PIL images, got {type(images).__name__}")
    if not torch.is_floating_point(images):
        raise ValueError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype}")
    if images.dim() != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"images must have shape [B, 3, 32, 32], got {list(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1 - _RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ValueError(f"images must be in [-1, 1], got values in [{lo:.3f}, {hi:.3f}]")
    if lo >= 0.0 and hi - lo > 0.5:
        # every palette colour has a channel below mid-grey, so [-1, 1] images with objects have
        # negative values; a non-negative batch with contrast is [0, 1] data
        raise ValueError(
            f"images look like they are in [0, 1] (min {lo:.3f}); convert with images * 2 - 1 to [-1, 1]"
        )
    if n_prompts is not None and images.shape[0] != n_prompts:
        raise ValueError(f"got {images.shape[0]} images but {n_prompts} prompts")
    return images.float()


def check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    for p in prompts:
        parse_prompt(p)  # raises ValueError for prompts outside the grammar
    return prompts


def parse_images(images, verifier: SceneParser | None = None, batch: int = 256) -> torch.Tensor:
    """Per-cell class probabilities [B, 9, 13] (differentiable w.r.t. the images)."""
    v = verifier or get_verifier()
    return torch.cat([v.probs(images[i : i + batch]) for i in range(0, images.shape[0], batch)])


def faithfulness(images, prompts, verifier: SceneParser | None = None) -> FaithfulnessResult:
    """DSG-style faithfulness of images to shapes prompts (hard answers, dependency zeroing)."""
    prompts = check_prompts(prompts)
    images = check_images(images, len(prompts))
    with torch.no_grad():
        probs = parse_images(images, verifier)
    return score_parsed(probs, prompts)


def soft_faithfulness(images: torch.Tensor, prompts, verifier: SceneParser | None = None) -> torch.Tensor:
    """Differentiable per-image faithfulness in [0, 1] (soft answers, product over parents)."""
    prompts = check_prompts(prompts)
    images = check_images(images, len(prompts))
    return soft_scores(parse_images(images, verifier), prompts)


class ShapesFaithfulnessReward:
    """Non-differentiable DSG score per image (``shapes-faithfulness``)."""

    name = "shapes-faithfulness"
    differentiable = False
    input_range = "[-1,1]"

    def __init__(self, verifier_path: str | Path | None = None):
        self.verifier = check_reward_verifier(get_verifier(verifier_path))

    def score(self, images, prompts) -> torch.Tensor:
        return torch.tensor(faithfulness(images, prompts, self.verifier).per_prompt)

    __call__ = score


class ShapesReward:
    """Differentiable soft faithfulness per image (``shapes-reward``), on pixels in [-1, 1]."""

    name = "shapes-reward"
    differentiable = True
    input_range = "[-1,1]"

    def __init__(self, verifier_path: str | Path | None = None):
        self.verifier = check_reward_verifier(get_verifier(verifier_path))

    def score(self, images, prompts) -> torch.Tensor:
        return soft_faithfulness(images, prompts, self.verifier)

    __call__ = score


def faithfulness_reward(**kwargs) -> ShapesFaithfulnessReward:
    return ShapesFaithfulnessReward(**kwargs)


def shapes_reward(**kwargs) -> ShapesReward:
    return ShapesReward(**kwargs)


class VerifierFeatures(nn.Module):
    """Verifier penultimate features, usable as ``FrechetInceptionDistance(feature=module)``.

    uint8 inputs are read as [0, 255]; float inputs as ``input_range`` ("[0,1]", torchmetrics'
    ``normalize=True`` convention, or "[-1,1]").
    """

    def __init__(self, verifier: SceneParser | None = None, input_range: str = "[0,1]"):
        super().__init__()
        if input_range not in ("[0,1]", "[-1,1]"):
            raise ValueError(f"input_range must be '[0,1]' or '[-1,1]', got {input_range!r}")
        self.verifier = verifier or get_verifier()
        self.input_range = input_range
        self.num_features = self.verifier.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        elif self.input_range == "[0,1]":
            x = x.float() * 2 - 1
        if tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"images must have shape [B, 3, 32, 32], got {list(x.shape)}")
        with torch.no_grad():
            return self.verifier.features(x).double()


def features(images, verifier: SceneParser | None = None) -> torch.Tensor:
    images = check_images(images)
    v = verifier or get_verifier()
    with torch.no_grad():
        return torch.cat([v.features(images[i : i + 256]) for i in range(0, images.shape[0], 256)])


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between two Gaussians (numpy float64)."""
    from scipy import linalg

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():
        eps = 1e-6 * np.eye(sigma1.shape[0])
        covmean = linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_stats(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = feats.double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def reference_renders(n: int = 2000, seed: int = 777) -> torch.Tensor:
    """Renders of held-out prompts (all skills) used as the FID reference set."""
    from .grammar import sample_specs
    from .render import render_scenes, scene_for_spec

    rng = random.Random(seed)
    specs = sample_specs("all", n, "heldout", rng)
    return render_scenes([scene_for_spec(s, rng) for s, _ in specs], seed)


def compute_reference_stats(verifier: SceneParser | None = None, n: int = 2000, seed: int = 777):
    return feature_stats(features(reference_renders(n, seed), verifier))


def save_reference_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    from safetensors.torch import save_file

    save_file({"mu": torch.from_numpy(mu).float(), "sigma": torch.from_numpy(sigma).float()}, str(path))
    return Path(path)


@lru_cache(maxsize=2)
def _reference_stats(path: str):
    from safetensors.torch import load_file

    d = load_file(path)
    return d["mu"].double().numpy(), d["sigma"].double().numpy()


def fid(images, reference: str = "renders", verifier: SceneParser | None = None) -> float:
    """FID in verifier-feature space between images and the reference set.

    ``reference="renders"`` uses the committed statistics of 2,000 held-out renders (computed by the
    build); a path to a ``.safetensors`` file with ``mu``/``sigma`` is also accepted.
    """
    feats = features(images, verifier)
    if feats.shape[0] < 2:
        raise ValueError("FID needs at least 2 images")
    if reference == "renders":
        path = ASSETS / "fid_reference.safetensors"
        if path.exists() and verifier is None:
            mu_r, sig_r = _reference_stats(str(path))
        else:
            mu_r, sig_r = compute_reference_stats(verifier)
    else:
        mu_r, sig_r = _reference_stats(str(reference))
    mu, sig = feature_stats(feats)
    return frechet_distance(mu, sig, mu_r, sig_r)


__all__ = [
    "FEATURE_DIM",
    "ShapesFaithfulnessReward",
    "ShapesReward",
    "VerifierFeatures",
    "check_images",
    "check_prompts",
    "faithfulness",
    "fid",
    "soft_faithfulness",
]
