import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFALIGN_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).parent))


def _launch_fallback() -> None:
    """TEMPORARY: core.launch has not landed yet; a minimal stand-in so the trainer can be tested."""
    try:
        import diffalign.core.launch  # noqa: F401
    except ImportError:
        import types

        import accelerate

        from diffalign.core.config import Config

        mod = types.ModuleType("diffalign.core.launch")

        class LaunchConfig(Config):
            launcher: str = "none"
            num_processes: int = 1
            mixed_precision: str = "no"
            deepspeed: str = "none"
            gradient_accumulation_steps: int = 1

        def make_accelerator(cfg, run_dir=None):
            return accelerate.Accelerator(mixed_precision=cfg.mixed_precision, cpu=True)

        mod.LaunchConfig, mod.make_accelerator = LaunchConfig, make_accelerator
        sys.modules["diffalign.core.launch"] = mod


_launch_fallback()
