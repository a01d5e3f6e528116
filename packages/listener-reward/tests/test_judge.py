import pytest
import torch

from diffalign.listener_reward.config import JudgeConfig, PromptsConfig
from diffalign.listener_reward.judge import ListenerJudgeReward, PreferenceJudge, default_anchors


@pytest.fixture(scope="module")
def judge(tiny_dirs):
    return PreferenceJudge.from_pretrained(
        tiny_dirs["reasoner"], PromptsConfig(), JudgeConfig(max_new_tokens=4)
    )


def test_compare_returns_consistent_choice(judge, pairs):
    a, b = pairs[0].images()
    r = judge.compare(pairs[0].prompt, a, b)
    assert r.choice in (1, 2) and 0.5 <= r.probability <= 1.0
    assert r.probability == pytest.approx(r.p_image_a if r.choice == 1 else 1 - r.p_image_a)
    assert "<answer>" not in r.reasoning
    again = judge.compare(pairs[0].prompt, a, b)
    assert again.p_image_a == r.p_image_a


def test_symmetric_judge_is_order_invariant(tiny_dirs, pairs):
    sym = PreferenceJudge.from_pretrained(
        tiny_dirs["reasoner"], PromptsConfig(), JudgeConfig(max_new_tokens=4, symmetric=True)
    )
    a, b = pairs[1].images()
    ab = sym.compare(pairs[1].prompt, a, b)
    ba = sym.compare(pairs[1].prompt, b, a)
    assert ab.p_image_a == pytest.approx(1 - ba.p_image_a, abs=1e-5)


def test_rank_by_anchors_matches_brute_force(judge, pairs):
    images = [p.images()[0] for p in pairs[:3]]
    anchors = default_anchors(16, 2)
    scores, order = judge.rank_by_anchors("a red circle", images, anchors)
    brute = torch.tensor(
        [[judge.compare("a red circle", im, an).p_image_a for an in anchors] for im in images]
    )
    assert torch.allclose(scores, brute.mean(1), atol=1e-5)
    assert order == torch.argsort(brute.mean(1), descending=True).tolist()
    with pytest.raises(ValueError):
        judge.rank_by_anchors("a red circle", images, [])


def test_listener_judge_reward_model_protocol(judge, pairs):
    from diffalign.core.rewards import RewardModel

    rm = ListenerJudgeReward(judge, default_anchors(16, 1))
    assert isinstance(rm, RewardModel)
    assert rm.name == "listener-judge" and rm.differentiable is False and rm.input_range == "pil"
    images = [p.images()[0] for p in pairs[:2]]
    scores = rm.score(images, [p.prompt for p in pairs[:2]])
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()
    # the batched score equals one comparison per (image, anchor) pair, image by image
    anchors2 = default_anchors(16, 2)
    rm2 = ListenerJudgeReward(judge, anchors2)
    prompts3 = [p.prompt for p in pairs[:3]]
    images3 = [p.images()[1] for p in pairs[:3]]
    brute = torch.tensor(
        [[judge.compare(pr, im, an).p_image_a for an in anchors2] for pr, im in zip(prompts3, images3)]
    )
    assert torch.allclose(rm2.score(images3, prompts3), brute.mean(1), atol=1e-5)
    assert not torch.allclose(rm2.score(images3, prompts3), brute[:, 0], atol=1e-5) or torch.allclose(
        brute[:, 0], brute[:, 1], atol=1e-5
    )  # negative control: the first anchor alone is not the score
    tensor_images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert rm.score(tensor_images, ["a red circle"] * 2).shape == (2,)
    with pytest.raises(ValueError):
        rm.score(images, ["only one prompt"])


def test_listener_judge_is_registered_by_name(tiny_dirs):
    from diffalign.core.rewards import get_reward, list_rewards

    assert "listener-judge" in list_rewards()
    rm = get_reward("listener-judge", source=tiny_dirs["reasoner"], max_new_tokens=2)
    assert rm.name == "listener-judge"
