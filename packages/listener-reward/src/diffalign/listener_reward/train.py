"""Training recipes: SFT warm-up and listener-shaped GRPO (TRL's ``GRPOTrainer``).

* ``run_sft``: teacher-forced supervised fine-tuning of the reasoner on (prompt, two images) -> completion
  (oracle reasoning in the shapes world, answer-only on real sets), with a ``transformers.Trainer``
  (checkpoints, ``resume_from_checkpoint``, accelerate / DeepSpeed through ``TrainingArguments``). The
  same masked-completion collator trains the shapes-world listener (``shapes_models.py``).
* ``run_grpo``: TRL ``GRPOTrainer`` with reward functions ``[format, accuracy(, listener)]`` and
  ``reward_weights`` ``[1, 0.5(, 0.5)]``; ``reward.use_listener=false`` is the naive GRPO baseline. No
  hand-written RL loop: TRL's VLM path ran the tiny Qwen2.5-VL end to end on CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from diffalign.listener_reward.config import ListenerRewardRecipe
from diffalign.listener_reward.data import grpo_rows, load_pairs, sft_target
from diffalign.listener_reward.modeling import load_vlm_and_processor, render_prompts, resolve_source
from diffalign.listener_reward.prompts import reasoner_messages
from diffalign.listener_reward.rewards import make_listener_backend, reward_functions

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    try:
        from diffalign.core.training import seed_everything as core_seed

        core_seed(seed)
    except ImportError:  # pragma: no cover
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def save_vlm(model, processor, path: str | Path) -> Path:
    """Save a (possibly LoRA-wrapped) VLM with its processor, safetensors only."""
    from diffalign.core.tiny_vlm import save_tiny_vlm

    path = Path(path)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if type(processor).__name__ == "OfflineQwen2_5_VLProcessor":
        return save_tiny_vlm(model, processor, path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------- SFT


class CompletionCollator:
    """(messages, images, completion) -> model inputs with labels on the completion tokens only."""

    def __init__(self, processor, suffix: str = "", add_eos: bool = True):
        self.processor = processor
        self.suffix = suffix
        self.add_eos = add_eos

    def __call__(self, examples: list[dict]) -> dict:
        tok = self.processor.tokenizer
        prompts = render_prompts(self.processor, [e["messages"] for e in examples], self.suffix)
        eos = f" {tok.eos_token}" if self.add_eos else ""
        fulls = [p + " " + e["completion"] + eos for p, e in zip(prompts, examples)]
        images = [e["images"] for e in examples]
        old_side = tok.padding_side
        tok.padding_side = "right"
        try:
            batch = self.processor(text=fulls, images=images, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = old_side
        # prompt length = its unexpanded tokens + the extra image-pad tokens of its images
        merge = getattr(self.processor.image_processor, "merge_size", 1) ** 2
        per_image = (batch["image_grid_thw"].prod(-1) // merge).tolist() if "image_grid_thw" in batch else []
        prompt_lens, cursor = [], 0
        for text, imgs in zip(prompts, images):
            n_text = len(tok(text, add_special_tokens=False)["input_ids"])
            extra = sum(per_image[cursor : cursor + len(imgs)]) - len(imgs)
            cursor += len(imgs)
            prompt_lens.append(n_text + extra)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for row, n in enumerate(prompt_lens):
            labels[row, :n] = -100
        batch["labels"] = labels
        return dict(batch)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def _deepspeed_arg(cfg: ListenerRewardRecipe):
    """The DeepSpeed config for ``TrainingArguments(deepspeed=...)``: core's preset dict or the recipe's file."""
    from diffalign.core.launch import DEEPSPEED_PRESETS, deepspeed_config

    stage = cfg.launch.deepspeed  # LaunchConfig validated it: none, a preset or an existing .json file
    if stage == "none":
        return None
    if stage in DEEPSPEED_PRESETS:
        return deepspeed_config(*DEEPSPEED_PRESETS[stage])
    return str(stage)


def _report_to(cfg: ListenerRewardRecipe, output_dir: str | Path) -> list[str] | str:
    """``TrainingArguments(report_to=...)`` from the recipe's ``launch.log_with`` (installed trackers only)."""
    from diffalign.core.launch import resolve_trackers

    return resolve_trackers(cfg.launch.log_with, output_dir) or "none"


