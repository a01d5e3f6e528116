"""The MLCM recipe: stage 1 (MLCD) -> stage 2 (inter-segment consistency) -> optional reward learning.

Reads like v6 Sec. 4 of arXiv 2406.05768: every iteration draws prompts only; training states come from the
guided teacher's own DDIM trajectories. The student is a LoRA on the teacher (teacher = adapters disabled)
or a full copy. Runs single-process, DDP or DeepSpeed through core's ``make_accelerator``; checkpoints
atomically every ``checkpoint.every`` iterations and resumes from the latest one. Every random draw of
iteration ``i`` on rank ``r`` of ``N`` comes from a generator seeded by ``(seed, i * N + r)``, so a resumed
run retraces an uninterrupted one and N processes draw what one process accumulating N micro-batches draws.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffalign.core.checkpoints import StateCheckpoints
from diffalign.core.config import save_config
from diffalign.core.denoisers import adapters_disabled, denoiser_for
from diffalign.core.factory import load_factory
from diffalign.core.launch import check_process_count, make_accelerator
from diffalign.core.lora import add_lora, default_targets, make_lora_config, save_lora
from diffalign.core.monitor import StepLogger
from diffalign.core.rundir import MetricsLog
from diffalign.core.training import EMA, check_finite, finish_trackers, make_tracker, seed_everything

from .config import MLCMRecipe
from .distill import (
    draw_segment_pairs,
    inter_segment_loss,
    mlcd_loss,
    renoised_x0_prediction,
    student_sample,
    teacher_states,
)
from .losses import direct_reward_loss, hinge_reward_loss
from .schedule import milestone_grid, sampling_timesteps
from .scheduler import MLCMScheduler

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
from .inference import STUDENT_FILE  # noqa: E402

FAMILIES = ("sd", "sdxl", "pixart")  # DDPM-family pipelines (the milestone grid is on integer timesteps)


@dataclass
class Phase:
    stage: str  # "stage1" | "stage2" | "reward"
    start: int
    end: int
    num_segments: int
    lr: float

    @property
    def key(self) -> str:
        return f"{self.stage}:{self.num_segments}"


@dataclass
class TrainResult:
    run_dir: Path
    student_dir: Path
    steps: int
    losses: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0


def plan_phases(cfg: MLCMRecipe) -> list[Phase]:
    """Consecutive iteration ranges: stage-1 phases (one per segment count), stage 2, reward."""
    phases, step = [], 0
    seg_phases = cfg.stage1.phases()
    if cfg.stage1.iterations:
        base, extra = divmod(cfg.stage1.iterations, len(seg_phases))
        for i, m in enumerate(seg_phases):
            n = base + (1 if i < extra else 0)
            phases.append(Phase("stage1", step, step + n, m, cfg.stage1.lr))
            step += n
    if cfg.stage2.iterations:
        phases.append(
            Phase("stage2", step, step + cfg.stage2.iterations, cfg.stage2.num_segments, cfg.stage2.lr)
        )
        step += cfg.stage2.iterations
    if cfg.reward_iterations():
        phases.append(
            Phase("reward", step, step + cfg.reward.iterations, cfg.stage2.num_segments, cfg.reward.lr)
        )
    return phases


def build_prompts(cfg: MLCMRecipe) -> list[str]:
    if cfg.data.prompts_file:
        path = Path(cfg.data.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"data.prompts_file not found: {path}")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"data.prompts_file {path} contains no prompts")
        return prompts
    from diffalign.core.shapes import sample_prompts

    prompts: list[str] = []
    for i, skill in enumerate(cfg.data.shapes_skills):
        prompts += sample_prompts(skill, cfg.data.shapes_prompts_per_skill, split="train", seed=cfg.seed + i)
    return prompts


def load_hook(spec: str | None):
    """``"module:factory"`` -> ``factory()``: the latent perceptual feature callable (or None)."""
    if not spec:
        return None
    return load_factory(spec, "distill.perceptual")()


class Distiller:
    """Holds the teacher, student and denoiser adapter; computes the loss of one iteration."""

    def __init__(self, cfg: MLCMRecipe, pipe, reward=None, device=None):
        self.cfg = cfg
        self.pipe = pipe
        for name in ("vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False)
        self.den = denoiser_for(pipe, cfg.model.resolution, cfg.model.max_sequence_length)
        if self.den.family not in FAMILIES:
            raise ValueError(
                f"MLCM distils DDPM-family pipelines ({', '.join(FAMILIES)}); got a {self.den.family} pipeline"
            )
        self.model = self.den.model
        self.lora = cfg.student.mode == "lora"
        self.target_model = None
        self.target_ema = None
        if self.lora:
            # zero-initialised B (gaussian A): the student starts as the teacher
            targets = cfg.student.lora_targets or default_targets(self.den.family, "full")
            config = make_lora_config(cfg.student.lora_rank, cfg.student.lora_alpha, targets, "gaussian")
            add_lora(self.model, config)
            self.teacher_model = self.model
        else:
            self.teacher_model = copy.deepcopy(self.model).requires_grad_(False).eval()
            self.model.requires_grad_(True)
            if cfg.student.ema_decay is not None:
                self.target_model = copy.deepcopy(self.model).requires_grad_(False)
                self.target_ema = EMA(
                    self.model, cfg.student.ema_decay, warmup=False, target=self.target_model
                )
        self.model.train()
        self.reward = reward
        self.features = load_hook(cfg.distill.perceptual)
        self.student = self.model  # replaced by the accelerate-prepared module

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    # -- model functions -----------------------------------------------------------------------------
    def teacher_fn(self, cond):
        w = self.cfg.distill.guidance_scale
        if self.lora:
            return self.den.guided_fn(self.student, cond, w, context=lambda: adapters_disabled(self.model))
        return self.den.guided_fn(self.teacher_model, cond, w)

    def student_fn(self, cond):
        return self.den.model_fn(self.student, cond.cond)

    def target_fn(self, cond):
        return None if self.target_model is None else self.den.model_fn(self.target_model, cond.cond)

    # -- losses --------------------------------------------------------------------------------------
    def _noise(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(self.den.latent_shape(batch), generator=gen).to(self.den.device, self.den.dtype)

    def stage1_loss(self, prompts: list[str], num_segments: int, gen: torch.Generator) -> dict:
        c, s1 = self.cfg, self.cfg.stage1
        cond = self.den.encode(prompts, c.data.negative_prompt)
        milestones = milestone_grid(num_segments, self.den.schedule.num_train_timesteps)
        pairs = draw_segment_pairs(
            len(prompts), milestones, s1.skip, gen, s1.segment_sampling == "per_sample", self.den.device
        )
        teacher = self.teacher_fn(cond)
        z_upper = teacher_states(
            teacher, self._noise(len(prompts), gen), pairs.t_upper, self.den.schedule, self.den.prediction_type,
            s1.trajectory, s1.mds_reference_segments or num_segments,
        )  # fmt: skip
        out = mlcd_loss(
            self.student_fn(cond), teacher, z_upper, pairs, self.den.schedule, self.den.prediction_type,
            c.distill.loss, c.distill.huber_c, self.target_fn(cond), self.features, c.distill.perceptual_weight,
        )  # fmt: skip
        return {"loss": out.loss, "mlcd": out.loss.detach()}

    def _student_x0(self, cond, batch: int, steps: int, sampler: str, gen) -> torch.Tensor:
        ts = sampling_timesteps(steps, self.cfg.stage2.num_segments, self.den.schedule.num_train_timesteps)
        with torch.no_grad():
            return student_sample(
                self.student_fn(cond), self._noise(batch, gen), ts, self.den.schedule, self.den.prediction_type,
                sampler, gen,
            )  # fmt: skip

    def stage2_loss(self, prompts: list[str], num_segments: int, gen: torch.Generator) -> dict:
        c, s2 = self.cfg, self.cfg.stage2
        cond = self.den.encode(prompts, c.data.negative_prompt)
        x0_hat = self._student_x0(cond, len(prompts), s2.sample_steps, s2.sampler, gen)
        out = inter_segment_loss(
            self.student_fn(cond), self.teacher_fn(cond), x0_hat,
            milestone_grid(num_segments, self.den.schedule.num_train_timesteps), self.den.schedule,
            self.den.prediction_type, s2.teacher_substeps, c.distill.loss, c.distill.huber_c, gen,
        )  # fmt: skip
        return {"loss": out.loss, "inter_segment": out.loss.detach()}

    def reward_loss(self, prompts: list[str], num_segments: int, gen: torch.Generator) -> dict:
        c, r = self.cfg, self.cfg.reward
        cond = self.den.encode(prompts, c.data.negative_prompt)
        x0_hat = self._student_x0(cond, len(prompts), r.sample_steps, c.stage2.sampler, gen)
        milestones = milestone_grid(num_segments, self.den.schedule.num_train_timesteps)
        x0 = renoised_x0_prediction(
            self.student_fn(cond), x0_hat, milestones, self.den.schedule, self.den.prediction_type, gen
        )
        images = self.den.decode(x0)
        score = self.reward.score(images, prompts)
        if r.loss == "hinge":
            neg = self.reward.score(images, [r.negative_prompt] * len(prompts)) if r.negative_prompt else None
            reward_term = hinge_reward_loss(score, r.margin, neg)
        else:
            reward_term = direct_reward_loss(score)
        loss = r.weight * reward_term
        logs = {"reward": score.detach().mean(), "reward_loss": reward_term.detach()}
        if r.consistency_weight > 0:
            out = inter_segment_loss(
                self.student_fn(cond), self.teacher_fn(cond), x0_hat, milestones, self.den.schedule,
                self.den.prediction_type, c.stage2.teacher_substeps, c.distill.loss, c.distill.huber_c, gen,
            )  # fmt: skip
            loss = loss + r.consistency_weight * out.loss
            logs["inter_segment"] = out.loss.detach()
        logs["loss"] = loss
        return logs

    def loss(self, phase: Phase, prompts: list[str], gen: torch.Generator) -> dict:
        fn = {"stage1": self.stage1_loss, "stage2": self.stage2_loss, "reward": self.reward_loss}[phase.stage]
        return fn(prompts, phase.num_segments, gen)

    @torch.no_grad()
    def update_target(self) -> None:
        if self.target_ema is not None:
            self.target_ema.update(self.model)  # fixed decay, averaged in place into target_model


def resolve_reward(cfg: MLCMRecipe):
    if not cfg.reward.name:
        return None
    from diffalign.core.rewards import get_reward

    reward = get_reward(cfg.reward.name, **cfg.reward.kwargs)
    if not reward.differentiable:
        raise ValueError(
            f"reward {cfg.reward.name!r} is not differentiable; MLCM reward learning needs gradients"
        )
    if reward.input_range != "[-1,1]":
        raise ValueError(
            f"reward {cfg.reward.name!r} takes {reward.input_range!r}; MLCM needs '[-1,1]' tensors"
        )
    return reward


def exported_segments(cfg: MLCMRecipe) -> int:
    """Segments of the student's last training phase: the milestone grid it was last trained on."""
    return plan_phases(cfg)[-1].num_segments


