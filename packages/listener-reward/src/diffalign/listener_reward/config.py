"""Recipe config of listener-shaped GRPO.

Everything the paper does not state (prompt templates, group size, beta, learning rate, lengths, pixel
budget) is a field here, never a constant in code. Defaults are the research note's choices; recipes
label each guess in a YAML comment.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from diffalign.core.config import Config
from diffalign.core.launch import LaunchConfig


class PromptsConfig(Config):
    """Reasoner and listener templates. ``{prompt}`` is the text-to-image prompt, ``{reasoning}`` the
    reasoner's chain of thought with the answer removed. The images go between the image labels."""

    reasoner_system: str = (
        "you are a judge . look at both images , think , then give the final choice ."  # tiny-vocab default
    )
    reasoner_prefix: str = "prompt : {prompt}"
    image1_label: str = "image 1 :"
    image2_label: str = "image 2 :"
    reasoner_question: str = (
        "which image is better for the prompt ? <think> reasoning </think> <answer> 1 or 2 </answer>"
    )
    listener_system: str = "you are a judge ."
    listener_question: str = (
        "reasoning : {reasoning} . based on this reasoning which image is better ? answer 1 or 2"
    )
    # text appended after the assistant generation prompt before reading the two answer logits
    listener_answer_prefix: str = "<answer>"
    reasoner_answer_prefix: str = "<answer>"
    answer_tokens: tuple[str, str] = ("1", "2")
    answer_format: Literal["tags", "json"] = "tags"

    @field_validator("reasoner_prefix")
    @classmethod
    def _has_prompt(cls, v: str) -> str:
        if "{prompt}" not in v:
            raise ValueError("reasoner_prefix must contain the '{prompt}' placeholder")
        return v

    @field_validator("listener_question")
    @classmethod
    def _has_reasoning(cls, v: str) -> str:
        if "{reasoning}" not in v:
            raise ValueError("listener_question must contain the '{reasoning}' placeholder")
        return v


class RewardConfig(Config):
    """r = w_fmt * r_fmt + w_acc * r_acc + w_list * r_list (paper: 1 / 0.5 / 0.5)."""

    format_weight: float = 1.0
    accuracy_weight: float = 0.5
    listener_weight: float = 0.5
    use_listener: bool = True
    listener_backend: Literal["local", "http"] = "local"
    listener_url: str | None = None  # for backend http: POST endpoint served by `serve_listener`
    listener_timeout_s: float = 60.0
    listener_batch_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _url(self):
        if self.use_listener and self.listener_backend == "http" and not self.listener_url:
            raise ValueError("reward.listener_backend=http needs reward.listener_url")
        return self


class ModelConfig(Config):
    reasoner: str = "shapes/reasoner"  # hub id or local dir; 'shapes/...' = models trained by this package
    listener: str = "shapes/listener"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_pixels: int = Field(32 * 32, ge=64)  # per-image pixel budget (note: 256*28*28 for real models)
    min_pixels: int = Field(16 * 16, ge=16)
    trust_remote_code: bool = False


class DataConfig(Config):
    source: Literal["shapes", "shapes-core", "imagereward", "hpdv2", "rapidata", "jsonl"] = "shapes"
    train_path: str | None = None
    eval_paths: dict[str, str] = Field(default_factory=dict)  # split name -> file
    eval_formats: dict[str, Literal["imagereward", "hpdv2", "rapidata"]] = Field(default_factory=dict)
    train_fraction: float = Field(1.0, gt=0, le=1)  # paper: 16% of HPDv2 train
    num_train: int = Field(512, ge=1)  # shapes world only
    num_eval: int = Field(200, ge=1)  # shapes world only, per split
    image_size: int = Field(16, ge=8)  # shapes world only
    annotator_noise: float = Field(0.15, ge=0, lt=0.5)  # shapes world stand-in annotators
    seed: int = 0


class LoraConfig(Config):
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class SFTConfig(Config):
    learning_rate: float = 1e-3
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_steps: int = 100
    logging_steps: int = 10
    target: Literal["oracle", "answer_only"] = "oracle"  # oracle CoT needs per-image verdicts in the data
    output_dir: str = "runs/listener-reward/sft"


class GRPOConfig(Config):
    num_generations: int = Field(8, ge=2)  # G, TRL default [guess]
    beta: float = Field(0.04, ge=0)  # KL coefficient, original GRPO [guess]
    learning_rate: float = 1e-6  # TRL default [guess]
    temperature: float = Field(1.0, gt=0)
    max_completion_length: int = Field(512, ge=4)
    per_device_batch_size: int = Field(8, ge=1)  # completions per device per step
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = Field(100, ge=1)
    epsilon: float = 0.2
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    save_steps: int = 50
    logging_steps: int = 5
    gradient_checkpointing: bool = False
    use_vllm: bool = False
    vllm_mode: Literal["colocate", "server"] = "colocate"
    output_dir: str = "runs/listener-reward/grpo"
    init_from: str | None = (
        None  # reasoner checkpoint to start from (e.g. the SFT output); default model.reasoner
    )

    @model_validator(mode="after")
    def _group(self):
        if (
            self.per_device_batch_size % self.num_generations
            and self.num_generations % self.per_device_batch_size
        ):
            raise ValueError(
                f"grpo.per_device_batch_size ({self.per_device_batch_size}) and grpo.num_generations "
                f"({self.num_generations}) must divide one another"
            )
        return self


class JudgeConfig(Config):
    max_new_tokens: int = Field(512, ge=1)
    do_sample: bool = False
    symmetric: bool = False  # average p over both image orders (removes position bias)
    num_anchors: int = Field(2, ge=1)


class EvalConfig(Config):
    splits: list[str] = Field(default_factory=lambda: ["test_id", "test_ood"])
    max_pairs: int | None = None
    bootstrap: int = Field(1000, ge=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    output: str = "runs/listener-reward/eval.json"
    checkpoint: str | None = None  # reasoner to evaluate; default grpo.output_dir/final


class ListenerRewardRecipe(Config):
    """Top-level recipe (``diffalign config schema listener-reward``)."""

    seed: int = 0
    device: str = "cpu"
    model: ModelConfig = Field(default_factory=ModelConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)


RECIPE_CONFIG = ListenerRewardRecipe

__all__ = [
    "DataConfig",
    "EvalConfig",
    "GRPOConfig",
    "JudgeConfig",
    "ListenerRewardRecipe",
    "LoraConfig",
    "ModelConfig",
    "PromptsConfig",
    "RECIPE_CONFIG",
    "RewardConfig",
    "SFTConfig",
]
