import pytest
import torch

from diffalign.core.config import ConfigError, load_config
from diffalign.core.rewards import register_reward, unregister_reward
from diffalign.core.testing import tiny_sd_pipeline
from diffalign.mlcm.config import MLCMRecipe
from diffalign.mlcm.inference import apply_student
from diffalign.mlcm.train import plan_phases, train

from .helpers import tiny_recipe


def _v_pipe():
    return tiny_sd_pipeline(prediction_type="v_prediction")


def test_lora_trains_only_adapters_resumes_exactly_and_exports(tmp_path):
    base = {n: p.detach().clone() for n, p in _v_pipe().unet.named_parameters()}
    cfg = tiny_recipe(tmp_path / "full")
    pipe = _v_pipe()
    result = train(cfg, pipe=pipe)
    assert result.steps == 3 and [h["phase"] for h in result.losses] == ["stage1:8", "stage1:8", "stage2:8"]
    trained = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    lora = [n for n in trained if "lora_" in n]
    assert lora, "no LoRA parameters were added"
    for name, value in trained.items():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(value, base[key]), f"base weight {name} changed"
    assert any("lora_B" in n and trained[n].abs().sum() > 0 for n in lora)  # B started at zero

    # interrupted after 2 iterations, then resumed: identical to the uninterrupted run
    cfg2 = tiny_recipe(tmp_path / "resumed")
    part = train(cfg2, pipe=_v_pipe(), max_steps=2)
    assert part.steps == 2 and not part.student_dir.exists()
    pipe2 = _v_pipe()
    train(cfg2, pipe=pipe2)
    for name, value in pipe2.unet.named_parameters():
        torch.testing.assert_close(value, trained[name], atol=1e-6, rtol=1e-5)

    # export is readable by diffusers' load_lora_weights and reproduces the student
    fresh = apply_student(_v_pipe(), result.student_dir)
    assert type(fresh.scheduler).__name__ == "MLCMScheduler"
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([499])
    emb = torch.randn(1, 16, 32)
    with torch.no_grad():
        a = pipe.unet(z, t, encoder_hidden_states=emb).sample
        b = fresh.unet(z, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert (result.run_dir / "config.yaml").is_file() and (result.run_dir / "metrics.jsonl").is_file()


def test_full_finetune_with_ema_target(tmp_path):
    cfg = tiny_recipe(
        tmp_path / "run",
        student={"mode": "full", "ema_decay": 0.5},
        stage1={"iterations": 1},
        stage2={"iterations": 0},
    )
    pipe = _v_pipe()
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    result = train(cfg, pipe=pipe)
    changed = [n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])]
    assert changed
    assert (result.student_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    fresh = apply_student(_v_pipe(), result.student_dir)
    for n, p in fresh.unet.named_parameters():
        torch.testing.assert_close(p, dict(pipe.unet.named_parameters())[n])
    # the target network is core's EMA at the fixed decay 0.5: after one step, the midpoint
    from diffalign.core.checkpoints import StateCheckpoints

    ckpt = StateCheckpoints(None, result.run_dir)
    # accelerate saves the registered EMA target as its first custom checkpoint object
    target = torch.load(ckpt.path_for(ckpt.latest_step()) / "custom_checkpoint_0.pkl", weights_only=True)
    after = dict(pipe.unet.named_parameters())
    for n in changed:
        torch.testing.assert_close(target[n], 0.5 * (before[n] + after[n].detach()))
        assert not torch.allclose(target[n], after[n].detach())  # not the student itself


def test_ema_target_requires_full_mode():
    with pytest.raises(ValueError, match="ema_decay"):
        MLCMRecipe.model_validate({"model": {"source": "x"}, "student": {"ema_decay": 0.9}})


class _Brightness:
    name, differentiable, input_range = "test-brightness", True, "[-1,1]"

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def test_reward_gradient_reaches_student_through_vae_decoder(tmp_path):
    register_reward("test-brightness", lambda **kw: _Brightness(), overwrite=True)
    try:
        cfg = tiny_recipe(
            tmp_path / "run",
            stage1={"iterations": 0},
            stage2={"iterations": 0},
            reward={
                "name": "test-brightness",
                "iterations": 1,
                "loss": "direct",
                "consistency_weight": 0.0,
                "sample_steps": 2,
            },
        )
        pipe = _v_pipe()
        result = train(cfg, pipe=pipe)
    finally:
        unregister_reward("test-brightness")
    assert result.losses[0]["phase"] == "reward:8" and "reward" in result.losses[0]
    lora_b = [p for n, p in pipe.unet.named_parameters() if "lora_B" in n]
    # LoRA B starts at zero; only the reward gradient (through the VAE decoder) can move it here
    assert any(p.abs().sum() > 0 for p in lora_b)


def test_nondifferentiable_reward_rejected(tmp_path):
    class _Hard(_Brightness):
        differentiable = False

    register_reward("test-hard", lambda **kw: _Hard(), overwrite=True)
    try:
        cfg = tiny_recipe(tmp_path / "run", reward={"name": "test-hard", "iterations": 1})
        with pytest.raises(ValueError, match="not differentiable"):
            train(cfg, pipe=_v_pipe())
    finally:
        unregister_reward("test-hard")
    assert not (tmp_path / "run").exists()


def test_segment_halving_phases(tmp_path):
    cfg = tiny_recipe(
        tmp_path / "r", stage1={"iterations": 10, "segment_schedule": [8, 4, 2]}, stage2={"iterations": 3}
    )
    phases = plan_phases(cfg)
    assert [(p.key, p.start, p.end, p.lr) for p in phases] == [
        ("stage1:8", 0, 4, 1e-4),
        ("stage1:4", 4, 7, 1e-4),
        ("stage1:2", 7, 10, 1e-4),
        ("stage2:8", 10, 13, 1e-5),
    ]


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  source: shapes/unet\nstage1:\n  iterashuns: 5\n")
    with pytest.raises(ConfigError, match="iterashuns"):
        load_config(MLCMRecipe, bad)
    with pytest.raises(ConfigError, match="nothing to train"):
        load_config(MLCMRecipe, None, ["model.source=x", "stage1.iterations=0", "stage2.iterations=0"])


def test_metrics_log_has_each_step_once_after_kill_and_resume(tmp_path):
    import json
    import shutil

    from diffalign.core.checkpoints import StateCheckpoints

    sections = {"stage1": {"iterations": 3}, "stage2": {"iterations": 1}}
    ref = train(tiny_recipe(tmp_path / "ref", **sections), pipe=_v_pipe())
    cfg = tiny_recipe(tmp_path / "run", **sections)
    train(cfg, pipe=_v_pipe(), max_steps=3)
    # killed after step 3 was logged but before its checkpoint landed: resume starts from step 2
    ckpt = StateCheckpoints(None, cfg.run_dir)
    shutil.rmtree(ckpt.path_for(3))
    assert ckpt.latest_step() == 2
    train(cfg, pipe=_v_pipe())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row, expected in zip(rows, ref.losses):
        assert row["phase"] == expected["phase"]
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize(
    ("sections", "segments", "sampler", "two_steps"),
    [
        ({}, 8, "renoise", [999, 499]),
        ({"stage2": {"num_segments": 4, "sampler": "deterministic"}}, 4, "deterministic", [999, 499]),
        ({"stage1": {"iterations": 2, "segment_schedule": [8, 2]}, "stage2": {"iterations": 0}}, 2, "renoise", [999, 499]),
        # the single-segment LCM baseline: one segment, sampled on the 8-segment table
        ({"stage1": {"num_segments": 1}, "stage2": {"iterations": 0, "sampler": "deterministic"}}, 1, "deterministic", [999, 499]),
    ],
)  # fmt: skip
def test_exported_scheduler_carries_recipe_segments_and_sampler(
    tmp_path, sections, segments, sampler, two_steps
):
    from diffalign.mlcm.scheduler import MLCMScheduler
    from diffalign.mlcm.train import Distiller, export_student

    cfg = tiny_recipe(tmp_path / "run", **sections)
    out = export_student(Distiller(cfg, _v_pipe()), tmp_path / "student", "tiny")
    loaded = MLCMScheduler.from_pretrained(out, subfolder="scheduler")
    assert (loaded.config.num_segments, loaded.config.sampler) == (segments, sampler)
    pipe = apply_student(_v_pipe(), out)
    assert (pipe.scheduler.config.num_segments, pipe.scheduler.config.sampler) == (segments, sampler)
    pipe.scheduler.set_timesteps(2)
    assert pipe.scheduler.timesteps.tolist() == two_steps
    assert apply_student(_v_pipe(), out, sampler="renoise").scheduler.config.sampler == "renoise"


def test_mds_reference_follows_phase_segments_when_null(tmp_path, monkeypatch):
    from diffalign.mlcm import train as train_mod

    seen = []
    real = train_mod.teacher_states

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(train_mod, "teacher_states", spy)
    for reference, expected in ((None, [4]), (8, [8])):
        seen.clear()
        cfg = tiny_recipe(
            tmp_path / f"r{reference}",
            stage1={"num_segments": 4, "mds_reference_segments": reference},
            stage2={"num_segments": 4},
        )
        distiller = train_mod.Distiller(cfg, _v_pipe())
        distiller.stage1_loss(["a red circle"], 4, torch.Generator().manual_seed(0))
        assert seen == expected
