import threading

import pytest
import torch

from diffalign.listener_reward.config import PromptsConfig, RewardConfig
from diffalign.listener_reward.modeling import answer_token_ids, load_vlm_and_processor, two_token_probs
from diffalign.listener_reward.rewards import (
    HTTPListener,
    ListenerReward,
    LocalListener,
    accuracy_reward,
    combine_rewards,
    contradiction_rate,
    format_reward,
    reward_functions,
    serve_listener,
)

GOOD1 = "<think> image 1 : match . image 2 : mismatch . </think> <answer> 1 </answer>"
GOOD2 = "<think> image 1 : match . image 2 : mismatch . </think> <answer> 2 </answer>"
BAD = "image 1 maybe"


def test_format_and_accuracy_rewards():
    assert format_reward([GOOD1, BAD, GOOD2]) == [1.0, 0.0, 1.0]
    assert accuracy_reward([GOOD1, BAD, GOOD2], label=[1, 1, 1]) == [1.0, 0.0, 0.0]
    assert accuracy_reward([GOOD2], label=[2]) == [1.0]
    with pytest.raises(ValueError):
        accuracy_reward([GOOD1], label=[1, 2])


def test_two_token_probs_matches_restricted_softmax():
    logits = torch.randn(5, 11)
    ids = (3, 7)
    p = two_token_probs(logits, ids)
    ref = torch.exp(logits[:, [3, 7]]) / torch.exp(logits[:, [3, 7]]).sum(1, keepdim=True)
    assert torch.allclose(p, ref, atol=1e-6)
    assert torch.allclose(p.sum(1), torch.ones(5))
    # negative control: the full-vocabulary softmax read at the two ids is a different (unnormalised) thing
    wrong = torch.softmax(logits, -1)[:, [3, 7]]
    assert not torch.allclose(wrong, ref, atol=1e-3)


def test_combine_rewards_applies_weights_against_brute_force():
    comps = {"format": [1.0, 0.0, 1.0], "accuracy": [1.0, 1.0, 0.0], "listener": [0.9, 0.2, float("nan")]}
    weights = {"format": 1.0, "accuracy": 0.5, "listener": 0.5}
    total = combine_rewards(comps, weights)
    expected = [1 + 0.5 + 0.45, 0 + 0.5 + 0.1, 1 + 0 + 0]
    assert total == pytest.approx(expected)
    # negative control: unweighted sum differs
    assert [sum(v for v in c if v == v) for c in zip(*comps.values())] != pytest.approx(expected)
    with pytest.raises(KeyError):
        combine_rewards({"format": [1.0]}, weights)


def test_reward_functions_default_weights_and_names():
    class Backend:
        def probabilities(self, *a):
            raise AssertionError

    funcs, weights = reward_functions(RewardConfig(), PromptsConfig(), Backend())
    assert weights == [1.0, 0.5, 0.5]
    assert [f.__name__ for f in funcs] == ["format_reward", "accuracy_reward", "listener_reward"]
    funcs, weights = reward_functions(RewardConfig(use_listener=False), PromptsConfig())
    assert weights == [1.0, 0.5] and len(funcs) == 2
    with pytest.raises(ValueError, match="listener backend"):
        reward_functions(RewardConfig(), PromptsConfig(), None)


def test_contradiction_rate_brute_force():
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    choices = [1, 1, None, 2]
    stats = contradiction_rate(choices, probs)
    assert stats == {"contradiction_rate": pytest.approx(1 / 3), "n": 3}
    assert contradiction_rate([None], torch.tensor([[0.5, 0.5]]))["n"] == 0
    with pytest.raises(ValueError):
        contradiction_rate([1, 2], probs)


class RedBackend:
    """Symmetric by construction: p(image k) = softmax over the two images' mean red channel."""

    def __init__(self):
        self.seen = []

    def probabilities(self, prompts, images, reasonings):
        self.seen.extend(reasonings)
        import numpy as np

        red = torch.tensor([[float(np.asarray(im)[..., 0].mean()) / 20 for im in pair] for pair in images])
        return torch.softmax(red, dim=1)


