import pytest

from diffalign.listener_reward.config import PromptsConfig
from diffalign.listener_reward.prompts import (
    completion_text,
    extract_answer,
    format_completion,
    is_well_formed,
    listener_messages,
    reasoner_messages,
    strip_answer,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think> image 1 : match . </think> <answer> 1 </answer>", 1),
        ("<think>x</think><answer>2</answer>", 2),
        ("<think> a </think> <answer> Image 2 </answer>", 2),
        ('<think> a </think> {"choice": "1"}', 1),
        ("<answer> 1 </answer> then <answer> 2 </answer>", 2),  # last answer wins
        ("<think> a </think> <answer> 1 or 2 </answer>", None),  # ambiguous
        ("<think> a </think> <answer> 3 </answer>", None),
        ("<think> unfinished", None),
        ("", None),
        ("1", None),  # a bare digit is not an answer
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_completion_text_accepts_conversational():
    msg = [{"role": "assistant", "content": "<think> a </think> <answer> 2 </answer>"}]
    assert extract_answer(msg) == 2
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]) == "hi"
    with pytest.raises(TypeError):
        completion_text(3)


@pytest.mark.parametrize(
    "text",
    [
        "<think> image 1 : match . image 2 : mismatch . </think> <answer> 1 </answer>",
        "<think> image 1 : match </think> <answer> 2 </answer> trailing",
        '<think> x </think> {"choice": "2"}',
        "no think block <answer> 2 </answer>",
        "<think> unclosed reasoning <answer> 1 </answer>",
        "<think> nested <answer> 2 </answer> inside </think>",
        "<answer> 1 </answer>",
        'reasoning then {"answer": 2}',
    ],
)
def test_strip_answer_never_leaks_the_answer(text):
    stripped = strip_answer(text)
    assert "<answer>" not in stripped and "</answer>" not in stripped
    assert extract_answer(stripped) is None
    assert "choice" not in stripped and '"answer"' not in stripped


def test_strip_answer_keeps_reasoning():
    text = "<think> image 1 : match . image 2 : mismatch . </think> <answer> 2 </answer>"
    assert strip_answer(text) == "image 1 : match . image 2 : mismatch ."
    assert strip_answer("plain words <answer> 1 </answer>") == "plain words"


def test_strip_answer_negative_control():
    # a plausible wrong variant: remove only the think tags -> the answer survives; the check must catch it
    text = "<think> r </think> <answer> 1 </answer>"
    naive = text.replace("<think>", "").replace("</think>", "")
    assert extract_answer(naive) == 1
    assert extract_answer(strip_answer(text)) is None


@pytest.mark.parametrize(
    "text, ok",
    [
        ("<think> r </think> <answer> 1 </answer>", True),
        ("  <think>r</think><answer>2</answer>\n", True),
        ("<think> </think> <answer> 1 </answer>", False),  # empty reasoning
        ("<think> r </think>", False),
        ("<answer> 1 </answer>", False),
        ("<think> r </think> <answer> 1 </answer> extra", False),
        ("<think> a </think> <think> b </think> <answer> 1 </answer>", False),
        ("<think> r </think> <answer> 1 </answer> <answer> 2 </answer>", False),
        ("<think> r </think> <answer> 3 </answer>", False),
        ('<think> r </think> {"choice": "1"}', False),
    ],
)
def test_is_well_formed_tags(text, ok):
    assert is_well_formed(text, "tags") is ok


def test_is_well_formed_json_and_roundtrip():
    assert is_well_formed('<think> r </think> {"choice": "2"}', "json")
    for fmt in ("tags", "json"):
        for k in (1, 2):
            text = format_completion("some reasoning .", k, fmt)
            assert is_well_formed(text, fmt) and extract_answer(text) == k
            assert strip_answer(text) == "some reasoning ."
    with pytest.raises(ValueError):
        format_completion("r", 3)


