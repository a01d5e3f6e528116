"""Stage 3: one LoRA expert per skill (SELMA section 3.2).

The loop is diffusers' text-to-image LoRA fine-tuning, as SELMA uses it: frozen VAE and text encoders,
LoRA (peft) on the denoiser's attention projections, the plain diffusion MSE, AdamW with a constant
learning rate. It runs under core's accelerator (DDP or DeepSpeed from the recipe's ``launch``
section), checkpoints atomically every ``checkpoint_every`` steps and resumes exactly: the data order,
the noise and the timesteps of step ``s`` depend only on (seed, s, micro-step, process), never on what
ran before.

Supported denoisers: SD-style UNets (``StableDiffusionPipeline``), SDXL UNets (text and time
embeddings) and PixArt transformers (learned-sigma output, attention masks).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from diffalign.core.denoisers import Denoiser, denoiser_for, prediction_target
from diffalign.core.lora import add_lora, component_of, default_targets, make_lora_config
from diffalign.core.models import detect_family
from diffalign.selma.images import ImageTextDataset
from diffalign.selma.lora import LoraAdapter, adapter_from_model, save_adapter
from diffalign.selma.losses import diffusion_loss, drop_captions, loss_weights

FAMILIES = ("sd", "sdxl", "pixart")  # DDPM-family pipelines (the plain diffusion loss on integer timesteps)


def _micro_batch_seed(seed: int, micro_batch: int) -> int:
    """Seed of the noise, timesteps, crops and caption dropout of global micro-batch ``micro_batch``.

    Micro-batch ``(step * accumulation + micro) * processes + rank`` is drawn the same way however the
    global batch is laid out, so N processes train like one process accumulating N micro-batches."""
    return int(hashlib.sha256(f"selma-train:{seed}:{micro_batch}:0:0".encode()).hexdigest()[:15], 16)


def init_seed(seed: int) -> int:
    """The torch seed of the LoRA initialisation of a run seeded ``seed``."""
    return int(hashlib.sha256(f"selma-lora-init:{seed}".encode()).hexdigest()[:15], 16)


def batch_indices(seed: int, counter: int, batch_size: int, n: int) -> list[int]:
    """Indices ``counter .. counter+batch_size-1`` of an endless stream of seeded epoch permutations."""
    out = []
    cache: dict[int, torch.Tensor] = {}
    for c in range(counter, counter + batch_size):
        epoch, pos = divmod(c, n)
        if epoch not in cache:
            cache[epoch] = torch.randperm(
                n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            )
        out.append(int(cache[epoch][pos]))
    return out


# --------------------------------------------------------------------------------------------------
# The denoiser call
# --------------------------------------------------------------------------------------------------


def expert_denoiser(pipe, resolution: int | None = None) -> Denoiser:
    """Core's denoiser of ``pipe``; refuses families SELMA's trainer does not cover."""
    den = denoiser_for(pipe, resolution)
    if den.family not in FAMILIES:
        raise ValueError(
            f"SELMA expert training supports Stable Diffusion, SDXL and PixArt pipelines, not "
            f"{type(pipe).__name__} (a {den.family} pipeline)"
        )
    return den


def denoise(
    den: Denoiser, model, latents, timesteps, prompts, crops: torch.Tensor | None = None
) -> torch.Tensor:
    """The trained network's output for ``prompts`` (no guidance); SDXL gets the images' own size and
    crop conditioning ``crops`` ``[B, (orig_h, orig_w, top, left)]``, as SDXL was trained."""
    latents = latents.to(den.dtype)
    if den.family == "sdxl":
        size = latents.shape[-1] * den.vae_scale_factor
        cond = den.encode(prompts, guidance=False, crops=crops, target_size=size)
    else:
        cond = den.encode(prompts, guidance=False)
    return den.forward(model, latents, timesteps, cond.cond)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def train_lora(
    pipe,
    records: Sequence[dict],
    out_dir: str | Path,
    tcfg,
    launch=None,
    *,
    seed: int = 0,
    steps: int | None = None,
    base_model: str | None = None,
    skill: str | None = None,
    log=print,
) -> Path:
    """Train (or resume) one LoRA on ``records`` (imagefolder records with ``path`` and ``text``).

    Writes checkpoints to ``out_dir/checkpoints`` and the final adapter to ``out_dir`` (diffusers LoRA
    layout); returns ``out_dir``. ``tcfg`` is a :class:`~diffalign.selma.config.TrainConfig`.
    """
    from diffusers.optimization import get_scheduler

    from diffalign.core.checkpoints import StateCheckpoints
    from diffalign.core.launch import LaunchConfig, check_process_count, make_accelerator
    from diffalign.core.monitor import StepLogger
    from diffalign.core.rundir import MetricsLog
    from diffalign.core.training import check_finite, finish_trackers, make_tracker

    out_dir = Path(out_dir)
    steps = steps or tcfg.steps
    if not records:
        raise ValueError("no training images")
    done_file = out_dir / "pytorch_lora_weights.safetensors"
    meta_file = out_dir / "selma_adapter.json"
    if done_file.exists() and meta_file.exists():
        import json

        meta = json.loads(meta_file.read_text())
        if meta.get("steps") == steps and meta.get("complete") and meta.get("rank") == tcfg.rank:
            log(f"[selma] {out_dir} already holds a finished adapter ({steps} steps); skipping")
            return out_dir
    accelerator = make_accelerator(launch, out_dir)
    check_process_count(accelerator, launch or LaunchConfig())
    device = accelerator.device
    pipe.to(device)
    for comp in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, comp, None)
        if module is not None:
            module.requires_grad_(False)
            if tcfg.dtype:
                module.to(dtype=getattr(torch, tcfg.dtype))
    den = expert_denoiser(pipe, tcfg.resolution)
    denoiser = den.model
    targets = tcfg.targets or default_targets(den.family)
    lcfg = make_lora_config(tcfg.rank, tcfg.alpha, targets, tcfg.init)
    # the LoRA initialisation depends on the run's seed only, not on what used the global RNG before
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed(seed))
        add_lora(denoiser, lcfg)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    for p in params:  # LoRA weights train in float32 even when the frozen model is half precision
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(
        params,
        lr=tcfg.lr,
        betas=(tcfg.adam_beta1, tcfg.adam_beta2),
        weight_decay=tcfg.weight_decay,
        eps=tcfg.adam_epsilon,
    )
    # accelerate steps a prepared scheduler once per process at each optimizer step (as in diffusers' scripts)
    n_proc = accelerator.num_processes
    lr_sched = get_scheduler(
        tcfg.lr_scheduler,
        optimizer,
        num_warmup_steps=tcfg.warmup_steps * n_proc,
        num_training_steps=steps * n_proc,
    )
    denoiser_p, optimizer, lr_sched = accelerator.prepare(denoiser, optimizer, lr_sched)
    accum = accelerator.gradient_accumulation_steps
    dataset = ImageTextDataset(records, tcfg.resolution, tcfg.center_crop, tcfg.random_flip)
    schedule, prediction_type = den.schedule, den.prediction_type
    n_train_t = schedule.num_train_timesteps
    weighting = getattr(tcfg, "loss_weighting", "none")
    dropout = getattr(tcfg, "caption_dropout", 0.0)
    if weighting == "teacher" and prediction_type != "v_prediction":
        raise ValueError(
            "train.loss_weighting 'teacher' is the shapes teachers' weighting of a v-prediction loss; "
            f"this model predicts {prediction_type!r}: use loss_weighting 'none'"
        )

    # accelerate's save_state/load_state: the LoRA model, the optimizer (every ZeRO partition), the LR
    # schedule and the RNG states of every rank, atomically and verified
    ckpt = StateCheckpoints(accelerator, out_dir, keep_last=tcfg.keep_checkpoints)
    start = 0
    latest = ckpt.latest_step()
    if latest is not None:
        shape = ckpt.extra(latest)
        if shape.get("rank") != tcfg.rank or shape.get("total_steps") != steps:
            raise ValueError(
                f"checkpoint in {ckpt.dir} was made with rank {shape.get('rank')} / {shape.get('total_steps')} "
                f"steps, the recipe asks for rank {tcfg.rank} / {steps} steps: use another run directory"
            )
        ckpt.load(latest)
        start = latest
        log(f"[selma] resuming {out_dir.name} from step {start}")
    rank, world = accelerator.process_index, accelerator.num_processes
    track = make_tracker(
        accelerator, out_dir, project=f"selma-{skill or out_dir.name}", config=tcfg.model_dump()
    )
    metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    metrics.truncate(start)  # rows logged after the checkpoint would be logged again
    bar = StepLogger(steps, log_every=tcfg.log_every, desc=f"train[{skill or out_dir.name}]", initial=start)
    denoiser_p.train()
    last_loss = float("nan")
    history: list[dict] = []
    for step in range(start, steps):
        for micro in range(accum):
            micro_batch = (step * accum + micro) * world + rank
            gen = torch.Generator().manual_seed(_micro_batch_seed(seed, micro_batch))
            counter = micro_batch * tcfg.batch_size
            idx = batch_indices(seed, counter, tcfg.batch_size, len(dataset))
            items = [dataset.load(i, gen) for i in idx]
            pixels = torch.stack([it[0] for it in items])
            prompts = drop_captions([it[1] for it in items], dropout, gen)
            crops = torch.tensor([[it[2][0], it[2][1], it[2][2], it[2][3]] for it in items])
            with accelerator.accumulate(denoiser_p):
                latents = den.encode_images(pixels, gen).float()
                noise = torch.randn(latents.shape, generator=gen).to(latents.device)
                t = torch.randint(0, n_train_t, (latents.shape[0],), generator=gen).to(latents.device)
                xt = schedule.add_noise(latents, noise, t)
                alpha, sigma = schedule.alpha_sigma(t, latents)
                target = prediction_target(latents, noise, alpha, sigma, prediction_type)
                with accelerator.autocast():
                    pred = denoise(den, denoiser_p, xt, t, prompts, crops)
                weights = loss_weights(schedule.alphas_cumprod, t, weighting, getattr(tcfg, "snr_clamp", 5.0))
                loss = diffusion_loss(pred, target, None if weights is None else weights.to(latents.device))
                check_finite(loss, step, "selma lora loss")
                accelerator.backward(loss)
                if accelerator.sync_gradients and tcfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, tcfg.max_grad_norm)
                optimizer.step()
                lr_sched.step()
                optimizer.zero_grad(set_to_none=True)
            last_loss = float(loss.detach())
        done = step + 1
        if done % tcfg.log_every == 0 or done == steps:
            history.append({"step": done, "loss": last_loss})
            metrics.append(done, {"loss": last_loss, "lr": lr_sched.get_last_lr()[0]})
            track({"loss": last_loss}, done)
        bar.step(done, {"loss": last_loss})
        if done % tcfg.checkpoint_every == 0 or done == steps:
            ckpt.save(done, {"rank": tcfg.rank, "total_steps": steps})
        if done in tcfg.adapter_steps and accelerator.is_main_process:
            _export(
                accelerator.unwrap_model(denoiser_p),
                lcfg,
                pipe,
                out_dir / f"checkpoint-{done}",
                base_model,
                skill,
                done,
                steps,
                len(records),
                partial=True,
            )
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _export(
            accelerator.unwrap_model(denoiser_p),
            lcfg,
            pipe,
            out_dir,
            base_model,
            skill,
            steps,
            steps,
            len(records),
            history=history,
        )
    accelerator.wait_for_everyone()
    finish_trackers(accelerator)
    accelerator.free_memory()
    return out_dir


def _export(
    denoiser, lcfg, pipe, out_dir, base_model, skill, step, steps, n_images, partial=False, history=None
) -> LoraAdapter:
    prefix = component_of(detect_family(pipe))
    adapter = adapter_from_model(denoiser, lcfg, prefix=prefix, base_model=base_model)
    extra = {
        "skill": skill,
        "steps": steps,
        "step": step,
        "complete": not partial,
        "num_images": n_images,
        "targets": sorted(lcfg.target_modules),
        "loss_history": history or [],
    }
    save_adapter(adapter, out_dir, extra)
    return adapter


def trainable_parameter_names(denoiser) -> list[str]:
    return [n for n, p in denoiser.named_parameters() if p.requires_grad]


def default_steps_for_mixed(per_expert_steps: int, n_skills: int) -> int:
    """The mixed-data baseline gets the experts' total budget (same total steps)."""
    return int(math.ceil(per_expert_steps * n_skills))
