"""Reference checks of diffalign.listener_reward.rewards aimed at mutants the first tests let through: ties,
length checks, the label-to-column mapping of the listener reward and the HTTP shape check. No VLM needed."""

import pytest
import torch

from diffalign.listener_reward.config import PromptsConfig, RewardConfig
from diffalign.listener_reward.prompts import extract_answer
from diffalign.listener_reward.rewards import (
    HTTPListener,
    ListenerReward,
    accuracy_reward,
    combine_rewards,
    contradiction_rate,
    format_reward,
    make_listener_backend,
)

GOOD1 = "<think> image 1 : match . image 2 : mismatch . </think> <answer> 1 </answer>"
GOOD2 = "<think> image 1 : mismatch . image 2 : match . </think> <answer> 2 </answer>"


class FixedBackend:
    """Returns the given probabilities and records what it was asked."""

    def __init__(self, probs):
        self.probs = torch.tensor(probs, dtype=torch.float32)
        self.calls = []

    def probabilities(self, prompts, images, reasonings):
        self.calls.append((list(prompts), [list(p) for p in images], list(reasonings)))
        return self.probs


def test_accuracy_reward_needs_one_label_per_completion_both_ways():
    assert accuracy_reward([GOOD1, GOOD2], label=["1", 2]) == [1.0, 1.0]  # labels may be strings
    for completions, labels in (([GOOD1], [1, 2]), ([GOOD1, GOOD2], [1])):
        with pytest.raises(ValueError, match="labels for"):
            accuracy_reward(completions, label=labels)


def test_combine_rewards_length_and_key_checks_and_nan_only_drops_that_term():
    with pytest.raises(ValueError, match="different lengths"):
        combine_rewards({"a": [1.0, 2.0], "b": [1.0]}, {"a": 1.0, "b": 1.0})
    with pytest.raises(KeyError, match="no values for reward terms"):
        combine_rewards({"a": [1.0]}, {"a": 1.0, "b": 2.0})
    # a term without weight is ignored; a NaN drops only its own contribution
    total = combine_rewards(
        {"a": [2.0, float("nan")], "b": [1.0, 3.0], "c": [9.0, 9.0]}, {"a": 0.25, "b": 2.0}
    )
    assert total == [0.5 + 2.0, 6.0]
    assert combine_rewards({"a": [1.0]}, {}) == [0.0]


def test_contradiction_rate_ties_go_to_image_one_and_only_parsed_answers_count():
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.2, 0.8], [0.8, 0.2]])
    # listener choices: 1 (tie), 1 (tie), 2, 1
    stats = contradiction_rate([1, 2, 2, 0], probs)
    assert stats == {"contradiction_rate": pytest.approx(1 / 3), "n": 3}
    assert contradiction_rate([1, 1, 2, 1], probs) == {"contradiction_rate": 0.0, "n": 4}
    empty = contradiction_rate([None, 3], torch.tensor([[0.1, 0.9], [0.9, 0.1]]))
    assert empty["n"] == 0 and empty["contradiction_rate"] != empty["contradiction_rate"]  # NaN
    for bad in (torch.ones(4, 3), torch.ones(3, 2)):
        with pytest.raises(ValueError, match="listener_probs must be"):
            contradiction_rate([1, 2, 2, 0], bad)


def test_listener_reward_reads_the_labelled_column_and_logs_disagreement():
    backend = FixedBackend([[0.7, 0.3], [0.1, 0.9], [0.6, 0.4]])
    logged = []
    reward = ListenerReward(backend)
    out = reward(
        [GOOD1, GOOD2, GOOD2],
        label=[1, 2, 2],
        images=[("a1", "a2"), ("b1", "b2"), ("c1", "c2")],
        t2i_prompt=["p1", "p2", "p3"],
        log_metric=lambda name, value: logged.append((name, value)),
    )
    assert out == pytest.approx([0.7, 0.9, 0.4])
    prompts, images, reasonings = backend.calls[0]
    assert prompts == ["p1", "p2", "p3"] and images[2] == ["c1", "c2"]
    assert all("<answer>" not in r for r in reasonings)
    # answers 1, 2, 2 vs listener argmax 1, 2, 1: one contradiction in three
    assert logged == [("listener_disagreement", pytest.approx(1 / 3))]
    assert reward.__name__ == "listener_reward"


