"""The captioning gate of the benchmark: ``caption_accuracy`` scores the caption tokens of every candidate."""

from types import SimpleNamespace

import pytest
import torch

from diffalign.listener_reward import shapes_models
from diffalign.listener_reward.config import ListenerRewardRecipe
from diffalign.listener_reward.data import COLORS


class _FakeCaptioner:
    """Puts extra logit mass on one colour word and one shape word at every position; which colour is read
    from the truth of the render being scored (recorded by the patched ``render_shape``)."""

    def __init__(self, tokenizer, truths, colour_of, shape="circle"):
        self.tok, self.truths, self.colour_of, self.shape = tokenizer, truths, colour_of, shape

    def eval(self):
        return self

    def __call__(self, input_ids, **_):
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        colour = self.colour_of(self.truths[-1][0])
        for word in (colour, self.shape):
            (token,) = self.tok(word, add_special_tokens=False)["input_ids"]
            logits[..., token] += 8.0
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def processor():
    return shapes_models.new_tiny_vlm(0, ListenerRewardRecipe())[1]


def _run(monkeypatch, processor, colour_of):
    truths = []
    real = shapes_models.render_shape

    def recording(color, shape, *args, **kwargs):
        truths.append((color, shape))
        return real(color, shape, *args, **kwargs)

    monkeypatch.setattr(shapes_models, "render_shape", recording)
    model = _FakeCaptioner(processor.tokenizer, truths, colour_of)
    return shapes_models.caption_accuracy(model, processor, n=24, seed=3), truths


def test_caption_accuracy_reads_the_caption_tokens(monkeypatch, processor):
    acc, truths = _run(monkeypatch, processor, lambda c: c)
    assert acc["colour_accuracy"] == 1.0
    # the fake always says "circle": shape accuracy is exactly the share of circles drawn
    assert acc["shape_accuracy"] == pytest.approx(sum(s == "circle" for _, s in truths) / len(truths))
    assert 0.0 < acc["shape_accuracy"] < 1.0


def test_caption_accuracy_negative_control_wrong_colour(monkeypatch, processor):
    names = list(COLORS)
    acc, _ = _run(monkeypatch, processor, lambda c: names[(names.index(c) + 1) % len(names)])
    assert acc["colour_accuracy"] == 0.0