def _use_cpu(cfg: ListenerRewardRecipe) -> bool:
    """Train on the CPU when the recipe says so or no GPU is present (several CPU processes then use gloo)."""
    return cfg.device == "cpu" or not torch.cuda.is_available()


def _check_processes(trainer, cfg: ListenerRewardRecipe) -> None:
    from diffalign.core.launch import check_process_count

    check_process_count(trainer.accelerator, cfg.launch)


def _last_checkpoint(output_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


def train_completions(
    model,
    processor,
    items: list[dict],
    output_dir: str | Path,
    *,
    learning_rate: float,
    max_steps: int,
    batch_size: int,
    seed: int,
    suffix: str = "",
    add_eos: bool = True,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    save_steps: int = 100,
    logging_steps: int = 10,
    gradient_accumulation_steps: int = 1,
    deepspeed=None,
    use_cpu: bool = True,
    resume: bool = True,
    report_to: list[str] | str = "none",
    check=None,
):
    """Masked-completion fine-tuning with ``transformers.Trainer`` (checkpoints + resume).

    ``report_to`` names the trackers (``TrainingArguments.report_to``); ``check(trainer)`` runs before
    training (the recipe's process-count check)."""
    from transformers import Trainer, TrainingArguments

    output_dir = Path(output_dir)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        lr_scheduler_type="cosine",
        save_steps=save_steps,
        save_total_limit=2,
        logging_steps=logging_steps,
        report_to=report_to,
        remove_unused_columns=False,
        seed=seed,
        data_seed=seed,
        use_cpu=use_cpu,
        deepspeed=deepspeed,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    model.train()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ListDataset(items),
        data_collator=CompletionCollator(processor, suffix=suffix, add_eos=add_eos),
    )
    if check is not None:
        check(trainer)
    checkpoint = _last_checkpoint(output_dir) if resume else None
    result = trainer.train(resume_from_checkpoint=checkpoint)
    model.eval()
    return trainer, result


def sft_items(pairs, cfg: ListenerRewardRecipe) -> list[dict]:
    return [
        {
            "messages": reasoner_messages(p.prompt, cfg.prompts),
            "images": p.images(),
            "completion": sft_target(p, cfg.prompts, cfg.sft.target),
        }
        for p in pairs
    ]


def _maybe_lora(model, cfg: ListenerRewardRecipe):
    if not cfg.lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def run_sft(cfg: ListenerRewardRecipe, pairs=None) -> Path:
    """SFT warm-up of the reasoner; writes ``sft.output_dir/final`` and returns it."""
    seed_everything(cfg.seed)
    model, processor = load_vlm_and_processor(
        cfg.model.reasoner,
        cfg.model.dtype,
        cfg.device,
        cfg.model.min_pixels,
        cfg.model.max_pixels,
        cfg.model.trust_remote_code,
    )
    pairs = pairs if pairs is not None else load_pairs(cfg.data, "train")
    model = _maybe_lora(model, cfg)
    trainer, _ = train_completions(
        model,
        processor,
        sft_items(pairs, cfg),
        cfg.sft.output_dir,
        learning_rate=cfg.sft.learning_rate,
        max_steps=cfg.sft.max_steps,
        batch_size=cfg.sft.batch_size,
        gradient_accumulation_steps=cfg.sft.gradient_accumulation_steps,
        seed=cfg.seed,
        warmup_steps=cfg.sft.warmup_steps,
        weight_decay=cfg.sft.weight_decay,
        max_grad_norm=cfg.sft.max_grad_norm,
        save_steps=cfg.sft.save_steps,
        logging_steps=cfg.sft.logging_steps,
        deepspeed=_deepspeed_arg(cfg),
        use_cpu=_use_cpu(cfg),
        report_to=_report_to(cfg, cfg.sft.output_dir),
        check=lambda trainer: _check_processes(trainer, cfg),
    )
    final = Path(cfg.sft.output_dir) / "final"
    if trainer.accelerator.is_main_process:  # written once, by the main process
        save_vlm(model, processor, final)
    trainer.accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------ GRPO


