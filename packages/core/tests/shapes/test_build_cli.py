import json
import time

import pytest
from typer.testing import CliRunner

from diffalign.core.shapes.build import BuildPlan, build_world
from diffalign.core.shapes.cli import app


@pytest.fixture(scope="module")
def micro_world(tmp_path_factory):
    import diffusers  # noqa: F401  (library imports are not part of the build time)
    import transformers  # noqa: F401

    out = tmp_path_factory.mktemp("world")
    t0 = time.time()
    info = build_world(out, BuildPlan.micro_plan(), log=lambda m: None)
    return out, info, time.time() - t0


def test_micro_world_builds_end_to_end(micro_world):
    # Build time (~20-60 s on 2 cores) is reported, not asserted: timing targets belong to benchmarks.
    out, info, seconds = micro_world
    print(f"micro world built in {seconds:.1f} s")
    for name in (
        "tokenizer/tokenizer.json",
        "vae/config.json",
        "verifier.safetensors",
        "fid_reference.safetensors",
        "unet/model_index.json",
        "dit/model_index.json",
        "world_info.json",
    ):
        assert (out / name).exists(), name
    assert {"teacher_unet", "teacher_dit", "verifier", "renders"} <= set(info)
    assert "2" in info["teacher_dit"]["steps"]


def test_build_is_resumable_and_deterministic(micro_world, tmp_path):
    out, info, _ = micro_world
    stamp = (out / "unet" / "model_index.json").stat().st_mtime
    again = build_world(out, BuildPlan.micro_plan(), log=lambda m: None)
    assert (out / "unet" / "model_index.json").stat().st_mtime == stamp  # nothing rebuilt
    assert again == info
    # a second build from scratch produces the same verifier weights
    from safetensors.torch import load_file

    plan = BuildPlan.micro_plan()
    build_world(tmp_path, plan, teachers=(), log=lambda m: None)
    a, b = load_file(str(out / "verifier.safetensors")), load_file(str(tmp_path / "verifier.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def test_cli_sample_writes_a_png_grid(micro_world, tmp_path):
    out, _, _ = micro_world
    png = tmp_path / "x.png"
    res = CliRunner().invoke(
        app,
        [
            "sample",
            "--prompt",
            "two red circles",
            "--model",
            str(out / "dit"),
            "--out",
            str(png),
            "--n",
            "2",
            "--steps",
            "2",
            "--no-score",
        ],
    )
    assert res.exit_code == 0, res.output
    from PIL import Image

    assert Image.open(png).size[0] > 64


def test_cli_rejects_bad_input(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["sample", "--prompt", "a purple cat", "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "grammar" in res.output
    assert not (tmp_path / "x.png").exists()
    res = runner.invoke(app, ["build", "--out", str(tmp_path / "w"), "--teachers", "gan"])
    assert res.exit_code == 2 and not (tmp_path / "w").exists()


def test_cli_info_formats_numbers():
    from diffalign.core.shapes.cli import format_info

    data = {
        "verifier": {"clean": {"exists_accuracy": 1.0, "count_accuracy": 0.99}},
        "renders": {"matched_renders": {"overall": 1.0, "per_skill": {"object": 1.0}}},
        "teacher_unet": {
            "guidance": 4.0,
            "steps": {"50": {"overall": 0.5, "skill_mean": 0.5, "per_skill": {"object": 0.9}, "fid": 3.0}},
        },
    }
    text = format_info(data)
    assert "shapes/unet" in text and "object 0.90" in text and "FID 3.0" in text
    json.dumps(data)
