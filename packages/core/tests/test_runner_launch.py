"""The runner end to end: relaunch under torchrun / accelerate on CPU (gloo), DeepSpeed resume, state
checkpoints, trackers and the step logger."""

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from diffalign.core.launch import (
    LaunchConfig,
    ProcessCountError,
    check_process_count,
    make_accelerator,
    resolve_trackers,
)
from diffalign.core.monitor import StepLogger
from diffalign.core.testing.launch import fresh_env
from diffalign.core.testing.toy_run import ToyData, batch_rows, toy_data, toy_model
from diffalign.core.training import CheckpointError

# Two runs of the same recipe differ only in float32 summation order (gradient all-reduce over ranks,
# DeepSpeed's flattened buffers); after 6 AdamW steps that stays far below this bound, while training
# on half the batch or skipping a step moves parameters by more than 1e-3 (the negative controls).
PARAM_ATOL = 1e-5


def reference_params(
    steps: int,
    lr: float = 0.05,
    data: ToyData | None = None,
    rows_of=None,
    fresh_optimizer_at: int | None = None,
) -> torch.Tensor:
    """The toy recipe trained in one process on the full global batch, in plain torch.

    ``fresh_optimizer_at`` replaces the optimizer (zero AdamW moments) at that step: a resume that
    restored the weights but lost the optimizer state.
    """
    data = data or ToyData()
    model = toy_model(data.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    x, y = toy_data(data)
    for step in range(steps):
        if step == fresh_optimizer_at:
            opt = torch.optim.AdamW(model.parameters(), lr=lr)
        rows = batch_rows(step, data) if rows_of is None else rows_of(step)
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()
        opt.zero_grad()
    state = model.state_dict()
    return torch.cat([state[k].flatten() for k in sorted(state)])


def _env(tmp_path: Path) -> dict[str, str]:
    return fresh_env(
        quiet=False, DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path])
    )


def _toy(tmp_path: Path, run_dir: Path, *sets: str, module: str = "diffalign.core.testing.toy_run"):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(f"run_dir: {run_dir}\nsteps: 6\ncheckpoint_every: 3\n")
    args = [sys.executable, "-m", module, str(recipe)]
    for item in sets:
        args += ["--set", item]
    return subprocess.run(args, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)


def _params(run_dir: Path) -> torch.Tensor:
    return torch.tensor(json.loads((run_dir / "final_params.json").read_text()))


def _reset_accelerate():
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


# --------------------------------------------------------------------------- worker-side launch pieces


class _Recorder:
    def __init__(self, **kwargs):
        type(self).kwargs = kwargs


