"""What a pip user meets: built-in recipes by name, offline recipe validation, a light and honest CLI,
README code that runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffalign.core.cli import app, register_method_apps
from diffalign.core.config import (
    Component,
    ConfigError,
    check_components,
    list_recipes,
    load_config,
    resolve_recipe,
)

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("mlcm", "di-star", "ecad", "selma", "listener-reward")
SHAPES_RECIPE = {
    "mlcm": "shapes_unet",
    "di-star": "shapes_unet",
    "ecad": "shapes_dit",
    "selma": "shapes_unet",
    "listener-reward": "shapes",
}
PAPER_RECIPES = [
    ("di-star", "sdxl_paper", "reward"),
    ("di-star", "sd15_lora", "reward"),
    ("ecad", "pixart_alpha_256", "quality"),
    ("ecad", "pixart_sigma_256", "quality"),
    ("ecad", "flux_dev_256", "quality"),
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}

register_method_apps()
runner = CliRunner()


def _config_class(method):
    from importlib.metadata import entry_points

    return next(ep for ep in entry_points(group="diffalign.configs") if ep.name == method).load()


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-c", "from diffalign.core.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env or ENV,
        cwd=ROOT,
    )


# ------------------------------------------------------------------ built-in recipes


@pytest.mark.parametrize("method", METHODS)
def test_every_recipe_file_is_a_builtin_and_validates(method):
    folder = ROOT / "packages" / method / "recipes"
    names = list_recipes(method)
    assert sorted(names) == sorted(p.stem for p in folder.glob("*.yaml"))
    cls = _config_class(method)
    for name in names:
        assert resolve_recipe(method, name) == names[name]
        assert resolve_recipe(method, name + ".yaml") == names[name]
        load_config(cls, resolve_recipe(method, name))  # keys and types


def test_recipe_paths_still_work_and_unknown_names_list_the_builtins(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text((ROOT / "packages/mlcm/recipes/shapes_unet.yaml").read_text())
    assert resolve_recipe("mlcm", own) == own
    with pytest.raises(ConfigError, match=r"built-in: sd15_lora, sdxl_lora, shapes_dit, shapes_unet"):
        resolve_recipe("mlcm", "shapes_unt")
    with pytest.raises(ConfigError, match="neither a file"):
        resolve_recipe("mlcm", str(tmp_path / "missing.yaml"))


def test_recipes_command_lists_names():
    result = runner.invoke(app, ["mlcm", "recipes"])
    assert result.exit_code == 0
    assert re.search(r"^shapes_unet\s+MLCM", result.output, re.M)


# ------------------------------------------------------------------ offline validation


@pytest.mark.parametrize("method", METHODS)
def test_config_validate_accepts_every_shipped_recipe(method):
    for name in list_recipes(method):
        result = runner.invoke(app, ["config", "validate", method, name])
        assert result.exit_code == 0, result.output
        assert f"ok: {name} is a valid {method} recipe" in result.output


@pytest.mark.parametrize(("method", "recipe", "section"), PAPER_RECIPES)
def test_paper_recipe_without_reward_arguments_fails_with_one_line(method, recipe, section, tmp_path):
    text = resolve_recipe(method, recipe).read_text()
    kwargs_key = "kwargs" if section == "reward" else "reward_kwargs"
    # drop the reward arguments block the recipe ships with (what the recipe looked like before)
    stripped = re.sub(rf"^  {kwargs_key}:.*\n(^    .*\n)*", "", text, flags=re.M)
    assert stripped != text
    bad = tmp_path / "bad.yaml"
    bad.write_text(stripped)
    result = _cli("config", "validate", method, str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "needs the argument 'model'" in lines[0]
    assert f"--set {section}.{kwargs_key}.model=" in lines[0]


def test_paper_recipe_stops_before_loading_any_model():
    """As shipped, sdxl_paper names local folders that are not here: one line each, rc 2, no diffusers."""
    code = (
        "import sys\n"
        "from diffalign.core.cli import main\n"
        "sys.argv = ['diffalign', 'di-star', 'train', 'sdxl_paper']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('diffusers-loaded' if 'diffusers' in sys.modules else 'no-model', code)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert out.stdout.split() == ["no-model", "2"], out.stdout + out.stderr
    errors = out.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in errors)
    assert any("reward.kwargs.model" in e and "--set reward.kwargs.model=PATH" in e for e in errors)
    assert any("model.generator_init" in e for e in errors)


def test_check_components_binds_factory_signatures():
    ok = Component("reward", "reward.name", "pickscore", {"model": "m", "tokenizer": "t"}, "reward.kwargs")
    assert check_components([ok], files=False) == []
    missing = Component("reward", "reward.name", "aesthetic", {"model": "m"}, "reward.kwargs")
    [line] = check_components([missing], files=False)
    assert "needs the argument 'head'" in line and "--set reward.kwargs.head=" in line
    unknown = Component("reward", "quality.reward", "shapes-nonexistent", {}, "quality.reward_kwargs")
    assert "unknown reward" in check_components([unknown], files=False)[0]
    # path arguments are checked only with files=True
    assert check_components([ok], files=True)[0].startswith("reward.kwargs.model: pickscore path not found")


def test_core_readme_real_reward_example_binds():
    text = (ROOT / "packages/core/README.md").read_text()
    call = re.search(r'get_reward\("pickscore",\s*([^)]*)\)', text).group(1)
    kwargs = dict(re.findall(r'(\w+)="([^"]*)"', call))
    assert kwargs, call
    comp = Component("reward", "reward.name", "pickscore", kwargs, "reward.kwargs")
    assert check_components([comp], files=False) == []


# ------------------------------------------------------------------ CLI


@pytest.mark.parametrize("args", [["--help"], *([m, "--help"] for m in METHODS), ["config", "--help"]])
def test_help_does_not_import_torch(args):
    code = (
        "import sys\nfrom diffalign.core.cli import main\n"
        f"sys.argv = ['diffalign', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write('TORCH=' + str('torch' in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert out.stderr.endswith("TORCH=False"), out.stderr[-500:]
    assert "Usage" in out.stdout


@pytest.mark.parametrize("method", METHODS)
def test_version(method):
    from importlib.metadata import version

    result = runner.invoke(app, [method, "--version"])
    assert (
        result.exit_code == 0
        and result.output.strip() == f"diffalign-{method} {version(f'diffalign-{method}')}"
    )
    assert runner.invoke(app, ["--version"]).output.startswith("diffalign-core ")


def _commands(method):
    import typer.main

    group = typer.main.get_command(app).commands[method]
    return group.commands


@pytest.mark.parametrize("method", METHODS)
def test_help_examples_are_valid_for_their_command(method):
    """Every `--set` example shown in a command's help applies to that method's recipe."""
    cls = _config_class(method)
    base = resolve_recipe(method, SHAPES_RECIPE[method])
    seen = 0
    for name, command in _commands(method).items():
        for param in command.params:
            if "--set" in getattr(param, "opts", ()):
                examples = re.findall(r"--set (\S+=\S+)", param.help or "")
                assert examples, f"{method} {name}: --set help has no example"
                load_config(cls, base, examples)
                seen += 1
    assert seen


def test_every_trainer_has_run_dir():
    trainers = {
        "mlcm": ["distill"],
        "di-star": ["train"],
        "ecad": ["search"],
        "listener-reward": ["sft", "train"],
    }
    trainers["selma"] = ["prompts", "images", "train", "merge", "eval", "run"]
    for method, names in trainers.items():
        commands = _commands(method)
        for name in names:
            opts = {o for p in commands[name].params for o in getattr(p, "opts", ())}
            assert "--run-dir" in opts, f"{method} {name}"


def test_listener_run_dir_sets_the_stage_output(tmp_path):
    import diffalign.listener_reward.cli as lr_cli

    cfg = lr_cli._cfg("shapes", [], "grpo.output_dir", tmp_path / "g", check=False)
    assert cfg.grpo.output_dir == str(tmp_path / "g") and cfg.sft.output_dir != str(tmp_path / "g")


def test_world_sample_writes_out_with_progress(tmp_path):
    out = tmp_path / "grids" / "x.png"
    result = runner.invoke(
        app,
        [
            "world",
            "sample",
            "-p",
            "a red circle",
            "--n",
            "1",
            "--steps",
            "2",
            "--out",
            str(out),
            "--no-score",
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.is_file()
    bad = runner.invoke(app, ["world", "sample", "-p", "a red circle", "--out", str(tmp_path)])
    assert bad.exit_code == 2


# ------------------------------------------------------------------ README code


def _readme_blocks():
    blocks = []
    for readme in sorted(ROOT.glob("packages/*/README.md")):
        text = readme.read_text()
        for match in re.finditer(r"<!-- readme-test[^>]*-->\n```python\n(.*?)```", text, re.S):
            blocks.append(pytest.param(match.group(1), id=readme.parent.name))
    return blocks


def test_readme_blocks_are_marked():
    assert {b.id for b in _readme_blocks()} >= {"core", "ecad"}


@pytest.mark.parametrize("code", _readme_blocks())
def test_readme_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README", "exec"), {"__name__": "__readme__"})


# ------------------------------------------------------------------ package metadata


def test_package_pages_render_on_the_index():
    """Every package: LICENSE beside its pyproject, the same canonical URL, no relative README links."""
    import tomllib

    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    homes = set()
    for pyproject in sorted(ROOT.glob("packages/*/pyproject.toml")):
        package = pyproject.parent
        assert (package / "LICENSE").read_text() == license_text, package.name
        meta = tomllib.loads(pyproject.read_text())["project"]
        homes.add(meta["urls"]["Homepage"])
        assert any(c.startswith("License :: OSI Approved :: Apache") for c in meta["classifiers"])
        relative = re.findall(r"\]\((?!https?://|#)([^)]+)\)", (package / "README.md").read_text())
        assert not relative, f"{package.name} README has relative links {relative}"
    assert homes == {"https://github.com/diffalign/diffalign"}
