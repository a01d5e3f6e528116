from diffalign.ecad.search import choose, paired_distances


def _entries():
    # calibration prefers "lucky" (better calibration fidelity), validation exposes it
    return [
        {
            "name": "lucky",
            "flop_ratio": 0.45,
            "fidelity": 0.01,
            "reward": 0.95,
            "validation_fidelity": 0.30,
            "validation_reward": 0.80,
        },
        {
            "name": "steady",
            "flop_ratio": 0.48,
            "fidelity": 0.05,
            "reward": 0.90,
            "validation_fidelity": 0.06,
            "validation_reward": 0.89,
        },
        {
            "name": "costly",
            "flop_ratio": 0.70,
            "fidelity": 0.00,
            "reward": 0.96,
            "validation_fidelity": 0.00,
            "validation_reward": 0.90,
        },
    ]


def test_choice_is_made_on_validation_scores_within_the_budget():
    assert choose(_entries(), 0.5, None, 0.90)["name"] == "steady"
    assert choose(_entries(), 0.75, None, 0.90)["name"] == "costly"
    assert choose(_entries(), 0.40, None, 0.90) is None
    # negative control: without validation scores the calibration pick is the lucky one
    calib_only = [{k: v for k, v in e.items() if not k.startswith("validation_")} for e in _entries()]
    assert choose(calib_only, 0.5, None, None)["name"] == "lucky"


def test_paired_distances_is_relative_l2_per_image():
    import torch

    ref = torch.ones(2, 3, 2, 2)
    x = ref.clone()
    x[1] *= 1.5
    d = paired_distances(x, ref)
    assert torch.allclose(d, torch.tensor([0.0, 0.5]))