def test_make_accelerator_uses_the_cpu_backend_when_launched_without_gpu(monkeypatch, tmp_path):
    import accelerate

    monkeypatch.setattr(accelerate, "Accelerator", _Recorder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    make_accelerator(LaunchConfig())
    assert "cpu" not in _Recorder.kwargs
    monkeypatch.setenv("WORLD_SIZE", "2")
    make_accelerator(LaunchConfig(launcher="torchrun", num_processes=2))
    assert _Recorder.kwargs["cpu"] is True
    make_accelerator(LaunchConfig(launcher="torchrun", num_processes=2, deepspeed="zero2"))
    assert "cpu" not in _Recorder.kwargs  # DeepSpeed runs on its own CPU accelerator ...
    # ... whose backend accelerate is told, or it would count one process
    (handler,) = _Recorder.kwargs["kwargs_handlers"]
    assert handler.backend in ("gloo", "ccl")
    # an unset gradient_clipping means no clipping under DeepSpeed too (accelerate would use 1.0)
    assert _Recorder.kwargs["deepspeed_plugin"].deepspeed_config["gradient_clipping"] == 0.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    make_accelerator(LaunchConfig(launcher="torchrun", num_processes=2))
    assert "cpu" not in _Recorder.kwargs


def test_recipe_trackers_reach_the_accelerator(monkeypatch, tmp_path):
    import importlib.util

    import accelerate

    monkeypatch.setattr(accelerate, "Accelerator", _Recorder)
    real_find_spec = importlib.util.find_spec
    installed = {"tensorboard"}
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            object()
            if name in installed
            else (None if name in ("wandb", "tensorboardX") else real_find_spec(name, *a))
        ),
    )
    cfg = LaunchConfig(log_with="tensorboard,wandb")
    assert cfg.log_with == ["tensorboard", "wandb"]
    with pytest.warns(UserWarning, match="wandb is not installed"):
        make_accelerator(cfg, run_dir=tmp_path)
    assert _Recorder.kwargs["log_with"] == ["tensorboard"]
    assert _Recorder.kwargs["project_config"].logging_dir == str(tmp_path / "logs")
    installed.add("wandb")
    make_accelerator(cfg, run_dir=tmp_path)
    assert _Recorder.kwargs["log_with"] == ["tensorboard", "wandb"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_accelerator(LaunchConfig(log_with="none"), run_dir=tmp_path)
    assert "log_with" not in _Recorder.kwargs
    assert resolve_trackers(["auto", "wandb"], tmp_path) == ["tensorboard", "wandb"]
    assert resolve_trackers(["auto"], None) == []  # auto needs a run directory to log into
    with pytest.raises(ValueError, match="unknown tracker"):
        LaunchConfig(log_with=["mlflow2"])


def test_check_process_count():
    class Acc:
        num_processes = 1
        distributed_type = "NO"

    check_process_count(Acc(), LaunchConfig())
    with pytest.raises(ProcessCountError, match="launch.num_processes=2 but the accelerator runs 1"):
        check_process_count(Acc(), LaunchConfig(launcher="torchrun", num_processes=2))


# --------------------------------------------------------------------------- step logger


def test_step_logger_prints_every_log_every_steps_without_a_terminal():
    out = io.StringIO()
    with StepLogger(7, log_every=3, desc="mlcm", enabled=True, bar=False, stream=out) as log:
        for step in range(1, 8):
            log.step(step, {"loss": 1.0 / step, "phase": "stage1"})
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "mlcm step 3/7 loss=0.3333 phase=stage1",
        "mlcm step 6/7 loss=0.1667 phase=stage1",
        "mlcm step 7/7 loss=0.1429 phase=stage1",
    ]
    quiet = io.StringIO()
    log = StepLogger(7, log_every=1, enabled=False, bar=False, stream=quiet)  # not the main process
    log.step(1, {"loss": 1.0})
    assert quiet.getvalue() == ""
    with pytest.raises(ValueError, match="log_every"):
        StepLogger(3, log_every=0)


def test_step_logger_uses_a_bar_on_a_terminal():
    out = io.StringIO()
    log = StepLogger(4, log_every=1, enabled=True, bar=True, stream=out, initial=1)
    assert log._bar is not None and log._bar.n == 1
    log.step(3, {"loss": 0.5})
    assert log._bar.n == 3 and out.getvalue() == ""
    log.close()


# --------------------------------------------------------------------------- state checkpoints (1 process)


def _toy_accelerator(tmp_path):
    from diffalign.core.checkpoints import StateCheckpoints

    acc = make_accelerator(LaunchConfig(), tmp_path)
    model = toy_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt, StateCheckpoints(acc, tmp_path, keep_last=2)


def _step(model, opt, data=ToyData(), step=0):
    x, y = toy_data(data)
    rows = batch_rows(step, data)
    torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
    opt.step()
    opt.zero_grad()


def test_state_checkpoints_round_trip_atomic_and_verified(tmp_path):
    try:
        acc, model, opt, ckpt = _toy_accelerator(tmp_path)
        assert ckpt.load_latest() is None
        for step in range(3):
            _step(model, opt, step=step)
        (ckpt.dir / ".tmp-state_00000002").mkdir(parents=True)  # left by a killed save
        ckpt.save(3, extra={"step": 3, "epoch": 0})
        assert not (ckpt.dir / ".tmp-state_00000002").exists()
        for step in range(3, 5):
            _step(model, opt, step=step)
        ckpt.save(5)
        ckpt.save(6)
        assert ckpt.steps() == [5, 6]  # keep_last=2
        ckpt.keep_last = 3
        ckpt.save(3, extra={"step": 3, "epoch": 1})  # re-saving a step replaces it
        assert ckpt.steps() == [3, 5, 6] and not list(ckpt.dir.glob(".tmp-*"))
        saved = [p.detach().clone() for p in model.parameters()]
        moments = [s["exp_avg"].clone() for s in opt.state_dict()["state"].values()]
        _step(model, opt, step=5)  # move params and moments away from the checkpoint
        assert ckpt.load(3) == {"step": 3, "epoch": 1}
        for p, value in zip(model.parameters(), saved):
            assert torch.equal(p.detach(), value)
        for s, value in zip(opt.state_dict()["state"].values(), moments):
            assert torch.equal(s["exp_avg"], value)
        # corruption: a truncated file and a missing manifest are refused, naming the checkpoint
        victim = ckpt.path_for(5) / "optimizer.bin"
        victim.write_bytes(victim.read_bytes()[:-10])
        with pytest.raises(CheckpointError, match="optimizer.bin is truncated or corrupt"):
            ckpt.load(5)
        (ckpt.path_for(6) / "diffalign-manifest.json").unlink()
        with pytest.raises(CheckpointError, match="no readable manifest"):
            ckpt.load_latest()
        with pytest.raises(CheckpointError, match="checkpoint not found"):
            ckpt.load(4)
    finally:
        _reset_accelerate()


