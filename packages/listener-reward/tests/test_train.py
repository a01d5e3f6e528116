import json
from pathlib import Path

import pytest
import torch

from diffalign.core.config import load_config
from diffalign.listener_reward.config import RECIPE_CONFIG
from diffalign.listener_reward.data import grpo_rows, sft_target
from diffalign.listener_reward.modeling import load_vlm_and_processor
from diffalign.listener_reward.prompts import reasoner_messages
from diffalign.listener_reward.train import CompletionCollator, run_grpo, run_sft

SHAPES = Path(__file__).resolve().parents[1] / "recipes" / "shapes.yaml"


def _cfg(tiny_dirs, tmp_path, *extra):
    return load_config(
        RECIPE_CONFIG,
        SHAPES,
        [
            f"model.reasoner={tiny_dirs['reasoner']}",
            f"model.listener={tiny_dirs['listener']}",
            "grpo.num_generations=4",
            "grpo.per_device_batch_size=4",
            "grpo.max_completion_length=6",
            "grpo.max_steps=2",
            "grpo.save_steps=1",
            "grpo.logging_steps=1",
            "grpo.learning_rate=0.01",
            f"grpo.output_dir={tmp_path / 'grpo'}",
            f"grpo.init_from={tiny_dirs['reasoner']}",
            "sft.max_steps=2",
            "sft.batch_size=4",
            "sft.save_steps=1",
            f"sft.output_dir={tmp_path / 'sft'}",
            *extra,
        ],
    )


def test_collator_masks_everything_but_the_completion(tiny_dirs, pairs, tmp_path):
    cfg = _cfg(tiny_dirs, tmp_path)
    _, processor = load_vlm_and_processor(tiny_dirs["reasoner"])
    items = [
        {
            "messages": reasoner_messages(p.prompt, cfg.prompts),
            "images": p.images(),
            "completion": sft_target(p, cfg.prompts),
        }
        for p in pairs[:3]
    ]
    batch = CompletionCollator(processor)(items)
    tok = processor.tokenizer
    for row, item in zip(range(3), items):
        kept = batch["labels"][row][batch["labels"][row] != -100]
        assert tok.decode(kept).split() == (item["completion"] + " <|im_end|>").split()
        assert torch.equal(
            batch["labels"][row][batch["labels"][row] != -100],
            batch["input_ids"][row][batch["labels"][row] != -100],
        )
    assert (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == 3 * 8


def test_grpo_rows_are_trl_conversational(pairs):
    cfg = load_config(RECIPE_CONFIG, SHAPES)
    rows = grpo_rows(pairs[:2], cfg.prompts)
    assert set(rows[0]) == {"prompt", "images", "label", "t2i_prompt"}
    assert rows[0]["label"] in (1, 2) and len(rows[0]["images"]) == 2
    assert sum(b["type"] == "image" for m in rows[0]["prompt"] for b in m["content"]) == 2


def test_sft_then_two_step_listener_grpo_and_resume(tiny_dirs, pairs, tmp_path):
    cfg = _cfg(tiny_dirs, tmp_path)
    sft_final = run_sft(cfg, pairs)
    assert (sft_final / "model.safetensors").is_file()
    cfg.grpo.init_from = str(sft_final)
    final = run_grpo(cfg, pairs)
    assert (final / "model.safetensors").is_file()
    state = json.loads((tmp_path / "grpo" / "checkpoint-2" / "trainer_state.json").read_text())
    logs = [r for r in state["log_history"] if "reward" in r]
    assert len(logs) == 2
    for key in (
        "rewards/format_reward/mean",
        "rewards/accuracy_reward/mean",
        "rewards/listener_reward/mean",
        "kl",
    ):
        assert key in logs[0]
    # the logged total is the weighted sum 1 * fmt + 0.5 * acc + 0.5 * listener
    row = logs[0]
    expected = (
        row["rewards/format_reward/mean"]
        + 0.5 * row["rewards/accuracy_reward/mean"]
        + 0.5 * row["rewards/listener_reward/mean"]
    )
    assert row["reward"] == pytest.approx(expected, abs=1e-4)
    assert 0.0 < row["rewards/listener_reward/mean"] < 1.0
    # weights changed
    before, _ = load_vlm_and_processor(sft_final)
    after, _ = load_vlm_and_processor(final)
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))
    # resume: one more step continues from checkpoint-2 instead of restarting
    cfg.grpo.max_steps = 3
    run_grpo(cfg, pairs)
    state3 = json.loads((tmp_path / "grpo" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state3["global_step"] == 3
    assert len([r for r in state3["log_history"] if "reward" in r]) == 3


def test_naive_grpo_has_no_listener_term(tiny_dirs, pairs, tmp_path):
    from diffalign.listener_reward.train import build_trl_config

    cfg = _cfg(tiny_dirs, tmp_path, "reward.use_listener=false")
    args = build_trl_config(cfg, [1.0, 0.5])
    assert args.reward_weights == [1.0, 0.5]
    assert args.num_generations == 4 and args.beta == pytest.approx(0.04)
    assert args.max_completion_length == 6


def test_trackers_and_cpu_come_from_the_recipe(monkeypatch, tmp_path):
    """report_to follows launch.log_with (installed trackers only, core's resolve_trackers); the trainer
    runs on the CPU when the recipe says so or there is no GPU."""
    import importlib.util

    from diffalign.core.config import load_config
    from diffalign.listener_reward.config import RECIPE_CONFIG
    from diffalign.listener_reward.train import _report_to, _use_cpu, build_trl_config

    real_find_spec = importlib.util.find_spec
    installed = {"wandb"}
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            object()
            if name in installed
            else (None if name in ("tensorboard", "tensorboardX") else real_find_spec(name, *a))
        ),
    )
    cfg = load_config(RECIPE_CONFIG, None, [f"grpo.output_dir={tmp_path}", "launch.log_with=wandb"])
    assert _report_to(cfg, tmp_path) == ["wandb"]
    plain = load_config(RECIPE_CONFIG, None, [f"grpo.output_dir={tmp_path}"])
    assert _report_to(plain, tmp_path) == "none"
    with pytest.warns(UserWarning, match="tensorboard is not installed"):
        asked = load_config(RECIPE_CONFIG, None, ["launch.log_with=tensorboard"])
        assert _report_to(asked, tmp_path) == "none"
    assert _use_cpu(cfg)  # device: cpu
    gpu = load_config(RECIPE_CONFIG, None, ["device=cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _use_cpu(gpu)  # no GPU here: the CPU, not a failed CUDA start
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not _use_cpu(gpu)
    monkeypatch.setattr("diffalign.listener_reward.train._report_to", lambda c, d: ["wandb"])
    assert build_trl_config(plain, [1.0]).report_to == ["wandb"]
