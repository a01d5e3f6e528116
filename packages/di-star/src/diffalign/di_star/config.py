"""Recipe config for Diff-Instruct* training (``diffalign config schema di-star`` prints its schema)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from diffalign.core.config import Config
from diffalign.core.launch import LaunchConfig

__all__ = [
    "ModelConfig",
    "LoraConfig",
    "OptimizerConfig",
    "GeneratorConfig",
    "FakeScoreConfig",
    "LossConfig",
    "RewardConfig",
    "DataConfig",
    "TrainingConfig",
    "DiStarConfig",
    "RECIPE_CONFIG",
]


class ModelConfig(Config):
    teacher: str = Field(
        "shapes/unet",
        description="Reference diffusion model (frozen): hub id, local diffusers folder, or shapes/unet. "
        "StableDiffusionPipeline or StableDiffusionXLPipeline; epsilon or v prediction.",
    )
    generator_init: str | None = Field(
        None,
        description="Initial one-step generator UNet (a diffusers UNet folder, or a pipeline folder with unet/, "
        "e.g. DMD2-SDXL-1step or a stage-1 run's generator/ export). Must have the teacher UNet's architecture "
        "(and, for a DI* export, the same t_star). Default: a copy of the teacher UNet.",
    )
    fake_init: str | None = Field(
        None, description="Initial fake-score UNet. Default: a copy of the teacher UNet."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Dtype of the frozen parts (text encoders, VAE, reference UNet)."
    )
    resolution: int | None = Field(
        None, description="Pixel resolution; default: the UNet's native sample size."
    )


class LoraConfig(Config):
    rank: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0)
    target_modules: list[str] | None = Field(
        None, description="LoRA target modules; null = core's attention projections for the family."
    )


class OptimizerConfig(Config):
    lr: float = Field(5e-7, gt=0, description="AdamW learning rate (DMD2 SDXL default 5e-7).")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(10.0, description="Gradient clipping norm (DMD2: 10); null = off.")


class GeneratorConfig(Config):
    t_star: int = Field(399, ge=0, description="Fixed timestep the generator is evaluated at on pure noise.")
    lora: LoraConfig | None = Field(None, description="Train a LoRA instead of the full generator UNet.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)


class FakeScoreConfig(Config):
    lora: LoraConfig | None = None
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    updates_per_generator_step: int = Field(
        5,
        ge=1,
        description="K_TA fake-score DSM updates per generator update (DMD2 dfake_gen_update_ratio 5).",
    )
    timestep_range: tuple[int, int] = Field(
        (0, 999), description="DSM timesteps, uniform integers, inclusive."
    )


class LossConfig(Config):
    regulariser: Literal["score", "kl", "none"] = Field(
        "score",
        description="score = DI* score divergence (SIM-style); kl = Diff-Instruct / DI++ integral KL baseline; "
        "none = reward only (hacks).",
    )
    distance: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    huber_c: float = Field(1.0, gt=0, description="pseudo-Huber c, in score units (paper: not given).")
    cfg_scale: float = Field(7.5, ge=0, description="alpha_cfg of the reference (DI*: 7.5).")
    cfg_mode: Literal["in", "out"] = Field(
        "in", description="in: CFG score is the target inside d (DI*-IN); out: implicit reward outside d."
    )
    alpha_rew: float = Field(
        100.0, ge=0, description="Reward scale (DI*: 100). 0 turns the reward off (SIM)."
    )
    divergence_scale: float = Field(1.0, ge=0, description="Multiplier on the regulariser term.")
    timestep_range: tuple[int, int] = Field(
        (20, 980), description="Generator-loss timesteps, uniform integers, inclusive (DMD2: [0.02T, 0.98T])."
    )
    weighting: Literal["constant", "sigma", "sigma_sq"] = Field(
        "sigma", description="w(t) (paper: not given)."
    )


class RewardConfig(Config):
    name: str = Field("shapes-reward", description="Reward registry name (diffalign.core.rewards).")
    kwargs: dict = Field(default_factory=dict, description="Keyword arguments for the reward factory.")
    resize: int | None = Field(
        None, description="Bilinear-resize decoded pixels to this size before the reward (differentiable)."
    )


class DataConfig(Config):
    prompts: str = Field(
        "shapes",
        description="'shapes' (the shapes-world grammar, train split) or a text file, one prompt a line.",
    )
    skills: list[Literal["object", "count", "color", "spatial"]] = Field(
        default_factory=lambda: ["object", "count", "color", "spatial"]
    )
    num_prompts: int = Field(2000, ge=1, description="Number of grammar prompts drawn (shapes only).")
    batch_size: int = Field(4, ge=1, description="Per-process batch size (DMD2 SDXL: 2).")


class TrainingConfig(Config):
    max_steps: int = Field(1000, ge=1, description="Generator updates.")
    checkpoint_every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    log_grad_norms: bool = Field(
        False,
        description="Log the generator-gradient norm of the reward term and of the divergence term separately "
        "(grad_norm_reward, grad_norm_divergence; one extra backward each) to check alpha_rew is near parity.",
    )


class DiStarConfig(Config):
    run_dir: Path = Path("runs/di-star")
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    fake_score: FakeScoreConfig = Field(default_factory=FakeScoreConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    @model_validator(mode="after")
    def _check_ranges(self) -> DiStarConfig:
        for name, (low, high) in (
            ("loss.timestep_range", self.loss.timestep_range),
            ("fake_score.timestep_range", self.fake_score.timestep_range),
        ):
            if not 0 <= low <= high:
                raise ValueError(f"{name} must satisfy 0 <= low <= high, got [{low}, {high}]")
        if self.loss.regulariser == "none" and self.loss.alpha_rew == 0:
            raise ValueError("loss.regulariser=none with loss.alpha_rew=0 leaves nothing to train")
        if self.launch.gradient_accumulation_steps != 1:
            raise ValueError(
                "launch.gradient_accumulation_steps must be 1: DI* alternates two optimisers every step; "
                "raise data.batch_size or num_processes instead"
            )
        if not self.data.skills:
            raise ValueError("data.skills must name at least one skill")
        return self


RECIPE_CONFIG = DiStarConfig
