"""MLCM distils a DiT teacher into a few-step student; ECAD then searches a caching schedule for the
4-step student.

A tiny PixArt pipeline stands in for the shapes DiT teacher (``shapes/dit``). The student leaves mlcm as
a standard folder (``apply_student`` puts it into a fresh pipeline with ``MLCMScheduler``); ecad sees only
a diffusers pipeline. What must hold across the two: the searched schedules validate against the
student's transformer at 4 steps, and the all-recompute schedule reproduces the student bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch

PROMPTS = ["a red circle", "two blue squares"]
STEPS = 4


class ColourContrast:
    """A cheap deterministic quality stand-in that every pixel influences."""

    name, differentiable, input_range = "colour-contrast", True, "[-1,1]"

    def score(self, images, prompts):
        x = images.float()
        return 0.5 + 0.25 * (x[:, 0] - x[:, 2]).mean(dim=(1, 2)) + 0.1 * x.std(dim=(1, 2, 3))


def _mlcm_recipe(run_dir, mode: str):
    from diffalign.mlcm.config import MLCMRecipe

    return MLCMRecipe.model_validate(
        {
            "run_dir": str(run_dir),
            "seed": 0,
            "model": {"source": "shapes/dit"},  # recorded as the student's base; the test passes the pipe
            "student": {"mode": mode, "lora_rank": 4},
            "data": {"shapes_skills": ["object", "count"], "shapes_prompts_per_skill": 4},
            "distill": {"batch_size": 2, "guidance_scale": 3.0},
            "stage1": {"iterations": 2, "lr": 1e-3, "num_segments": 8, "skip": 20},
            "stage2": {
                "iterations": 1,
                "lr": 1e-4,
                "num_segments": 8,
                "sample_steps": 4,
                "teacher_substeps": 1,
            },
            "checkpoint": {"every": 100},
            "log_every": 1,
        }
    )


def _ecad_recipe(run_dir):
    from diffalign.ecad.config import EcadRecipe

    return EcadRecipe.model_validate(
        {
            "run_dir": str(run_dir),
            "model": {"source": "unused: the test passes the student pipeline"},
            # the student has the teacher's guidance baked in: it samples without CFG
            "sampling": {"num_inference_steps": STEPS, "guidance_scale": 1.0, "height": 16, "width": 16},
            "calibration": {"prompts": PROMPTS, "num_prompts": 2, "num_seeds": 1},
            "search": {"population_size": 4, "generations": 2, "seed": 0, "choose_at_flop_ratios": [0.9]},
        }
    )


def _sample(pipe):
    from diffalign.ecad.sampling import generate

    return generate(pipe, PROMPTS, [0, 1], STEPS, 1.0, 16, 16)


def test_mlcm_student_then_ecad_search(tmp_path):
    from diffalign.core.testing import tiny_pixart_pipeline
    from diffalign.ecad.hooks import apply_schedule, remove_schedule
    from diffalign.ecad.schedule import ScheduleError, no_cache
    from diffalign.ecad.search import run_search
    from diffalign.mlcm.inference import apply_student, read_student_meta
    from diffalign.mlcm.scheduler import MLCMScheduler
    from diffalign.mlcm.train import train

    # 1. distil (stage 1 then stage 2, a few iterations) and export
    result = train(_mlcm_recipe(tmp_path / "mlcm", "full"), pipe=tiny_pixart_pipeline())
    assert result.steps == 3 and [r["phase"].split(":")[0] for r in result.losses] == ["stage1"] * 2 + [
        "stage2"
    ]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.losses)
    assert read_student_meta(result.student_dir)["architecture"]

    # 2. the student in a fresh pipeline: MLCM scheduler, weights moved away from the teacher's
    teacher = tiny_pixart_pipeline()
    student = apply_student(tiny_pixart_pipeline(), result.student_dir)
    student.transformer.eval()
    student.set_progress_bar_config(disable=True)
    assert isinstance(student.scheduler, MLCMScheduler)
    t_sd, s_sd = teacher.transformer.state_dict(), student.transformer.state_dict()
    assert any(not torch.equal(t_sd[k], s_sd[k]) for k in t_sd)

    # 3. ECAD search on the 4-step student
    search = run_search(
        _ecad_recipe(tmp_path / "ecad"), pipe=student, reward=ColourContrast(), show_progress=False
    )
    assert len(student.scheduler.timesteps) == STEPS  # the student really sampled in 4 steps
    front = search.front_schedules()
    assert front, "empty Pareto front"
    summary = json.loads((tmp_path / "ecad" / "front.json").read_text())
    assert summary["num_inference_steps"] == STEPS and len(summary["front"]) == len(front)
    for schedule in front:
        assert schedule.num_steps == STEPS and schedule.num_cached() >= 1
        schedule.validate(student.transformer, num_inference_steps=STEPS)
        with pytest.raises(ScheduleError, match="steps"):
            schedule.validate(student.transformer, num_inference_steps=8)

    # 4. all-recompute reproduces the student bit for bit; a cached front schedule does not
    plain = _sample(student)
    assert torch.equal(plain, _sample(student))  # deterministic to begin with
    for schedule, expect_equal in ((no_cache(student.transformer, STEPS), True), (front[0], False)):
        apply_schedule(student, schedule)
        try:
            hooked = _sample(student)
        finally:
            remove_schedule(student)
        assert torch.equal(hooked, plain) is expect_equal, schedule.name
    assert torch.equal(_sample(student), plain)  # removing the hooks restores the student exactly

    # the student differs from the teacher sampled the same way (distillation changed the model)
    assert not torch.equal(plain, _sample(teacher))


def test_mlcm_lora_student_of_a_dit(tmp_path):
    from diffalign.core.testing import tiny_pixart_pipeline
    from diffalign.mlcm.train import train

    cfg = _mlcm_recipe(tmp_path / "mlcm", "lora")
    result = train(cfg, pipe=tiny_pixart_pipeline(), max_steps=1)
    assert result.steps == 1
