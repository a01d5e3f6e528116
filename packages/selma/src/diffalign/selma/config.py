"""The SELMA recipe: one YAML file drives prompts -> images -> experts -> merge -> eval.

Defaults are the paper's where the paper (or its official code) fixes them: Rouge-L threshold 0.8,
3 in-context examples, 1,000 prompts per skill, LoRA r=128 / alpha=128 on the attention q/k/v/out
projections, AdamW lr 3e-4 constant with no warm-up, weight decay 1e-2, uniform merge weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from diffalign.core.config import Config
from diffalign.core.launch import LaunchConfig

SHAPES_SKILLS = ("object", "count", "color", "spatial")


class SkillConfig(Config):
    """One skill. For the shapes-world skills, ``instruction`` and ``seeds`` default to the grammar's."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_\-]+$")
    instruction: str | None = None
    seeds: list[str] = Field(default_factory=list)
    max_words: int = Field(30, ge=1)
    rules: list[str] = Field(default_factory=list)
    template: dict | None = None  # {"patterns": [...], "slots": {...}} for the template backend


class HFBackendConfig(Config):
    model: str = ""
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    device: str | None = None
    trust_remote_code: bool = False


class OpenAIBackendConfig(Config):
    model: str = "gpt-3.5-turbo-instruct"
    base_url: str = "https://api.openai.com/v1"
    mode: Literal["completions", "chat"] = "completions"
    api_key_env: str | None = "OPENAI_API_KEY"
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(3072, ge=1)
    timeout_s: float = Field(60.0, gt=0)


class PromptsConfig(Config):
    backend: Literal["template", "hf", "openai"] = "template"
    n_per_skill: int = Field(1000, ge=1)
    rouge_threshold: float = Field(0.8, ge=0, le=1)
    num_examples: int = Field(3, ge=1)
    prompts_per_request: int = Field(5, ge=1)
    max_requests: int | None = Field(None, ge=1)
    retries: int = Field(5, ge=0)
    backoff_s: float = Field(2.0, ge=0)
    max_backoff_s: float = Field(60.0, ge=0)
    hf: HFBackendConfig = Field(default_factory=HFBackendConfig)
    openai: OpenAIBackendConfig = Field(default_factory=OpenAIBackendConfig)

    @model_validator(mode="after")
    def _backend_settings(self):
        if self.backend == "hf" and not self.hf.model:
            raise ValueError("prompts.backend is 'hf' but prompts.hf.model is empty (a local path or hub id)")
        return self


class RewardFilterConfig(Config):
    """DreamSync-style filtering of generated images by a registered reward (an extension; off in SELMA)."""

    enabled: bool = False
    reward: str = "shapes-faithfulness"
    threshold: float = 0.5
    kwargs: dict = Field(default_factory=dict)


