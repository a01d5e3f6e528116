"""Real multi-process runs (slow: each process imports torch and diffusers)."""

import os
import subprocess
import sys

import pytest
import yaml


@pytest.mark.slow
def test_two_process_accelerate_images_match_one_process(tmp_path):
    from diffalign.core.testing import tiny_sd_pipeline

    model = tmp_path / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(model)
    outs = {}
    for n in (1, 2):
        run = tmp_path / f"run{n}"
        recipe = tmp_path / f"r{n}.yaml"
        recipe.write_text(
            yaml.safe_dump(
                {
                    "run_dir": str(run),
                    "model": str(model),
                    "skills": [{"name": "count"}, {"name": "color"}],
                    "prompts": {"n_per_skill": 5},
                    "images": {"num_inference_steps": 2, "batch_size": 2},
                }
            )
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFALIGN_NO_PROGRESS": "1"}
        subprocess.run(
            [sys.executable, "-m", "diffalign.selma.cli", "prompts", str(recipe)], check=True, env=env
        )
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--cpu",
            "--num_processes",
            str(n),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "diffalign.selma.cli",
            "images",
            str(recipe),
        ]
        subprocess.run(cmd, check=True, env=env, timeout=900)
        outs[n] = run / "images"
    assert len(list((outs[2] / "shards").iterdir())) == 2
    assert (outs[1] / "metadata.jsonl").read_text() == (outs[2] / "metadata.jsonl").read_text()
    for f in sorted((outs[1] / "images").iterdir()):
        assert f.read_bytes() == (outs[2] / "images" / f.name).read_bytes()


@pytest.mark.slow
def test_bench_smoke_on_a_tiny_model(tmp_path, monkeypatch):
    import json

    from diffalign.core.rewards import register_reward
    from diffalign.core.testing import tiny_sd_pipeline
    from diffalign.selma import bench

    class Mean:
        name, differentiable, input_range = "selma-smoke-mean", False, "[-1,1]"

        def score(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    register_reward("selma-smoke-mean", lambda **kw: Mean(), overwrite=True)
    model = tmp_path / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(model)
    out = tmp_path / "selma.json"
    argv = [
        "--quick",
        "--model",
        str(model),
        "--faithfulness",
        "none",
        "--reward",
        "selma-smoke-mean",
        "--skills",
        "count",
        "color",
        "--run-dir",
        str(tmp_path / "b"),
        "--out",
        str(out),
        "--sample-steps",
        "2",
        "--weak-steps",
        "1",
        "--prompts-per-skill",
        "4",
        "--images-per-prompt",
        "1",
        "--train-steps",
        "2",
        "--eval-per-skill",
        "2",
        "--seeds",
        "0",
        "1",
        "--loss-weighting",
        "none",
    ]
    bench.main(argv)
    res = json.loads(out.read_text())
    assert res["complete"] and res["seeds"] == "0,1"
    models = {(r["model"], r["seed"]) for r in res["rows"]}
    per_seed = {"expert:count", "expert:color", "merged:linear", "mixed", "mixed:matched:linear"}
    assert models == {("base", "-")} | {(m, s) for m in per_seed for s in (0, 1)} | {
        ("weak-to-strong merged:linear", 0)
    }
    assert all("selma-smoke-mean" in r for r in res["rows"])
    # the two seeds trained different experts (prompts, images, batches and LoRA init all follow the seed)
    a, b = (
        (tmp_path / "b" / "tiny-sd" / "quick" / f"self-s{s}" / "experts" / "count").glob("*.safetensors")
        for s in (0, 1)
    )
    assert next(a).read_bytes() != next(b).read_bytes()
    # a rerun evaluates nothing again: every model comes from the cache
    before = out.read_text()
    calls = []
    monkeypatch.setattr("diffalign.selma.stages.stage_eval", lambda *a, **k: calls.append(1) or {})
    bench.main(argv)
    assert calls == []
    after = json.loads(out.read_text())
    assert after["rows"] == json.loads(before)["rows"]