def test_older_single_file_checkpoints_are_refused_not_silently_ignored(tmp_path):
    from diffalign.core.training import CheckpointManager

    try:
        acc, model, opt, ckpt = _toy_accelerator(tmp_path)
        CheckpointManager(tmp_path).save(7, {"model": {}})  # a run dir written by an older trainer
        with pytest.raises(CheckpointError, match=r"step_00000007.pt.*would\s+silently start over"):
            ckpt.load_latest()
        ckpt.save(8)  # once the run has checkpoints of its own, they are what it resumes from
        assert ckpt.load_latest() == (8, {})
    finally:
        _reset_accelerate()


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    try:
        acc, model, opt, ckpt = _toy_accelerator(tmp_path)
        _step(model, opt)
        ckpt.save(1, extra={"step": 1})
        real_save_state = acc.save_state

        def dies_midway(output_dir, **kwargs):
            Path(output_dir, "model.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt  # the process is stopped while writing

        monkeypatch.setattr(acc, "save_state", dies_midway)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save(2, extra={"step": 2})
        assert ckpt.steps() == [1] and ckpt.latest_step() == 1
        assert ckpt.load_latest() == (1, {"step": 1})
        monkeypatch.setattr(acc, "save_state", real_save_state)
        ckpt.save(2, extra={"step": 2})
        assert ckpt.steps() == [1, 2] and not list(ckpt.dir.glob(".tmp-*"))
    finally:
        _reset_accelerate()


def test_state_checkpoint_resume_restores_params_and_optimizer(tmp_path):
    """Save at step 3 of 6, mess up the model, load: the finished run equals an uninterrupted one."""
    try:
        acc, model, opt, ckpt = _toy_accelerator(tmp_path)
        for step in range(3):
            _step(model, opt, step=step)
        ckpt.save(3)
        for step in range(3, 6):  # a run that continues past the checkpoint ...
            _step(model, opt, step=step)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1)
        step, _ = ckpt.load_latest()  # ... is rolled back to the checkpoint, optimizer moments included
        for s in range(step, 6):
            _step(model, opt, step=s)
        got = torch.cat([v.flatten() for k, v in sorted(model.state_dict().items())])
        assert torch.allclose(got, reference_params(6), atol=PARAM_ATOL, rtol=0)
        assert (got - reference_params(6, fresh_optimizer_at=3)).abs().max() > 1e-3  # the moments matter
    finally:
        _reset_accelerate()


# --------------------------------------------------------------------------- 2 ranks on gloo (CPU)


def _check_two_rank_run(run_dir: Path, result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((run_dir / "seen" / f"rank{r}.json").read_text())["rows"] for r in (0, 1)]
    assert set(seen[0]).isdisjoint(seen[1]), "ranks trained on the same rows"
    assert sorted(seen[0] + seen[1]) == sorted(
        torch.cat([batch_rows(s, ToyData()) for s in range(6)]).tolist()
    )
    rows = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [2, 4, 6], "metrics written more than once"
    assert [ln.split(" loss")[0] for ln in result.stderr.splitlines() if ln.startswith("toy step")] == [
        "toy step 2/6",
        "toy step 4/6",
        "toy step 6/6",
    ]
    assert result.stdout.count("toy: 6 steps") == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["state_00000003", "state_00000006"]
    got = _params(run_dir)
    assert torch.allclose(got, reference_params(6), atol=PARAM_ATOL, rtol=0), (
        (got - reference_params(6)).abs().max()
    )
    # negative control: one rank's half of each batch alone gives measurably different parameters
    half = reference_params(6, rows_of=lambda s: batch_rows(s, ToyData())[:4])
    assert (got - half).abs().max() > 1e-3


