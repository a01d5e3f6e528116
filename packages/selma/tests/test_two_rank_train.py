"""Two gloo ranks train a LoRA expert like one process accumulating both ranks' micro-batches.

The default suite's real multi-process trainer test (the other methods' are marked slow): 2 CPU ranks
under torchrun at a tiny budget. Each rank draws its own share of the global batch, outputs are written
once, and the adapter equals a 1-process run with the same global batch (gradient accumulation over 2
micro-batches) to 1e-5; a 1-process run with one micro-batch a step (half the global batch) is the
negative control.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from diffalign.core.launch import LaunchConfig
from diffalign.core.testing.launch import fresh_env
from diffalign.selma import images as I
from diffalign.selma.config import TrainConfig
from diffalign.selma.train import train_lora

from .helpers import tiny_image_folder

RECORDS = [
    {"text": t, "skill": "count"}
    for t in ("two red circles", "three blue squares", "one green triangle", "two yellow circles")
]
TRAIN = dict(rank=4, alpha=4, steps=2, checkpoint_every=1, batch_size=1, lr=1e-2, log_every=1)
TOLERANCE = 1e-5  # float32, the gradient average is summed in another order over gloo

HELPER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    from diffalign.core.launch import LaunchConfig
    from diffalign.core.testing import tiny_sd_pipeline
    from diffalign.selma import images as I, train as T
    from diffalign.selma.config import TrainConfig

    folder, out, processes, accumulation = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rank = int(os.environ.get("RANK", "0"))
    seen = []
    real = T.batch_indices

    def recording(*args):
        idx = real(*args)
        seen.extend(idx)
        return idx

    T.batch_indices = recording
    launch = LaunchConfig(
        launcher="torchrun" if processes > 1 else "none",
        num_processes=processes,
        gradient_accumulation_steps=accumulation,
    )
    T.train_lora(
        tiny_sd_pipeline(), I.read_imagefolder(folder), out, TrainConfig(**json.loads(os.environ["TRAIN"])),
        launch, seed=0, log=lambda *_: None,
    )
    (out.parent / f"{out.name}-seen-{rank}.json").write_text(json.dumps(seen))
    """
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_image_folder(tmp_path_factory.mktemp("two-rank") / "images", RECORDS)


def _run(tmp_path, folder, name: str, processes: int, accumulation: int):
    """``processes`` ranks under torchrun (each a fresh interpreter running HELPER)."""
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER)
    env = fresh_env(TRAIN=json.dumps(TRAIN))
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nnodes", "1"]
        launcher += ["--nproc_per_node", str(processes)]
    cmd = [*launcher, str(helper), str(folder), str(tmp_path / name), str(processes), str(accumulation)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(tmp_path / name / "pytorch_lora_weights.safetensors")


_seen_here: list[int] = []


def _train_here(folder, out, accumulation: int, monkeypatch):
    """One process in this interpreter, recording the data indices it draws."""
    from diffalign.core.testing import tiny_sd_pipeline
    from diffalign.selma import train as T

    _seen_here.clear()
    real = T.batch_indices

    def recording(*args):
        idx = real(*args)
        _seen_here.extend(idx)
        return idx

    monkeypatch.setattr(T, "batch_indices", recording)
    launch = LaunchConfig(gradient_accumulation_steps=accumulation)
    train_lora(
        tiny_sd_pipeline(),
        I.read_imagefolder(folder),
        out,
        TrainConfig(**TRAIN),
        launch,
        seed=0,
        log=lambda *_: None,
    )
    monkeypatch.setattr(T, "batch_indices", real)
    return load_file(out / "pytorch_lora_weights.safetensors")


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.timeout(900)
def test_two_gloo_ranks_equal_one_process_with_the_same_global_batch(tmp_path, folder, monkeypatch):
    two = _run(tmp_path, folder, "two", processes=2, accumulation=1)
    # the ranks drew different micro-batches: together, rank 0's and rank 1's of each step
    seen = [json.loads((tmp_path / f"two-seen-{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == TRAIN["steps"] and seen[0] != seen[1]
    # outputs written once: one adapter, one loss row per step, one checkpoint per step with both ranks' RNG
    meta = json.loads((tmp_path / "two" / "selma_adapter.json").read_text())
    assert [row["step"] for row in meta["loss_history"]] == [1, 2]
    states = sorted((tmp_path / "two" / "checkpoints").iterdir())
    assert [p.name for p in states] == ["state_00000001", "state_00000002"]
    assert {p.name for p in states[-1].glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }

    one = _train_here(folder, tmp_path / "one", accumulation=2, monkeypatch=monkeypatch)
    assert _seen_here == [i for pair in zip(seen[0], seen[1]) for i in pair]  # the same global batch
    assert _max_diff(two, one) < TOLERANCE

    # negative control: one process, one micro-batch a step (half the global batch)
    alone = _train_here(folder, tmp_path / "alone", accumulation=1, monkeypatch=monkeypatch)
    assert _max_diff(two, alone) > 100 * TOLERANCE
    assert torch.isfinite(torch.cat([v.flatten() for v in two.values()])).all()
