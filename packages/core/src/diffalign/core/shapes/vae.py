"""Tiny latent autoencoder of the shapes world: 32x32x3 pixels <-> 8x8x4 latents."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from .render import random_scene, render_scenes


def build_vae(micro: bool = False):
    from diffusers import AutoencoderKL

    ch = (8, 8, 8) if micro else (16, 32, 32)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=ch,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=not micro,
    )


def vae_loss(vae, images: torch.Tensor, kl_weight: float = 1e-6) -> tuple[torch.Tensor, dict]:
    post = vae.encode(images).latent_dist
    z = post.sample()
    recon = vae.decode(z).sample
    l1 = (recon - images).abs().mean()
    l2 = ((recon - images) ** 2).mean()
    kl = post.kl().mean() / z[0].numel()
    loss = l1 + l2 + kl_weight * kl
    return loss, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


def train_vae(
    out_dir: str | Path,
    steps: int = 500,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    micro: bool = False,
    log=print,
    progress=None,
):
    """Train the VAE on fresh random renders, set its scaling factor, save it to ``out_dir``."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = build_vae(micro)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * (1 - s / max(1, steps)))
    )
    it = range(steps) if progress is None else progress(range(steps), total=steps, desc="vae")
    for step in it:
        images = render_scenes([random_scene(rng) for _ in range(batch_size)], gen)
        loss, parts = vae_loss(vae, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"vae step {step} loss {float(loss):.4f} l1 {parts['l1']:.4f} kl {parts['kl']:.2f}")
    vae.eval()
    with torch.no_grad():
        images = render_scenes([random_scene(rng) for _ in range(256)], gen)
        z = vae.encode(images).latent_dist.sample()
        std = float(z.std())
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
        err = float((recon - images).abs().mean())
    vae.register_to_config(scaling_factor=1.0 / std)
    out_dir = Path(out_dir)
    vae.save_pretrained(str(out_dir))
    log(f"vae saved: latent std {std:.3f} scaling_factor {1 / std:.3f} recon L1 {err:.4f}")
    return vae, {"latent_std": std, "recon_l1": err}


def finetune_decoder(
    vae_dir: str | Path,
    out_dir: str | Path,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 5e-4,
    seed: int = 1,
    log=print,
    progress=None,
):
    """Sharpen the decoder with the encoder frozen: the latent space (and so every teacher trained
    on it) is unchanged; only the pixels drawn from latents improve."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=torch.float32)
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    it = range(steps) if progress is None else progress(range(steps), total=steps, desc="vae decoder")
    for step in it:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / steps))
        images = render_scenes([random_scene(rng) for _ in range(batch_size)], gen)
        with torch.no_grad():
            z = vae.encode(images).latent_dist.sample(generator=gen)
        recon = vae.decode(z).sample
        loss = (recon - images).abs().mean() + ((recon - images) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"decoder step {step} loss {loss.item():.4f}")
    vae.eval()
    vae.save_pretrained(str(out_dir))
    return vae
