"""Tests that load the committed verifier weights (assets/verifier.safetensors)."""

import numpy as np
import pytest
import torch

from diffalign.core.shapes import eval_prompts, faithfulness, render_prompts
from diffalign.core.shapes.render import perturb
from diffalign.core.shapes.scoring import (
    ASSETS,
    ShapesFaithfulnessReward,
    ShapesReward,
    VerifierFeatures,
    check_images,
    fid,
    frechet_distance,
    soft_faithfulness,
)
from diffalign.core.shapes.verifier import evaluate_verifier


@pytest.fixture(scope="module")
def verifier():
    from diffalign.core.shapes.scoring import get_verifier

    return get_verifier()


def test_committed_weights_exist():
    assert (ASSETS / "verifier.safetensors").exists()
    assert (ASSETS / "fid_reference.safetensors").exists()


def test_verifier_accuracy_on_heldout_renders(verifier):
    ev = evaluate_verifier(verifier, n=200, seed=4321)
    for key in ("exists_accuracy", "colour_accuracy", "count_accuracy", "relation_accuracy"):
        assert ev[key] >= 0.97, ev
    ev = evaluate_verifier(verifier, n=200, seed=4322, perturbed=True)
    for key in ("exists_accuracy", "colour_accuracy", "count_accuracy", "relation_accuracy"):
        assert ev[key] >= 0.95, ev


def test_matched_renders_score_one_and_mismatched_near_chance(verifier):
    prompts = eval_prompts(25)
    images = render_prompts(prompts, seed=5)
    matched = faithfulness(images, prompts)
    assert matched.overall > 0.97
    mismatched = faithfulness(images, prompts[7:] + prompts[:7])
    assert 0.15 < mismatched.overall < 0.42  # the prototype measured 0.28
    assert set(matched.per_skill) == {"object", "count", "color", "spatial"}
    assert set(matched.per_category) == {"entity", "attribute", "count", "relation"}


def test_rewards_follow_the_protocol(verifier):
    prompts = ["two red circles", "a blue square above a green triangle"]
    images = render_prompts(prompts, seed=2)
    hard = ShapesFaithfulnessReward()
    soft = ShapesReward()
    assert (hard.name, hard.differentiable, hard.input_range) == ("shapes-faithfulness", False, "[-1,1]")
    assert (soft.name, soft.differentiable) == ("shapes-reward", True)
    assert hard.score(images, prompts).tolist() == pytest.approx([1.0, 1.0])
    s = soft.score(images, prompts)
    assert s.shape == (2,) and (s > 0.9).all()
    wrong = soft.score(images, prompts[::-1])
    assert (wrong < 0.5).all()


def test_registry_lookup():
    from diffalign.core.rewards import get_reward

    assert get_reward("shapes-reward").differentiable is True
    assert get_reward("shapes-faithfulness").differentiable is False


def test_reward_gradient_is_finite_and_ascent_improves_faithfulness(verifier):
    prompts = [
        "a red circle to the left of a blue square",
        "three green triangles",
        "a yellow circle and a red square",
        "a blue triangle",
    ]
    # start from renders of *other* prompts: low faithfulness
    x = render_prompts(
        ["a green square", "a red circle", "two blue circles", "a yellow square"], seed=9
    ).clone()
    before = faithfulness(x, prompts).overall
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(30):
        r = soft_faithfulness(x, prompts)
        loss = -r.sum()
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(x.grad).all()
        opt.step()
        with torch.no_grad():
            x.clamp_(-1, 1)
    after_soft = soft_faithfulness(x.detach(), prompts)
    after = faithfulness(x.detach(), prompts).overall
    assert after_soft.mean() > 0.5
    assert after > before + 0.2, (before, after)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(2, 3, 64, 64), "shape"),
        (torch.zeros(2, 1, 32, 32), "shape"),
        (torch.full((2, 3, 32, 32), 3.0), r"\[-1, 1\]"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "float"),
        (torch.zeros(3, 3, 32, 32), "3 images but 2 prompts"),
        (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
    ],
)
def test_bad_images_raise(bad, match, verifier):
    with pytest.raises(ValueError, match=match):
        faithfulness(bad, ["a red circle", "a blue square"])


def test_zero_one_images_are_rejected_not_rescaled(verifier):
    x = render_prompts(["a red circle", "a blue square"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        faithfulness((x + 1) / 2, ["a red circle", "a blue square"])


def test_bad_prompts_raise(verifier):
    x = render_prompts(["a red circle"])
    with pytest.raises(ValueError, match="prompts is empty"):
        faithfulness(x[:0], [])
    with pytest.raises(ValueError, match="not in the shapes-world grammar"):
        faithfulness(x, ["a photo of a cat"])
    with pytest.raises(TypeError):
        faithfulness(x, "a red circle")


def test_pil_images_accepted_and_checked(verifier):
    from PIL import Image

    x = render_prompts(["a red circle"])
    arr = ((x[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    assert faithfulness([Image.fromarray(arr)], ["a red circle"]).overall == 1.0
    with pytest.raises(ValueError, match="mode"):
        check_images([Image.fromarray(arr).convert("L")])
    with pytest.raises(ValueError, match="32x32"):
        check_images([Image.fromarray(arr).resize((64, 64))])


def test_frechet_distance_analytic():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    s1, s2 = np.diag(rng.uniform(0.5, 2, 4)), np.diag(rng.uniform(0.5, 2, 4))
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)
    # negative control: dropping the cross term (trace of sqrt(s1 s2)) is a different number
    wrong = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
    assert abs(frechet_distance(mu1, s1, mu2, s2) - wrong) > 0.1


def test_fid_ranks_degraded_images_worse_and_plugs_into_torchmetrics(verifier):
    prompts = eval_prompts(25, seed=77)
    clean = render_prompts(prompts, seed=1)
    noisy = perturb(clean, torch.Generator().manual_seed(0), strength=3.0)
    assert fid(clean) < fid(noisy)
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=VerifierFeatures(), normalize=True)
    metric.update((render_prompts(prompts, seed=2) + 1) / 2, real=True)
    metric.update((clean + 1) / 2, real=False)
    same = float(metric.compute())
    metric.reset()
    metric.update((render_prompts(prompts, seed=2) + 1) / 2, real=True)
    metric.update((noisy + 1) / 2, real=False)
    assert float(metric.compute()) > same
