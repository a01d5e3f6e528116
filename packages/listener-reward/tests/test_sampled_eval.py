"""Sampled evaluation, paired intervals, the reasoning-verdict referee, ranking changes and bench
fingerprints: each against a brute-force reference and a plausible wrong variant."""

import json

import numpy as np
import pytest
import torch

from diffalign.listener_reward.data import oracle_reasoning, reasoning_verdict
from diffalign.listener_reward.evaluate import ratio_bootstrap, sample_completions, sampled_pair_counts
from diffalign.listener_reward.rewards import ranking_changes


def test_reasoning_verdict_inverts_oracle_reasoning():
    for faithful in ((True, False), (False, True)):
        for descs in (None, ("a red circle", "a blue square")):
            assert reasoning_verdict(oracle_reasoning(faithful, descs)) == (1 if faithful[0] else 2)
    assert reasoning_verdict(oracle_reasoning((True, True))) is None  # undecided
    assert reasoning_verdict(oracle_reasoning((False, False))) is None
    assert reasoning_verdict("image 1 : match . image 1 : mismatch . image 2 : match .") is None
    assert reasoning_verdict("image 1 : a red circle , match .") is None  # one verdict only
    assert reasoning_verdict("") is None
    # negative control: "mismatch" must not be read as "match" (a substring search would say image 1)
    assert reasoning_verdict("image 1 : a red circle , mismatch . image 2 : a red circle , match .") == 2


def _brute_counts(answers, labels, listener, verdicts):
    rows = []
    for a, y, lis, v in zip(answers, labels, listener, verdicts):
        votes = {1: sum(x == 1 for x in a), 2: sum(x == 2 for x in a)}
        maj = 1 if votes[1] > votes[2] else 2 if votes[2] > votes[1] else None
        rows.append(
            dict(
                correct=sum(x == y for x in a),
                majority=float(maj == y),
                disagree=sum(x in (1, 2) and li != x for x, li in zip(a, lis)),
                parsed=sum(x in (1, 2) for x in a),
                contradict=sum(x in (1, 2) and vi in (1, 2) and vi != x for x, vi in zip(a, v)),
                decided=sum(x in (1, 2) and vi in (1, 2) for x, vi in zip(a, v)),
            )
        )
    return rows


def test_sampled_pair_counts_match_brute_force():
    rng = np.random.default_rng(0)
    answers = rng.integers(0, 3, (40, 5))
    labels = rng.integers(1, 3, 40)
    listener = rng.integers(1, 3, (40, 5))
    verdicts = rng.integers(0, 3, (40, 5))
    got = sampled_pair_counts(answers, labels, listener, verdicts)
    for i, ref in enumerate(_brute_counts(answers, labels, listener, verdicts)):
        for key, value in ref.items():
            assert got[key][i] == value, (key, i)
    assert (got["samples"] == 5).all()
    # negative control: a majority that counts a tie as the label (or ignores unparsed answers as votes
    # for image 1) disagrees with the strict-majority rule on some pair
    tie = np.array([[1, 2, 0, 0]])
    assert sampled_pair_counts(tie, [1], np.ones_like(tie))["majority"][0] == 0.0
    assert sampled_pair_counts(np.array([[0, 0, 0, 2]]), [2], np.ones((1, 4), int))["majority"][0] == 1.0
    with pytest.raises(ValueError):
        sampled_pair_counts(answers, labels[:3], listener)


def test_ratio_bootstrap_point_values_and_strata():
    num_a, den_a = np.array([3.0, 1, 4, 0]), np.array([4.0, 4, 4, 4])
    num_b, den_b = np.array([1.0, 1, 2, 1]), np.array([2.0, 4, 4, 1])
    single = ratio_bootstrap(num_a, den_a, n_boot=200)
    assert single["value"] == pytest.approx(8 / 16)
    assert single["ci"][0] <= 0.5 <= single["ci"][1]
    paired = ratio_bootstrap(num_a, den_a, num_b, den_b, n_boot=200)
    assert paired["value"] == pytest.approx(8 / 16 - 5 / 11)
    strata = np.array([0, 0, 1, 1])
    stratified = ratio_bootstrap(num_a, den_a, num_b, den_b, strata=strata, n_boot=200)
    per = [(4 / 8 - 2 / 6), (4 / 8 - 3 / 5)]
    assert stratified["value"] == pytest.approx(np.mean(per))
    # negative control: the pooled ratio difference is not the per-stratum mean here
    assert stratified["value"] != pytest.approx(paired["value"])
    # a real difference of 0.3 on 400 pairs: the paired interval excludes 0 and covers 0.3
    rng = np.random.default_rng(1)
    a = (rng.random(400) < 0.8).astype(float)
    b = a.copy()
    flip = rng.choice(400, 120, replace=False)
    b[flip] = 1 - b[flip]
    b[flip[a[flip] == 0]] = 0  # b is wrong wherever it was flipped
    d = ratio_bootstrap(a, np.ones(400), b, np.ones(400), n_boot=500)
    assert d["ci"][0] > 0 and d["ci"][0] <= d["value"] <= d["ci"][1]