def test_listener_reward_logs_nothing_without_parsed_answers():
    logged = []
    ListenerReward(FixedBackend([[0.5, 0.5]]))(
        ["no answer"],
        label=[1],
        images=[("x", "y")],
        t2i_prompt=["p"],
        log_metric=lambda *a: logged.append(a),
    )
    assert logged == []


def test_http_listener_rejects_wrongly_shaped_replies(monkeypatch):
    import io
    import json

    from PIL import Image

    class Reply(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    replies = {"probs": [[0.2, 0.8]]}
    seen = {}

    def fake_urlopen(request, timeout):
        seen["timeout"] = timeout
        seen["items"] = json.loads(request.data)["items"]
        return Reply(json.dumps(replies).encode())

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    image = Image.new("RGB", (4, 4), (255, 0, 0))
    listener = HTTPListener("http://example.invalid/score", timeout_s=7.5)
    probs = listener.probabilities(["a red square"], [(image, image)], ["image 1 : match ."])
    assert probs.tolist() == [[pytest.approx(0.2), pytest.approx(0.8)]]
    assert seen["timeout"] == 7.5 and seen["items"][0]["prompt"] == "a red square"
    # too many rows or columns, and too few of either
    for bad in ([[0.2, 0.8], [0.5, 0.5]], [[0.2, 0.3, 0.5]], [[0.7]], []):
        replies["probs"] = bad
        with pytest.raises(ValueError, match="listener server returned probs of shape"):
            listener.probabilities(["a red square"], [(image, image)], ["r"])


def test_make_listener_backend_choices():
    cfg = RewardConfig(listener_backend="http", listener_url="http://h/x", listener_timeout_s=3.0)
    backend = make_listener_backend(cfg, PromptsConfig())
    assert isinstance(backend, HTTPListener) and backend.url == "http://h/x" and backend.timeout_s == 3.0
    with pytest.raises(ValueError, match="needs the listener model and processor"):
        make_listener_backend(RewardConfig(), PromptsConfig())


def test_listener_reward_logs_rank_changes_per_group_by_hand():
    # two groups of two, weights (format, accuracy, listener) = (1, 0.5, 2); labels 1, 1 | 1, 1
    # group 1: GOOD1, GOOD1 -> base 1.5, 1.5 (a tie); listener 0.7 vs 0.3 breaks it: changed, not flipped
    # group 2: GOOD1, GOOD2 -> base 1.5 > 1.0; listener 0.1 vs 0.9 -> shaped 1.7 < 2.8: changed and flipped
    backend = FixedBackend([[0.7, 0.3], [0.3, 0.7], [0.1, 0.9], [0.9, 0.1]])
    logged = []
    reward = ListenerReward(backend, group_size=2, weights=(1.0, 0.5, 2.0))
    kwargs = dict(label=[1, 1, 1, 1], images=[("a", "b")] * 4, t2i_prompt=["p"] * 4)
    out = reward([GOOD1, GOOD1, GOOD1, GOOD2], log_metric=lambda *a: logged.append(a), **kwargs)
    assert out == pytest.approx([0.7, 0.3, 0.1, 0.9])
    # answers 1, 1, 1, 2 vs listener argmax 1, 2, 2, 1: three contradictions in four
    assert logged == [
        ("listener_disagreement", pytest.approx(0.75)),
        ("listener_rank_change", 1.0),
        ("listener_rank_flip", 0.5),
    ]
    # a batch that is not whole groups logs no ranking (nor does a term without a group size)
    for size, n in ((3, 4), (None, 4), (2, 3)):
        logged.clear()
        ListenerReward(FixedBackend([[0.7, 0.3]] * n), group_size=size, weights=(1.0, 0.5, 2.0))(
            [GOOD1] * n,
            label=[1] * n,
            images=[("a", "b")] * n,
            t2i_prompt=["p"] * n,
            log_metric=lambda *a: logged.append(a),
        )
        assert [name for name, _ in logged] == ["listener_disagreement"]
    # whole groups of another count still log: four groups of one, eight in groups of two
    for size, n in ((1, 4), (2, 8)):
        logged.clear()
        ListenerReward(FixedBackend([[0.7, 0.3]] * n), group_size=size)(
            [GOOD1] * n,
            label=[1] * n,
            images=[("a", "b")] * n,
            t2i_prompt=["p"] * n,
            log_metric=lambda *a: logged.append(a),
        )
        assert [name for name, _ in logged][1:] == ["listener_rank_change", "listener_rank_flip"]


def test_ranking_changes_a_tie_made_is_a_change_not_a_flip():
    from diffalign.listener_reward.rewards import ranking_changes

    # base orders the pair strictly, the shaped rewards tie it: changed, but no strict pair is reversed
    assert ranking_changes([1.0, 0.5], [1.0, 1.0], 2) == {"changed": 1.0, "flipped": 0.0, "groups": 1}
    assert ranking_changes([0.5, 1.0], [1.0, 1.0], 2) == {"changed": 1.0, "flipped": 0.0, "groups": 1}
    # three groups: one flipped, one tie made, one unchanged
    got = ranking_changes([2.0, 1.0, 2.0, 1.0, 2.0, 1.0], [1.0, 2.0, 1.0, 1.0, 3.0, 1.0], 2)
    assert got == {"changed": pytest.approx(2 / 3), "flipped": pytest.approx(1 / 3), "groups": 3}


def test_ranking_changes_rejects_unequal_lengths_either_way_and_bad_group_sizes():
    from diffalign.listener_reward.rewards import ranking_changes

    for base, shaped, size in (
        ([1.0, 2.0, 3.0, 4.0], [1.0, 2.0], 2),  # base longer
        ([1.0, 2.0], [1.0, 2.0, 3.0, 4.0], 2),  # shaped longer
        ([1.0, 2.0], [1.0, 2.0], 0),
        ([1.0, 2.0], [1.0, 2.0], -1),
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 2),  # not whole groups
    ):
        with pytest.raises(ValueError, match="equal length divisible"):
            ranking_changes(base, shaped, size)
    assert ranking_changes([1.0, 2.0], [2.0, 1.0], 1) == {"changed": 0.0, "flipped": 0.0, "groups": 2}


