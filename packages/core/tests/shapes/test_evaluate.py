"""The shapes evaluation path every benchmark uses: prompts, noise contract, scores, verifier plug-in."""

import pytest
import torch

from diffalign.core.shapes import SKILLS, parse_prompt, prompt_split, render_prompts, sample_prompts
from diffalign.core.shapes import evaluate as E
from diffalign.core.shapes.scoring import faithfulness, fid, get_verifier


def test_heldout_prompts_are_the_committed_eval_set_and_skill_subsets_agree():
    prompts = E.heldout_prompts()
    assert len(prompts) == 4 * E.EVAL_PROMPTS_PER_SKILL == 100
    # brute force: skill k drawn with seed 1234 + SKILLS.index(k) from the held-out split
    reference = [p for i, k in enumerate(SKILLS) for p in sample_prompts(k, 25, "heldout", seed=1234 + i)]
    assert prompts == reference
    assert {prompt_split(p) for p in prompts} == {"heldout"}
    records = E.heldout_records(25)
    assert [r["text"] for r in records] == prompts
    assert all(parse_prompt(r["text"]).skill == r["skill"] for r in records)
    subset = E.heldout_records(25, ["count", "spatial"])
    full = {k: [r["text"] for r in records if r["skill"] == k] for k in SKILLS}
    assert [r["text"] for r in subset] == full["count"] + full["spatial"]
    # negative control: seeding by the position in the subset (the old per-package helpers) moves prompts
    shifted = [
        p for i, k in enumerate(["count", "spatial"]) for p in sample_prompts(k, 25, "heldout", 1234 + i)
    ]
    assert shifted != [r["text"] for r in subset]
    with pytest.raises(ValueError, match="unknown skill 'colour'"):
        E.heldout_prompts(2, ["colour"])


def _fake_sampler(calls):
    def sample(prompts, generators):
        calls.append(len(prompts))
        assert len(generators) == len(prompts)
        return torch.stack([torch.rand(3, 32, 32, generator=g) * 2 - 1 for g in generators])

    return sample


def test_noise_contract_one_generator_per_prompt_independent_of_batch_size():
    prompts = E.heldout_prompts(2)
    calls = []
    a = E.sample_images(_fake_sampler(calls), prompts, seed=3, batch_size=8)
    b = E.sample_images(_fake_sampler(calls), prompts, seed=3, batch_size=3)
    assert calls == [8, 3, 3, 2]
    assert torch.equal(a, b)
    for i in range(len(prompts)):  # brute force: prompt i <- manual_seed(3 * 1_000_000 + i)
        g = torch.Generator().manual_seed(3 * 1_000_000 + i)
        assert torch.equal(a[i], torch.rand(3, 32, 32, generator=g) * 2 - 1)
    assert not torch.equal(a, E.sample_images(_fake_sampler([]), prompts, seed=4))

    # negative control: one generator per batch (the old convention) depends on the batch size
    def per_batch(batch_size):
        out = []
        for s in range(0, len(prompts), batch_size):
            g = torch.Generator().manual_seed(3 + s)
            out.append(torch.rand(len(prompts[s : s + batch_size]), 3, 32, 32, generator=g))
        return torch.cat(out)

    assert not torch.equal(per_batch(8), per_batch(3))
    with pytest.raises(ValueError, match="returned 1 images for 3 prompts"):
        E.sample_images(lambda p, g: torch.zeros(1, 3, 32, 32), prompts[:3])


def test_score_images_equals_the_scoring_functions_and_evaluate_sampler_uses_the_given_verifier():
    prompts = E.heldout_prompts(3)
    images = render_prompts(prompts, seed=1)
    row = E.score_images(images, prompts)
    assert row["overall"] == pytest.approx(faithfulness(images, prompts).overall)
    assert row["fid"] == pytest.approx(fid(images))
    assert row["overall"] > 0.95 and set(row["per_skill"]) == set(SKILLS)

    class CountingVerifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.calls = get_verifier(), 0

        def probs(self, x):
            self.calls += 1
            return self.inner.probs(x)

        def features(self, x):
            self.calls += 1
            return self.inner.features(x)

    verifier = CountingVerifier()
    out, sampled = E.evaluate_sampler(lambda p, g: render_prompts(p, seed=1), prompts, verifier=verifier)
    assert verifier.calls >= 2
    assert out["overall"] == pytest.approx(row["overall"])
    assert {"seconds", "cpu_seconds", "seconds_per_image", "fid", "per_category"} <= set(out)
    assert sampled.shape == images.shape
    # a mismatched pairing scores lower through the same path (the score is not a constant)
    shifted = prompts[1:] + prompts[:1]
    assert E.score_images(images, shifted)["overall"] < row["overall"] - 0.2


def test_protocol_records_the_contract():
    p = E.protocol(25)
    assert p["n_prompts"] == 100 and p["prompt_seed"] == 1234 and p["split"] == "heldout"
    assert E.noise_seed(2, 5) == 2_000_005
    with pytest.raises(ValueError, match="prompt index"):
        E.noise_seed(0, E.NOISE_SEED_STRIDE)
