"""The SELMA recipe, stage by stage; each stage reads the previous one's files and resumes.

Run directory::

    run_dir/config.yaml                     resolved recipe
    run_dir/prompts/<skill>.jsonl           accepted prompts (+ <skill>.state.json while running)
    run_dir/images/                         imagefolder: metadata.jsonl, images/, shards/
    run_dir/experts/<skill>/                one LoRA per skill (pytorch_lora_weights.safetensors)
    run_dir/experts/_mixed/                 baseline: one LoRA on all skills' data
    run_dir/merged/<method>/lora/           the merge as one LoRA
    run_dir/merged/<method>/pipeline/       the merge fused into the base pipeline (save_pretrained)
    run_dir/eval/results.json, table.md     per-skill scores
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from diffalign.core.lora import load_lora
from diffalign.core.models import network_of
from diffalign.selma.config import SHAPES_SKILLS, SelmaConfig, SkillConfig
from diffalign.selma.images import generate_images, pipeline_call_kwargs, read_imagefolder
from diffalign.selma.lora import load_adapter
from diffalign.selma.merge import fuse_deltas, matched_norm_scales, merge_adapters, scale_deltas
from diffalign.selma.prompts import (
    HFBackend,
    OpenAIBackend,
    SkillSpec,
    TemplateBackend,
    generate_skill_prompts,
    read_prompts,
    shapes_skill,
)

MIXED = "_mixed"


def _dtype(name: str | None):
    return getattr(torch, name) if name else None


def load_model(source: str, dtype: str | None = None, device: str | None = None):
    from diffalign.core.models import load_pipeline

    return load_pipeline(source, dtype=_dtype(dtype), device=device)


# --------------------------------------------------------------------------------------------------
# 1. prompts
# --------------------------------------------------------------------------------------------------


def skill_spec(skill: SkillConfig, seed: int = 0) -> SkillSpec:
    if skill.name in SHAPES_SKILLS and not skill.seeds:
        base = shapes_skill(skill.name, seed=seed)
        return SkillSpec(
            name=skill.name,
            instruction=skill.instruction or base.instruction,
            seeds=base.seeds,
            max_words=skill.max_words,
            rules=tuple(skill.rules),
            template=skill.template,
        )
    from diffalign.selma.prompts import SHAPES_INSTRUCTIONS

    return SkillSpec(
        name=skill.name,
        instruction=skill.instruction or SHAPES_INSTRUCTIONS.get(skill.name, skill.name),
        seeds=tuple(skill.seeds),
        max_words=skill.max_words,
        rules=tuple(skill.rules),
        template=skill.template,
    )


def make_backend(cfg: SelmaConfig):
    p = cfg.prompts
    if p.backend == "template":
        return TemplateBackend()
    if p.backend == "hf":
        h = p.hf
        return HFBackend(
            h.model,
            max_new_tokens=h.max_new_tokens,
            temperature=h.temperature,
            top_p=h.top_p,
            device=h.device,
            dtype=h.dtype,
            trust_remote_code=h.trust_remote_code,
        )
    o = p.openai
    return OpenAIBackend(
        o.model,
        base_url=o.base_url,
        mode=o.mode,
        api_key_env=o.api_key_env,
        temperature=o.temperature,
        top_p=o.top_p,
        max_tokens=o.max_tokens,
        timeout_s=o.timeout_s,
    )


def stage_prompts(cfg: SelmaConfig, log: Callable = print) -> dict[str, int]:
    backend = make_backend(cfg)
    out = cfg.path("prompts")
    counts = {}
    for skill in cfg.skills:
        st = generate_skill_prompts(
            skill_spec(skill, cfg.seed),
            backend,
            cfg.prompts.n_per_skill,
            out,
            seed=cfg.seed,
            threshold=cfg.prompts.rouge_threshold,
            num_examples=cfg.prompts.num_examples,
            prompts_per_request=cfg.prompts.prompts_per_request,
            max_requests=cfg.prompts.max_requests,
            retries=cfg.prompts.retries,
            backoff_s=cfg.prompts.backoff_s,
            max_backoff_s=cfg.prompts.max_backoff_s,
            log=log,
        )
        counts[skill.name] = len(st.prompts)
        log(
            f"[selma] prompts[{skill.name}]: {len(st.prompts)} kept after {st.next_request} requests "
            f"({st.rejected_similar} too similar, {st.rejected_length} too long)"
        )
    return counts


# --------------------------------------------------------------------------------------------------
# 2. images
# --------------------------------------------------------------------------------------------------


def stage_images(cfg: SelmaConfig, pipe=None, log: Callable = print) -> Path | None:
    records = []
    for skill in cfg.skills:
        path = cfg.path("prompts", f"{skill.name}.jsonl")
        if not path.exists():
            raise FileNotFoundError(
                f"no prompts for skill {skill.name!r} at {path}: run the prompts stage first"
            )
        records += read_prompts(path)
    ic = cfg.images
    from diffalign.core.launch import check_process_count, process_state

    state = process_state()  # joins the other processes (gloo on a CPU) when launched with several
    check_process_count(state, cfg.launch)
    if pipe is None:
        device = ic.device or cfg.device or str(state.device)
        pipe = load_model(ic.generator or cfg.model, ic.dtype or cfg.dtype, device)
    reward = None
    if ic.reward_filter.enabled:
        from diffalign.core.rewards import get_reward

        reward = get_reward(ic.reward_filter.reward, **ic.reward_filter.kwargs)
    kwargs = pipeline_call_kwargs(pipe, ic.num_inference_steps, ic.guidance_scale, ic.height, ic.width)
    path = generate_images(
        pipe,
        records,
        cfg.path("images"),
        seed=cfg.seed,
        batch_size=ic.batch_size,
        images_per_prompt=ic.images_per_prompt,
        call_kwargs=kwargs,
        image_format=ic.image_format,
        reward=reward,
        reward_threshold=ic.reward_filter.threshold if ic.reward_filter.enabled else None,
    )
    if path is not None:
        log(f"[selma] images: {path}")
    return path


# --------------------------------------------------------------------------------------------------
# 3. experts
# --------------------------------------------------------------------------------------------------


def stage_train(
    cfg: SelmaConfig, skills: list[str] | None = None, mixed: bool = False, log: Callable = print
) -> list[Path]:
    from diffalign.selma.train import default_steps_for_mixed, train_lora

    names = [s.name for s in cfg.skills]
    todo = skills if skills is not None else names
    unknown = [s for s in todo if s not in names and s != MIXED]
    if unknown:
        raise ValueError(f"unknown skills {unknown}; the recipe's skills are {names}")
    outs = []
    for skill in todo:
        recs = read_imagefolder(cfg.path("images"), [skill])
        pipe = load_model(cfg.model, cfg.dtype, cfg.train.device or cfg.device)
        outs.append(
            train_lora(
                pipe,
                recs,
                cfg.path("experts", skill),
                cfg.train,
                cfg.launch,
                seed=cfg.seed,
                base_model=cfg.model,
                skill=skill,
                log=log,
            )
        )
    if mixed:
        recs = read_imagefolder(cfg.path("images"), names)
        steps = cfg.train.mixed_steps or default_steps_for_mixed(cfg.train.steps, len(names))
        pipe = load_model(cfg.model, cfg.dtype, cfg.train.device or cfg.device)
        outs.append(
            train_lora(
                pipe,
                recs,
                cfg.path("experts", MIXED),
                cfg.train,
                cfg.launch,
                seed=cfg.seed,
                steps=steps,
                base_model=cfg.model,
                skill="all",
                log=log,
            )
        )
    return outs


# --------------------------------------------------------------------------------------------------
# 4. merge
# --------------------------------------------------------------------------------------------------


def expert_dir(cfg: SelmaConfig, name: str) -> Path:
    step = cfg.merge.expert_step
    base = cfg.path("experts", name)
    return base if step is None or step == cfg.train.steps else base / f"checkpoint-{step}"


def merged_result(cfg: SelmaConfig, method: str | None = None, experts: list[str] | None = None):
    names = experts or cfg.merge.experts or [s.name for s in cfg.skills]
    adapters = []
    for name in names:
        path = expert_dir(cfg, name)
        try:
            adapters.append(load_adapter(path))
        except Exception as err:
            raise FileNotFoundError(f"expert {name!r}: {err} (run the train stage first)") from err
    m = cfg.merge
    return merge_adapters(
        adapters,
        names,
        method=method or m.method,
        weights=m.weights,
        density=m.density,
        majority=m.majority,
        ties_scale=m.ties_scale,
        svd_rank=m.svd_rank,
        seed=m.seed,
    )


def matched_mixed_deltas(cfg: SelmaConfig, method: str | None = None) -> tuple[dict, float]:
    """The mixed LoRA's weight updates scaled globally to the Frobenius norm of the merged experts'
    updates (:func:`~diffalign.selma.merge.matched_norm_scales`), and that scale."""
    mixed = load_adapter(cfg.path("experts", MIXED)).deltas()
    merged = merged_result(cfg, method).deltas
    scales = matched_norm_scales(mixed, merged)
    return scale_deltas(mixed, scales), next(iter(scales.values()), 0.0)


def stage_merge(cfg: SelmaConfig, method: str | None = None, log: Callable = print) -> dict:
    from diffalign.core.report import write_json
    from diffalign.selma.lora import save_adapter

    res = merged_result(cfg, method)
    out = cfg.path("merged", res.method)
    out.mkdir(parents=True, exist_ok=True)
    report = res.report()
    for note in res.notes:
        log(f"[selma] merge note: {note}")
    if cfg.merge.export in ("lora", "both"):
        if res.method in ("linear", "cat", "svd") or cfg.merge.svd_rank is not None:
            svd_rank = cfg.merge.svd_rank if res.method not in ("linear", "cat") else None
            adapter, err = res.as_lora(svd_rank)
            save_adapter(adapter, out / "lora")
            report["lora"] = {
                "path": str(out / "lora"),
                "relative_error": err,
                "rank": max(adapter.ranks().values()),
            }
        else:
            report["lora"] = {
                "skipped": f"a {res.method} merge is not low-rank; set merge.svd_rank to export it as a LoRA"
            }
            log(f"[selma] {report['lora']['skipped']}")
    if cfg.merge.export in ("fused", "both"):
        pipe = load_model(cfg.model, cfg.dtype, cfg.device)
        fuse_deltas(network_of(pipe), res.deltas)
        target = out / "pipeline"
        tmp = out / "pipeline.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        report["pipeline"] = str(target)
    write_json(report, out / "merge.json")
    log(f"[selma] merged {res.experts} with {res.method} -> {out}")
    return report


# --------------------------------------------------------------------------------------------------
# 5. eval
# --------------------------------------------------------------------------------------------------


def build_model(cfg: SelmaConfig, which: str, base_factory: Callable | None = None):
    """A pipeline for ``base``, ``expert:<skill>``, ``mixed``, ``mixed:matched[:<method>]`` (the mixed LoRA
    at the merge's update size) or ``merged[:<method>]`` (fused in memory)."""
    pipe = base_factory() if base_factory else load_model(cfg.model, cfg.dtype, cfg.device)
    if which == "base":
        return pipe
    if which.startswith("expert:"):
        load_lora(pipe, expert_dir(cfg, which.split(":", 1)[1]), adapter_name="expert")
        return pipe
    if which == "mixed":
        load_lora(pipe, cfg.path("experts", MIXED), adapter_name="mixed")
        return pipe
    if which.startswith("mixed:matched"):
        # the mixed LoRA's update scaled to the Frobenius norm of the merge's (global: one scale)
        method = which.split(":", 2)[2] if which.count(":") == 2 else None
        fuse_deltas(network_of(pipe), matched_mixed_deltas(cfg, method)[0])
        return pipe
    if which.startswith("merged"):
        method = which.split(":", 1)[1] if ":" in which else None
        fuse_deltas(network_of(pipe), merged_result(cfg, method).deltas)
        return pipe
    raise ValueError(f"unknown model {which!r}")


def eval_records(cfg: SelmaConfig) -> list[dict]:
    """``eval.prompts`` if given, else core's held-out shapes prompts of the configured skills."""
    from diffalign.core.shapes import SKILLS
    from diffalign.core.shapes.evaluate import heldout_records

    if cfg.eval.prompts:
        return read_prompts(cfg.eval.prompts)
    skills = [s.name for s in cfg.skills]
    for skill in skills:
        if skill not in SKILLS:
            raise ValueError(
                f"skill {skill!r} is not a shapes-world skill: give eval.prompts (a .jsonl of prompts)"
            )
    return heldout_records(cfg.eval.n_per_skill, skills, cfg.eval.prompt_seed)


def stage_eval(
    cfg: SelmaConfig,
    models: list[str] | None = None,
    base_factory: Callable | None = None,
    faithfulness_fn: Callable | None = None,
    fid_fn: Callable | None = None,
    log: Callable = print,
) -> dict:
    from diffalign.core.report import save_image_grid, write_json
    from diffalign.selma.evaluate import results_table, sample_images, score_images, shapes_faithfulness_fn

    records = eval_records(cfg)
    e = cfg.eval
    if faithfulness_fn is None and e.faithfulness == "shapes":
        faithfulness_fn = shapes_faithfulness_fn()
    rewards = {}
    if e.rewards:
        from diffalign.core.rewards import get_reward

        rewards = {name: get_reward(name, **e.reward_kwargs.get(name, {})) for name in e.rewards}
    wanted = models or _expand_models(cfg, e.models)
    results = {}
    out = cfg.path("eval")
    for which in wanted:
        pipe = build_model(cfg, which, base_factory)
        kwargs = pipeline_call_kwargs(pipe, e.num_inference_steps, e.guidance_scale, e.height, e.width)
        images = sample_images(pipe, records, seed=e.seed, batch_size=e.batch_size, call_kwargs=kwargs)
        results[which] = score_images(
            images, records, faithfulness_fn=faithfulness_fn, rewards=rewards, fid_fn=fid_fn
        )
        if e.save_grids:
            save_image_grid(images[:16], out / f"{which.replace(':', '_')}.png", nrow=4)
        log(f"[selma] eval {which}: {results[which].get('faithfulness', {}).get('skill_mean')}")
    skills = sorted({r["skill"] for r in records})
    table = results_table(results, skills)
    write_json({"models": results, "skills": skills, "n_prompts": len(records)}, out / "results.json")
    (out / "table.md").write_text(table, encoding="utf-8")
    log(table)
    return results


def _expand_models(cfg: SelmaConfig, kinds) -> list[str]:
    out = []
    for k in kinds:
        if k == "experts":
            out += [f"expert:{s.name}" for s in cfg.skills]
        elif k == "merged":
            out.append(f"merged:{cfg.merge.method}")
        elif k == "mixed_matched":
            out.append(f"mixed:matched:{cfg.merge.method}")
        else:
            out.append(k)
    return out


def run_all(cfg: SelmaConfig, log: Callable = print) -> dict | None:
    """Every stage in order. Launched with several processes, images and training are shared among them
    and prompts, merge and evaluation run on the main process (the others wait); returns the evaluation
    results on the main process."""
    from diffalign.core.config import save_config
    from diffalign.core.launch import process_state

    state = process_state()
    if state.is_main_process:
        save_config(cfg, cfg.run_dir)
        stage_prompts(cfg, log)
    state.wait_for_everyone()
    stage_images(cfg, log=log)
    stage_train(cfg, mixed=bool({"mixed", "mixed_matched"} & set(cfg.eval.models)), log=log)
    results = None
    if state.is_main_process:
        stage_merge(cfg, log=log)
        results = stage_eval(cfg, log=log)
    state.wait_for_everyone()
    return results
