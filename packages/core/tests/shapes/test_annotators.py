import pytest
import torch

from diffalign.core.shapes.annotators import annotator_agreement, make_preference_pairs, write_preference_sets


def test_two_simulated_annotators_agree_65_to_75_percent():
    for split in ("in_distribution", "ood"):
        agree = annotator_agreement(2000, split, seed=2)
        assert 0.65 <= agree <= 0.75, (split, agree)


def test_pairs_are_seeded_labels_follow_the_hidden_utility():
    a = make_preference_pairs(400, "in_distribution", seed=3)
    b = make_preference_pairs(400, "in_distribution", seed=3)
    assert torch.equal(a.images_a, b.images_a) and torch.equal(a.label, b.label)
    assert a.images_a.shape == (400, 3, 32, 32) and a.images_a.min() >= -1 and a.images_a.max() <= 1
    better = (a.utility_a > a.utility_b).float()
    clear = (a.utility_a - a.utility_b).abs() > 0.3
    assert (a.label[clear] == better[clear]).float().mean() > 0.85
    assert 0.1 < a.label.mean() < 0.9
    assert (a.votes_a + a.votes_b == 3).all()


def test_ood_uses_heldout_prompts():
    from diffalign.core.shapes.grammar import prompt_split

    ood = make_preference_pairs(50, "ood", seed=0)
    assert all(prompt_split(p) == "heldout" for p in ood.prompts)
    ind = make_preference_pairs(50, "in_distribution", seed=0)
    assert all(prompt_split(p) == "train" for p in ind.prompts)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split"):
        make_preference_pairs(4, "test")
    with pytest.raises(ValueError, match="positive"):
        make_preference_pairs(0)


def test_written_sets_read_back_with_core_readers(tmp_path):
    from diffalign.core.metrics import preference_data as pdata

    info = write_preference_sets(tmp_path, n=12, seed=0)
    assert info["ood"]["n"] == 12
    d = tmp_path / "in_distribution"
    ir = pdata.read_imagereward(d / "imagereward.json", check_images=True)
    hp = pdata.read_hpdv2(d / "hpdv2.json", check_images=True)
    ra = pdata.read_rapidata(d / "rapidata.jsonl", check_images=True)
    assert len(ir) == len(hp) == len(ra) == 12
    assert ir[0].prompt == ra[0].prompt
