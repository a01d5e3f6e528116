"""Every T2I benchmark measures the teacher on core's evaluation path: same prompts, same noise, same
scores. The teacher rows of mlcm, di-star and selma equal core's own measurement of the same pipeline."""

import pytest
import torch

pytest.importorskip("diffalign.mlcm")
pytest.importorskip("diffalign.di_star")
pytest.importorskip("diffalign.selma")

STEPS, GUIDANCE, N_PER_SKILL = 2, 4.0, 2


@pytest.fixture(scope="module")
def teacher():
    from diffalign.core.models import load_pipeline

    torch.manual_seed(0)
    pipe = load_pipeline("shapes/unet")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def core_row(teacher):
    from diffalign.core.shapes.evaluate import evaluate_sampler, heldout_prompts, pipeline_sampler

    prompts = heldout_prompts(N_PER_SKILL)
    row, images = evaluate_sampler(pipeline_sampler(teacher, STEPS, GUIDANCE), prompts)
    return prompts, row, images


def test_mlcm_teacher_row_is_cores(teacher, core_row):
    from diffusers import DDIMScheduler

    from diffalign.mlcm import bench

    prompts, row, _ = core_row
    teacher.scheduler = DDIMScheduler.from_config(teacher.scheduler.config)  # what the bench does
    got = bench.evaluate(teacher, prompts, STEPS, GUIDANCE, 0, 32)
    assert got["faithfulness"] == pytest.approx(row["overall"], abs=1e-6)
    assert got["fid"] == pytest.approx(row["fid"], rel=1e-4)
    # negative control: another noise seed is another measurement
    other = bench.evaluate(teacher, prompts, STEPS, GUIDANCE, 1, 32)
    assert other["fid"] != pytest.approx(row["fid"], rel=1e-4)


def test_di_star_teacher_row_is_cores_and_one_step_sampling_takes_core_noise(teacher, core_row):
    from diffalign.core.rewards import get_reward
    from diffalign.core.shapes.evaluate import sample_images
    from diffalign.di_star import bench
    from diffalign.di_star.inference import to_one_step_pipeline

    prompts, row, _ = core_row
    got = bench._evaluate(
        "teacher",
        bench._teacher_sampler(teacher, STEPS, GUIDANCE, None),
        prompts,
        prompts[:2],
        [100, 101],
        get_reward("shapes-reward"),
        lambda *a: None,
    )
    # core's row is scored with the committed verifier: the benchmark reports that one beside its evaluation-only
    # verifier's score (which is what its "faithfulness" column is)
    assert got["faithfulness_train_verifier"] == pytest.approx(row["overall"], abs=1e-6)
    assert got["fid"] == pytest.approx(row["fid"], rel=1e-4)
    assert got["diversity"] > 0
    from diffalign.core.shapes import load_eval_verifier
    from diffalign.core.shapes.scoring import faithfulness

    eval_score = faithfulness(core_row[2], prompts, load_eval_verifier()).as_dict()["overall"]
    assert got["faithfulness"] == pytest.approx(eval_score, abs=1e-6)

    from diffalign.core.models import load_pipeline

    one_step = to_one_step_pipeline(load_pipeline("shapes/unet"))
    sampler = bench._one_step_sampler(one_step, 399, None)
    a = sample_images(sampler, prompts[:3], batch_size=3)
    b = sample_images(sampler, prompts[:3], batch_size=1)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_selma_base_row_samples_cores_images(teacher, core_row):
    from diffalign.core.shapes.evaluate import heldout_records
    from diffalign.selma.evaluate import sample_images

    prompts, _, images = core_row
    records = heldout_records(N_PER_SKILL)
    assert [r["text"] for r in records] == prompts
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE}
    got = sample_images(teacher, records, seed=0, batch_size=3, call_kwargs=kwargs)
    torch.testing.assert_close(got, images, atol=1e-4, rtol=0)
