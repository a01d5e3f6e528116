"""The DI* recipe: alternate fake-score DSM updates and generator updates.

Each iteration (paper / DI++ Algorithm 1, DMD2 two-timescale schedule):

  (a) K_TA times: x0 = sg(g_theta(z, c)); x_t = alpha_t x0 + sigma_t eps, t ~ U[fake range];
      psi <- psi - lr * grad ||eps_psi(x_t, t, c) - eps||^2          (in the network's own parameterisation)
  (b) once:       x0 = g_theta(z, c); t ~ U[generator range]; x_t = alpha_t x0 + sigma_t eps
      theta <- theta - lr * grad [ -alpha_rew r(decode(x0), c) + w(t) d'(u)^T (s_psi - grad log q) ]
      with u = s_ref^cfg - s_psi, gradients through x_t into both networks' outputs, their parameters frozen.

Randomness of step k (prompts, z, t, eps) comes from a generator seeded by (seed, k), so a resumed run
ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffalign.core.denoisers import Denoiser, cat_conditioning, denoiser_for
from diffalign.core.lora import add_lora, default_targets, make_lora_config

from . import losses as L
from .config import DiStarConfig, OptimizerConfig
from .inference import METADATA_FILE, read_metadata, to_one_step_pipeline, write_metadata

__all__ = [
    "DiStarTrainer",
    "load_prompts",
    "train",
    "export_generator",
    "generate_x0",
    "predict_epsilon",
    "straight_through_clamp",
]

FAMILIES = ("sd", "sdxl")  # DI* trains UNet latent-diffusion pipelines


def unet_denoiser(pipe: Any, resolution: int | None = None) -> Denoiser:
    """Core's denoiser of ``pipe``; refuses families DI* does not train."""
    den = denoiser_for(pipe, resolution)
    if den.family not in FAMILIES:
        raise ValueError(
            f"DI* trains UNet latent-diffusion pipelines (Stable Diffusion 1.x/2.x, SDXL); got "
            f"{type(pipe).__name__}, a {den.family} pipeline. Use a StableDiffusion / StableDiffusionXL model."
        )
    return den


def generate_x0(
    den: Denoiser, generator_unet: Any, noise: torch.Tensor, cond: dict, t_star: int
) -> torch.Tensor:
    """g_theta(z, c): one network evaluation on pure noise z at t*, converted to a clean latent (this is
    what LCMScheduler with one step, ``timesteps=[t*]`` and guidance 0 computes)."""
    timesteps = torch.full((noise.shape[0],), int(t_star), device=noise.device, dtype=torch.long)
    return den.predict_x0_eps(generator_unet, noise, timesteps, cond)[0]


def predict_epsilon(
    den: Denoiser, unet: Any, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict
) -> torch.Tensor:
    """eps_hat(x_t, t, c) from a UNet of the teacher's prediction type (differentiable w.r.t. x_t)."""
    return den.predict_x0_eps(unet, x_t, timesteps, cond)[1]


