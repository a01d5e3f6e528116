"""Text-to-image teachers of the shapes world, trained from scratch on fresh renders.

Two teachers share the tiny VAE (32x32x3 <-> 8x8x4) and the word-level tokenizer:

- ``unet``: ``StableDiffusionPipeline`` = VAE + latent ``UNet2DConditionModel`` + 3-layer
  ``CLIPTextModel`` (hidden 64), trained jointly.
- ``dit``: ``PixArtAlphaPipeline`` = VAE + ``PixArtTransformer2DModel`` on the 8x8x4 latents +
  tiny ``T5EncoderModel``, trained jointly. Sample it with ``use_resolution_binning=False``.

Recipe: v-prediction on a cosine schedule rescaled to zero terminal SNR (DDIM, trailing spacing),
loss weight min(max(SNR, 1), 5) / (SNR + 1), 10% caption dropout for classifier-free guidance,
AdamW (0.9, 0.99), weight decay 0.01, linear warm-up then cosine decay, gradient clipping at 1,
EMA with a ramped decay, fresh renders of train-split prompts every batch.

Training is resumable: state is checkpointed atomically every few minutes; a sample grid of
held-out prompts (EMA weights) is written every ``sample_every`` steps.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .grammar import eval_prompts, sample_specs
from .render import render_scenes, scene_for_spec

TEACHERS = ("unet", "dit")


@dataclass
class TeacherConfig:
    kind: str = "unet"
    steps: int = 30000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    snr_clamp: float = 5.0
    ema_max_decay: float = 0.999
    seed: int = 0
    checkpoint_minutes: float = 4.0
    sample_every: int = 500
    log_every: int = 50
    micro: bool = False
    skills_weights: dict = field(default_factory=lambda: {"object": 1, "count": 1, "color": 1, "spatial": 1})


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # unused by trailing spacing; 1 keeps StableDiffusionPipeline from rewriting it
    )


def build_text_encoder(kind: str, vocab_size: int, micro: bool = False):
    if kind == "unet":
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=16 if micro else 64,
            intermediate_size=32 if micro else 128,
            num_hidden_layers=1 if micro else 3,
            num_attention_heads=2 if micro else 4,
            max_position_embeddings=20,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return CLIPTextModel(cfg)
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=16 if micro else 64,
        d_kv=8 if micro else 16,
        d_ff=32 if micro else 128,
        num_layers=1 if micro else 3,
        num_heads=2 if micro else 4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg)


def build_denoiser(kind: str, text_dim: int, micro: bool = False):
    if kind == "unet":
        from diffusers import UNet2DConditionModel

        ch = (16, 32) if micro else (48, 96, 96)
        return UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * len(ch),
            up_block_types=("CrossAttnUpBlock2D",) * len(ch),
            block_out_channels=ch,
            layers_per_block=1,
            cross_attention_dim=text_dim,
            attention_head_dim=8 if micro else 16,
            norm_num_groups=8 if micro else 16,
        )
    if kind == "dit":
        from diffusers import PixArtTransformer2DModel

        return PixArtTransformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=1 if micro else 6,
            num_attention_heads=2 if micro else 6,
            attention_head_dim=8 if micro else 32,
            cross_attention_dim=16 if micro else 192,
            caption_channels=text_dim,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            num_embeds_ada_norm=1000,
            use_additional_conditions=False,
        )
    raise ValueError(f"unknown teacher kind {kind!r}; expected one of {TEACHERS}")


def text_dim_of(text_encoder) -> int:
    cfg = text_encoder.config
    return (
        cfg.hidden_size
        if hasattr(cfg, "hidden_size") and cfg.model_type == "clip_text_model"
        else cfg.d_model
    )


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = sqrt(a) * eps - sqrt(1 - a) * x0 (per-sample alpha_bar of shape [B])."""
    a = alpha_bar.view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def snr_weight(alpha_bar: torch.Tensor, clamp: float = 5.0) -> torch.Tensor:
    """min(max(SNR, 1), clamp) / (SNR + 1): min-SNR weighting for v-prediction that keeps the
    zero-SNR step (SNR = 0) at weight 1 instead of 0."""
    snr = alpha_bar / (1 - alpha_bar).clamp(min=1e-12)
    return snr.clamp(min=1.0, max=clamp) / (snr + 1.0)