def export_student(distiller: Distiller, out_dir: Path, source: str) -> Path:
    """Write the student: a LoRA in diffusers' layout (``pipe.load_lora_weights`` reads it; PixArt through
    ``diffalign.core.lora.load_lora``) or a full student as a ``from_pretrained`` folder. The MLCM
    scheduler config goes to ``out_dir/scheduler``, with the segments of the last training phase and the
    recipe's sampler (``stage2.sampler``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, den = distiller.model, distiller.den
    if distiller.lora:
        save_lora(out_dir, model, den.family)
    else:
        model.save_pretrained(out_dir / den.component, safe_serialization=True)
    sched = MLCMScheduler.from_config(
        distiller.pipe.scheduler.config,
        num_segments=exported_segments(distiller.cfg),
        sampler=distiller.cfg.stage2.sampler,
    )
    sched.save_pretrained(out_dir / "scheduler")
    meta = {"base": source, "mode": distiller.cfg.student.mode, "architecture": den.family}
    (out_dir / STUDENT_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out_dir


def _step_generator(seed: int, micro_batch: int) -> torch.Generator:
    """The generator of global micro-batch ``micro_batch`` (``step * processes + rank``): N processes draw
    what one process accumulating N micro-batches per optimizer step draws."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_batch) * 131)