def test_messages_have_two_image_slots_and_listener_refuses_answers():
    cfg = PromptsConfig()
    msgs = reasoner_messages("a red circle", cfg)
    blocks = [b for m in msgs for b in m["content"]]
    assert sum(b["type"] == "image" for b in blocks) == 2
    assert any("a red circle" in b.get("text", "") for b in blocks)
    lm = listener_messages("a red circle", "image 1 : match .", cfg)
    assert any("image 1 : match ." in b.get("text", "") for m in lm for b in m["content"])
    with pytest.raises(ValueError, match="never see the answer"):
        listener_messages("a red circle", "r <answer> 1 </answer>", cfg)


def test_shapes_pairs_stand_in_and_core_adapter():
    from diffalign.listener_reward.data import make_shapes_pairs, oracle_reasoning

    a = make_shapes_pairs(20, "train", seed=0)
    assert [p.prompt for p in a] == [p.prompt for p in make_shapes_pairs(20, "train", seed=0)]
    ood = {p.prompt for p in make_shapes_pairs(20, "test_ood", seed=0)}
    assert not ood & {p.prompt for p in a}
    for p in a:
        assert p.label in (1, 2) and p.faithful[0] != p.faithful[1]
        assert extract_answer(oracle_reasoning(p.faithful)) is None
        # the faithful image is described exactly as the prompt, the other one differently
        k = 0 if p.faithful[0] else 1
        assert p.descriptions[k] == p.prompt and p.descriptions[1 - k] != p.prompt
        reasoning = oracle_reasoning(p.faithful, p.descriptions)
        assert extract_answer(reasoning) is None
        assert reasoning.split(" . ")[k].rstrip(" .").endswith(f"{p.descriptions[k]} , match")
    try:
        from diffalign.core.shapes import make_preference_pairs  # noqa: F401
    except ImportError:
        pytest.skip("core shapes generator not installed")
    from diffalign.listener_reward.data import core_shapes_pairs

    pairs = core_shapes_pairs(4, "test_ood", seed=0)
    assert pairs and all(p.label in (1, 2) and p.votes[p.label - 1] > p.votes[2 - p.label] for p in pairs)
    assert pairs[0].images()[0].size == (32, 32)


def test_listener_items_follow_the_reasoning_and_captions_cover_every_combination():
    from diffalign.listener_reward.config import PromptsConfig
    from diffalign.listener_reward.data import OOD_COMBOS, make_shapes_pairs
    from diffalign.listener_reward.shapes_models import caption_items, listener_items

    prompts = PromptsConfig()
    pairs = make_shapes_pairs(200, "train", seed=3)
    items = listener_items(pairs, prompts, seed=0)
    kinds = {"faithful": 0, "swapped": 0, "empty": 0}
    for pair, item in zip(pairs, items):
        text = " ".join(b.get("text", "") for m in item["messages"] for b in m["content"])
        truth = 1 if pair.faithful[0] else 2
        answer = prompts.answer_tokens.index(item["completion"]) + 1
        first = pair.descriptions[0]
        if f"image 1 : {first} ," in text and " match ." in text and "mismatch" in text:
            kinds["faithful"] += 1
            assert answer == truth
        elif f"image 1 : {pair.descriptions[1]} ," in text:
            kinds["swapped"] += 1  # the reasoning argues for the other image; the answer follows it
            assert answer == 3 - truth
        elif "reasoning :  ." in text:
            kinds["empty"] += 1
            assert answer == truth
    assert min(kinds.values()) > 10, kinds
    # the captioning base (a pretrained VLM's stand-in) sees every combination, the OOD ones included;
    # only the preference data holds them out
    seen = {tuple(item["completion"].split()[1:]) for item in caption_items(96, seed=0)}
    assert OOD_COMBOS <= seen and len(seen) == 12
    restricted = {tuple(item["completion"].split()[1:]) for item in caption_items(96, seed=0, combos="train")}
    assert not (restricted & OOD_COMBOS)
    assert not any(tuple(p.prompt.split()[1:]) in OOD_COMBOS for p in pairs)