def build_trl_config(cfg: ListenerRewardRecipe, reward_weights: list[float]):
    from trl import GRPOConfig

    g = cfg.grpo
    return GRPOConfig(
        output_dir=g.output_dir,
        num_generations=g.num_generations,
        beta=g.beta,
        learning_rate=g.learning_rate,
        temperature=g.temperature,
        max_completion_length=g.max_completion_length,
        per_device_train_batch_size=g.per_device_batch_size,
        gradient_accumulation_steps=g.gradient_accumulation_steps,
        max_steps=g.max_steps,
        epsilon=g.epsilon,
        loss_type=g.loss_type,
        scale_rewards=g.scale_rewards,
        reward_weights=reward_weights,
        save_steps=g.save_steps,
        save_total_limit=2,
        logging_steps=g.logging_steps,
        gradient_checkpointing=g.gradient_checkpointing,
        use_vllm=g.use_vllm,
        vllm_mode=g.vllm_mode,
        report_to=_report_to(cfg, g.output_dir),
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=_use_cpu(cfg),
        bf16=cfg.model.dtype == "bfloat16" and cfg.device != "cpu",
        deepspeed=_deepspeed_arg(cfg),
        remove_unused_columns=False,
        disable_tqdm=False,
        model_init_kwargs={"dtype": cfg.model.dtype, "use_safetensors": True},
    )


def run_grpo(cfg: ListenerRewardRecipe, pairs=None, listener_backend=None) -> Path:
    """Listener-shaped (or, with ``reward.use_listener=false``, naive) GRPO; returns ``output_dir/final``."""
    from datasets import Dataset
    from trl import GRPOTrainer

    seed_everything(cfg.seed)
    source = resolve_source(cfg.grpo.init_from or cfg.model.reasoner)
    _, processor = load_vlm_and_processor(
        source, cfg.model.dtype, "cpu", cfg.model.min_pixels, cfg.model.max_pixels
    )
    if cfg.reward.use_listener and listener_backend is None and cfg.reward.listener_backend == "local":
        listener, listener_processor = load_vlm_and_processor(
            cfg.model.listener,
            cfg.model.dtype,
            cfg.device,
            cfg.model.min_pixels,
            cfg.model.max_pixels,
            cfg.model.trust_remote_code,
        )
        listener_backend = make_listener_backend(cfg.reward, cfg.prompts, listener, listener_processor)
    elif cfg.reward.use_listener and listener_backend is None:
        listener_backend = make_listener_backend(cfg.reward, cfg.prompts)
    funcs, weights = reward_functions(cfg.reward, cfg.prompts, listener_backend, cfg.grpo.num_generations)
    pairs = pairs if pairs is not None else load_pairs(cfg.data, "train")
    dataset = Dataset.from_list(grpo_rows(pairs, cfg.prompts))
    peft_config = None
    if cfg.lora.enabled:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )
    trainer = GRPOTrainer(
        model=source,  # a path: TRL rebuilds the frozen reference model from it when beta > 0
        reward_funcs=funcs,
        args=build_trl_config(cfg, weights),
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config,
    )
    _check_processes(trainer, cfg)
    checkpoint = _last_checkpoint(Path(cfg.grpo.output_dir))
    trainer.train(resume_from_checkpoint=checkpoint)
    final = Path(cfg.grpo.output_dir) / "final"
    if trainer.accelerator.is_main_process:  # written once, by the main process
        import json

        save_vlm(trainer.model, processor, final)
        history = [row for row in trainer.state.log_history if "loss" in row or "reward" in row]
        (Path(cfg.grpo.output_dir) / "log_history.json").write_text(json.dumps(history, indent=1))
    trainer.accelerator.wait_for_everyone()
    return final


__all__ = ["CompletionCollator", "build_trl_config", "run_grpo", "run_sft", "save_vlm", "train_completions"]