def test_listener_reward_swaps_with_image_order_and_never_sees_answer(pairs):
    backend = RedBackend()
    reward = ListenerReward(backend)
    imgs = [p.images() for p in pairs[:4]]
    labels = [p.label for p in pairs[:4]]
    r = reward([GOOD1] * 4, label=labels, images=imgs, t2i_prompt=[p.prompt for p in pairs[:4]])
    swapped = reward(
        [GOOD2] * 4,
        label=[3 - y for y in labels],
        images=[im[::-1] for im in imgs],
        t2i_prompt=[p.prompt for p in pairs[:4]],
    )
    assert r == pytest.approx(swapped)
    # negative control: swapping the images without swapping the label changes the reward
    unswapped = reward(
        [GOOD1] * 4, label=labels, images=[im[::-1] for im in imgs], t2i_prompt=[p.prompt for p in pairs[:4]]
    )
    assert unswapped != pytest.approx(r)
    assert all("answer" not in s and s == "image 1 : match . image 2 : mismatch ." for s in backend.seen)


@pytest.fixture(scope="module")
def listener(tiny_dirs):
    model, processor = load_vlm_and_processor(tiny_dirs["listener"])
    return LocalListener(model, processor, PromptsConfig(), batch_size=3)


def test_tiny_listener_probabilities(listener, pairs):
    prompts = [p.prompt for p in pairs[:5]]
    imgs = [p.images() for p in pairs[:5]]
    reasons = ["image 1 : match ."] * 5
    p1 = listener.probabilities(prompts, imgs, reasons)
    p2 = listener.probabilities(prompts, imgs, reasons)
    assert p1.shape == (5, 2)
    assert torch.equal(p1, p2)  # deterministic
    assert torch.allclose(p1.sum(1), torch.ones(5), atol=1e-6)
    # batching does not change the numbers (left padding)
    single = torch.cat([listener.probabilities([a], [b], [c]) for a, b, c in zip(prompts, imgs, reasons)])
    assert torch.allclose(single, p1, atol=1e-5)
    assert not any(q.requires_grad for q in listener.model.parameters())


def test_listener_reward_is_blind_to_the_final_answer(listener, pairs):
    reward = ListenerReward(listener)
    kw = dict(label=[1, 1], images=[p.images() for p in pairs[:2]], t2i_prompt=[p.prompt for p in pairs[:2]])
    assert reward([GOOD1, GOOD1], **kw) == reward([GOOD2, GOOD2], **kw)
    # negative control: a listener fed the raw completion (answer included) does see the difference
    raw1 = listener.probabilities(kw["t2i_prompt"], kw["images"], ["r 1 1 1", "r 1 1 1"])
    raw2 = listener.probabilities(kw["t2i_prompt"], kw["images"], ["r 2 2 2", "r 2 2 2"])
    assert not torch.allclose(raw1, raw2)


def test_listener_reward_logs_disagreement(listener, pairs):
    logged = {}
    reward = ListenerReward(listener)
    reward(
        [GOOD1, BAD],
        label=[1, 2],
        images=[p.images() for p in pairs[:2]],
        t2i_prompt=[p.prompt for p in pairs[:2]],
        log_metric=lambda k, v: logged.update({k: v}),
    )
    assert 0.0 <= logged["listener_disagreement"] <= 1.0


def test_http_listener_matches_local(listener, pairs):
    server = serve_listener(listener)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        remote = HTTPListener(f"http://127.0.0.1:{server.server_address[1]}/")
        args = ([p.prompt for p in pairs[:3]], [p.images() for p in pairs[:3]], ["r"] * 3)
        assert torch.allclose(remote.probabilities(*args), listener.probabilities(*args), atol=1e-6)
    finally:
        server.shutdown()
        server.server_close()


def test_answer_token_ids_validation(listener):
    tok = listener.processor.tokenizer
    assert answer_token_ids(tok, ("1", "2")) != answer_token_ids(tok, ("2", "1"))
    with pytest.raises(ValueError, match="not in the tokenizer vocabulary"):
        answer_token_ids(tok, ("zebra", "2"))
    with pytest.raises(ValueError, match="one"):
        answer_token_ids(tok, ("1 2", "2"))
