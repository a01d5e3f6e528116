"""Real multi-process runs (slow: each process imports torch and diffusers)."""

import os
import subprocess
import sys

import pytest
import yaml


@pytest.mark.slow
def test_two_process_accelerate_images_match_one_process(tmp_path):
    """The recipe's launch section runs the images stage on 2 CPU processes (gloo): each process renders its
    own share, the images are written once, and they equal a 1-process run's bit for bit.

    (A hand-typed ``accelerate launch --cpu --num_processes 2`` runs ONE process: accelerate's ``--cpu``
    always takes its single-process launcher. The runner launches ``--multi_gpu``, which on a machine
    without GPUs starts the processes and core's ``make_accelerator``/``process_state`` join them on gloo.)
    """
    import json

    from diffalign.core.testing import tiny_sd_pipeline

    model = tmp_path / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(model)
    outs = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFALIGN_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
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
                    "launch": {"launcher": "accelerate" if n > 1 else "none", "num_processes": n},
                }
            )
        )
        for stage in ("prompts", "images"):
            done = subprocess.run(
                [sys.executable, "-m", "diffalign.selma.cli", stage, str(recipe)],
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert done.returncode == 0, done.stderr[-3000:]
        outs[n] = run / "images"
    shards = sorted((outs[2] / "shards").iterdir())
    assert len(shards) == 2
    seen = [{json.loads(line)["file_name"] for line in p.read_text().splitlines()} for p in shards]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # the ranks rendered different images
    rows = (outs[2] / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == len(set(rows)) == 10  # each image written once
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