def _forked_toy_rank(run_dir: str) -> None:
    from diffalign.core.testing.toy_run import ToyRecipe, train

    torch.set_num_threads(1)
    launch = LaunchConfig(launcher="torchrun", num_processes=2)
    train(ToyRecipe(run_dir=run_dir, steps=6, checkpoint_every=3, log_every=2, launch=launch))


def test_toy_trainer_on_two_forked_gloo_ranks_matches_one_process(tmp_path, capfd):
    """The default-suite 2-rank check: accelerate's debug launcher forks 2 gloo ranks (no new interpreter)."""
    from accelerate import debug_launcher

    run_dir = tmp_path / "run"
    debug_launcher(_forked_toy_rank, args=(str(run_dir),), num_processes=2)
    seen = [json.loads((run_dir / "seen" / f"rank{r}.json").read_text())["rows"] for r in (0, 1)]
    assert set(seen[0]).isdisjoint(seen[1]) and len(seen[0]) == len(seen[1]) == 24
    rows = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [2, 4, 6]
    got = _params(run_dir)
    assert torch.allclose(got, reference_params(6), atol=PARAM_ATOL, rtol=0)
    half = reference_params(6, rows_of=lambda s: batch_rows(s, ToyData())[:4])
    assert (got - half).abs().max() > 1e-3