def diffusion_loss(denoise, x0: torch.Tensor, alphas_cumprod: torch.Tensor, gen: torch.Generator, clamp=5.0):
    """Weighted v-prediction loss; ``denoise(x_t, t)`` returns the model's v."""
    b = x0.shape[0]
    t = torch.randint(0, alphas_cumprod.shape[0], (b,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = alphas_cumprod[t]
    x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
    pred = denoise(x_t, t)
    per = ((pred.float() - v_target(x0, noise, a)) ** 2).mean(dim=(1, 2, 3))
    return (snr_weight(a, clamp) * per).mean()


class Teacher(torch.nn.Module):
    """Denoiser + text encoder trained jointly."""

    def __init__(self, kind: str, tokenizer, micro: bool = False):
        super().__init__()
        self.kind = kind
        self.tokenizer = tokenizer
        self.text_encoder = build_text_encoder(kind, len(tokenizer), micro)
        self.denoiser = build_denoiser(kind, text_dim_of(self.text_encoder), micro)

    def encode(self, prompts: list[str]):
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        if self.kind == "unet":
            return self.text_encoder(tok.input_ids)[0], None
        mask = tok.attention_mask
        return self.text_encoder(tok.input_ids, attention_mask=mask)[0], mask

    def forward(self, x_t, t, prompts):
        emb, mask = self.encode(prompts)
        if self.kind == "unet":
            return self.denoiser(x_t, t, encoder_hidden_states=emb).sample
        return self.denoiser(
            x_t, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=None
        ).sample


def make_pipeline(kind: str, vae, teacher: Teacher, scheduler=None):
    """A standard diffusers pipeline over in-memory modules."""
    scheduler = scheduler or make_scheduler()
    if kind == "unet":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=teacher.text_encoder,
            tokenizer=teacher.tokenizer,
            unet=teacher.denoiser,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    from diffusers import PixArtAlphaPipeline

    return PixArtAlphaPipeline(
        tokenizer=teacher.tokenizer,
        text_encoder=teacher.text_encoder,
        vae=vae,
        transformer=teacher.denoiser,
        scheduler=scheduler,
    )


@torch.no_grad()
def sample_pipeline(
    pipe, prompts: list[str], steps: int = 50, guidance: float = 4.0, seed: int = 0, batch=50
):
    """Images [B, 3, 32, 32] in [-1, 1] from a shapes pipeline (UNet or PixArt), under the evaluation
    path's noise contract (``diffalign.core.shapes.evaluate``: one generator per prompt)."""
    from .evaluate import pipeline_sampler, sample_images

    return sample_images(pipeline_sampler(pipe, steps, guidance), prompts, seed=seed, batch_size=batch)


def teacher_ema(model: torch.nn.Module, ema: torch.nn.Module, cfg: TeacherConfig):
    """Core's EMA averaging ``model`` in place into ``ema`` with the ramped decay the committed teachers
    were built with: update n uses min(cfg.ema_max_decay, (1 + n) / (10 + n))."""
    from diffalign.core.training import EMA

    return EMA(model, decay=cfg.ema_max_decay, warmup=True, target=ema)


def lr_factor(step: int, cfg: TeacherConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    prog = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))


def _checkpointer(run_dir: Path):
    from diffalign.core.training import CheckpointManager

    return CheckpointManager(run_dir, keep_last=2)


def load_vae(path: str | Path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=torch.float32)
    vae.requires_grad_(False)
    return vae.eval()


def train_teacher(
    cfg: TeacherConfig,
    run_dir: str | Path,
    vae_dir: str | Path,
    tokenizer_dir: str | Path,
    log=print,
    progress=None,
    max_minutes: float | None = None,
):
    """Train (or resume) a teacher in ``run_dir``; returns (teacher with EMA weights, vae)."""
    from transformers import PreTrainedTokenizerFast

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    vae = load_vae(vae_dir)
    sf = vae.config.scaling_factor
    model = Teacher(cfg.kind, tokenizer, cfg.micro)
    ema = copy.deepcopy(model).requires_grad_(False)
    averager = teacher_ema(model, ema, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    alphas = make_scheduler().alphas_cumprod.float()
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    ckpt = _checkpointer(run_dir)
    state = ckpt.load_latest()
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        rng.setstate(state["py_rng"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        averager.num_updates = step
        log(f"resumed {cfg.kind} from step {step}")
    n_params = sum(p.numel() for p in model.denoiser.parameters())
    n_text = sum(p.numel() for p in model.text_encoder.parameters())
    log(f"{cfg.kind}: denoiser {n_params / 1e6:.2f}M params, text encoder {n_text / 1e6:.2f}M")
    skills = list(cfg.skills_weights)
    weights = [cfg.skills_weights[s] for s in skills]
    fixed = eval_prompts(4, seed=99)

    def save(step):
        ckpt.save(
            step,
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "py_rng": rng.getstate(),
                "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
            },
        )

    t_start = time.time()
    last_ckpt = time.time()
    it = range(step, cfg.steps)
    if progress is not None:
        it = progress(it, total=cfg.steps, initial=step, desc=f"teacher {cfg.kind}")
    run_loss = None
    for step in it:
        model.train()
        specs = []
        for _ in range(cfg.batch_size):
            skill = rng.choices(skills, weights)[0]
            specs.append(sample_specs(skill, 1, "train", rng)[0])
        prompts = ["" if rng.random() < cfg.caption_dropout else p for _, p in specs]
        images = render_scenes([scene_for_spec(s, rng) for s, _ in specs], gen)
        with torch.no_grad():
            x0 = vae.encode(images).latent_dist.sample(generator=gen) * sf
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg)
        loss = diffusion_loss(lambda x, t, p=prompts: model(x, t, p), x0, alphas, gen, cfg.snr_clamp)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite teacher loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        averager.update(model)
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        done = step + 1
        if done % cfg.log_every == 0:
            el = time.time() - t_start
            log(
                f"{cfg.kind} step {done} loss {run_loss:.4f} lr {opt.param_groups[0]['lr']:.2e} elapsed {el:.0f}s"
            )
        if cfg.sample_every and done % cfg.sample_every == 0:
            from ._util import save_grid

            pipe = make_pipeline(cfg.kind, vae, ema)
            imgs = sample_pipeline(pipe, fixed, steps=20, guidance=4.0, seed=0)
            save_grid(imgs, run_dir / "samples" / f"step_{done:06d}.png", nrow=8, upscale=3)
            (run_dir / "samples" / "prompts.txt").write_text("\n".join(fixed) + "\n")
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60 or done == cfg.steps:
            save(done)
            last_ckpt = time.time()
        if max_minutes is not None and time.time() - t_start > max_minutes * 60:
            save(done)
            log(f"{cfg.kind}: stopping after {max_minutes} minutes at step {done}")
            break
    return ema, vae


def export_teacher(kind: str, ema: Teacher, vae, out_dir: str | Path, fp16: bool = True) -> Path:
    """Write the EMA teacher as a standard diffusers pipeline folder (weights fp16 to stay small)."""
    pipe = make_pipeline(kind, vae, copy.deepcopy(ema))
    if fp16:
        pipe.to(torch.float16)
    out_dir = Path(out_dir)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    if fp16:  # transformers loads in the config's dtype: ask for float32, as diffusers models get
        encoder_config = out_dir / "text_encoder" / "config.json"
        data = json.loads(encoder_config.read_text())
        data["dtype"] = "float32"
        encoder_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_teacher_checkpoint(
    kind: str, run_dir: str | Path, tokenizer_dir: str | Path, micro=False
) -> Teacher:
    """The EMA teacher stored in a training run's latest checkpoint."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    model = Teacher(kind, tokenizer, micro)
    state = _checkpointer(Path(run_dir)).load_latest()
    if state is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}")
    model.load_state_dict(state["ema"])
    return model.eval()


def export_from_checkpoint(kind: str, run_dir, vae_dir, tokenizer_dir, out_dir, micro=False) -> Path:
    """Export the EMA weights of a run's latest checkpoint as a diffusers folder."""
    ema = load_teacher_checkpoint(kind, run_dir, tokenizer_dir, micro)
    return export_teacher(kind, ema, load_vae(vae_dir), out_dir)


def main(argv=None) -> None:
    """Train a teacher in the background: ``python -m diffalign.core.shapes.teachers --kind unet ...``."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--kind", choices=TEACHERS, required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--vae", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--steps", type=int, default=TeacherConfig.steps)
    ap.add_argument("--batch-size", type=int, default=TeacherConfig.batch_size)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lr = args.lr if args.lr is not None else (1e-3 if args.kind == "unet" else 5e-4)
    cfg = TeacherConfig(kind=args.kind, steps=args.steps, batch_size=args.batch_size, lr=lr, seed=args.seed)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    train_teacher(cfg, args.run_dir, args.vae, args.tokenizer, log=log, max_minutes=args.max_minutes)


if __name__ == "__main__":
    main()