def train(cfg: MLCMRecipe, pipe=None, reward=None, max_steps: int | None = None) -> TrainResult:
    """Run (or resume) the recipe. ``pipe`` overrides loading ``cfg.model.source`` (tests pass tiny ones);
    ``max_steps`` stops early after that many total iterations (used to simulate interruption)."""
    t_start = time.time()
    run_dir = Path(cfg.run_dir)
    seed_everything(cfg.seed)
    reward = reward if reward is not None else resolve_reward(cfg)
    prompts = build_prompts(cfg)
    accelerator = make_accelerator(cfg.launch, run_dir)
    check_process_count(accelerator, cfg.launch)
    if pipe is None:
        from diffalign.core.models import load_pipeline

        pipe = load_pipeline(cfg.model.source, dtype=DTYPES[cfg.model.dtype])
    pipe.to(accelerator.device)
    distiller = Distiller(cfg, pipe, reward)
    params = distiller.trainable_parameters()
    optimizer = torch.optim.AdamW(
        list(params.values()), lr=cfg.stage1.lr, weight_decay=cfg.distill.weight_decay
    )
    distiller.student, optimizer = accelerator.prepare(distiller.model, optimizer)
    if distiller.target_model is not None:
        accelerator.register_for_checkpointing(distiller.target_model)

    phases = plan_phases(cfg)
    total = phases[-1].end
    # accelerate's save_state/load_state: the student, the optimizer (every ZeRO partition), the EMA
    # target and the RNG states of every rank, atomically and verified
    ckpt = StateCheckpoints(accelerator, run_dir, keep_last=cfg.checkpoint.keep_last)
    step, current_key = 0, None
    state = ckpt.load_latest()
    if state is not None:
        step, extra = state
        current_key = extra["phase"]
    if accelerator.is_main_process:
        save_config(cfg, run_dir)
    log = make_tracker(accelerator, run_dir, project="mlcm", config=cfg.model_dump(mode="json"))
    history: list[dict] = []
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    # rows logged after the checkpoint we resume from would be logged again: cut them
    metrics.truncate(step)

    def save(step_done: int, phase: Phase) -> None:
        ckpt.save(step_done, {"phase": phase.key})

    stop = total if max_steps is None else min(total, max_steps)
    bar = StepLogger(total, log_every=cfg.log_every, desc="mlcm distill", initial=step)
    batch = cfg.distill.batch_size
    while step < stop:
        phase = next(p for p in phases if p.start <= step < p.end)
        if phase.key != current_key:
            for group in optimizer.param_groups:
                group["lr"] = phase.lr
            inner = getattr(optimizer, "optimizer", optimizer)
            if current_key is not None and isinstance(inner, torch.optim.Optimizer):
                inner.state.clear()  # a fresh optimizer per stage, as separate training runs would have
            current_key = phase.key
        for group in optimizer.param_groups:
            group["lr"] = phase.lr
        gen = _step_generator(cfg.seed, step * accelerator.num_processes + accelerator.process_index)
        bsz = (cfg.reward.batch_size or batch) if phase.stage == "reward" else batch
        idx = torch.randint(0, len(prompts), (bsz,), generator=gen)
        batch_prompts = [prompts[i] for i in idx.tolist()]
        with accelerator.accumulate(distiller.student), accelerator.autocast():
            logs = distiller.loss(phase, batch_prompts, gen)
            check_finite(logs["loss"], step, f"{phase.stage} loss")
            accelerator.backward(logs["loss"])
            if accelerator.sync_gradients and cfg.distill.max_grad_norm:
                accelerator.clip_grad_norm_(list(params.values()), cfg.distill.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        distiller.update_target()
        step += 1
        record = {"step": step, "phase": phase.key, **{k: float(v.detach()) for k, v in logs.items()}}
        history.append(record)
        if step % cfg.log_every == 0 or step == stop:
            log({f"{phase.stage}/{k}": v for k, v in record.items() if k not in ("step", "phase")}, step)
            metrics.append(step, {k: v for k, v in record.items() if k != "step"})
        bar.step(step, {"phase": phase.key, "loss": record["loss"]})
        if step % cfg.checkpoint.every == 0 or step == phase.end or step == stop:
            save(step, phase)
    bar.close()
    accelerator.wait_for_everyone()
    student_dir = run_dir / "student"
    if step >= total and accelerator.is_main_process:
        distiller.model = accelerator.unwrap_model(distiller.student)
        export_student(distiller, student_dir, cfg.model.source)
    finish_trackers(accelerator)
    return TrainResult(run_dir, student_dir, step, history, time.time() - t_start)