@pytest.mark.slow  # 4 interpreters start (runner, torchrun, 2 ranks): 20-40 s on 2 shared cores
@pytest.mark.timeout(600)
def test_recipe_relaunches_under_torchrun_with_two_cpu_ranks(tmp_path):
    run_dir = tmp_path / "run"
    result = _toy(tmp_path, run_dir, "launch.launcher=torchrun", "launch.num_processes=2", "log_every=2")
    _check_two_rank_run(run_dir, result)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_recipe_relaunches_under_accelerate_launch_with_two_cpu_ranks(tmp_path):
    run_dir = tmp_path / "run"
    result = _toy(tmp_path, run_dir, "launch.launcher=accelerate", "launch.num_processes=2", "log_every=2")
    _check_two_rank_run(run_dir, result)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_external_torchrun_is_accepted_and_a_wrong_count_exits_2(tmp_path):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(f"run_dir: {tmp_path / 'run'}\nsteps: 6\n")
    base = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
    ]
    base += ["-m", "diffalign.core.testing.toy_run", str(recipe)]
    bad = subprocess.run(base, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "launch.num_processes=1" in bad.stderr
    assert not (tmp_path / "run").exists()
    good = subprocess.run(
        [
            *base,
            "--set",
            "launch.launcher=torchrun",
            "--set",
            "launch.num_processes=2",
            "--set",
            "log_every=2",
        ],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    _check_two_rank_run(tmp_path / "run", good)


# --------------------------------------------------------------------------- DeepSpeed ZeRO resume on CPU

# DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op when it starts (minutes on 2
# cores); gloo does the same reductions, so the entry point of these runs skips the build.
_DS_ENTRY = """
import sys
import deepspeed.comm.torch

sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # the attribute path finds torch itself
from diffalign.core.testing.toy_run import main

sys.exit(main())
"""


@pytest.mark.slow  # DeepSpeed start-up in 2 ranks, three runs per stage: minutes on 2 shared cores
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_two_ranks_resume_equals_uninterrupted(tmp_path, stage):
    pytest.importorskip("deepspeed")
    (tmp_path / "ds_toy_entry.py").write_text(_DS_ENTRY)
    sets = (
        "launch.launcher=torchrun",
        "launch.num_processes=2",
        f"launch.deepspeed={stage}",
        "log_every=2",
    )
    full = _toy(tmp_path, tmp_path / "full", *sets, module="ds_toy_entry")
    assert full.returncode == 0, full.stderr[-3000:]
    part = _toy(tmp_path, tmp_path / "resumed", *sets, "stop_after=3", module="ds_toy_entry")
    assert part.returncode == 0, part.stderr[-3000:]
    ckpt = tmp_path / "resumed" / "checkpoints" / "state_00000003"
    shards = sorted(p.name for p in ckpt.rglob("*optim_states.pt"))
    assert len(shards) == 2, shards  # one optimizer partition per rank
    # the two partitions together hold the full fp32 state: the parameters rebuilt from them are
    # the 3-step reference (deepspeed's own zero_to_fp32 reader)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    rebuilt = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="pytorch_model")
    flat = torch.cat([rebuilt[k].flatten() for k in sorted(rebuilt)])
    assert torch.allclose(flat, reference_params(3), atol=PARAM_ATOL, rtol=0)
    resumed = _toy(tmp_path, tmp_path / "resumed", *sets, module="ds_toy_entry")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    starts = [
        json.loads((tmp_path / "resumed" / "seen" / f"rank{r}.json").read_text())["start"] for r in (0, 1)
    ]
    assert starts == [3, 3]
    rows = [
        json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows == [2, 4, 6]
    a, b = _params(tmp_path / "full"), _params(tmp_path / "resumed")
    assert torch.allclose(a, b, atol=PARAM_ATOL, rtol=0), (a - b).abs().max()
    assert torch.allclose(a, reference_params(6), atol=PARAM_ATOL, rtol=0), (
        (a - reference_params(6)).abs().max()
    )
    # negative control: a resume that lost the optimizer state (fresh AdamW moments at step 3) differs
    assert (b - reference_params(6, fresh_optimizer_at=3)).abs().max() > 1e-3


# --------------------------------------------------------------------------- the README's commands


def _readme_commands() -> tuple[str, list[str]]:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text(encoding="utf-8")
    block = text.split("<!-- commands checked by test_readme_scale_out_commands -->", 1)[1]
    block = block.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    lines = [
        line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    return lines[0], lines[1:]


def test_readme_block_has_the_scale_out_commands():
    setup, commands = _readme_commands()
    assert setup.startswith("printf") and len(commands) == 5
    assert all("diffalign.core.testing.toy_run toy.yaml" in c for c in commands)


@pytest.mark.slow  # each command starts 1-4 interpreters: 20 s to minutes on 2 shared cores
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("index", range(5))
def test_readme_scale_out_commands(tmp_path, index):
    setup, commands = _readme_commands()
    command = commands[index]
    if "deepspeed" in command:
        pytest.importorskip("deepspeed")
    python = sys.executable
    if command.startswith("torchrun "):
        command = f"{python} -m torch.distributed.run " + command[len("torchrun ") :]
    else:
        command = command.replace("python ", f"{python} ", 1)
    env = _env(tmp_path)
    result = subprocess.run(
        f"{setup} && {command}",
        shell=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = _params(tmp_path / "runs" / "toy")
    assert torch.allclose(got, reference_params(6), atol=PARAM_ATOL, rtol=0), (
        (got - reference_params(6)).abs().max()
    )


def test_make_tracker_starts_a_tracker_without_tensorboard(monkeypatch, tmp_path):
    """A wandb-only (here: a custom, offline) tracker starts and receives the logged values even when
    tensorboard is not installed."""
    import sys

    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    from diffalign.core.training import finish_trackers, make_tracker

    class FakeTracker(GeneralTracker):
        name = "fake-wandb"
        requires_logging_directory = False

        def __init__(self):
            super().__init__()
            self.config, self.rows, self.finished = None, [], False

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = dict(values)

        def log(self, values, step=None, **kwargs):
            self.rows.append((step, dict(values)))

        def finish(self):
            self.finished = True

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    fake = FakeTracker()
    accelerator = Accelerator(cpu=True, log_with=[fake])
    log = make_tracker(accelerator, tmp_path, project="t", config={"a": {"b": 1}, "c": [1, 2], "d": "x"})
    log({"loss": 0.5}, 3)
    finish_trackers(accelerator)
    assert fake.config == {"a.b": 1, "d": "x"}  # flat scalars only
    assert fake.rows == [(3, {"loss": 0.5})] and fake.finished
    # no tracker asked: a no-op logger, nothing started
    plain = Accelerator(cpu=True)
    make_tracker(plain, tmp_path)({"loss": 1.0}, 1)
    assert plain.trackers == []
