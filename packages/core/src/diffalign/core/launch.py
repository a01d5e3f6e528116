"""Launching trainers single-process, data-parallel (accelerate / torchrun) or with DeepSpeed ZeRO.

A trainer never changes between these modes: the CLI re-executes ``python -m <module> <args>``
through :func:`launch` (the command comes from the pure :func:`build_command`), and the worker builds
its :class:`accelerate.Accelerator` with :func:`make_accelerator` from the same :class:`LaunchConfig`.

DeepSpeed presets (``zero2``, ``zero3``, ``zero3_offload``) are expressed twice, consistently: as
accelerate ``DeepSpeedPlugin`` arguments inside the worker and as a raw DeepSpeed JSON config from
:func:`deepspeed_config`, whose ``"auto"`` fields (batch sizes, accumulation, clipping, precision)
accelerate fills at ``prepare`` time; :func:`resolve_deepspeed_config` fills them for raw
``deepspeed.initialize`` use.

On CPU-only machines (measured with accelerate 1.16, DeepSpeed 0.19.8): a worker started with
``WORLD_SIZE > 1`` and no GPU gets a CPU accelerator on the gloo backend (``MULTI_CPU``), so
``accelerate launch --multi_gpu``, torchrun and ``accelerate.debug_launcher`` all give real
multi-process data parallelism; ``accelerate launch`` with DeepSpeed runs one process; more processes
need torchrun. The multi-process ``distributed_type`` written by :func:`write_accelerate_config` is
``MULTI_GPU`` (GPU clusters), as accelerate expects there.

Inside a worker, :func:`launched_world_size` tells whether a launcher started this process and
:func:`check_process_count` asserts that the accelerator runs as many processes as the recipe asks.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from diffalign.core.config import Config

__all__ = [
    "DEEPSPEED_PRESETS",
    "TRACKERS",
    "LaunchConfig",
    "ProcessCountError",
    "build_command",
    "check_process_count",
    "deepspeed_config",
    "is_main_process",
    "launch",
    "launched_world_size",
    "make_accelerator",
    "process_rank",
    "process_state",
    "resolve_trackers",
    "started_by_launcher",
    "resolve_deepspeed_config",
    "write_accelerate_config",
    "write_deepspeed_config",
]

DEEPSPEED_PRESETS: dict[str, tuple[int, bool]] = {
    "zero2": (2, False),
    "zero3": (3, False),
    "zero3_offload": (3, True),
}
TRACKERS = ("auto", "tensorboard", "wandb")


class ProcessCountError(ValueError):
    """The run has a different number of processes than the recipe's ``launch.num_processes``."""


class LaunchConfig(Config):
    """How to run a trainer: launcher, process layout, precision and DeepSpeed.

    ``num_processes`` counts processes over *all* machines (accelerate's convention); torchrun gets
    ``num_processes // num_machines`` per node. ``deepspeed`` is ``none``, a preset
    (``zero2``, ``zero3``, ``zero3_offload``) or the path of a DeepSpeed JSON config. When
    ``accelerate_config_file`` is set, the accelerate launcher reads the process layout and precision
    from that file instead of these fields. ``log_with`` names the trackers a trainer reports to:
    ``tensorboard``, ``wandb`` (each when installed) or ``auto`` (tensorboard when installed).
    """

    launcher: Literal["none", "accelerate", "torchrun"] = "none"
    num_processes: int = Field(1, ge=1)
    num_machines: int = Field(1, ge=1)
    machine_rank: int = Field(0, ge=0)
    main_process_ip: str | None = None
    main_process_port: int | None = Field(None, ge=1, le=65535)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    deepspeed: str = "none"
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_clipping: float | None = Field(None, gt=0)
    accelerate_config_file: str | None = None
    log_with: list[str] = Field(default_factory=list)

    @field_validator("log_with", mode="before")
    @classmethod
    def _check_log_with(cls, value: Any) -> Any:
        if value is None or value == "none":
            return []
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [v for v in value if v not in TRACKERS]
        if unknown:
            raise ValueError(f"unknown tracker(s) {unknown}; choose from {list(TRACKERS)} or 'none'")
        return value

    @field_validator("deepspeed")
    @classmethod
    def _check_deepspeed(cls, value: str) -> str:
        if value == "none" or value in DEEPSPEED_PRESETS:
            return value
        if not value.endswith(".json"):
            raise ValueError(
                f"deepspeed must be 'none', one of {sorted(DEEPSPEED_PRESETS)} or a path to a .json "
                f"DeepSpeed config, got {value!r}"
            )
        if not Path(value).is_file():
            raise ValueError(f"DeepSpeed config file not found: {value}")
        return value

    @field_validator("accelerate_config_file")
    @classmethod
    def _check_accelerate_config(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"accelerate config file not found: {value}")
        return value

    @model_validator(mode="after")
    def _check_layout(self) -> LaunchConfig:
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank {self.machine_rank} must be < num_machines {self.num_machines}")
        if self.num_processes % self.num_machines:
            raise ValueError(
                f"num_processes ({self.num_processes}) counts processes over all machines and must be a "
                f"multiple of num_machines ({self.num_machines})"
            )
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("num_machines > 1 needs main_process_ip (the address of machine_rank 0)")
        if self.launcher == "none" and (self.num_processes > 1 or self.num_machines > 1):
            raise ValueError("launcher 'none' runs one process; choose 'accelerate' or 'torchrun' for more")
        return self

    @property
    def uses_deepspeed(self) -> bool:
        return self.deepspeed != "none"

    @property
    def processes_per_machine(self) -> int:
        return self.num_processes // self.num_machines


