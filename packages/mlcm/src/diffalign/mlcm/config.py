"""Recipe configuration for MLCM distillation (``diffalign config schema mlcm`` prints it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from diffalign.core.config import Config
from diffalign.core.launch import LaunchConfig


class ModelConfig(Config):
    source: str = Field(
        ..., description="Teacher: hub id, local diffusers folder, or shapes/unet | shapes/dit"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    resolution: int | None = Field(
        None, gt=0, description="Pixel resolution; default: the model's sample size"
    )
    max_sequence_length: int | None = Field(
        None, gt=0, description="PixArt text length (default min(120, tok))"
    )


class StudentConfig(Config):
    mode: Literal["lora", "full"] = "lora"
    lora_rank: int = Field(64, ge=1)
    lora_alpha: float | None = Field(None, gt=0, description="Default: equal to lora_rank")
    lora_targets: list[str] | None = Field(
        None, description="Module names; default: TLCM list per architecture"
    )
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="EMA target network (full fine-tune only); the paper uses none"
    )

    @model_validator(mode="after")
    def _ema_only_full(self) -> StudentConfig:
        if self.ema_decay is not None and self.mode != "full":
            raise ValueError("student.ema_decay needs student.mode=full (a LoRA student's target is itself)")
        return self


class DataConfig(Config):
    prompts_file: str | None = Field(None, description="Text file, one prompt per line (no images needed)")
    shapes_skills: list[Literal["object", "count", "color", "spatial"]] = [
        "object",
        "count",
        "color",
        "spatial",
    ]
    shapes_prompts_per_skill: int = Field(500, ge=1, description="Used when prompts_file is not set")
    negative_prompt: str = ""


class DistillConfig(Config):
    """Settings shared by all stages."""

    guidance_scale: float = Field(
        8.0, ge=0, description="Teacher CFG scale w (fixed; baked into the student)"
    )
    loss: Literal["l2", "pseudo_huber"] = "l2"
    huber_c: float = Field(0.001, gt=0)
    batch_size: int = Field(8, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    perceptual: str | None = Field(
        None, description="Latent perceptual hook 'module:factory' returning a latents->features callable"
    )
    perceptual_weight: float = Field(1.0, ge=0)


class Stage1Config(Config):
    """Multistep latent consistency distillation (v6 Alg. 1)."""

    iterations: int = Field(12000, ge=0)
    lr: float = Field(1e-4, gt=0)
    num_segments: int = Field(8, ge=1)
    segment_schedule: list[int] | None = Field(
        None, description="Segment halving, e.g. [8, 4, 2]: iterations split evenly over the phases"
    )
    skip: int = Field(20, ge=1, description="Teacher DDIM skip between t_m and t_n")
    trajectory: Literal["mds", "single"] = "mds"
    mds_reference_segments: int | None = Field(
        8,
        ge=1,
        description="Grid for the MDS step count L = M - s; null follows the phase's num_segments",
    )
    segment_sampling: Literal["per_sample", "per_batch"] = "per_sample"

    @model_validator(mode="after")
    def _check_schedule(self) -> Stage1Config:
        if self.segment_schedule is not None:
            if not self.segment_schedule or any(m < 1 for m in self.segment_schedule):
                raise ValueError(
                    "stage1.segment_schedule must be a non-empty list of positive segment counts"
                )
            if self.iterations and self.iterations < len(self.segment_schedule):
                raise ValueError("stage1.iterations must be >= the number of segment_schedule phases")
        return self

    def phases(self) -> list[int]:
        return list(self.segment_schedule or [self.num_segments])


class Stage2Config(Config):
    """Inter-segment consistency ("progressive training", v6 Alg. 2)."""

    iterations: int = Field(2000, ge=0)
    lr: float = Field(1e-5, gt=0)
    num_segments: int = Field(8, ge=1)
    sample_steps: int = Field(4, ge=1, description="q: student steps that produce the detached x0")
    teacher_substeps: int = Field(3, ge=1, description="p: teacher DDIM sub-steps across one segment")
    sampler: Literal["renoise", "deterministic"] = "renoise"


class RewardConfig(Config):
    """Reward learning on the student's x0 through the VAE decoder (v6 uses an MPS hinge)."""

    name: str | None = Field(None, description="Registered differentiable reward; None disables the stage")
    kwargs: dict = Field(default_factory=dict)
    iterations: int = Field(500, ge=0)
    lr: float = Field(1e-5, gt=0)
    batch_size: int | None = Field(None, ge=1, description="Default: distill.batch_size")
    loss: Literal["hinge", "direct"] = "hinge"
    margin: float = Field(16.0, description="Hinge s0 (16 for MPS; use ~1 for rewards in [0, 1])")
    negative_prompt: str | None = Field(None, description="Irrelevant prompt for the hinge's negative term")
    weight: float = Field(1.0, ge=0)
    consistency_weight: float = Field(1.0, ge=0, description="Stage-2 loss kept alongside the reward")
    sample_steps: int = Field(4, ge=1)


class CheckpointConfig(Config):
    every: int = Field(500, ge=1)
    keep_last: int = Field(2, ge=1)


class MLCMRecipe(Config):
    run_dir: str = "runs/mlcm"
    seed: int = 0
    model: ModelConfig
    student: StudentConfig = StudentConfig()
    data: DataConfig = DataConfig()
    distill: DistillConfig = DistillConfig()
    stage1: Stage1Config = Stage1Config()
    stage2: Stage2Config = Stage2Config()
    reward: RewardConfig = RewardConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log_every: int = Field(50, ge=1)
    launch: LaunchConfig = LaunchConfig()

    @model_validator(mode="after")
    def _check(self) -> MLCMRecipe:
        if self.stage1.iterations + self.stage2.iterations + self.reward_iterations() == 0:
            raise ValueError(
                "nothing to train: stage1, stage2 and reward iterations are all 0 (or reward disabled)"
            )
        if self.stage2.sample_steps > self.stage2.num_segments:
            raise ValueError("stage2.sample_steps must be <= stage2.num_segments")
        if self.reward.name and self.reward.sample_steps > self.stage2.num_segments:
            raise ValueError("reward.sample_steps must be <= stage2.num_segments")
        return self

    def reward_iterations(self) -> int:
        return self.reward.iterations if self.reward.name else 0


RECIPE_CONFIG = MLCMRecipe