def test_ranking_changes_brute_force():
    base = [1.0, 1.0, 0.5, 0.0, 1.5, 1.0, 0.5, 0.0]
    shaped = [1.2, 1.1, 0.9, 0.1, 1.6, 1.3, 0.9, 0.1]  # group 1: 1st pair tie broken; 2: no reversal
    got = ranking_changes(base, shaped, 4)
    assert got == {"changed": 0.5, "flipped": 0.0, "groups": 2}
    flipped = ranking_changes([1.0, 0.5], [1.0, 1.4], 2)
    assert flipped["changed"] == 1.0 and flipped["flipped"] == 1.0
    # negative control: adding a constant (or any monotone shift) changes nothing
    assert ranking_changes(base, [b + 0.3 for b in base], 4)["changed"] == 0.0
    rng = np.random.default_rng(0)
    for _ in range(20):
        b = rng.integers(0, 3, 8) / 2
        s = b + rng.random(8) * 0.6
        groups = [(b[i : i + 4], s[i : i + 4]) for i in (0, 4)]
        ref_changed = np.mean(
            [
                any(np.sign(x[i] - x[j]) != np.sign(y[i] - y[j]) for i in range(4) for j in range(4))
                for x, y in groups
            ]
        )
        ref_flipped = np.mean(
            [
                any(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) < 0 for i in range(4) for j in range(4))
                for x, y in groups
            ]
        )
        got = ranking_changes(b, s, 4)
        assert got["changed"] == ref_changed and got["flipped"] == ref_flipped
    with pytest.raises(ValueError):
        ranking_changes([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 2)


def test_sample_completions_entropy_matches_teacher_forced_reference(pairs):
    from diffalign.core.testing.vlm import tiny_qwen2_5_vl
    from diffalign.listener_reward.config import PromptsConfig
    from diffalign.listener_reward.modeling import encode, render_prompts
    from diffalign.listener_reward.prompts import reasoner_messages

    model, processor = tiny_qwen2_5_vl(0)
    model.eval()
    # many end tokens, so that some samples stop early and the after-EOS padding must be left out
    vocab = model.config.get_text_config().vocab_size
    model.generation_config.eos_token_id = list(range(0, vocab, 3))
    prompts = PromptsConfig()
    messages = [reasoner_messages(p.prompt, prompts) for p in pairs[:2]]
    images = [p.images() for p in pairs[:2]]
    texts, ent = sample_completions(model, processor, messages, images, k=3, max_new_tokens=6, seed=5)
    assert len(texts) == 2 and all(len(row) == 3 for row in texts)
    again, ent2 = sample_completions(model, processor, messages, images, k=3, max_new_tokens=6, seed=5)
    assert again == texts and ent2 == ent  # seeded
    # reference: teacher-force each prompt + 6 sampled tokens; entropy of the next-token softmax
    torch.manual_seed(5)
    flat_m = [m for m in messages for _ in range(3)]
    flat_i = [i for i in images for _ in range(3)]
    inputs = encode(processor, render_prompts(processor, flat_m), flat_i)
    with torch.no_grad():
        seqs = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6)
        length = inputs["input_ids"].shape[1]
        full = dict(inputs, input_ids=seqs)
        for key, value in inputs.items():  # per-token inputs: the new tokens are text, attended to
            if key != "input_ids" and torch.is_tensor(value) and value.shape == inputs["input_ids"].shape:
                tail = torch.full((seqs.shape[0], seqs.shape[1] - length), int(key == "attention_mask"))
                full[key] = torch.cat([value, tail.to(value.dtype)], dim=1)
        logits = model(**full).logits[:, inputs["input_ids"].shape[1] - 1 : -1].float()
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    new = seqs[:, inputs["input_ids"].shape[1] :]
    eos = model.generation_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, list) else [eos])
    is_eos = torch.isin(new, eos).long()
    mask = (is_eos.cumsum(1) - is_eos) == 0
    assert ent["tokens"] == int(mask.sum())
    assert ent["entropy_per_token"] == pytest.approx(float(entropy[mask].mean()), rel=2e-5)
    # negative control: counting the padding after EOS too gives another number
    assert not mask.all()
    assert ent["entropy_per_token"] != pytest.approx(float(entropy.mean()), rel=2e-5)
    assert ent["tokens"] < new.numel()


