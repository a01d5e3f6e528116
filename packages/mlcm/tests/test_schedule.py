import numpy as np
import pytest
import torch

from diffalign.core.denoisers import NoiseSchedule
from diffalign.mlcm.schedule import (
    ddim_jump,
    inverse_ddim,
    milestone_grid,
    sampling_timesteps,
    segment_boundary,
    segment_index,
    segment_map,
)


def test_milestone_grid_matches_official_linspace():
    assert milestone_grid(8) == [999, 874, 749, 624, 499, 374, 249, 124, 0]
    assert milestone_grid(8) == np.linspace(999, 0, 9).astype(int).tolist()
    assert milestone_grid(4) == [999, 749, 499, 249, 0]
    assert milestone_grid(1) == [999, 0]
    with pytest.raises(ValueError):
        milestone_grid(0)


def test_official_step_subsets():
    expected = {
        2: [999, 499],
        3: [999, 499, 124],
        4: [999, 749, 499, 124],
        5: [999, 749, 499, 249, 124],
        6: [999, 749, 499, 374, 249, 124],
        7: [999, 749, 624, 499, 374, 249, 124],
        8: [999, 874, 749, 624, 499, 374, 249, 124],
    }
    for n, ts in expected.items():
        assert sampling_timesteps(n) == ts
    assert sampling_timesteps(2, num_segments=4) == [999, 499]
    assert sampling_timesteps(4, num_segments=4) == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="exceeds"):
        sampling_timesteps(5, num_segments=4)


def test_lcm_scheduler_timesteps_reference():
    from diffusers import LCMScheduler

    s = LCMScheduler()
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 759, 499, 259]
    s.set_timesteps(2)
    assert s.timesteps.tolist() == [999, 499]


def test_segment_index_and_boundary():
    m = milestone_grid(8)
    t = torch.tensor([999, 875, 874, 873, 500, 499, 125, 124, 1, 0])
    assert segment_index(t, m).tolist() == [0, 0, 1, 1, 3, 4, 6, 7, 7, 7]
    assert segment_boundary(t, m).tolist() == [874, 874, 749, 749, 499, 374, 124, 0, 0, 0]
    # negative control: the boundary is never the segment's own upper milestone
    assert not (segment_boundary(t[:-1], m) == t[:-1]).any()


def test_ddim_jump_identity_and_inverse():
    torch.manual_seed(1)
    sched = NoiseSchedule.scaled_linear()
    z_t, out = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    t = torch.tensor([999, 700, 300, 50])
    s = torch.tensor([874, 624, 249, 0])
    # identity when jumping to the same timestep (exact)
    assert torch.equal(segment_map(out, z_t, t, t, sched, "epsilon"), z_t)
    # inverse DDIM recovers the x0 used for the jump
    a_t, s_t = sched.alpha_sigma(t, z_t)
    a_s, s_s = sched.alpha_sigma(s, z_t)
    x0 = torch.randn_like(z_t)
    eps = (z_t - a_t * x0) / s_t
    z_s = ddim_jump(x0, eps, a_s, s_s)
    z_s_map = segment_map(eps, z_t, t, s, sched, "epsilon")
    torch.testing.assert_close(z_s_map, z_s, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(inverse_ddim(z_s, z_t, a_t, s_t, a_s, s_s), x0, atol=1e-3, rtol=1e-3)
    # negative control: a jump to a different boundary lands elsewhere
    other = segment_map(eps, z_t, t, (s - 100).clamp(min=0), sched, "epsilon")
    assert (other - z_s).abs().max() > 1e-2
