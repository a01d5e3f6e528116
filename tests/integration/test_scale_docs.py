"""The "Running at scale" commands of every method README are valid, and (slow) run at a tiny budget.

Each README holds one block after the marker below. The default suite checks every command offline: the
command exists, the built-in recipe resolves, every ``--set`` override validates with core's typed
overrides, and a command started by ``accelerate launch`` asks for as many processes as the recipe. The
slow test runs each command whose recipe runs here (the shapes world) with budget overrides appended.
"""

from __future__ import annotations

import importlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffalign.core.config import resolve_recipe
from diffalign.core.runner import load_recipe

ROOT = Path(__file__).resolve().parents[2]
MARK = "<!-- commands checked by tests/integration/test_scale_docs.py -->"
METHODS = {
    # method: (cli module, recipe class)
    "mlcm": ("diffalign.mlcm.cli", "diffalign.mlcm.config:MLCMRecipe"),
    "di-star": ("diffalign.di_star.cli", "diffalign.di_star.config:DiStarConfig"),
    "selma": ("diffalign.selma.cli", "diffalign.selma.config:SelmaConfig"),
    "listener-reward": (
        "diffalign.listener_reward.cli",
        "diffalign.listener_reward.config:ListenerRewardRecipe",
    ),
    "ecad": ("diffalign.ecad.cli", "diffalign.ecad.config:EcadRecipe"),
}
# appended to a shapes-world command in the slow test: a budget of seconds, not hours
TINY = {
    "mlcm": [
        "stage1.iterations=2", "stage2.iterations=0", "reward.iterations=0", "distill.batch_size=1",
        "data.shapes_prompts_per_skill=2", "checkpoint.every=1",
    ],
    "di-star": ["training.max_steps=2", "data.batch_size=1", "data.num_prompts=8", "loss.alpha_rew=0"],
    "selma": [
        "prompts.n_per_skill=2", "images.num_inference_steps=2", "train.steps=2", "train.batch_size=1",
        "eval.n_per_skill=1", "eval.num_inference_steps=2", "eval.models=[base]",
    ],
    "ecad": ["search.generations=1", "search.population_size=4", "calibration.num_prompts=2",
             "calibration.num_seeds=1"],
}  # fmt: skip


def commands(method: str) -> list[str]:
    text = (ROOT / "packages" / method / "README.md").read_text(encoding="utf-8")
    assert text.count(MARK) == 1, f"{method} README: one block of scale-out commands"
    block = text.split(MARK, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [
        " ".join(line.split()) for line in block.splitlines() if line.strip() and not line.startswith("#")
    ]


def parse(method: str, line: str) -> tuple[list[str], str, str, list[str], str | None, int | None]:
    """(launcher prefix, command, recipe, overrides, run dir, processes the launcher starts)."""
    words = shlex.split(line)
    module = METHODS[method][0]
    launched = None
    if words[:2] == ["accelerate", "launch"]:
        at = words.index("-m")
        assert words[at + 1] == module, line
        launched = int(words[words.index("--num_processes") + 1])
        prefix, words = words[: at + 2], words[at + 2 :]
    else:
        assert words[:2] == ["diffalign", method], line
        prefix, words = words[:2], words[2:]
    command, recipe, rest = words[0], words[1], words[2:]
    overrides, run_dir = [], None
    while rest:
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag == "--set":
            overrides.append(value)
        elif flag == "--run-dir":
            run_dir = value
        else:
            raise AssertionError(f"unexpected option {flag} in: {line}")
    return prefix, command, recipe, overrides, run_dir, launched


@pytest.mark.parametrize("method", sorted(METHODS))
def test_documented_scale_out_commands_are_valid(method):
    module, config = METHODS[method]
    app = importlib.import_module(module).app
    cls_module, _, cls_name = config.partition(":")
    cls = getattr(importlib.import_module(cls_module), cls_name)
    lines = commands(method)
    assert len(lines) >= 4
    kinds = {"one": False, "relaunch": False, "launcher": False}
    for line in lines:
        _, command, recipe, overrides, _, launched = parse(method, line)
        help_text = CliRunner().invoke(app, [command, "--help"])
        assert help_text.exit_code == 0 and "--resume" in help_text.output, line
        cfg = load_recipe(cls, resolve_recipe(method, recipe), overrides)
        if launched is not None:
            assert cfg.launch.num_processes == launched, line
            kinds["launcher"] = True
        elif cfg.launch.num_processes > 1:
            assert cfg.launch.launcher != "none", line
            kinds["relaunch"] = True
        else:
            kinds["one"] = True
    assert all(kinds.values()), kinds  # one process, a relaunch, and a launcher started by hand


def _shapes_commands():
    out = []
    for method in sorted(TINY):
        for index, line in enumerate(commands(method)):
            if parse(method, line)[2].startswith("shapes"):
                out.append(pytest.param(method, index, id=f"{method}-{index}"))
    return out


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("method", "index"), _shapes_commands())
def test_documented_scale_out_commands_run(tmp_path, method, index):
    prefix, command, recipe, overrides, run_dir, _ = parse(method, commands(method)[index])
    module = METHODS[method][0]
    if prefix[:2] == ["accelerate", "launch"]:
        head = [sys.executable, "-m", "accelerate.commands.launch", *prefix[2:]]
    else:
        head = [sys.executable, "-m", module]
    extra = [a for o in TINY[method] for a in ("--set", o)]
    args = [command, recipe, *(a for o in overrides for a in ("--set", o)), *extra]
    args += ["--run-dir", str(tmp_path / (run_dir or "run"))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DIFFALIGN_NO_PROGRESS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    done = subprocess.run([*head, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, done.stderr[-3000:]
