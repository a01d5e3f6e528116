"""Stage 4: merging skill experts (SELMA section 3.3), in weight-update space.

SELMA merges its experts at inference with diffusers ``set_adapters``: ``W = W0 + sum_i w_i * s_i B_i A_i``
(``s_i = alpha_i / r_i``), i.e. an exact average of the weight updates. Every method here works on those
updates ``delta_i = s_i B_i A_i`` directly, so ranks may differ between experts:

- ``linear``: ``sum_i w_i delta_i`` (SELMA's merge). Exported as a fused model, or exactly as one LoRA by
  concatenating the factors (rank ``sum_i r_i``).
- ``cat``: the same update, always exported as the concatenated LoRA.
- ``svd``: the linear update truncated to ``svd_rank`` by SVD (the best rank-k approximation).
- ``ties``: TIES-Merging (trim to the top ``density`` magnitudes, elect a sign per entry by total mass,
  disjoint mean of the entries that agree), scaled by ``ties_scale``.
- ``dare_linear`` / ``dare_ties``: DARE (drop each entry with probability ``1 - density`` and rescale the
  rest by ``1/density``), then a linear sum or TIES.

What PEFT's ``add_weighted_adapter(combination_type="linear")`` does (combine the A's and the B's
separately) is *not* an average of the updates: it adds cross terms ``B_i A_j``. :func:`peft_style_linear_factors`
reproduces it only to show that (a negative control in the tests).

Weights default to uniform ``1/n`` over the experts. The official inference script computes
``1/len(args.model_id)``, the length of the model-id *string* (about 1/30 per expert); that is a bug and
is not reproduced. For ``linear``/``dare_linear`` the weights multiply the updates; for the TIES variants
``n * w_i`` multiplies each update inside the disjoint mean, so uniform weights give the plain TIES mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from diffalign.selma.lora import AdapterError, LoraAdapter, check_fits

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")


# --------------------------------------------------------------------------------------------------
# Pure tensor functions
# --------------------------------------------------------------------------------------------------


def resolve_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Uniform ``1/n`` when ``weights`` is None; otherwise check there is one finite weight per expert."""
    if n < 1:
        raise AdapterError("no experts to merge")
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise AdapterError(f"{len(weights)} merge weights given for {n} experts")
    if not all(torch.isfinite(torch.tensor(w)) for w in weights):
        raise AdapterError(f"merge weights must be finite, got {weights}")
    return weights


def linear_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i delta_i``."""
    out = torch.zeros_like(deltas[0], dtype=torch.float64)
    for d, w in zip(deltas, weights):
        out += w * d.double()
    return out


def magnitude_trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest (TIES step 1)."""
    _check_density(density)
    k = int(density * t.numel())
    if k >= t.numel():
        return t.clone()
    out = torch.zeros_like(t)
    if k == 0:
        return out
    flat = t.reshape(-1)
    idx = flat.abs().topk(k).indices
    out.view(-1)[idx] = flat[idx]
    return out