# --------------------------------------------------------------------------- DeepSpeed configs


def deepspeed_config(
    stage: int,
    offload: bool = False,
    *,
    mixed_precision: str = "auto",
    gradient_accumulation_steps: int | str = "auto",
    gradient_clipping: float | str = "auto",
    reduce_bucket_size: int = 500_000_000,
    stage3_prefetch_bucket_size: int = 50_000_000,
    stage3_param_persistence_threshold: int = 100_000,
) -> dict[str, Any]:
    """A DeepSpeed ZeRO config dict (stage 2 or 3, optional CPU offload).

    Batch sizes are ``"auto"`` (accelerate fills them from the prepared dataloader); precision,
    accumulation and clipping are ``"auto"`` unless given. ``offload`` moves optimizer state to CPU
    (stage 2 and 3) and parameters too (stage 3). Bucket sizes are explicit numbers, so models
    without a ``config.hidden_size`` work.
    """
    if stage not in (2, 3):
        raise ValueError(f"ZeRO stage must be 2 or 3, got {stage}")
    if mixed_precision not in ("auto", "no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be auto|no|fp16|bf16, got {mixed_precision!r}")
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": reduce_bucket_size,
    }
    if stage == 2:
        zero.update(
            {
                "allgather_partitions": True,
                "allgather_bucket_size": reduce_bucket_size,
                "reduce_scatter": True,
            }
        )
    else:
        zero.update(
            {
                "stage3_prefetch_bucket_size": stage3_prefetch_bucket_size,
                "stage3_param_persistence_threshold": stage3_param_persistence_threshold,
                "stage3_max_live_parameters": 1_000_000_000,
                "stage3_max_reuse_distance": 1_000_000_000,
                "stage3_gather_16bit_weights_on_model_save": True,
                "sub_group_size": 1_000_000_000,
            }
        )
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    def enabled(kind: str) -> bool | str:
        return "auto" if mixed_precision == "auto" else mixed_precision == kind

    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": zero,
        "fp16": {"enabled": enabled("fp16"), "loss_scale": 0, "initial_scale_power": 16},
        "bf16": {"enabled": enabled("bf16")},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def resolve_deepspeed_config(
    config: Mapping[str, Any],
    *,
    micro_batch_size: int,
    world_size: int = 1,
    gradient_accumulation_steps: int = 1,
    gradient_clipping: float = 0.0,
    mixed_precision: str = "no",
) -> dict[str, Any]:
    """Replace the ``"auto"`` fields of ``config`` for direct ``deepspeed.initialize`` use."""
    out = copy.deepcopy(dict(config))
    fills = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": gradient_clipping,
    }
    for key, value in fills.items():
        if out.get(key, "auto") == "auto":
            out[key] = value
    for kind in ("fp16", "bf16"):
        section = out.get(kind)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = mixed_precision == kind
    leftover = [path for path in _auto_paths(out)]
    if leftover:
        raise ValueError(f"DeepSpeed config still has 'auto' values at {leftover}; set them explicitly")
    return out