def test_bench_seeds_vary_data_and_fingerprints_guard_reuse(tmp_path):
    from diffalign.listener_reward import bench

    cfg0 = bench.bench_config(bench.QUICK, tmp_path, seed=0)
    cfg1 = bench.bench_config(bench.QUICK, tmp_path, seed=1)
    assert (cfg0.data.seed, cfg1.data.seed) == (0, 1)
    plan0, plan1 = bench.stage_plan(cfg0, bench.QUICK, 0), bench.stage_plan(cfg1, bench.QUICK, 1)
    shared = {"reasoner_init", "listener"}  # pretrained stand-ins: one per world, not per seed
    assert all(plan0[s]["fingerprint"] != plan1[s]["fingerprint"] for s in set(plan0) - shared)
    assert all(plan0[s]["fingerprint"] == plan1[s]["fingerprint"] for s in shared)
    assert bench.stage_plan(cfg0, bench.QUICK, 0) == plan0  # stable
    # an upstream change (SFT steps) reaches both GRPO runs but not the listener
    plan_b = bench.stage_plan(
        bench.bench_config({**bench.QUICK, "sft_steps": 41}, tmp_path, 0), bench.QUICK, 0
    )
    assert plan_b["grpo_naive"]["fingerprint"] != plan0["grpo_naive"]["fingerprint"]
    assert plan_b["listener"]["fingerprint"] == plan0["listener"]["fingerprint"]
    assert plan0["grpo_naive"]["fingerprint"] != plan0["grpo_listener"]["fingerprint"]
    # GRPO runs whole epochs: 128 prompts, 2 prompts per step
    assert cfg0.grpo.max_steps == bench.QUICK["grpo_epochs"] * 64
    # a stage directory holding another fingerprint is refused, never silently reused
    final = tmp_path / "stage"
    final.mkdir()
    (final / "config.json").write_text("{}")
    (final / "fingerprint.json").write_text(json.dumps({"fingerprint": "other"}))
    with pytest.raises(RuntimeError, match="another configuration"):
        bench._stage("sft", final, lambda: None, {}, "mine")
    timings = {}
    (final / "fingerprint.json").write_text(json.dumps({"fingerprint": "mine"}))
    assert bench._stage("sft", final, lambda: 1 / 0, timings, "mine") == final


def _fake_results(rng, shift):
    def judge(p_correct):
        correct = (rng.random((60, 4)) < p_correct).sum(1).astype(float)
        return {
            "greedy": {
                "accuracy": 0.5,
                "per_pair_correct": (correct > 2).astype(float).tolist(),
                "per_pair_disagree": [0.0] * 60,
                "per_pair_parsed": [1.0] * 60,
            },
            "sampled": {
                "per_pair": {
                    "correct": correct.tolist(),
                    "samples": [4.0] * 60,
                    "majority": (correct > 2).astype(float).tolist(),
                    "ones": [1.0] * 60,
                    "disagree": [1.0] * 60,
                    "parsed": [4.0] * 60,
                    "contradict": [0.0] * 60,
                    "decided": [4.0] * 60,
                }
            },
        }

    return {
        name: {"test_id": judge(p)}
        for name, p in (("sft", 0.5), ("grpo_naive", 0.6), ("grpo_listener", 0.6 + shift))
    }


def test_paired_differences_pool_seeds_by_pair():
    from diffalign.listener_reward.bench import paired_differences

    rng = np.random.default_rng(0)
    seeds = [_fake_results(rng, 0.2), _fake_results(rng, 0.2)]
    diff = paired_differences(seeds, n_boot=200)
    d = diff["listener_minus_naive"]["test_id"]["sampled_accuracy"]
    ref = np.mean(
        [
            np.sum(s["grpo_listener"]["test_id"]["sampled"]["per_pair"]["correct"]) / 240
            - np.sum(s["grpo_naive"]["test_id"]["sampled"]["per_pair"]["correct"]) / 240
            for s in seeds
        ]
    )
    assert d["value"] == pytest.approx(ref) and d["strata"] == 2 and d["n_pairs"] == 120
    assert d["ci"][0] > 0  # a 0.2 gain on 120 pairs x 4 samples is resolved
    # negative control: the reversed difference is negative
    assert diff["naive_minus_sft"]["test_id"]["sampled_accuracy"]["value"] > 0
