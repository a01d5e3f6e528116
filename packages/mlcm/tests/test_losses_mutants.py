"""Reference checks of diffalign.mlcm.losses written against mutants that the first tests let through:
default arguments, boundaries of the argument checks, and the perceptual term's weight and gradient."""

import math

import pytest
import torch

from diffalign.mlcm.losses import consistency_distance, consistency_loss, hinge_reward_loss


def _pseudo_huber_reference(a, b, c):
    """Brute force: sqrt(d^2 + c^2) - c per element, mean per sample."""
    out = []
    for x, y in zip(a.tolist(), b.tolist()):
        vals = [math.sqrt((p - q) ** 2 + c * c) - c for p, q in zip(x, y)]
        out.append(sum(vals) / len(vals))
    return torch.tensor(out)


def test_default_kind_is_l2_and_default_huber_c_is_one_thousandth():
    a = torch.tensor([[0.0, 0.002, 1.0], [0.5, -0.5, 0.0]])
    b = torch.zeros(2, 3)
    torch.testing.assert_close(consistency_distance(a, b), (a**2).mean(1))
    ref = _pseudo_huber_reference(a, b, 0.001)
    torch.testing.assert_close(consistency_distance(a, b, "pseudo_huber"), ref)
    torch.testing.assert_close(consistency_loss(a, b, "pseudo_huber"), ref.mean())
    torch.testing.assert_close(consistency_loss(a, b), (a**2).mean())
    # negative control: another c gives another number at this scale
    assert not torch.allclose(_pseudo_huber_reference(a, b, 0.01), ref)


def test_huber_c_must_be_positive_and_shapes_must_match():
    a, b = torch.ones(1, 2), torch.zeros(1, 2)
    with pytest.raises(ValueError, match="huber_c must be > 0"):
        consistency_distance(a, b, "pseudo_huber", 0.0)
    with pytest.raises(ValueError, match="huber_c must be > 0"):
        consistency_distance(a, b, "pseudo_huber", -1.0)
    consistency_distance(a, b, "pseudo_huber", 1e-6)  # any positive c is fine
    for pred_shape, target_shape in (((1, 2), (2, 1)), ((2, 1), (1, 2)), ((2, 3), (2, 2)), ((2, 2), (2, 3))):
        with pytest.raises(ValueError, match="differ in shape"):
            consistency_distance(torch.ones(pred_shape), torch.ones(target_shape))


def test_distance_averages_every_non_batch_dimension_per_sample():
    a = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2)
    b = torch.zeros(2, 3, 2, 2)
    d = consistency_distance(a, b)
    assert d.shape == (2,)
    torch.testing.assert_close(d, torch.stack([(a[i] ** 2).mean() for i in range(2)]))


def test_feature_term_default_weight_one_and_gradient_only_through_prediction():
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0]], requires_grad=True)

    def feats(x):
        return x[:, :2] * 3.0

    loss = consistency_loss(pred, target, features=feats)
    l2 = (1 + 4 + 9 + 16) / 4
    feature_l2 = ((3.0**2) + (6.0**2)) / 2
    assert loss.item() == pytest.approx(l2 + feature_l2)
    loss.backward()
    assert target.grad is None
    # d/dp of mean(p^2) is p/2 per element; the feature term adds 2 * 9 * p / 2 on the first two
    expected = torch.tensor([[0.5 + 9.0, 1.0 + 18.0, 1.5, 2.0]])
    torch.testing.assert_close(pred.grad, expected)


def test_hinge_margin_edge_and_negative_term_sign():
    # exactly at the margin: no loss; just under: the gap
    assert hinge_reward_loss(torch.tensor([2.0]), 2.0).item() == 0.0
    assert hinge_reward_loss(torch.tensor([1.5]), 2.0).item() == pytest.approx(0.5)
    # the negative prompt's score is penalised only above 0, by its value
    assert hinge_reward_loss(torch.tensor([5.0]), 2.0, torch.tensor([0.25])).item() == pytest.approx(0.25)
    assert hinge_reward_loss(torch.tensor([5.0]), 2.0, torch.tensor([-0.25])).item() == 0.0


def test_loss_kind_compared_by_value_not_identity():
    """A kind read from a config file is an equal but distinct string object."""
    a, b = torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2)
    l2, huber = "".join(["l", "2"]), "".join(["pseudo", "_huber"])
    torch.testing.assert_close(consistency_distance(a, b, l2), consistency_distance(a, b, "l2"))
    torch.testing.assert_close(
        consistency_distance(a, b, huber, 0.5), consistency_distance(a, b, "pseudo_huber", 0.5)
    )


@pytest.mark.parametrize("kind", ["aaa", "l1", "smooth_l1", "zzz", "L2"])
def test_unknown_kinds_are_rejected_whatever_their_sort_order(kind):
    with pytest.raises(ValueError, match="unknown loss kind"):
        consistency_distance(torch.ones(1, 2), torch.zeros(1, 2), kind)
