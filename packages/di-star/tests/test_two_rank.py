"""Two gloo ranks through the recipe's launch section train like one process with twice the batch.

Slow: the CLI re-runs itself under torchrun with 2 CPU ranks (three interpreters). Every rank draws the
step's global batch (2 x data.batch_size prompts, noises and timesteps) and keeps its half, so the ranks
see different rows and the generator equals a 1-process run with data.batch_size doubled (to 1% of the
update, TOLERANCE).
A 1-process run with the per-rank batch (what two ranks drawing the same rows would compute) is the
negative control.
"""

from __future__ import annotations

import pytest
import yaml
from safetensors.torch import load_file

from diffalign.core.testing.launch import check_written_once, run_cli
from diffalign.di_star.config import DiStarConfig
from diffalign.di_star.train import train

# Adam's first updates are lr * g / (|g| + eps) per element: where a gradient element is near zero,
# float32 rounding of the average (gloo sums in another order) can move it by up to lr. So the runs are
# compared by the size of their difference relative to the size of the update, over all parameters.
TOLERANCE = 1e-2


def _recipe(tmp_path, run: str, batch: int, **launch) -> dict:
    return {
        "run_dir": str(tmp_path / run),
        "seed": 0,
        "model": {"teacher": str(tmp_path / "teacher")},
        "generator": {"t_star": 399, "optimizer": {"lr": 1e-3}},
        "fake_score": {"updates_per_generator_step": 1, "optimizer": {"lr": 1e-3}},
        "loss": {"alpha_rew": 0.0, "cfg_scale": 7.5, "huber_c": 1.0},
        "data": {"prompts": "shapes", "num_prompts": 16, "batch_size": batch},
        "training": {"max_steps": 2, "checkpoint_every": 1, "log_every": 1},
        "launch": launch,
    }


def _generator(run_dir):
    return load_file(run_dir / "generator" / "unet" / "diffusion_pytorch_model.safetensors")


def _relative_diff(a, b, start) -> float:
    """||a - b|| / ||a - start|| over all parameters: the difference as a fraction of the update."""
    assert a.keys() == b.keys()
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5
    update = sum(float((a[k].double() - start[k].double()).pow(2).sum()) for k in a) ** 0.5
    return diff / update


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_gloo_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    from diffalign.core import testing

    testing.tiny_sd_pipeline(seed=0, prediction_type="v_prediction").save_pretrained(tmp_path / "teacher")
    recipe = tmp_path / "two.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tmp_path, "two", 1, launcher="torchrun", num_processes=2)))
    run_cli("diffalign.di_star.cli", "train", str(recipe))
    two = _generator(tmp_path / "two")
    check_written_once(tmp_path / "two", steps=2, ranks=2)  # logs and checkpoints written once

    start = load_file(tmp_path / "teacher" / "unet" / "diffusion_pytorch_model.safetensors")
    train(DiStarConfig.model_validate(_recipe(tmp_path, "one", 2)))  # the global batch in one process
    same = _relative_diff(two, _generator(tmp_path / "one"), start)
    train(DiStarConfig.model_validate(_recipe(tmp_path, "alone", 1)))  # negative control: half of it
    other = _relative_diff(two, _generator(tmp_path / "alone"), start)
    print(f"|two ranks - one process| / |update|: same global batch {same:.3g}, half of it {other:.3g}")
    assert same < TOLERANCE
    assert other > 10 * TOLERANCE
