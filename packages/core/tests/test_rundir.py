import json

import pytest
from pydantic import Field

from diffalign.core.config import Config
from diffalign.core.rundir import (
    RUN_MARKER,
    MetricsLog,
    RunDirError,
    flatten_recipe,
    prepare_run_dir,
    recipe_fingerprint,
)


class Optim(Config):
    lr: float = 1e-3
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.99])


class Recipe(Config):
    run_dir: str = "runs/x"
    steps: int = 10
    optim: Optim = Field(default_factory=Optim)


def _files(path):
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_flatten_and_fingerprint_ignore_keys():
    flat = flatten_recipe(Recipe())
    assert flat == {"run_dir": "runs/x", "steps": 10, "optim.lr": 1e-3, "optim.betas": [0.9, 0.99]}
    assert recipe_fingerprint(Recipe(run_dir="a")) == recipe_fingerprint(Recipe(run_dir="b"))
    assert recipe_fingerprint(Recipe(steps=1)) != recipe_fingerprint(Recipe(steps=2))
    assert recipe_fingerprint(Recipe(steps=1), ignore=("steps", "run_dir")) == recipe_fingerprint(
        Recipe(steps=2), ignore=("steps", "run_dir")
    )


def test_fresh_run_writes_marker_then_resumes_same_recipe(tmp_path):
    run = tmp_path / "run"
    state = prepare_run_dir(run, "mlcm", Recipe())
    assert not state.resume and state.changed == []
    marker = json.loads((run / RUN_MARKER).read_text())
    assert marker["method"] == "mlcm" and marker["recipe"]["optim.lr"] == 1e-3
    (run / "checkpoints").mkdir()
    again = prepare_run_dir(run, "mlcm", Recipe(run_dir="elsewhere"))
    assert again.resume and again.fingerprint == state.fingerprint


def test_changed_recipe_is_refused_naming_keys_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, "mlcm", Recipe())
    before = (run / RUN_MARKER).read_text()
    with pytest.raises(RunDirError) as err:
        prepare_run_dir(run, "mlcm", Recipe(steps=20, optim=Optim(lr=0.1)))
    msg = str(err.value)
    assert "steps (10 -> 20)" in msg and "optim.lr (0.001 -> 0.1)" in msg and "\n" not in msg
    assert (run / RUN_MARKER).read_text() == before


def test_allowed_keys_resume_and_update_marker(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, "mlcm", Recipe())
    with pytest.raises(RunDirError, match="optim.lr"):  # only steps allowed
        prepare_run_dir(run, "mlcm", Recipe(steps=20, optim=Optim(lr=0.1)), allow_changed=["steps"])
    state = prepare_run_dir(
        run, "mlcm", Recipe(steps=20, optim=Optim(lr=0.1)), allow_changed=["steps", "optim"]
    )
    assert state.resume and state.changed == ["optim.lr", "steps"]
    marker = json.loads((run / RUN_MARKER).read_text())
    assert marker["recipe"]["steps"] == 20 and marker["history"][0]["changed"] == ["optim.lr", "steps"]
    # the new recipe is now the reference: resuming with it needs no permission
    assert prepare_run_dir(run, "mlcm", Recipe(steps=20, optim=Optim(lr=0.1))).changed == []


def test_ignored_keys_may_change(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, "ecad", Recipe(), ignore=("run_dir", "steps"))
    assert prepare_run_dir(run, "ecad", Recipe(steps=99), ignore=("run_dir", "steps")).resume


def test_other_method_is_refused(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, "selma", Recipe())
    with pytest.raises(RunDirError, match="holds a 'selma' run"):
        prepare_run_dir(run, "mlcm", Recipe())


def test_resume_never_needs_an_empty_dir(tmp_path):
    run = tmp_path / "run"
    assert not prepare_run_dir(run, "mlcm", Recipe(), resume="never").resume  # missing dir: fine
    with pytest.raises(RunDirError, match="needs an empty run_dir"):
        prepare_run_dir(run, "mlcm", Recipe(), resume="never")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not prepare_run_dir(empty, "mlcm", Recipe(), resume="never").resume


def test_resume_always_needs_a_run_and_bad_mode(tmp_path):
    with pytest.raises(RunDirError, match="needs an existing run"):
        prepare_run_dir(tmp_path / "none", "mlcm", Recipe(), resume="always")
    assert not (tmp_path / "none").exists()
    with pytest.raises(RunDirError, match="resume must be"):
        prepare_run_dir(tmp_path / "x", "mlcm", Recipe(), resume="sometimes")


def test_foreign_or_broken_dirs_are_refused(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not written by a diffalign run"):
        prepare_run_dir(foreign, "mlcm", Recipe())
    assert _files(foreign) == ["notes.txt"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / RUN_MARKER).write_text("{not json")
    with pytest.raises(RunDirError, match="unreadable"):
        prepare_run_dir(broken, "mlcm", Recipe())
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(RunDirError, match="is a file"):
        prepare_run_dir(afile, "mlcm", Recipe())


def test_write_false_checks_without_writing(tmp_path):
    run = tmp_path / "run"
    assert not prepare_run_dir(run, "mlcm", Recipe(), write=False).resume
    assert not run.exists()


def test_metrics_log_truncates_to_checkpoint_step(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (5, 10, 15, 20):
        log.append(step, {"loss": step / 10})
    with open(log.path, "a") as fh:
        fh.write('{"step": 25, "lo')  # a row cut short by a kill
    assert log.truncate(10) == 3
    assert [r["step"] for r in log.rows()] == [5, 10]
    log.append(15, {"loss": 0.0})  # the resumed run logs step 15 again: exactly once
    assert [r["step"] for r in log.rows()] == [5, 10, 15]
    assert log.truncate(100) == 0


def test_metrics_log_disabled_on_other_ranks(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=False)
    log.append(1, {"loss": 1.0})
    assert not log.path.exists()
    MetricsLog(log.path).append(1, {"loss": 1.0})
    assert log.truncate(0) == 0 and len(log.rows()) == 1