def elect_sign(tensors: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Per-entry sign of the merged update (TIES step 2): sign of the summed values (``total``) or of the
    summed signs (``frequency``). Ties resolve to +1. ``tensors`` is stacked ``[n, ...]``."""
    if method == "total":
        s = tensors.sum(0)
    elif method == "frequency":
        s = tensors.sign().sum(0)
    else:
        raise ValueError(f"majority sign method must be 'total' or 'frequency', got {method!r}")
    return torch.where(s >= 0, torch.ones_like(s), -torch.ones_like(s))


def disjoint_mean(tensors: torch.Tensor, weights: Sequence[float], sign: torch.Tensor) -> torch.Tensor:
    """``sum_i c_i t_i [sign(t_i) == sign] / #{i: t_i != 0 and agrees}`` with ``c_i = n w_i`` (TIES step 3)."""
    n = tensors.shape[0]
    coef = torch.tensor([n * w for w in weights], dtype=tensors.dtype).view(n, *([1] * (tensors.dim() - 1)))
    agree = (tensors.sign() == sign.unsqueeze(0)) & (tensors != 0)
    count = agree.sum(0).clamp(min=1)
    return (tensors * coef * agree).sum(0) / count


def ties_merge(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    majority: str = "total",
    scale: float = 1.0,
) -> torch.Tensor:
    trimmed = torch.stack([magnitude_trim(d.double(), density) for d in deltas])
    return scale * disjoint_mean(trimmed, weights, elect_sign(trimmed, majority))


def dare_drop(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability ``density`` and divide kept entries by ``density`` (unbiased)."""
    _check_density(density)
    if density == 1.0:
        return t.clone()
    keep = torch.rand(t.shape, generator=generator, dtype=torch.float64) < density
    return torch.where(keep, t / density, torch.zeros_like(t))


def dare_merge(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    generator: torch.Generator,
    combine: str = "linear",
    majority: str = "total",
    scale: float = 1.0,
) -> torch.Tensor:
    dropped = [dare_drop(d.double(), density, generator) for d in deltas]
    if combine == "linear":
        return linear_merge(dropped, weights)
    if combine == "ties":
        stacked = torch.stack(dropped)
        return scale * disjoint_mean(stacked, weights, elect_sign(stacked, majority))
    raise ValueError(f"DARE combine must be 'linear' or 'ties', got {combine!r}")


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` the best rank-``rank`` approximation of ``delta`` (flattened to 2-D)."""
    if rank < 1:
        raise ValueError(f"svd rank must be >= 1, got {rank}")
    mat = delta.reshape(delta.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = u[:, :k] * root
    a = root[:, None] * vh[:k]
    if delta.dim() == 4:
        a = a.reshape(k, *delta.shape[1:])
        b = b.reshape(delta.shape[0], k, 1, 1)
    return a, b


def concat_factors(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], scales: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = [c_1 A_1; ...; c_n A_n]``, ``B = [B_1, ..., B_n]`` so that ``B @ A = sum_i c_i B_i A_i`` exactly."""
    a = torch.cat([c * f[0].double() for f, c in zip(factors, scales)], dim=0)
    b = torch.cat([f[1].double() for f in factors], dim=1)
    return a, b


def peft_style_linear_factors(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], scales: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT ``combination_type="linear"``: ``A = sum sqrt(c_i) A_i``, ``B = sum sqrt(c_i) B_i`` (same ranks).

    ``B @ A`` then contains the cross terms ``sqrt(c_i c_j) B_i A_j``: *not* the average of the updates.
    Kept only as a negative control."""
    ranks = {f[0].shape[0] for f in factors}
    if len(ranks) != 1:
        raise AdapterError(f"PEFT-style factor averaging needs equal ranks, got {sorted(ranks)}")
    a = sum(abs(c) ** 0.5 * (1 if c >= 0 else -1) * f[0].double() for f, c in zip(factors, scales))
    b = sum(abs(c) ** 0.5 * f[1].double() for f, c in zip(factors, scales))
    return a, b


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


# --------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------


def matched_norm_scales(
    deltas: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], per_layer: bool = False
) -> dict[str, float]:
    """Scales ``s`` that give ``s * deltas`` the Frobenius norm of ``reference`` (the fair-comparison size).

    Global (the default, used by the benchmark): one scale for every module, with
    ``||s * ΔW_mixed||_F = ||ΔW_merged||_F`` over all modules together (the norm of the concatenated updates),
    so the mixed LoRA keeps its own distribution across layers and only its overall size changes, as a
    strength knob would. ``per_layer``: each module is scaled to its reference module's norm. Modules of
    ``deltas`` missing from ``reference`` have a zero reference; a zero update gets scale 0."""
    missing = sorted(set(reference) - set(deltas))
    if missing:
        raise AdapterError(f"the reference updates have modules the updates lack (first: {missing[:3]})")

    def sq(t: torch.Tensor) -> float:
        return float(t.double().pow(2).sum())

    if per_layer:
        out = {}
        for name, d in deltas.items():
            n_d = sq(d) ** 0.5
            n_r = sq(reference[name]) ** 0.5 if name in reference else 0.0
            out[name] = n_r / n_d if n_d > 0 else 0.0
        return out
    n_d = sum(sq(d) for d in deltas.values()) ** 0.5
    n_r = sum(sq(r) for r in reference.values()) ** 0.5
    s = n_r / n_d if n_d > 0 else 0.0
    return {name: s for name in deltas}


def scale_deltas(deltas: Mapping[str, torch.Tensor], scales: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """``scales[m] * deltas[m]`` per module."""
    return {name: d * scales[name] for name, d in deltas.items()}


@dataclass
class MergeResult:
    """Merged weight updates per module, and what was done (JSON-friendly)."""

    deltas: dict[str, torch.Tensor]
    method: str
    weights: list[float]
    prefix: str
    base_model: str | None
    experts: list[str]
    notes: list[str] = field(default_factory=list)
    adapters: list[LoraAdapter] = field(default_factory=list, repr=False)

    def report(self) -> dict:
        return {
            "method": self.method,
            "weights": self.weights,
            "experts": self.experts,
            "base_model": self.base_model,
            "modules": len(self.deltas),
            "notes": self.notes,
        }

    def as_lora(self, svd_rank: int | None = None) -> tuple[LoraAdapter, float]:
        """One LoRA carrying the merge, and its relative Frobenius error against the merged updates.

        ``linear``/``cat`` without ``svd_rank`` concatenate the experts (exact). Otherwise each module's
        update is factorised by truncated SVD at ``svd_rank`` (exact iff the update's rank <= svd_rank)."""
        layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        num = 0.0
        den = 0.0
        exact_concat = self.method in ("linear", "cat") and svd_rank is None
        if not exact_concat and svd_rank is None:
            raise AdapterError(
                f"a '{self.method}' merge is not low-rank: give svd_rank to export it as one LoRA, or export a fused model"
            )
        for name, delta in self.deltas.items():
            if exact_concat:
                present = [(ad, w) for ad, w in zip(self.adapters, self.weights) if name in ad.layers]
                a, b = concat_factors(
                    [ad.layers[name] for ad, _ in present], [w * ad.scale(name) for ad, w in present]
                )
            else:
                a, b = svd_factors(delta, svd_rank)
            approx = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
            num += float((approx - delta.reshape(delta.shape[0], -1).double()).pow(2).sum())
            den += float(delta.double().pow(2).sum())
            layers[name] = (a.float(), b.float())
        # alpha = r per module gives scale 1: the factors carry the merge weights and expert scales.
        alphas = {name: float(a.shape[0]) for name, (a, _) in layers.items()}
        rel = (num / den) ** 0.5 if den > 0 else 0.0
        adapter = LoraAdapter(
            layers,
            alphas,
            prefix=self.prefix,
            base_model=self.base_model,
            meta={"merge": self.report() | {"export_relative_error": rel, "svd_rank": svd_rank}},
        )
        return adapter, rel


def check_compatible(adapters: Sequence[LoraAdapter], names: Sequence[str]) -> list[str]:
    """Refuse adapters of different base models / denoisers / update shapes; say what else differs."""
    notes: list[str] = []
    prefixes = {ad.prefix for ad in adapters}
    if len(prefixes) > 1:
        raise AdapterError(f"experts adapt different denoisers {sorted(prefixes)}; they cannot be merged")
    bases = {ad.base_model for ad in adapters if ad.base_model}
    if len(bases) > 1:
        detail = ", ".join(f"{n}: {ad.base_model}" for n, ad in zip(names, adapters))
        raise AdapterError(
            f"experts were trained on different base models ({detail}); merging them is refused"
        )
    if len(bases) == 0:
        notes.append("no expert records its base model: the base could not be checked")
    shapes: dict[str, tuple[str, tuple]] = {}
    for name, ad in zip(names, adapters):
        for module in ad.layers:
            shape = ad.delta_shape(module)
            if module in shapes and shapes[module][1] != shape:
                other, other_shape = shapes[module]
                raise AdapterError(
                    f"module {module!r} has update shape {other_shape} in expert {other!r} but {shape} in {name!r}: "
                    "the experts come from different architectures"
                )
            shapes.setdefault(module, (name, shape))
    ranks = sorted({r for ad in adapters for r in ad.ranks().values()})
    if len(ranks) > 1:
        notes.append(
            f"experts have different LoRA ranks {ranks}: merged in weight-update space (no rank constraint); "
            "PEFT's factor-wise 'linear'/'ties' merges would refuse them"
        )
    module_sets = [set(ad.layers) for ad in adapters]
    union = set().union(*module_sets)
    partial = [m for m in union if sum(m in s for s in module_sets) < len(adapters)]
    if partial:
        notes.append(
            f"{len(partial)} modules are adapted by only some experts; a missing expert contributes a zero update there"
        )
    return notes


def merge_adapters(
    adapters: Sequence[LoraAdapter],
    names: Sequence[str] | None = None,
    *,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    density: float = 0.5,
    majority: str = "total",
    ties_scale: float = 1.0,
    svd_rank: int | None = None,
    seed: int = 0,
) -> MergeResult:
    """Merge experts' weight updates with one of :data:`METHODS`."""
    if method not in METHODS:
        raise AdapterError(f"unknown merge method {method!r}; expected one of {METHODS}")
    names = list(names) if names is not None else [f"expert{i}" for i in range(len(adapters))]
    weights = resolve_weights(weights, len(adapters))
    notes = check_compatible(adapters, names)
    if method in ("ties", "dare_ties") and any(w <= 0 for w in weights):
        raise AdapterError(f"{method} needs positive weights (they scale the disjoint mean), got {weights}")
    if method == "svd" and svd_rank is None:
        raise AdapterError("method 'svd' needs svd_rank")
    modules = sorted(set().union(*(ad.layers for ad in adapters)))
    generator = torch.Generator().manual_seed(seed)
    merged: dict[str, torch.Tensor] = {}
    for module in modules:
        ds = []
        for ad in adapters:
            ds.append(
                ad.delta(module)
                if module in ad.layers
                else torch.zeros(_shape_of(adapters, module), dtype=torch.float64)
            )
        if method in ("linear", "cat"):
            merged[module] = linear_merge(ds, weights)
        elif method == "svd":
            a, b = svd_factors(linear_merge(ds, weights), svd_rank)
            merged[module] = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(ds[0].shape)
        elif method == "ties":
            merged[module] = ties_merge(ds, weights, density, majority, ties_scale)
        elif method == "dare_linear":
            merged[module] = dare_merge(ds, weights, density, generator, "linear")
        else:
            merged[module] = dare_merge(ds, weights, density, generator, "ties", majority, ties_scale)
    base = next((ad.base_model for ad in adapters if ad.base_model), None)
    return MergeResult(merged, method, weights, adapters[0].prefix, base, names, notes, list(adapters))


def _shape_of(adapters: Sequence[LoraAdapter], module: str) -> tuple[int, ...]:
    for ad in adapters:
        if module in ad.layers:
            return ad.delta_shape(module)
    raise KeyError(module)


@torch.no_grad()
def fuse_deltas(denoiser: torch.nn.Module, deltas: Mapping[str, torch.Tensor], scale: float = 1.0) -> None:
    """``W += scale * delta`` for each module (checks that every module exists with the update's shape)."""
    probe = LoraAdapter(
        {
            n: (torch.zeros(1, *d.shape[1:]), torch.zeros(d.shape[0], 1, *([1] * (d.dim() - 2))))
            for n, d in deltas.items()
        },
        {n: 1.0 for n in deltas},
    )
    check_fits(denoiser, probe)
    modules = dict(denoiser.named_modules())
    for name, delta in deltas.items():
        weight = getattr(modules[name], "base_layer", modules[name]).weight
        weight.add_((scale * delta).to(dtype=weight.dtype, device=weight.device))
