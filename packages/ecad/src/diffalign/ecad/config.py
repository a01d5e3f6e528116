"""Recipe config of an ECAD schedule search (``diffalign config schema ecad`` prints its schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from diffalign.core.config import Config
from diffalign.core.launch import LaunchConfig

__all__ = [
    "ModelSection",
    "SamplingSection",
    "CalibrationSection",
    "QualitySection",
    "SearchSection",
    "EcadRecipe",
    "RECIPE_CONFIG",
]


class ModelSection(Config):
    source: str = Field("shapes/dit", description="hub id, local diffusers folder, or shapes/dit")
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    device: str = Field("cpu", description="device of process 0; process i uses its accelerator device")


class SamplingSection(Config):
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = 4.5
    height: int | None = Field(None, description="pixels; None = the pipeline's default")
    width: int | None = None
    batch_size: int = Field(16, ge=1)
    extra_call_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="passed to pipe(...) verbatim"
    )


class CalibrationSection(Config):
    """Calibration prompts x seeds on which every candidate schedule is scored."""

    prompts: list[str] | None = Field(None, description="explicit prompts (take precedence)")
    prompt_file: str | None = Field(None, description="text file, one prompt per line, or a JSON list")
    shapes_skills: list[Literal["object", "count", "color", "spatial"]] = Field(
        default_factory=lambda: ["object", "count", "color", "spatial"],
        description="shapes-world skills to draw prompts from when no prompts/prompt_file is given",
    )
    shapes_split: Literal["train", "heldout"] = "train"
    num_prompts: int = Field(100, ge=1, description="prompts used (shapes: split evenly over skills)")
    num_seeds: int = Field(10, ge=1, description="images per prompt, seeds seed_offset..seed_offset+n-1")
    seed_offset: int = 0
    prompt_seed: int = 0

    @model_validator(mode="after")
    def _one_source(self):
        if self.prompts is not None and self.prompt_file is not None:
            raise ValueError("give either calibration.prompts or calibration.prompt_file, not both")
        if self.prompts is not None and not self.prompts:
            raise ValueError("calibration.prompts is empty")
        return self


class QualitySection(Config):
    reward: str = Field(
        "shapes-faithfulness",
        description="a registered reward name (diffalign.core.rewards) or 'module.path:factory'",
    )
    reward_kwargs: dict[str, Any] = Field(default_factory=dict)


class SearchSection(Config):
    population_size: int = Field(72, ge=2)
    generations: int = Field(550, ge=1)
    seed: int = 0
    crossover_prob: float = Field(0.9, ge=0, le=1)
    crossover_points: int = Field(4, ge=1)
    mutation_prob: float = Field(0.05, ge=0, le=1, description="fraction of offspring mutated (pymoo prob)")
    mutation_bit_prob: float | None = Field(
        None, ge=0, le=1, description="per-bit flip probability of a mutated child; None = 1/n_bits"
    )
    offspring: int | None = Field(None, ge=1, description="children per generation; None = population size")
    min_cached_bits: int = Field(1, ge=0, description="constraint: at least this many reused evaluations")
    seed_heuristics: bool = Field(True, description="initial population: no-cache, FORA, TGATE, grids")
    seed_builtin_recordings: bool = Field(
        True,
        description="initial population: static recordings of diffusers' built-in caches' decisions "
        "(FirstBlockCache, PAB, FasterCache, TaylorSeer) on the first calibration batch",
    )
    crossover: Literal["component", "point"] = Field(
        "component",
        description="component: children mix whole (block, component) tracks, steps or component slots; "
        "point: the paper's n-point crossover on the flat genome",
    )
    mutation: Literal["structured", "bitflip"] = Field(
        "structured",
        description="structured: every child gets one box/track/bit move; bitflip: the paper's operator "
        "(mutation_prob of the children, mutation_bit_prob per bit)",
    )
    quality_objective: Literal["fidelity", "reward"] = Field(
        "fidelity",
        description="fidelity: a high quantile of the per-image relative L2 distance to the no-cache image "
        "(same prompt and seed); reward: 1 - mean reward (the paper's objective)",
    )
    fidelity_quantile: float = Field(0.9, gt=0, le=1, description="quantile of the per-image distances")
    reward_tolerance: float | None = Field(
        0.02,
        ge=0,
        description="constraint: mean reward >= no-cache reward - tolerance (None = no reward constraint)",
    )
    step_invariant_cache: bool = Field(
        True, description="compute caption-only projections once per generation (bit-exact)"
    )
    cost_model: Literal["flops", "latency"] = Field(
        "flops",
        description="second objective: analytic FLOPs, or per-component latencies measured on this device",
    )
    initial_schedules: list[str] = Field(default_factory=list, description="schedule JSON files to seed with")
    objective: Literal["flops", "flop_ratio"] = Field(
        "flop_ratio", description="compute objective: absolute FLOPs or FLOPs / no-cache FLOPs (same front)"
    )
    choose_at_flop_ratios: list[float] = Field(
        default_factory=lambda: [0.75, 0.5, 0.35],
        description="write run_dir/chosen/flop_ratio_X.json: within each cost budget, the front schedule "
        "with the best validation objective that meets the validation reward constraint",
    )
    num_threads: int | None = Field(
        None, ge=1, description="torch threads per process (None = torch default)"
    )


# recipe keys that do not change a search's trajectory: a resumed search may differ in them (the
# generation budget may grow; the process layout and batch size only spread the same evaluations)
FINGERPRINT_IGNORE = (
    "run_dir",
    "launch",
    "search.generations",
    "search.num_threads",
    "sampling.batch_size",
)


class EcadRecipe(Config):
    run_dir: str = "runs/ecad"
    model: ModelSection = Field(default_factory=ModelSection)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    validation: CalibrationSection | None = Field(
        None,
        description="separate prompts x seeds on which the front is re-scored before a schedule is chosen "
        "(shapes prompts that are also calibration prompts are left out); None = the calibration section "
        "with seed_offset + 1000 and prompt_seed + 1",
    )
    quality: QualitySection = Field(default_factory=QualitySection)
    search: SearchSection = Field(default_factory=SearchSection)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)


RECIPE_CONFIG = EcadRecipe
