import random

import pytest

from diffalign.core.shapes import grammar as g
from diffalign.core.shapes.render import relation_holds, render_scenes, scene_for_spec
from diffalign.core.shapes.tokenizer import MAX_LENGTH, build_tokenizer


def test_splits_are_disjoint_and_cover_every_skill():
    for skill in g.SKILLS:
        train = set(g.all_prompts(skill, "train"))
        held = set(g.all_prompts(skill, "heldout"))
        assert train and held
        assert not train & held
    assert set(g.all_prompts()) == set(g.all_prompts(split="train")) | set(g.all_prompts(split="heldout"))


def test_content_level_split_for_composite_skills():
    # a held-out count/color/spatial prompt's content never appears in the train split, in any phrasing
    train_keys = {
        g.parse_prompt(p).key() for s in ("count", "color", "spatial") for p in g.all_prompts(s, "train")
    }
    held_keys = {
        g.parse_prompt(p).key() for s in ("count", "color", "spatial") for p in g.all_prompts(s, "heldout")
    }
    assert not train_keys & held_keys


def test_sample_prompts_is_seeded_and_respects_split():
    a = g.sample_prompts("spatial", 20, "heldout", seed=3)
    assert a == g.sample_prompts("spatial", 20, "heldout", seed=3)
    assert a != g.sample_prompts("spatial", 20, "heldout", seed=4)
    assert all(g.prompt_split(p) == "heldout" for p in a)
    assert all(g.parse_prompt(p).skill == "spatial" for p in a)


def test_parse_known_prompts_and_reverse_phrasing():
    spec = g.parse_prompt("Two blue squares.")
    assert spec.skill == "count" and spec.count == 2 and spec.entities[0] == g.Entity("blue", "square")
    a = g.parse_prompt("a yellow triangle to the left of a blue circle")
    b = g.parse_prompt("a blue circle to the right of a yellow triangle")
    assert a == b  # the reverse phrasing has the same content
    assert a.relation == (0, "left", 1)


@pytest.mark.parametrize("bad", ["a purple circle", "two red circles and a dog", "", "a red circle left"])
def test_prompts_outside_the_grammar_are_rejected(bad):
    with pytest.raises(ValueError, match="not in the shapes-world grammar"):
        g.parse_prompt(bad)


def test_unknown_skill_and_split():
    with pytest.raises(ValueError, match="unknown skill"):
        g.sample_prompts("texture", 2)
    with pytest.raises(ValueError, match="unknown split"):
        g.sample_prompts("object", 2, split="test")


def test_tokenizer_covers_the_vocabulary_without_unk():
    tok = build_tokenizer()
    assert tok.model_max_length == MAX_LENGTH
    assert set(g.vocabulary()) <= set(tok.get_vocab())
    longest = sorted(g.all_prompts(), key=lambda p: -len(p.split()))[:50]
    ids = tok(longest, padding="max_length", max_length=MAX_LENGTH, truncation=False).input_ids
    assert all(len(x) == MAX_LENGTH for x in ids)  # no prompt is longer than the model length
    assert all(tok.unk_token_id not in x for x in ids)
    assert tok("a purple circle").input_ids[1] == tok.unk_token_id


def test_relation_holds_hand_examples():
    assert relation_holds("left", (1, 0), (1, 2))
    assert relation_holds("left", (0, 0), (1, 2))  # two columns apart, one row: left
    assert not relation_holds("left", (0, 0), (1, 1))  # diagonal: neither left nor above
    assert not relation_holds("above", (0, 0), (1, 1))
    assert relation_holds("above", (0, 1), (2, 1))
    assert relation_holds("below", (2, 0), (0, 1))
    assert not relation_holds("right", (1, 0), (1, 2))


def test_scenes_satisfy_their_prompts_and_render_deterministically():
    rng = random.Random(0)
    specs = g.sample_specs("all", 40, "train", rng)
    scenes = [scene_for_spec(s, rng) for s, _ in specs]
    for (spec, _), scene in zip(specs, scenes):
        if spec.skill == "count":
            assert len(scene) == spec.count
        if spec.skill == "spatial":
            (_, ra, ca), (_, rb, cb) = scene
            assert relation_holds("left" if spec.relation[1] == "left" else "above", (ra, ca), (rb, cb))
    x = render_scenes(scenes, seed=1)
    assert x.shape == (40, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert (render_scenes(scenes, seed=1) == x).all()
    assert x[:, :, 0, 0].mean() > 0.99  # corners are white background
