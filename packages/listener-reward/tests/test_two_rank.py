"""SFT on two gloo ranks through the recipe's launch section (slow: three interpreters, tiny VLMs).

The CLI re-runs itself under torchrun; the ``transformers`` Trainer then runs data-parallel on the CPU
(``use_cpu``, gloo), the runner's and the Trainer's process counts match the recipe's, and the final
model, the trainer state and the run marker are written once. A wrong process count is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from diffalign.core.testing.launch import fresh_env, run_cli


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sft_on_two_gloo_ranks_from_the_recipe(tiny_dirs, tmp_path):
    run = tmp_path / "sft"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"reasoner": tiny_dirs["reasoner"], "listener": tiny_dirs["listener"]},
                "data": {"source": "shapes", "num_train": 8, "num_eval": 4, "image_size": 16},
                "sft": {
                    "max_steps": 2,
                    "batch_size": 1,
                    "save_steps": 1,
                    "logging_steps": 1,
                    "output_dir": str(run),
                },
                "launch": {"launcher": "torchrun", "num_processes": 2},
            }
        )
    )
    done = run_cli("diffalign.listener_reward.cli", "sft", str(recipe))
    assert (run / "final" / "model.safetensors").is_file()
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # the global batch is 2 rows a step (1 per rank): the Trainer saw both ranks
    assert state["train_batch_size"] == 1 and sum(1 for r in state["log_history"] if "loss" in r) == 2
    assert json.loads((run / "diffalign-run.json").read_text())["method"] == "listener-reward sft"
    assert done.stdout.count("saved ") == 1  # printed once, by the main process

    # launched by hand with 2 processes while the recipe expects 1: refused before training, one line
    other = tmp_path / "sft-wrong"
    wrong = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
            "-m", "diffalign.listener_reward.cli", "sft", str(recipe), "--run-dir", str(other),
            "--set", "launch.launcher=none", "--set", "launch.num_processes=1",
        ],
        env=fresh_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert wrong.returncode != 0
    assert "launch.num_processes=1" in wrong.stderr and "2 process(es)" in wrong.stderr
    assert not (other / "final").exists()