def straight_through_clamp(x: torch.Tensor, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """clamp(x, low, high) in the forward pass, identity in the backward pass.

    A hard clamp zeroes the reward's gradient on every saturated pixel, so a generator whose decoded
    pixels overshoot the range gets no reward signal there."""
    return x + (x.clamp(low, high) - x).detach()


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_prompts(cfg: DiStarConfig) -> list[str]:
    """Training prompts: the shapes grammar (train split) or a text file with one prompt per line."""
    if cfg.data.prompts == "shapes":
        from diffalign.core.shapes import sample_prompts

        per_skill = max(1, cfg.data.num_prompts // len(cfg.data.skills))
        prompts: list[str] = []
        for i, skill in enumerate(cfg.data.skills):
            prompts += sample_prompts(skill, per_skill, split="train", seed=cfg.seed + i)
        return prompts
    path = Path(cfg.data.prompts)
    if not path.is_file():
        raise FileNotFoundError(f"data.prompts: prompt file not found: {path} (or use 'shapes')")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"data.prompts: {path} contains no prompts")
    return prompts


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _make_optimizer(params: list[torch.nn.Parameter], opt: OptimizerConfig) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(
        params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay, eps=opt.eps
    )


@dataclass
class StepRandomness:
    prompts: list[str]
    noise: torch.Tensor
    timesteps: torch.Tensor
    eps: torch.Tensor


class DiStarTrainer:
    """Holds the three networks, the reward and both optimisers; ``train_step`` runs one DI* iteration.

    ``pipe`` is the loaded teacher pipeline (its UNet becomes the frozen reference); ``reward`` any
    differentiable ``RewardModel`` on [-1, 1] pixels (may be None when ``alpha_rew == 0``).
    """

    def __init__(
        self,
        cfg: DiStarConfig,
        pipe: Any,
        reward: Any | None,
        prompts: list[str],
        accelerator: Any | None = None,
        generator_unet: torch.nn.Module | None = None,
        fake_unet: torch.nn.Module | None = None,
    ):
        self.den = unet_denoiser(pipe, cfg.model.resolution)
        self.cfg = cfg
        self.pipe = pipe
        self.prompts = list(prompts)
        if not self.prompts:
            raise ValueError("DI* training needs at least one prompt")
        self.accelerator = accelerator
        self.device = accelerator.device if accelerator is not None else pipe.unet.device
        self.schedule = self.den.schedule
        n_train = self.schedule.num_train_timesteps
        for name, (_low, high) in (
            ("loss.timestep_range", cfg.loss.timestep_range),
            ("fake_score.timestep_range", cfg.fake_score.timestep_range),
        ):
            if high >= n_train:
                raise ValueError(f"{name} upper end {high} must be < the teacher's {n_train} train timesteps")
        if cfg.generator.t_star >= n_train:
            raise ValueError(f"generator.t_star={cfg.generator.t_star} must be < {n_train}")
        self.prediction_type = self.den.prediction_type
        self.latent_shape = self.den.latent_shape(1)[1:]

        if cfg.loss.alpha_rew > 0:
            if reward is None:
                raise ValueError("loss.alpha_rew > 0 needs a reward model")
            if (
                not getattr(reward, "differentiable", False)
                or getattr(reward, "input_range", None) != "[-1,1]"
            ):
                raise ValueError(
                    f"reward {getattr(reward, 'name', reward)!r} must be differentiable on [-1,1] pixel tensors "
                    "for DI*; pick a differentiable reward or set loss.alpha_rew=0"
                )
            for p in getattr(reward, "parameters", lambda: [])():
                p.requires_grad_(False)
        self.reward = reward

        # frozen parts: reference UNet, VAE, text encoders
        self.reference = pipe.unet
        for module in (
            pipe.unet,
            pipe.vae,
            getattr(pipe, "text_encoder", None),
            getattr(pipe, "text_encoder_2", None),
        ):
            if module is not None:
                module.requires_grad_(False)
                module.eval()

        # trainable parts: generator and fake score, float32 masters
        self.generator = (generator_unet if generator_unet is not None else copy.deepcopy(pipe.unet)).to(
            self.device, torch.float32
        )
        self.fake = (fake_unet if fake_unet is not None else copy.deepcopy(pipe.unet)).to(
            self.device, torch.float32
        )
        for net, section in ((self.generator, cfg.generator), (self.fake, cfg.fake_score)):
            net.requires_grad_(True)
            if section.lora is not None:
                lora = section.lora
                targets = lora.target_modules or default_targets(self.den.family)
                add_lora(net, make_lora_config(lora.rank, lora.alpha, targets, init=True))
            net.train()
        self.generator_params = _trainable(self.generator)
        self.fake_params = _trainable(self.fake)
        self.opt_generator = _make_optimizer(self.generator_params, cfg.generator.optimizer)
        self.opt_fake = _make_optimizer(self.fake_params, cfg.fake_score.optimizer)
        if accelerator is not None:
            self.generator, self.fake, self.opt_generator, self.opt_fake = accelerator.prepare(
                self.generator, self.fake, self.opt_generator, self.opt_fake
            )
        self._cond_cache: dict[tuple[str, ...], Any] = {}

    # ------------------------------------------------------------------------------------------ helpers
    def _unwrap(self, module):
        return self.accelerator.unwrap_model(module) if self.accelerator is not None else module

    def _conditions(self, prompts: list[str]) -> tuple[dict, dict]:
        """Network kwargs of the prompts and of the pipeline's own empty-prompt (unconditional) encoding."""
        key = tuple(prompts)
        if key not in self._cond_cache:
            if len(self._cond_cache) > 256:
                self._cond_cache.clear()
            self._cond_cache[key] = self.den.encode(prompts)
        both = self._cond_cache[key].to(self.device, torch.float32)
        return both.cond, both.uncond

    def randomness(self, step: int, phase: str, round_index: int, t_range: tuple[int, int]) -> StepRandomness:
        seed = (
            self.cfg.seed * 1_000_003 + step * 101 + round_index * 7 + (0 if phase == "fake" else 1)
        ) % 2**63
        gen = torch.Generator().manual_seed(seed)
        # every rank draws the global batch (processes x data.batch_size) and keeps its own slice, so N
        # processes train on the rows one process with N times the batch would
        b = self.cfg.data.batch_size
        rank, world = (
            (self.accelerator.process_index, self.accelerator.num_processes) if self.accelerator else (0, 1)
        )
        total, mine = b * world, slice(rank * b, (rank + 1) * b)
        idx = torch.randint(len(self.prompts), (total,), generator=gen)[mine].tolist()
        noise = torch.randn(total, *self.latent_shape, generator=gen)[mine]
        timesteps = self.schedule.sample_timesteps(total, *t_range, generator=gen)[mine]
        eps = torch.randn(total, *self.latent_shape, generator=gen)[mine]
        return StepRandomness(
            [self.prompts[i] for i in idx],
            noise.to(self.device),
            timesteps.to(self.device),
            eps.to(self.device),
        )

    def _backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def _clip(self, params, max_norm: float | None) -> float:
        if max_norm is None:
            return float("nan")
        if self.accelerator is not None:
            return float(self.accelerator.clip_grad_norm_(params, max_norm))
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # ------------------------------------------------------------------------------------------ phase (a)
    def fake_step(self, step: int, round_index: int = 0) -> dict[str, float]:
        rnd = self.randomness(step, "fake", round_index, self.cfg.fake_score.timestep_range)
        cond, _ = self._conditions(rnd.prompts)
        with torch.no_grad():
            x0 = generate_x0(self.den, self.generator, rnd.noise, cond, self.cfg.generator.t_star)
        alpha, sigma = self.schedule.alpha_sigma(rnd.timesteps)
        x_t = L.expand_like(alpha, x0) * x0 + L.expand_like(sigma, x0) * rnd.eps
        out = self.den.forward(self.fake, x_t, rnd.timesteps, cond)
        loss = L.fake_score_dsm_loss(out, x0, rnd.eps, alpha, sigma, self.prediction_type).mean()
        from diffalign.core.training import check_finite

        check_finite(loss, step, "fake-score DSM loss")
        self.opt_fake.zero_grad(set_to_none=True)
        self._backward(loss)
        grad_norm = self._clip(self.fake_params, self.cfg.fake_score.optimizer.max_grad_norm)
        self.opt_fake.step()
        return {"loss_fake": float(loss.detach()), "grad_norm_fake": grad_norm}

    # ------------------------------------------------------------------------------------------ phase (b)
    def generator_losses(self, rnd: StepRandomness) -> dict[str, torch.Tensor]:
        """Per-term generator losses (means over the batch) with the graph to theta."""
        cfg = self.cfg.loss
        cond, uncond = self._conditions(rnd.prompts)
        x0 = generate_x0(self.den, self.generator, rnd.noise, cond, self.cfg.generator.t_star)
        terms: dict[str, torch.Tensor] = {}
        zero = x0.sum() * 0.0
        if cfg.alpha_rew > 0:
            # the reward sees the displayed range [-1, 1] but its gradient reaches saturated pixels too
            images = straight_through_clamp(self.den.decode(x0, clamp=False).float())
            if self.cfg.reward.resize is not None:
                images = F.interpolate(
                    images, size=self.cfg.reward.resize, mode="bilinear", align_corners=False
                )
            rewards = self.reward.score(images, rnd.prompts).float()
            terms["reward"] = rewards.detach().mean()
            terms["loss_reward"] = L.reward_loss(rewards, cfg.alpha_rew).mean()
        else:
            terms["loss_reward"] = zero
        if cfg.regulariser == "none" or cfg.divergence_scale == 0:
            terms["loss_divergence"] = zero
            return terms
        alpha, sigma = self.schedule.alpha_sigma(rnd.timesteps)
        x_t = L.expand_like(alpha, x0) * x0 + L.expand_like(sigma, x0) * rnd.eps
        # fake score: parameters frozen in this phase, gradient flows through x_t into its output
        fake = self._unwrap(self.fake)
        for p in self.fake_params:
            p.requires_grad_(False)
        try:
            eps_fake = predict_epsilon(self.den, fake, x_t, rnd.timesteps, cond)
        finally:
            for p in self.fake_params:
                p.requires_grad_(True)
        ref_dtype = next(self.reference.parameters()).dtype
        need_uncond = cfg.cfg_scale != 1.0
        if need_uncond:
            eps_both = predict_epsilon(
                self.den,
                self.reference,
                torch.cat([x_t, x_t]).to(ref_dtype),
                torch.cat([rnd.timesteps] * 2),
                cat_conditioning(cond, uncond),
            ).float()
            eps_cond, eps_uncond = eps_both.chunk(2)
        else:
            eps_cond = predict_epsilon(
                self.den, self.reference, x_t.to(ref_dtype), rnd.timesteps, cond
            ).float()
            eps_uncond = eps_cond
        weight = L.timestep_weight(alpha, sigma, cfg.weighting)
        target = (
            L.classifier_free_guidance(eps_uncond, eps_cond, cfg.cfg_scale)
            if cfg.cfg_mode == "in"
            else eps_cond
        )
        if cfg.regulariser == "score":
            div = L.di_star_generator_loss(
                eps_fake, target, rnd.eps, sigma, weight, cfg.distance, cfg.huber_c
            )
        else:
            div = L.kl_generator_loss(eps_fake, target, x_t, sigma, weight)
        if cfg.cfg_mode == "out" and need_uncond:
            div = div + L.implicit_cfg_reward_loss(eps_cond, eps_uncond, x_t, sigma, cfg.cfg_scale, weight)
        terms["loss_divergence"] = cfg.divergence_scale * div.mean()
        return terms

    def generator_step(self, step: int) -> dict[str, float]:
        from diffalign.core.training import check_finite

        rnd = self.randomness(step, "generator", 0, self.cfg.loss.timestep_range)
        terms = self.generator_losses(rnd)
        loss = terms["loss_reward"] + terms["loss_divergence"]
        check_finite(loss, step, "generator loss")
        norms = self.term_grad_norms(terms) if self.cfg.training.log_grad_norms else {}
        self.opt_generator.zero_grad(set_to_none=True)
        self._backward(loss)
        grad_norm = self._clip(self.generator_params, self.cfg.generator.optimizer.max_grad_norm)
        self.opt_generator.step()
        out = {k: float(v.detach()) for k, v in terms.items()}
        out.update(loss_generator=float(loss.detach()), grad_norm_generator=grad_norm, **norms)
        return out

    def term_grad_norms(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Diagnostic: the unclipped gradient norm of each generator term (reward, divergence) on its own,
        so a run can check alpha_rew is near gradient parity. One extra backward per term."""
        out = {}
        for name in ("loss_reward", "loss_divergence"):
            term = terms[name]
            if not term.requires_grad:
                out[f"grad_norm_{name[5:]}"] = 0.0
                continue
            grads = torch.autograd.grad(term, self.generator_params, retain_graph=True, allow_unused=True)
            sq = sum(float(g.detach().float().pow(2).sum()) for g in grads if g is not None)
            out[f"grad_norm_{name[5:]}"] = sq**0.5
        return out

    def train_step(self, step: int) -> dict[str, float]:
        logs: dict[str, float] = {}
        if self.cfg.loss.regulariser != "none" and self.cfg.loss.divergence_scale > 0:
            fake_logs = [
                self.fake_step(step, k) for k in range(self.cfg.fake_score.updates_per_generator_step)
            ]
            logs["loss_fake"] = sum(f["loss_fake"] for f in fake_logs) / len(fake_logs)
        logs.update(self.generator_step(step))
        return logs

    def merged_generator(self) -> torch.nn.Module:
        """A plain UNet with the trained weights (LoRA fused and removed)."""
        unet = copy.deepcopy(self._unwrap(self.generator)).eval()
        if self.cfg.generator.lora is not None:
            unet.fuse_lora()
            unet.unload_lora()
        return unet.requires_grad_(False)


def export_generator(trainer: DiStarTrainer, out_dir: str | Path) -> Path:
    """Save the trained generator as a standard diffusers pipeline (LCMScheduler) plus ``di_star.json``."""
    out_dir = Path(out_dir)
    pipe = copy.copy(trainer.pipe)
    components = dict(trainer.pipe.components)
    components["unet"] = trainer.merged_generator()
    pipe = type(trainer.pipe)(**components)
    to_one_step_pipeline(pipe)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    write_metadata(tmp, trainer.cfg.generator.t_star, teacher=trainer.cfg.model.teacher)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


# UNet config entries that fix the weight layout and the conditioning: a starting point must match the teacher's
ARCHITECTURE_KEYS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "cross_attention_dim",
    "attention_head_dim",
    "addition_embed_type",
    "projection_class_embeddings_input_dim",
)


def check_init_unet(what: str, source: str, net: torch.nn.Module, teacher_unet: torch.nn.Module) -> None:
    """Refuse a starting UNet whose architecture differs from the teacher's (it would not share the
    teacher's conditioning, and DI* would silently train a different network)."""
    mine, theirs = dict(net.config), dict(teacher_unet.config)
    diff = [k for k in ARCHITECTURE_KEYS if _norm(mine.get(k)) != _norm(theirs.get(k))]
    if diff:
        detail = ", ".join(f"{k}: {mine.get(k)!r} vs teacher {theirs.get(k)!r}" for k in diff[:3])
        raise ValueError(
            f"model.{what} = {source} is a different architecture from the teacher's UNet ({detail}); "
            "start from a checkpoint of the same teacher (e.g. a stage-1 run's generator/ folder)"
        )


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def _load_init(what: str, source: str, cfg: DiStarConfig, teacher_unet: torch.nn.Module) -> torch.nn.Module:
    from diffalign.core.models import ModelNotFoundError, load_unet

    try:
        net = load_unet(source, dtype=torch.float32)
    except ModelNotFoundError as err:
        raise FileNotFoundError(
            f"model.{what}: no UNet checkpoint at {source} ({err}). For the two-stage protocol run the "
            "stage-1 recipe first; its exported generator/ folder is the stage-2 starting point"
        ) from err
    check_init_unet(what, source, net, teacher_unet)
    path = Path(source)
    if what == "generator_init" and (path / METADATA_FILE).is_file():
        t_star = read_metadata(path).get("t_star")
        if t_star is not None and int(t_star) != cfg.generator.t_star:
            raise ValueError(
                f"model.generator_init = {source} was trained as a one-step generator at t* = {t_star}, but "
                f"generator.t_star = {cfg.generator.t_star}; use the same t* to continue from it"
            )
    return net


def _load_models(cfg: DiStarConfig, device) -> tuple[Any, torch.nn.Module | None, torch.nn.Module | None]:
    from diffalign.core.models import load_pipeline

    pipe = load_pipeline(cfg.model.teacher, dtype=DTYPES[cfg.model.dtype], device=device)
    unet_denoiser(pipe)
    gen = fake = None
    if cfg.model.generator_init:
        gen = _load_init("generator_init", cfg.model.generator_init, cfg, pipe.unet)
    if cfg.model.fake_init:
        fake = _load_init("fake_init", cfg.model.fake_init, cfg, pipe.unet)
    return pipe, gen, fake


def train(cfg: DiStarConfig, pipe: Any | None = None, reward: Any | None = None) -> Path:
    """Run (or resume) a DI* recipe; returns the exported generator pipeline folder."""
    from diffalign.core.checkpoints import StateCheckpoints
    from diffalign.core.config import save_config
    from diffalign.core.launch import check_process_count, make_accelerator
    from diffalign.core.monitor import StepLogger
    from diffalign.core.rewards import get_reward
    from diffalign.core.rundir import MetricsLog
    from diffalign.core.training import finish_trackers, make_tracker, seed_everything

    prompts = load_prompts(cfg)
    seed_everything(cfg.seed)
    if reward is None and cfg.loss.alpha_rew > 0:
        reward = get_reward(cfg.reward.name, **cfg.reward.kwargs)
    run_dir = Path(cfg.run_dir)
    accelerator = make_accelerator(cfg.launch, run_dir=run_dir)
    check_process_count(accelerator, cfg.launch)
    gen_init = fake_init = None
    if pipe is None:
        pipe, gen_init, fake_init = _load_models(cfg, accelerator.device)
    else:
        pipe.to(accelerator.device)
    trainer = DiStarTrainer(cfg, pipe, reward, prompts, accelerator, gen_init, fake_init)

    if accelerator.is_main_process:
        save_config(cfg, run_dir)
    # accelerate's save_state/load_state: both networks, both optimizers (every ZeRO partition) and
    # the RNG states of every rank, atomically and verified
    ckpt = StateCheckpoints(accelerator, run_dir, keep_last=cfg.training.keep_last)
    start = 0
    state = ckpt.load_latest()
    if state is not None:
        start = state[0]
    log = make_tracker(accelerator, run_dir, project="di-star", config=cfg.model_dump(mode="json"))
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    metrics.truncate(start)  # rows logged after the checkpoint would be logged again
    bar = StepLogger(cfg.training.max_steps, log_every=cfg.training.log_every, desc="di-star", initial=start)
    for step in range(start, cfg.training.max_steps):
        logs = trainer.train_step(step)
        done = step + 1
        shown = {k: v for k, v in logs.items() if k.startswith(("loss_gen", "reward"))}
        bar.step(done, shown)
        if done % cfg.training.log_every == 0 or done == cfg.training.max_steps:
            log(logs, step=done)
            metrics.append(done, logs)
        if done % cfg.training.checkpoint_every == 0 or done == cfg.training.max_steps:
            ckpt.save(done)
    bar.close()
    accelerator.wait_for_everyone()
    out = run_dir / "generator"
    if accelerator.is_main_process:
        export_generator(trainer, out)
    finish_trackers(accelerator)
    return out