def test_combine_rewards_without_any_term_is_an_error():
    with pytest.raises(ValueError, match="different lengths"):
        combine_rewards({}, {})


class _CharTokenizer:
    unk_token_id = None

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) for ch in text]


class _Processor:
    tokenizer = _CharTokenizer()


def test_local_backend_is_built_from_the_recipe_and_frozen():
    from diffalign.listener_reward.rewards import LocalListener

    model = torch.nn.Linear(2, 2).train()
    backend = make_listener_backend(RewardConfig(listener_batch_size=5), PromptsConfig(), model, _Processor())
    assert isinstance(backend, LocalListener) and backend.batch_size == 5
    assert backend.answer_ids == (ord("1"), ord("2"))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # built directly, the listener uses the same batch size default as the recipe
    direct = LocalListener(torch.nn.Linear(2, 2), _Processor(), PromptsConfig())
    assert direct.batch_size == RewardConfig().listener_batch_size
    with pytest.raises(ValueError, match="needs the listener model and processor"):
        make_listener_backend(RewardConfig(), PromptsConfig(), model=model)


def test_listener_reward_default_weights_are_the_recipe_defaults():
    # r = 1 * r_fmt + 0.5 * r_acc + 0.5 * r_list: the ranking log must weigh the terms as training does
    cfg = RewardConfig()
    assert ListenerReward(FixedBackend([[0.5, 0.5]])).weights == (
        cfg.format_weight,
        cfg.accuracy_weight,
        cfg.listener_weight,
    )
    assert (cfg.format_weight, cfg.accuracy_weight, cfg.listener_weight) == (1.0, 0.5, 0.5)


