"""The 2-D Gaussian-mixture toy with an analytic teacher (research note Sec. 5)."""

import pytest
import torch

from diffalign.mlcm import toy
from diffalign.mlcm.schedule import sampling_timesteps


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    s = toy.make_toy()
    ref = toy.reference_samples(s)
    ddim = {k: toy.energy_distance(toy.teacher_samples(s, k), ref) for k in (2, 4)}
    floor = toy.energy_distance(toy.reference_samples(s, seed=999), ref)
    ddim_per_class = {k: toy.per_class_energy_distance(toy.teacher_samples(s, k), ref) for k in (2, 4)}
    return s, ref, ddim, floor, ddim_per_class


def test_zero_init_student_equals_conditional_teacher():
    s = toy.make_toy()
    student = toy.ResidualStudent(s.teacher, s.schedule)
    z, t, c = torch.randn(16, 2), torch.randint(0, 1000, (16,)), torch.randint(0, 2, (16,))
    torch.testing.assert_close(student(z, t, c), s.teacher.eps(z, t, c, s.schedule), atol=1e-5, rtol=1e-5)


def test_stage1_and_stage2_beat_teacher_ddim(setup):
    s, ref, ddim, floor, ddim_c = setup
    student = toy.ResidualStudent(s.teacher, s.schedule)
    toy.train_stage1(s, student, num_segments=4, iterations=1000, seed=0)
    x4 = toy.sample_student(s, student, sampling_timesteps(4, 4), "deterministic", 2000, 5)
    ed4, ed4_c = toy.energy_distance(x4, ref), toy.per_class_energy_distance(x4, ref)
    assert floor < ed4 < 0.6 * ddim[4], (ed4, ddim)
    assert all(ed4_c[c] < 0.6 * ddim_c[4][c] for c in (0, 1)), (ed4_c, ddim_c)  # each class, not the pool
    toy.train_stage2(s, student, num_segments=4, iterations=500, seed=1)
    x2 = toy.sample_student(s, student, sampling_timesteps(2, 4), "renoise", 2000, 5)
    ed2, ed2_c = toy.energy_distance(x2, ref), toy.per_class_energy_distance(x2, ref)
    assert floor < ed2 < 0.7 * ddim[2], (ed2, ddim)
    assert all(ed2_c[c] < 0.7 * ddim_c[2][c] for c in (0, 1)), (ed2_c, ddim_c)


def test_wrong_boundary_student_fails_stage1_bound(setup):
    s, ref, ddim, _, _ = setup
    student = toy.ResidualStudent(s.teacher, s.schedule)
    toy.train_stage1(s, student, num_segments=4, iterations=1000, seed=0, boundary_offset=1)
    ed4 = toy.energy_distance(
        toy.sample_student(s, student, sampling_timesteps(4, 4), "deterministic", 2000, 5), ref
    )
    assert ed4 >= 0.6 * ddim[4], (ed4, ddim)


def test_per_class_energy_distance_matches_brute_force_and_sees_a_class_swap():
    torch.set_num_threads(1)
    s = toy.make_toy()
    ref = toy.reference_samples(s, n=600, steps=20)
    good = toy.teacher_samples(s, 20, n=600, seed=8)
    # a student that draws the other class's modes: the same mixture overall
    gen = torch.Generator().manual_seed(8)
    swapped = s.teacher_ddim(torch.randn(600, 2, generator=gen), 1 - toy.sample_classes(600), 20)

    def brute(x, y):
        def mean_dist(a, b):
            return sum(float((ai - bj).norm()) for ai in a.double() for bj in b.double()) / (len(a) * len(b))

        return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)

    small = toy.per_class_energy_distance(swapped[:40], ref[:40])
    cls = toy.sample_classes(40)
    for c in (0, 1):
        assert small[c] == pytest.approx(brute(swapped[:40][cls == c], ref[:40][cls == c]), rel=1e-9)

    pooled_good, pooled_swapped = toy.energy_distance(good, ref), toy.energy_distance(swapped, ref)
    per_good, per_swapped = (
        toy.per_class_energy_distance(good, ref),
        toy.per_class_energy_distance(swapped, ref),
    )
    assert pooled_swapped < 2 * pooled_good + 0.01  # the pooled distance hides the swap
    assert set(per_good) == {0, 1}
    for c in (0, 1):
        assert per_good[c] < 0.05, per_good
        assert per_swapped[c] > 1.0, per_swapped  # the two halves of the ring are ~2.8 apart