def _auto_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _auto_paths(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def _preset_or_file(cfg: LaunchConfig) -> dict[str, Any]:
    if cfg.deepspeed in DEEPSPEED_PRESETS:
        stage, offload = DEEPSPEED_PRESETS[cfg.deepspeed]
        return deepspeed_config(stage, offload)
    try:
        return json.loads(Path(cfg.deepspeed).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {cfg.deepspeed} is not valid JSON: {err}") from err


def write_deepspeed_config(path: str | os.PathLike, cfg: LaunchConfig) -> Path:
    """Write the DeepSpeed JSON for ``cfg`` (preset expanded, or the user's file copied)."""
    if not cfg.uses_deepspeed:
        raise ValueError("LaunchConfig.deepspeed is 'none'; nothing to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_preset_or_file(cfg), indent=2) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- accelerate config


def accelerate_config_dict(cfg: LaunchConfig) -> dict[str, Any]:
    """The accelerate YAML config (``accelerate launch --config_file``) equivalent to ``cfg``."""
    if cfg.uses_deepspeed:
        distributed_type = "DEEPSPEED"
    elif cfg.num_processes > 1:
        distributed_type = "MULTI_GPU"
    else:
        distributed_type = "NO"
    out: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "distributed_type": distributed_type,
        "downcast_bf16": "no",
        "machine_rank": cfg.machine_rank,
        "main_training_function": "main",
        "mixed_precision": cfg.mixed_precision,
        "num_machines": cfg.num_machines,
        "num_processes": cfg.num_processes,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if cfg.main_process_ip:
        out["main_process_ip"] = cfg.main_process_ip
    if cfg.main_process_port:
        out["main_process_port"] = cfg.main_process_port
    if cfg.deepspeed in DEEPSPEED_PRESETS:
        stage, offload = DEEPSPEED_PRESETS[cfg.deepspeed]
        out["deepspeed_config"] = {
            "zero_stage": stage,
            "offload_optimizer_device": "cpu" if offload else "none",
            "offload_param_device": "cpu" if offload and stage == 3 else "none",
            "zero3_init_flag": stage == 3,
            "zero3_save_16bit_model": stage == 3,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "gradient_clipping": cfg.gradient_clipping if cfg.gradient_clipping is not None else 0.0,
        }
    elif cfg.uses_deepspeed:
        out["deepspeed_config"] = {
            "deepspeed_config_file": str(Path(cfg.deepspeed).absolute()),
            "zero3_init_flag": _preset_or_file(cfg).get("zero_optimization", {}).get("stage") == 3,
        }
    return out


def write_accelerate_config(path: str | os.PathLike, cfg: LaunchConfig) -> Path:
    """Write ``cfg`` as an accelerate YAML config file usable with ``accelerate launch --config_file``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(accelerate_config_dict(cfg), sort_keys=True), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- commands


def build_command(
    module: str,
    args: Sequence[str] = (),
    cfg: LaunchConfig | None = None,
    *,
    python: str | None = None,
    script: bool = False,
) -> list[str]:
    """The command line that runs ``python -m module *args`` under ``cfg.launcher``. Pure function.

    With ``script=True``, ``module`` is the path of a Python script (a console script, for example)
    run as ``python module *args``.
    """
    cfg = cfg or LaunchConfig()
    python = python or sys.executable
    if not module or module.startswith("-"):
        raise ValueError(f"module must be a dotted module name, got {module!r}")
    args = [str(a) for a in args]
    target = [module] if script else ["-m", module]

    if cfg.launcher == "none":
        return [python, *target, *args]

    if cfg.launcher == "torchrun":
        cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.processes_per_machine)]
        if cfg.num_machines == 1 and not cfg.main_process_ip:
            cmd += ["--standalone", "--nnodes", "1"]
        else:
            cmd += ["--nnodes", str(cfg.num_machines), "--node_rank", str(cfg.machine_rank)]
            cmd += ["--master_addr", cfg.main_process_ip or "127.0.0.1"]
            cmd += ["--master_port", str(cfg.main_process_port or 29500)]
        return [*cmd, *target, *args]

    cmd = [python, "-m", "accelerate.commands.launch"]
    if cfg.accelerate_config_file:
        cmd += ["--config_file", cfg.accelerate_config_file]
    else:
        cmd += ["--num_processes", str(cfg.num_processes), "--num_machines", str(cfg.num_machines)]
        cmd += ["--mixed_precision", cfg.mixed_precision]
        if cfg.num_machines > 1:
            cmd += ["--machine_rank", str(cfg.machine_rank), "--main_process_ip", str(cfg.main_process_ip)]
        if cfg.main_process_port:
            cmd += ["--main_process_port", str(cfg.main_process_port)]
        if cfg.deepspeed in DEEPSPEED_PRESETS:
            stage, offload = DEEPSPEED_PRESETS[cfg.deepspeed]
            cmd += ["--use_deepspeed", "--zero_stage", str(stage)]
            cmd += ["--offload_optimizer_device", "cpu" if offload else "none"]
            cmd += ["--offload_param_device", "cpu" if offload and stage == 3 else "none"]
            cmd += ["--zero3_init_flag", "true" if stage == 3 else "false"]
            cmd += ["--gradient_accumulation_steps", str(cfg.gradient_accumulation_steps)]
            if cfg.gradient_clipping is not None:
                cmd += ["--gradient_clipping", str(cfg.gradient_clipping)]
        elif cfg.uses_deepspeed:
            cmd += ["--use_deepspeed", "--deepspeed_config_file", str(cfg.deepspeed)]
        elif cfg.num_processes > 1:
            cmd += ["--multi_gpu"]
    return [*cmd, *target, *args]


def launch(
    module: str,
    args: Sequence[str] = (),
    cfg: LaunchConfig | None = None,
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    cwd: str | os.PathLike | None = None,
) -> int:
    """Run :func:`build_command` in a subprocess and wait; returns its exit code.

    With ``check`` a non-zero exit raises ``subprocess.CalledProcessError`` naming the command.
    """
    cmd = build_command(module, args, cfg)
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run(cmd, env=full_env, cwd=cwd, check=False)
    if check and result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, cmd)
    return result.returncode


# --------------------------------------------------------------------------- worker side


def make_accelerator(
    cfg: LaunchConfig | None = None,
    run_dir: str | os.PathLike | None = None,
    log_with: str | Sequence[str] | None = None,
    **accelerator_kwargs: Any,
):
    """Build the ``accelerate.Accelerator`` for ``cfg`` inside a (possibly distributed) worker.

    DeepSpeed presets become a ``DeepSpeedPlugin``; a JSON path is passed as ``hf_ds_config``.
    The project configuration has ``project_dir=run_dir`` and ``logging_dir=run_dir/logs``.
    Trackers are ``log_with`` or, when it is ``None``, ``cfg.log_with``: ``"tensorboard"`` /
    ``"wandb"`` are used only when installed (otherwise a warning is issued and that tracker is
    skipped); ``"auto"`` means tensorboard when installed and ``run_dir`` is set.
    Without a GPU, a process started with ``WORLD_SIZE > 1`` uses the CPU (gloo) backend; a DeepSpeed
    run uses DeepSpeed's CPU communication backend (gloo, or ccl when oneCCL is installed).
    """
    from accelerate import Accelerator

    cfg = cfg or LaunchConfig()
    kwargs: dict[str, Any] = {"mixed_precision": cfg.mixed_precision}
    distributed_cpu = (launched_world_size() or 1) > 1 and not _has_gpu()
    if distributed_cpu and not cfg.uses_deepspeed:
        kwargs["cpu"] = True
    if cfg.uses_deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        if cfg.deepspeed in DEEPSPEED_PRESETS:
            stage, offload = DEEPSPEED_PRESETS[cfg.deepspeed]
            plugin = DeepSpeedPlugin(
                zero_stage=stage,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                # None means no clipping, as without DeepSpeed (accelerate would fill in 1.0)
                gradient_clipping=cfg.gradient_clipping if cfg.gradient_clipping is not None else 0.0,
                offload_optimizer_device="cpu" if offload else "none",
                offload_param_device="cpu" if offload and stage == 3 else "none",
                zero3_init_flag=stage == 3,
                zero3_save_16bit_model=stage == 3,
            )
        else:
            plugin = DeepSpeedPlugin(hf_ds_config=str(cfg.deepspeed))
        kwargs["deepspeed_plugin"] = plugin
    else:
        kwargs["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    if run_dir is not None:
        from accelerate.utils import ProjectConfiguration

        kwargs["project_config"] = ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "logs")
        )
    trackers = resolve_trackers(cfg.log_with if log_with is None else log_with, run_dir)
    if trackers:
        kwargs["log_with"] = trackers
    if distributed_cpu and cfg.uses_deepspeed:
        # accelerate finds no distributed backend for DeepSpeed on a CPU and would count one process
        # although DeepSpeed joined them all; name DeepSpeed's CPU backend (gloo, or ccl with oneCCL)
        from accelerate.utils import InitProcessGroupKwargs
        from deepspeed.accelerator import get_accelerator

        backend = get_accelerator().communication_backend_name()
        handlers = list(accelerator_kwargs.pop("kwargs_handlers", None) or [])
        if not any(isinstance(h, InitProcessGroupKwargs) for h in handlers):
            handlers.append(InitProcessGroupKwargs(backend=backend))
        kwargs["kwargs_handlers"] = handlers
    kwargs.update(accelerator_kwargs)
    return Accelerator(**kwargs)


def process_state():
    """accelerate's ``PartialState`` for a stage without an accelerator (image generation, evaluation).

    As in :func:`make_accelerator`, a process started with ``WORLD_SIZE > 1`` and no GPU joins the others on
    the CPU (gloo) backend; a bare ``PartialState()`` would run it as an independent single process.
    """
    from accelerate import PartialState

    if (launched_world_size() or 1) > 1 and not _has_gpu():
        return PartialState(cpu=True)
    return PartialState()


def resolve_trackers(log_with: str | Sequence[str] | None, run_dir: Any = None) -> list[str]:
    """The installed trackers among ``log_with`` (``auto``: tensorboard when installed and ``run_dir`` set).

    For trainers that take tracker names directly (``transformers.TrainingArguments(report_to=...)``).
    """
    if log_with is None:
        return []
    names = [log_with] if isinstance(log_with, str) else list(log_with)
    has_tensorboard = (
        importlib.util.find_spec("tensorboard") is not None
        or importlib.util.find_spec("tensorboardX") is not None
    )
    out = []
    for name in names:
        if name == "auto":
            if has_tensorboard and run_dir is not None:
                out.append("tensorboard")
        elif name == "tensorboard" and not has_tensorboard:
            warnings.warn("tensorboard is not installed; logging without a tracker", stacklevel=3)
        elif name == "wandb" and importlib.util.find_spec("wandb") is None:
            warnings.warn("wandb is not installed; logging without it", stacklevel=3)
        else:
            out.append(name)
    return out


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def launched_world_size() -> int | None:
    """The process count a launcher (torchrun, accelerate launch, deepspeed) set, or ``None``."""
    value = os.environ.get("WORLD_SIZE")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def started_by_launcher() -> bool:
    """True when torchrun, ``accelerate launch`` (any process count) or another launcher started this process."""
    return any(var in os.environ for var in ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_DYNAMO_BACKEND"))


def process_rank() -> int:
    """This process's global rank from the environment (0 when not launched)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def check_process_count(accelerator: Any, cfg: LaunchConfig) -> None:
    """Raise :class:`ProcessCountError` unless ``accelerator`` runs ``cfg.num_processes`` processes."""
    if accelerator.num_processes != cfg.num_processes:
        raise ProcessCountError(
            f"the recipe asks for launch.num_processes={cfg.num_processes} but the accelerator runs "
            f"{accelerator.num_processes} process(es) ({accelerator.distributed_type}); launch with "
            f"{cfg.num_processes} processes or change launch.num_processes"
        )


def is_main_process() -> bool:
    """True on global rank 0 (or when not distributed). Safe to call before any accelerator exists."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # pragma: no cover - torch without distributed support
        pass
    return int(os.environ.get("RANK", "0")) == 0
