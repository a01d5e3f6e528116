"""The evaluation-only verifier: committed, accurate, independent of the reward's, never a reward."""

import random

import pytest
import torch

from diffalign.core.rewards import get_reward, list_rewards
from diffalign.core.shapes.questions import answer_scene, compile_prompt, scene_to_probs
from diffalign.core.shapes.render import render_scenes, scene_for_spec
from diffalign.core.shapes.scoring import get_verifier
from diffalign.core.shapes.verifier import (
    EvaluationOnlyError,
    SceneParser,
    eval_verifier_path,
    evaluate_verifier,
    load_eval_verifier,
    load_verifier,
    save_verifier,
    verifier_agreement,
)


@pytest.fixture(scope="module")
def ev():
    return load_eval_verifier()


def test_committed_and_distinct_from_the_reward_verifier(ev):
    assert eval_verifier_path().exists()
    assert ev.role == "evaluation"
    assert eval_verifier_path().stat().st_size < 400_000
    v1 = get_verifier()
    assert v1.role == "reward"
    s1, s2 = v1.state_dict(), ev.state_dict()
    assert s1.keys() == s2.keys()
    # trained from another seed: no tensor is shared
    assert all(not torch.equal(s1[k], s2[k]) for k in s1 if s1[k].numel() > 1)


def test_heldout_accuracy_per_question_type(ev):
    res = evaluate_verifier(ev, n=120, seed=31_337)
    for k in ("exists", "colour", "count", "relation"):
        assert res[f"{k}_accuracy"] >= 0.97, (k, res)


@pytest.mark.parametrize("name", ["shapes-faithfulness", "shapes-reward"])
def test_no_reward_can_return_it(name, ev, tmp_path):
    assert name in list_rewards()
    r = get_reward(name)
    assert r.verifier.role == "reward" and r.verifier is not ev
    with pytest.raises(EvaluationOnlyError, match="cannot back a reward"):
        get_reward(name, verifier_path=eval_verifier_path())
    # a copy keeps the marker, so copying the file does not get round it
    copy = tmp_path / "copy.safetensors"
    save_verifier(load_verifier(eval_verifier_path()), copy, role="evaluation")
    with pytest.raises(EvaluationOnlyError):
        get_reward(name, verifier_path=copy)
    # control: the same weights marked as a reward verifier are accepted (the refusal is the marker)
    save_verifier(load_verifier(eval_verifier_path()), tmp_path / "as_reward.safetensors", role="reward")
    assert get_reward(name, verifier_path=tmp_path / "as_reward.safetensors").verifier.role == "reward"


def test_no_registered_reward_holds_the_evaluation_weights(ev):
    w = ev.head.weight
    for name in list_rewards():
        if not name.startswith("shapes"):
            continue
        v = getattr(get_reward(name), "verifier", None)
        assert v is None or not torch.equal(v.head.weight, w), name


def test_save_rejects_unknown_role(tmp_path):
    with pytest.raises(ValueError, match="role"):
        save_verifier(SceneParser(4), tmp_path / "x.safetensors", role="judge")
    assert not (tmp_path / "x.safetensors").exists()


class _Oracle(SceneParser):
    """Parses every image as the given scenes (logits = large multiple of the exact one-hot map)."""

    def __init__(self, scenes):
        super().__init__(4)
        self.table = scene_to_probs(scenes)

    def forward(self, x):
        return 50.0 * self.table[: x.shape[0]] - 25.0


def test_agreement_matches_brute_force_answers():
    from diffalign.core.shapes.grammar import eval_prompts, parse_prompt

    prompts = eval_prompts(5)
    rng = random.Random(0)
    scenes = [scene_for_spec(parse_prompt(p), rng) for p in prompts]
    # b sees every third scene without its last object
    other = [s[:-1] if i % 3 == 0 and len(s) > 1 else s for i, s in enumerate(scenes)]
    images = render_scenes(scenes, 0)
    res = verifier_agreement(images, prompts, _Oracle(scenes), _Oracle(other))
    same = []
    for p, s, o in zip(prompts, scenes, other):
        for q in compile_prompt(p):
            same.append(answer_scene(q.op, s) == answer_scene(q.op, o))
    assert res["answer_agreement"] == pytest.approx(sum(same) / len(same))
    assert res["answer_agreement"] < 1.0  # the control differs, so the estimate can fail
    assert res["faithfulness_a"] == pytest.approx(1.0)
    assert res["faithfulness_b"] < 1.0
    assert res["scene_agreement"] == pytest.approx(sum(s == o for s, o in zip(scenes, other)) / len(scenes))
    ident = verifier_agreement(images, prompts, _Oracle(scenes), _Oracle(scenes))
    assert ident["answer_agreement"] == 1.0 and ident["prompt_score_agreement"] == 1.0


def test_world_info_shows_the_evaluation_verifier_and_the_web_base(tmp_path):
    import json

    from diffalign.core.shapes.cli import format_info, load_world_info

    row = {"overall": 0.9, "skill_mean": 0.9, "per_skill": {"object": 0.9, "count": 0.8}, "fid": 3.0}
    web = {"overall": 0.7, "skill_mean": 0.7, "per_skill": {"object": 0.85, "count": 0.5}, "fid": 4.0}
    (tmp_path / "world_info.json").write_text(
        json.dumps({"teacher_unet": {"guidance": 4.0, "steps": {"50": row}}})
    )
    agree = {"n_images": 100, "answer_agreement": 0.98, "prompt_score_agreement": 0.95}
    agree.update(faithfulness_a=0.93, faithfulness_b=0.92)
    ev = {"seed": 1, "clean": {"count_accuracy": 1.0}, "agreement": {"shapes/unet": agree}}
    (tmp_path / "eval_verifier.json").write_text(json.dumps(ev))
    (tmp_path / "unet_web").mkdir()
    info = {"clean": {"steps": {"50": row}}, "web": {"guidance": 4.0, "steps": {"50": web}}, "captions": "c"}
    (tmp_path / "unet_web" / "info.json").write_text(json.dumps(info))
    text = format_info(load_world_info(tmp_path))
    assert "evaluation verifier, seed 1" in text and "count 1.000" in text
    assert "answers 0.980" in text and "0.930 (reward's) vs 0.920 (evaluation)" in text
    assert "shapes/unet-web:" in text and "count 0.50" in text
    assert "overall -0.200; object -0.05, count -0.30" in text
