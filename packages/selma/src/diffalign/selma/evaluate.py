"""Stage 5: per-skill evaluation of the base model, the experts, the mixed LoRA and the merged model.

Every model samples the same prompts with the same per-prompt noise (paired comparison): the shapes
world's held-out prompts and noise contract come from ``diffalign.core.shapes.evaluate``. Scores:
DSG-style faithfulness through core (``diffalign.core.shapes.faithfulness`` for the shapes world:
question dependencies, micro-average, per-skill), any registered reward (mean per skill), and FID in
the verifier's feature space where the world provides it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from diffalign.selma.images import to_pixels


@torch.no_grad()
def sample_images(
    pipe, records: Sequence[dict], *, seed: int = 0, batch_size: int = 16, call_kwargs: dict | None = None
) -> torch.Tensor:
    """Images for ``records`` as a [-1, 1] tensor [N,3,H,W], on core's evaluation path
    (``diffalign.core.shapes.evaluate.sample_images``): prompt ``i`` always gets noise generator ``i``."""
    from diffalign.core.shapes.evaluate import sample_images as sample_with_core_noise

    def sample(prompts, generators):
        out = pipe(prompt=prompts, generator=generators, output_type="pt", **(call_kwargs or {}))
        return to_pixels(out.images.cpu())

    texts = [r["text"] for r in records]
    return sample_with_core_noise(sample, texts, seed=seed, batch_size=batch_size, desc="eval-sample")


def score_images(
    images: torch.Tensor,
    records: Sequence[dict],
    *,
    faithfulness_fn: Callable | None = None,
    rewards: dict | None = None,
    fid_fn: Callable | None = None,
) -> dict:
    """Per-skill scores of already-sampled images. ``faithfulness_fn(images, prompts)`` returns an object
    with ``.overall`` (micro-average over questions); it is called once per skill and once on all."""
    prompts = [r["text"] for r in records]
    skills = sorted({r["skill"] for r in records})
    groups = {s: [i for i, r in enumerate(records) if r["skill"] == s] for s in skills}
    result: dict = {"n_images": len(records)}
    if faithfulness_fn is not None:
        per_skill = {}
        for s, idx in groups.items():
            res = faithfulness_fn(images[idx], [prompts[i] for i in idx])
            per_skill[s] = float(res.overall)
        overall = faithfulness_fn(images, prompts)
        result["faithfulness"] = {
            "overall": float(overall.overall),  # DSG-style: micro-average over all questions
            "skill_mean": sum(per_skill.values()) / len(per_skill),
            "per_skill": per_skill,
        }
        per_prompt = getattr(overall, "per_prompt", None)
        if per_prompt:  # TIFA-style: score of each caption, then the mean over captions
            result["faithfulness"]["caption_mean"] = float(sum(per_prompt) / len(per_prompt))
    for name, reward in (rewards or {}).items():
        imgs = images if getattr(reward, "input_range", "[-1,1]") != "pil" else _to_pil(images)
        vals = reward.score(imgs, prompts).float().cpu()
        result.setdefault("rewards", {})[name] = {
            "mean": float(vals.mean()),
            "per_skill": {s: float(vals[idx].mean()) for s, idx in groups.items()},
        }
    if fid_fn is not None:
        result["fid"] = float(fid_fn(images))
    return result


def _to_pil(images: torch.Tensor):
    from diffalign.core.report import to_pil

    return to_pil(images)


def shapes_faithfulness_fn():
    from diffalign.core import shapes

    return shapes.faithfulness


def shapes_fid_fn():
    from diffalign.core import shapes

    return shapes.fid


def results_table(results: dict[str, dict], skills: Sequence[str]) -> str:
    """Markdown table: one row per model, faithfulness per skill, mean, rewards and FID."""
    from diffalign.core.report import markdown_table

    rows = []
    for model, res in results.items():
        row: dict = {"model": model}
        f = res.get("faithfulness")
        if f:
            for s in skills:
                row[s] = 100 * f["per_skill"].get(s, float("nan"))
            row["mean"] = 100 * f["skill_mean"]
            row["overall"] = 100 * f["overall"]
        for name, r in res.get("rewards", {}).items():
            row[name] = r["mean"]
        if "fid" in res:
            row["fid"] = res["fid"]
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return markdown_table(rows, columns, digits=2)
