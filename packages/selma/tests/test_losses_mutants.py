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
