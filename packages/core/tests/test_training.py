import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffalign.core.training import (
    EMA,
    CheckpointError,
    CheckpointManager,
    NonFiniteError,
    capture_rng_state,
    check_finite,
    restore_rng_state,
    seed_everything,
)

TRAIN_SCRIPT = """
import sys, time, torch
from diffalign.core.training import CheckpointManager, capture_rng_state, restore_rng_state, seed_everything
run_dir, total, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
seed_everything(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
ckpt = CheckpointManager(run_dir, keep_last=2)
state = ckpt.load_latest()
step = 0
if state is not None:
    model.load_state_dict(state["model"]); opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"]); restore_rng_state(state["rng"]); step = state["step"]
while step < total:
    x = torch.randn(16, 4)                      # data drawn from the RNG: resume must restore it
    y = (x.sum(1, keepdim=True) > 0).float()
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step(); sched.step(); step += 1
    if step % 3 == 0:
        ckpt.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "rng": capture_rng_state(), "step": step})
    time.sleep(delay)
torch.save(model.state_dict(), run_dir + "/final.pt")
"""


def _run(run_dir, total, delay=0.0):
    return subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(run_dir), str(total), str(delay)])


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    total = 30
    ref = tmp_path / "ref"
    ref.mkdir()
    assert _run(ref, total).wait(timeout=120) == 0
    run = tmp_path / "run"
    run.mkdir()
    proc = _run(run, total, delay=0.15)
    manager = CheckpointManager(run)
    deadline = time.time() + 120
    while (manager.latest_step() or 0) < 9 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = manager.latest_step()
    assert killed_at is not None and killed_at < total, "the run must be killed mid-way"
    assert not (run / "final.pt").exists()
    assert _run(run, total).wait(timeout=120) == 0
    final = torch.load(run / "final.pt", weights_only=True)
    expected = torch.load(ref / "final.pt", weights_only=True)
    for key in expected:
        assert torch.equal(final[key], expected[key]), key


def test_resume_without_rng_restore_diverges(tmp_path):
    """Negative control: skipping the RNG restore changes the data stream, so parameters differ."""
    seed_everything(0)
    a = torch.randn(3)
    state = capture_rng_state()
    b = torch.randn(3)
    restore_rng_state(state)
    assert torch.equal(torch.randn(3), b)
    seed_everything(0)
    assert not torch.equal(torch.randn(3), b) and torch.equal(a, a)


def test_truncated_checkpoint_is_detected(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = manager.save(5, {"w": torch.randn(100, 100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        manager.load_latest()


def test_keep_last_and_no_temp_files(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, {"step": step})
    assert manager.steps() == [2, 3]
    assert not list(Path(tmp_path / "checkpoints").glob("*.tmp"))
    assert manager.load_latest()["step"] == 3


def test_ema_matches_closed_form():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9, warmup=False)
    values = [1.0, 2.0, 3.0]
    expected = 0.0
    for v in values:
        model.weight.data.fill_(v)
        ema.update(model)
        expected = 0.9 * expected + 0.1 * v
    assert ema.shadow["weight"].item() == pytest.approx(expected)
    assert ema.shadow["weight"].item() != pytest.approx(sum(values) / 3)  # not a plain mean


def test_ema_target_holds_the_average_and_tied_weights_are_averaged_once():
    import copy

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(2, 2, bias=False)
            self.b = torch.nn.Linear(2, 2, bias=False)
            self.b.weight = self.a.weight  # one tensor under two state-dict keys

    torch.manual_seed(0)
    model = Tied()
    target = copy.deepcopy(model)
    start = model.a.weight.detach().clone()
    in_place = EMA(model, decay=0.5, warmup=False, target=target)
    private = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.a.weight.add_(4.0)
    in_place.update(model)
    private.update(model)
    expected = start + 2.0  # lerp(start, start + 4, 0.5) once; averaging the tied tensor twice gives +3
    assert torch.allclose(target.a.weight, expected) and target.b.weight is target.a.weight
    assert torch.allclose(private.shadow["a.weight"], expected)
    assert torch.allclose(private.shadow["b.weight"], expected)
    state = in_place.state_dict()
    restored = EMA(model, decay=0.9, warmup=True, target=copy.deepcopy(model))
    restored.load_state_dict(state)
    assert restored.num_updates == 1 and restored.decay == 0.5
    with pytest.raises(ValueError, match="does not match"):
        EMA(model, target=torch.nn.Linear(2, 2))


def test_check_finite():
    check_finite(torch.tensor(1.0), 0)
    with pytest.raises(NonFiniteError, match="step 7"):
        check_finite(torch.tensor(float("nan")), 7)
    with pytest.raises(NonFiniteError):
        check_finite(float("inf"), 1, "grad norm")
