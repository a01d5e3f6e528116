"""Reference checks of diffalign.selma.losses aimed at mutants the first tests let through: dtype handling,
the mean over all elements and both directions of the shape checks. (The forward process and the prediction
targets live in ``diffalign.core.denoisers`` and are tested there.)"""

import pytest
import torch

from diffalign.selma.losses import diffusion_loss


def test_loss_is_the_mean_over_all_elements():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert diffusion_loss(pred, target).item() == pytest.approx((1 + 4 + 9 + 9) / 4)


def test_shape_checks_both_ways():
    for a, b in (((2, 3), (3, 2)), ((3, 2), (2, 3)), ((2, 2), (2, 3)), ((2, 3), (2, 2))):
        with pytest.raises(ValueError, match="shape"):
            diffusion_loss(torch.zeros(a), torch.zeros(b))


def test_half_precision_prediction_gives_a_float32_loss():
    pred = torch.full((2, 2), 1.0, dtype=torch.bfloat16)
    target = torch.full((2, 2), 1.0 + 2**-9, dtype=torch.float32)  # not representable in bfloat16
    loss = diffusion_loss(pred, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2**-18, rel=1e-6)


def test_weighted_loss_is_the_mean_of_weighted_per_sample_mse():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    weights = torch.tensor([0.5, 2.0, 1.25])
    reference = sum(float(w) * float(((p - t) ** 2).mean()) for w, p, t in zip(weights, pred, target)) / 3
    assert diffusion_loss(pred, target, weights).item() == pytest.approx(reference, rel=1e-6)
    # negative controls: dropping the weights, or summing instead of averaging, is a different number
    assert diffusion_loss(pred, target).item() != pytest.approx(reference, rel=1e-3)
    assert 3 * reference != pytest.approx(reference, rel=1e-3)
    with pytest.raises(ValueError, match="weights shape"):
        diffusion_loss(pred, target, torch.ones(2))


def test_teacher_loss_weights_are_min_snr_clamped_over_snr_plus_one():
    from diffalign.selma.losses import loss_weights

    alphas = torch.tensor([0.999, 0.9, 0.5, 0.2, 0.0])
    t = torch.tensor([0, 1, 2, 3, 4])
    got = loss_weights(alphas, t, "teacher", clamp=5.0)
    # by hand: SNR = a / (1 - a) -> 999, 9, 1, 0.25, 0; weight = min(max(SNR, 1), 5) / (SNR + 1)
    expected = torch.tensor([5 / 1000, 5 / 10, 1 / 2, 1 / 1.25, 1.0])
    assert torch.allclose(got, expected, rtol=1e-4)
    assert got.dtype == torch.float32
    # the timesteps index the schedule: reversed timesteps give the reversed weights, not the same ones
    assert torch.allclose(loss_weights(alphas, t.flip(0), "teacher"), expected.flip(0), rtol=1e-4)
    assert loss_weights(alphas, t, "none") is None
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weights(alphas, t, "snr")


def test_drop_captions_drops_at_the_rate_and_only_to_empty():
    from diffalign.selma.losses import drop_captions

    prompts = [f"prompt {i}" for i in range(4000)]
    out = drop_captions(prompts, 0.1, torch.Generator().manual_seed(0))
    dropped = sum(o == "" for o in out)
    assert 0.085 * len(prompts) < dropped < 0.115 * len(prompts)
    assert all(o in ("", p) for o, p in zip(out, prompts))
    assert drop_captions(prompts, 0.0, torch.Generator()) == prompts
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="caption dropout"):
            drop_captions(prompts, bad, torch.Generator())


def test_weights_of_any_other_shape_than_the_batch_are_rejected():
    pred, target = torch.zeros(3, 2, 4), torch.ones(3, 2, 4)
    # longer, shorter and [B, 1] (which would broadcast to a [B, B] product and give a wrong mean)
    for bad in (torch.ones(4), torch.ones(2), torch.ones(3, 1), torch.ones(1)):
        with pytest.raises(ValueError, match="weights shape"):
            diffusion_loss(pred, target, bad)


def test_loss_weighting_accepts_exactly_none_and_teacher():
    from diffalign.selma.losses import loss_weights

    alphas, t = torch.tensor([0.9, 0.5]), torch.tensor([0, 1])
    # names read from a config file are equal to, but not the same object as, the literals in the code
    none, teacher = "".join(["no", "ne"]), "".join(["teach", "er"])
    assert loss_weights(alphas, t, none) is None
    assert torch.allclose(loss_weights(alphas, t, teacher), torch.tensor([5 / 10, 1 / 2]), rtol=1e-5)
    # unknown names on both sides of "none" and "teacher" in string order
    for bad in ("", "min_snr", "nonf", "snr", "uniform", "zero"):
        with pytest.raises(ValueError, match="unknown loss weighting"):
            loss_weights(alphas, t, bad)


def test_drop_captions_at_rate_zero_leaves_the_generator_untouched():
    # train.py draws the noise and the timesteps from the same generator right after the captions, so a
    # draw here at rate 0 would change every later sample of a run without caption dropout
    from diffalign.selma.losses import drop_captions

    gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    prompts = ["a", "b", "c"]
    out = drop_captions(prompts, 0.0, gen)
    assert out == prompts and out is not prompts
    assert torch.equal(gen.get_state(), ref.get_state())
    assert torch.equal(torch.rand(5, generator=gen), torch.rand(5, generator=ref))


def test_drop_captions_rejects_rates_above_one():
    from diffalign.selma.losses import drop_captions

    for bad in (1.5, 2.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="caption dropout"):
            drop_captions(["a"], bad, torch.Generator())


def test_drop_captions_drops_where_the_uniform_draw_is_strictly_below_the_rate():
    # P(u < rate) = rate exactly for torch.rand's float32 grid; u <= rate would drop one grid value more.
    # With the rate set to a drawn value itself, that prompt must be kept and exactly the smaller ones dropped.
    from diffalign.selma.losses import drop_captions

    u = torch.rand(64, generator=torch.Generator().manual_seed(11))
    rate = float(u[0])
    assert 0.05 < rate < 0.95  # the seed gives a useful rate
    prompts = [f"p{i}" for i in range(64)]
    out = drop_captions(prompts, rate, torch.Generator().manual_seed(11))
    expected = ["" if float(x) < rate else p for x, p in zip(u, prompts)]
    assert out == expected and out[0] == "p0"
    assert 0 < sum(o == "" for o in out) < 64
