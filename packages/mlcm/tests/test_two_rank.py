"""Two gloo ranks through the recipe's launch section distil like one process with the same global batch.

Slow: the CLI re-runs itself under torchrun with 2 CPU ranks (three interpreters). Rank ``r`` of 2 draws
global micro-batch ``2 * step + r``; one process accumulating 2 micro-batches a step over twice the
iterations draws the same ones, so the students agree to float precision (TOLERANCE). One process with one
micro-batch a step (what two ranks drawing the same data would compute) is the negative control.
"""

from __future__ import annotations

import pytest
import yaml
from safetensors.torch import load_file

from diffalign.core.testing.launch import check_written_once, run_cli
from diffalign.mlcm.config import MLCMRecipe
from diffalign.mlcm.train import train

from .helpers import PROMPTS

# AdamW's first updates are lr * g / |g| per element, so float32 rounding of the gradient average (gloo
# sums in another order) moves elements whose gradient is near zero by a small fraction of lr = 1e-2
TOLERANCE = 2e-4


def _recipe(tmp_path, run: str, iterations: int, **launch) -> dict:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {
        "run_dir": str(tmp_path / run),
        "model": {"source": str(tmp_path / "teacher")},
        "student": {"lora_rank": 4},
        "data": {"prompts_file": str(prompts)},
        "distill": {"batch_size": 1, "guidance_scale": 4.0},
        "stage1": {"iterations": iterations, "lr": 1e-2},
        "stage2": {"iterations": 0},
        "checkpoint": {"every": 1},
        "log_every": 1,
        "launch": launch,
    }


def _student(run_dir):
    return load_file(run_dir / "student" / "pytorch_lora_weights.safetensors")


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_gloo_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    from diffalign.core.testing import tiny_sd_pipeline

    tiny_sd_pipeline(prediction_type="v_prediction").save_pretrained(tmp_path / "teacher")
    recipe = tmp_path / "two.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tmp_path, "two", 2, launcher="torchrun", num_processes=2)))
    run_cli("diffalign.mlcm.cli", "distill", str(recipe))
    two = _student(tmp_path / "two")
    check_written_once(tmp_path / "two", steps=2, ranks=2)  # logs and checkpoints written once

    # one process, 2 micro-batches accumulated per optimizer step, twice the iterations: the same global batch
    one = MLCMRecipe.model_validate(_recipe(tmp_path, "one", 4, gradient_accumulation_steps=2))
    train(one, pipe=tiny_sd_pipeline(prediction_type="v_prediction"))
    same = _max_diff(two, _student(tmp_path / "one"))
    assert same < TOLERANCE

    # negative control: one micro-batch a step (as if both ranks had drawn the same data)
    alone = MLCMRecipe.model_validate(_recipe(tmp_path, "alone", 2))
    train(alone, pipe=tiny_sd_pipeline(prediction_type="v_prediction"))
    other = _max_diff(two, _student(tmp_path / "alone"))
    print(f"max |two ranks - one process|: same global batch {same:.3g}, half of it {other:.3g}")
    assert other > 10 * TOLERANCE