class ImagesConfig(Config):
    generator: str | None = None  # pipeline that draws the training images; None = the base model
    num_inference_steps: int | None = Field(
        None, ge=1
    )  # None = the pipeline's default (the paper passes none)
    guidance_scale: float | None = None
    height: int | None = Field(None, ge=8)
    width: int | None = Field(None, ge=8)
    batch_size: int = Field(8, ge=1)
    images_per_prompt: int = Field(1, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    device: str | None = None
    image_format: Literal["png", "jpg"] = "png"
    reward_filter: RewardFilterConfig = Field(default_factory=RewardFilterConfig)


class TrainConfig(Config):
    rank: int = Field(128, ge=1)
    alpha: float = Field(128.0, gt=0)
    targets: list[str] | None = None  # LoRA target modules; None: core's attention projections for the family
    init: Literal["gaussian", "default", "pissa", "olora"] = "gaussian"
    lr: float = Field(3e-4, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float | None = Field(1.0, gt=0)
    batch_size: int = Field(16, ge=1)  # per process and micro-step; gradient accumulation is launch.*
    steps: int = Field(5000, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    adapter_steps: list[int] = Field(default_factory=list)  # also export checkpoint-<step>/ adapters
    resolution: int | None = Field(None, ge=8)  # None = the size of the generated images
    random_flip: bool = True
    center_crop: bool = False
    dtype: Literal["float32", "float16", "bfloat16"] | None = None  # frozen VAE / text encoders
    device: str | None = None
    log_every: int = Field(10, ge=1)
    mixed_steps: int | None = Field(None, ge=1)  # steps of the one-LoRA-on-all-skills baseline (None = sum)
    # Extensions that match the expert's training to the base's own (SELMA itself uses neither):
    # "teacher" = the shapes teachers' per-sample weight min(max(SNR, 1), snr_clamp) / (SNR + 1) on the
    # v-prediction MSE (diffalign.core.shapes.teachers.snr_weight); "none" = the plain MSE (the paper).
    loss_weighting: Literal["none", "teacher"] = "none"
    snr_clamp: float = Field(5.0, gt=0)
    # fraction of training captions replaced by the empty prompt (keeps the unconditional branch that
    # classifier-free guidance needs); 0 = the paper
    caption_dropout: float = Field(0.0, ge=0, lt=1)


class MergeConfig(Config):
    method: Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"] = "linear"
    experts: list[str] | None = None  # skills to merge (None = all skills of the recipe)
    expert_step: int | None = Field(
        None, ge=1
    )  # merge experts/<skill>/checkpoint-<step> (train.adapter_steps)
    weights: list[float] | None = None  # None = uniform 1/n (not 1/len(model_id) as in the official code)
    density: float = Field(0.5, gt=0, le=1)
    majority: Literal["total", "frequency"] = "total"
    ties_scale: float = Field(1.0, gt=0)
    svd_rank: int | None = Field(None, ge=1)
    seed: int = 0
    export: Literal["fused", "lora", "both"] = "both"

    @model_validator(mode="after")
    def _check(self):
        if self.weights is not None and self.experts is not None and len(self.weights) != len(self.experts):
            raise ValueError(
                f"merge.weights has {len(self.weights)} entries but merge.experts has {len(self.experts)}"
            )
        if self.method == "svd" and self.svd_rank is None:
            raise ValueError("merge.method 'svd' needs merge.svd_rank")
        return self


class EvalConfig(Config):
    prompts: str | None = None  # a prompts .jsonl ({"skill", "text"}); None = the shapes world's held-out set
    n_per_skill: int = Field(25, ge=1)
    prompt_seed: int = 1234
    faithfulness: Literal["shapes", "none"] = "shapes"
    rewards: list[str] = Field(default_factory=list)
    # keyword arguments per reward name, e.g. {"listener-judge": {"source": "/models/judge"}}
    reward_kwargs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # mixed_matched: the mixed LoRA scaled to the merge's update norm (the fair comparison)
    models: list[Literal["base", "experts", "mixed", "mixed_matched", "merged"]] = Field(
        default_factory=lambda: ["base", "merged"]
    )
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = None
    height: int | None = Field(None, ge=8)
    width: int | None = Field(None, ge=8)
    batch_size: int = Field(16, ge=1)
    seed: int = 0
    save_grids: bool = True

    @model_validator(mode="after")
    def _reward_kwargs_named(self):
        unknown = sorted(set(self.reward_kwargs) - set(self.rewards))
        if unknown:
            raise ValueError(f"eval.reward_kwargs names rewards that are not in eval.rewards: {unknown}")
        return self


class SelmaConfig(Config):
    """The SELMA recipe (``diffalign selma run recipe.yaml``)."""

    run_dir: str = "runs/selma"
    seed: int = 0
    model: str = "shapes/unet"  # the base text-to-image model that the experts adapt
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    device: str | None = None
    skills: list[SkillConfig] = Field(
        default_factory=lambda: [SkillConfig(name=s, max_words=16) for s in SHAPES_SKILLS]
    )
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    @field_validator("skills")
    @classmethod
    def _unique_skills(cls, skills: list[SkillConfig]) -> list[SkillConfig]:
        if not skills:
            raise ValueError("at least one skill is needed")
        names = [s.name for s in skills]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"skill names must be unique, repeated: {dup}")
        for s in skills:
            if s.name not in SHAPES_SKILLS and not s.seeds:
                raise ValueError(
                    f"skill {s.name!r} is not a shapes-world skill: give it seed prompts (skills[].seeds)"
                )
            if s.name not in SHAPES_SKILLS and not s.instruction:
                raise ValueError(f"skill {s.name!r} is not a shapes-world skill: give it an instruction")
        return skills

    @model_validator(mode="after")
    def _check_merge_experts(self):
        step = self.merge.expert_step
        if step is not None and step != self.train.steps and step not in self.train.adapter_steps:
            raise ValueError(
                f"merge.expert_step {step} is neither train.steps nor one of train.adapter_steps"
            )
        if self.merge.experts is not None:
            names = {s.name for s in self.skills}
            unknown = [e for e in self.merge.experts if e not in names]
            if unknown:
                raise ValueError(
                    f"merge.experts names unknown skills {unknown}; recipe skills are {sorted(names)}"
                )
        return self

    # run-directory layout
    def path(self, *parts: str) -> Path:
        return Path(self.run_dir).joinpath(*parts)


RECIPE_CONFIG = SelmaConfig