def test_listener_server_answers_a_post_without_content_length_with_an_error():
    import http.client
    import json
    import threading

    from diffalign.listener_reward.rewards import serve_listener

    server = serve_listener(FixedBackend([[0.5, 0.5]]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.putrequest("POST", "/")
        conn.putheader("Content-Type", "application/json")
        conn.endheaders()  # no body and no Content-Length: an empty request, not a wait for bytes
        reply = conn.getresponse()
        assert reply.status == 400 and "error" in json.loads(reply.read())
        conn.close()
    finally:
        server.shutdown()
        server.server_close()


def test_listener_reward_rank_log_matches_a_brute_force_pairwise_count():
    import random

    # completions whose format reward and parsed answer are known: (text, well formed, answer)
    kinds = [
        (GOOD1, 1.0, 1),
        (GOOD2, 1.0, 2),
        ("image 1 maybe", 0.0, None),
        ("<answer> 2 </answer>", 0.0, 2),  # an answer without the reasoning block
    ]
    texts = [k[0] for k in kinds]
    assert format_reward(texts) == [k[1] for k in kinds]
    assert [extract_answer(t) for t in texts] == [k[2] for k in kinds]
    rng = random.Random(0)
    for trial in range(40):
        group, groups = rng.choice((2, 3, 4)), rng.choice((1, 2, 3))
        n = group * groups
        picks = [rng.choice(kinds) for _ in range(n)]
        labels = [rng.choice((1, 2)) for _ in range(n)]
        p1 = [rng.choice((0.0, 0.25, 0.5, 0.75, 1.0)) for _ in range(n)]
        weights = rng.choice(((1.0, 0.5, 0.5), (1.0, 0.5, 2.0), (0.5, 2.0, 1.0), (2.0, 1.0, 3.0)))
        logged = {}
        ListenerReward(FixedBackend([[p, 1 - p] for p in p1]), group_size=group, weights=weights)(
            [k[0] for k in picks],
            label=labels,
            images=[("a", "b")] * n,
            t2i_prompt=["p"] * n,
            log_metric=logged.__setitem__,
        )
        base = [weights[0] * k[1] + weights[1] * (k[2] == y) for k, y in zip(picks, labels)]
        listener = [p if y == 1 else 1 - p for p, y in zip(p1, labels)]
        shaped = [b + weights[2] * r for b, r in zip(base, listener)]

        def sign(x):
            return (x > 0) - (x < 0)

        changed = flipped = 0
        for g in range(groups):
            idx = range(g * group, (g + 1) * group)
            pairs = [(i, j) for i in idx for j in idx]
            changed += any(sign(base[i] - base[j]) != sign(shaped[i] - shaped[j]) for i, j in pairs)
            flipped += any(sign(base[i] - base[j]) * sign(shaped[i] - shaped[j]) < 0 for i, j in pairs)
        assert logged["listener_rank_change"] == pytest.approx(changed / groups), trial
        assert logged["listener_rank_flip"] == pytest.approx(flipped / groups), trial


def test_http_listener_default_timeout_is_the_recipe_default():
    assert HTTPListener("http://h/x").timeout_s == RewardConfig().listener_timeout_s == 60.0


def test_listener_servers_take_a_free_port_by_default():
    from diffalign.listener_reward.rewards import serve_listener

    servers = [serve_listener(FixedBackend([[0.5, 0.5]])) for _ in range(2)]
    try:
        ports = [s.server_address[1] for s in servers]
        assert ports[0] != ports[1] and min(ports) >= 1024  # two ephemeral ports, none fixed
        assert all(s.server_address[0] == "127.0.0.1" for s in servers)
    finally:
        for s in servers:
            s.server_close()


def test_accuracy_reward_takes_batches_of_any_size():
    # lengths above 256 are distinct int objects in CPython: the length check must compare values
    n = 300
    assert accuracy_reward([GOOD1, GOOD2] * (n // 2), label=[1, 1] * (n // 2)) == [1.0, 0.0] * (n // 2)


def test_listener_server_answers_a_valid_request_with_200_and_the_probabilities():
    import http.client
    import json
    import threading

    from PIL import Image

    from diffalign.listener_reward.rewards import _png_b64, serve_listener

    backend = FixedBackend([[0.25, 0.75]])
    server = serve_listener(backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        image = Image.new("RGB", (4, 4), (0, 0, 255))
        item = {
            "prompt": "a blue square",
            "reasoning": "r",
            "image1": _png_b64(image),
            "image2": _png_b64(image),
        }
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.request(
            "POST", "/", body=json.dumps({"items": [item]}), headers={"Content-Type": "application/json"}
        )
        reply = conn.getresponse()
        assert reply.status == 200 and json.loads(reply.read()) == {"probs": [[0.25, 0.75]]}
        conn.close()
        prompts, images, reasonings = backend.calls[0]
        assert (
            prompts == ["a blue square"]
            and reasonings == ["r"]
            and images[0][1].getpixel((0, 0)) == (0, 0, 255)
        )
    finally:
        server.shutdown()
        server.server_close()
