"""Shapes-world models: a tiny reasoner initialisation, an independent tiny listener, and a single-image
scorer baseline, all ``Qwen2_5_VLForConditionalGeneration`` built from configs with the offline word
tokenizer (``diffalign.core.tiny_vlm``), trained here on CPU.

* **base VLM**: real recipes start from a pretrained VLM that can already describe an image. The shapes
  stand-in for that pretraining is captioning: (image, "look at the image :") -> "a red circle" on every
  colour-shape combination (a pretrained VLM has seen all of them; only the preference data holds
  combinations out, so the OOD split tests judgement, not perception). Every model below starts from such
  a base; the listener from its own (other seed, other images, optionally a wider model).

* **listener**: its own seed and its own preference pairs (never the reasoner's); trained to read
  (prompt, images, answer-free reasoning) and put the answer token on the image the reasoning supports,
  or, when the reasoning is empty or undecided, on the image that matches the prompt. Frozen afterwards.
* **single-image scorer**: sees one image and answers ``yes``/``no`` to "does it match the prompt";
  trained on the preferred (yes) / rejected (no) images of the same pairs the reasoner gets; a pair is
  scored by comparing p(yes) of its two images.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from diffalign.listener_reward.config import ListenerRewardRecipe, PromptsConfig
from diffalign.listener_reward.data import (
    PairExample,
    caption_text,
    make_shapes_pairs,
    oracle_reasoning,
    render_shape,
    shapes_combos,
)
from diffalign.listener_reward.modeling import answer_probabilities, answer_token_ids
from diffalign.listener_reward.prompts import listener_messages
from diffalign.listener_reward.train import save_vlm, train_completions

TINY_SIZES = dict(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    vision_depth=2,
    vision_hidden_size=48,
    vision_heads=4,
    patch_size=4,
)


def new_tiny_vlm(seed: int, cfg: ListenerRewardRecipe, **overrides):
    from diffalign.core.tiny_vlm import tiny_qwen2_5_vl

    sizes = {**TINY_SIZES, **overrides}
    return tiny_qwen2_5_vl(seed, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels, **sizes)


CAPTION_QUESTION = "look at the image :"
# Captioning learning rate. Measured (600 steps, batch 32, 150 fresh renders, forced choice over the 12
# colour-shape captions): 3e-3 learns colour (1.00) but never shape (0.31, chance); 1e-3 gives shape 0.70
# at 600 steps and 1.00 at 2000 steps; 5e-4 gives 0.69 at 600.
BASE_LR = 1e-3


def _sibling(out_dir: str | Path, suffix: str) -> Path:
    """Working directory next to a model's output folder (``<out_dir><suffix>``): trainer checkpoints."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + suffix)


def caption_items(n: int, seed: int, image_size: int = 16, combos: str = "all") -> list[dict]:
    """Captioning data for the base VLM: one render of a colour-shape combination of ``combos`` (a
    :func:`shapes_combos` split; default every combination) each."""
    rng = random.Random(f"caption-{seed}")
    combos = shapes_combos(combos)
    items = []
    for _ in range(n):
        color, shape = rng.choice(combos)
        image = render_shape(color, shape, image_size, rng, noise=rng.uniform(0.0, 0.08))
        items.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": CAPTION_QUESTION}],
                    }
                ],
                "images": [image],
                "completion": caption_text(color, shape),
            }
        )
    return items


def pretrain_base_vlm(
    cfg: ListenerRewardRecipe,
    ckpt_dir: str | Path,
    steps: int,
    seed: int,
    num_images: int = 8192,
    lr: float = BASE_LR,
    batch_size: int = 32,
    sizes: dict | None = None,
):
    """A fresh tiny VLM (``seed``; ``sizes`` override :data:`TINY_SIZES`) taught to caption shapes renders
    for ``steps`` steps; returns ``(model, processor)``. ``steps=0`` returns the random initialisation."""
    model, processor = new_tiny_vlm(seed, cfg, **(sizes or {}))
    if steps > 0:
        torch.manual_seed(seed)
        train_completions(
            model,
            processor,
            caption_items(num_images, seed, cfg.data.image_size),
            ckpt_dir,
            learning_rate=lr,
            max_steps=steps,
            batch_size=batch_size,
            seed=seed,
            add_eos=False,
            warmup_steps=min(20, steps // 5),
            save_steps=max(steps // 2, 1),
            logging_steps=max(steps // 10, 1),
        )
    return model, processor


def listener_items(pairs: list[PairExample], prompts: PromptsConfig, seed: int = 0) -> list[dict]:
    """Listener training data: 50% faithful reasoning, 20% reasoning that argues for the other image
    (descriptions and verdicts swapped; the answer follows the reasoning), 30% empty or undecided
    reasoning (the answer follows the images)."""
    rng = random.Random(seed)
    items = []
    for pair in pairs:
        truth = 1 if pair.faithful[0] else 2
        descs = pair.descriptions
        u = rng.random()
        if u < 0.5:
            reasoning, answer = oracle_reasoning(pair.faithful, descs), truth
        elif u < 0.7:
            swapped = None if descs is None else (descs[1], descs[0])
            reasoning, answer = (
                oracle_reasoning((not pair.faithful[0], not pair.faithful[1]), swapped),
                3 - truth,
            )
        elif u < 0.85:
            reasoning, answer = "", truth
        else:
            both = rng.random() < 0.5
            reasoning, answer = oracle_reasoning((both, both), descs), truth
        items.append(
            {
                "messages": listener_messages(pair.prompt, reasoning, prompts),
                "images": pair.images(),
                "completion": prompts.answer_tokens[answer - 1],
            }
        )
    return items


POINTWISE_QUESTION = "does the image match the prompt ? answer yes or no"


def pointwise_messages(prompt: str, prompts: PromptsConfig) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": prompts.reasoner_prefix.format(prompt=prompt)},
                {"type": "image"},
                {"type": "text", "text": POINTWISE_QUESTION},
            ],
        }
    ]


def pointwise_items(pairs: list[PairExample], prompts: PromptsConfig) -> list[dict]:
    items = []
    for pair in pairs:
        images = pair.images()
        for k, image in enumerate(images, start=1):
            items.append(
                {
                    "messages": pointwise_messages(pair.prompt, prompts),
                    "images": [image],
                    "completion": "yes" if k == pair.label else "no",
                }
            )
    return items


class SingleImageScorer:
    """Scores each image alone: p(yes) of a tiny VLM; a pair is judged by comparing the two scores."""

    def __init__(self, model, processor, prompts: PromptsConfig, batch_size: int = 32):
        self.model, self.processor, self.prompts, self.batch_size = (
            model.eval(),
            processor,
            prompts,
            batch_size,
        )
        self.ids = answer_token_ids(processor.tokenizer, ("yes", "no"))

    def score(self, prompts: list[str], images: list) -> torch.Tensor:
        messages = [pointwise_messages(p, self.prompts) for p in prompts]
        probs = answer_probabilities(
            self.model,
            self.processor,
            messages,
            [[im] for im in images],
            self.ids,
            self.prompts.listener_answer_prefix,
            self.batch_size,
        )
        return probs[:, 0]


def _train_answers_and_save(cfg, model, processor, items, out_dir, steps, lr, batch_size, seed) -> Path:
    """Fine-tune a judge on one-token answers (the listener's answer prefix, no EOS), save it to ``out_dir``."""
    torch.manual_seed(seed)
    train_completions(
        model,
        processor,
        items,
        _sibling(out_dir, "-ckpt"),
        learning_rate=lr,
        max_steps=steps,
        batch_size=batch_size,
        seed=seed,
        suffix=cfg.prompts.listener_answer_prefix,
        add_eos=False,
        warmup_steps=min(20, steps // 5),
        save_steps=max(steps // 2, 1),
        logging_steps=max(steps // 10, 1),
    )
    return save_vlm(model, processor, out_dir)


def train_listener(
    cfg: ListenerRewardRecipe,
    out_dir: str | Path,
    steps: int,
    num_pairs: int,
    lr: float = 2e-3,
    batch_size: int = 16,
    seed: int = 1000,
    base_steps: int = 0,
    split: str = "train",
    sizes: dict | None = None,
    base_lr: float = BASE_LR,
) -> Path:
    """Train the independent listener on its own pairs (colour-shape combinations of ``split``; ``all``
    makes it broader than the reasoner, whose preference data holds the OOD combinations out) and seed,
    from its own captioning base (``base_steps``, ``sizes``); save it (safetensors) to ``out_dir``."""
    model, processor = pretrain_base_vlm(
        cfg, _sibling(out_dir, "-base-ckpt"), base_steps, seed, lr=base_lr, sizes=sizes
    )
    pairs = make_shapes_pairs(num_pairs, split, seed, cfg.data.image_size, cfg.data.annotator_noise)
    items = listener_items(pairs, cfg.prompts, seed)
    return _train_answers_and_save(cfg, model, processor, items, out_dir, steps, lr, batch_size, seed)


def train_single_image_scorer(
    cfg: ListenerRewardRecipe,
    pairs: list[PairExample],
    out_dir: str | Path,
    steps: int,
    lr: float = 2e-3,
    batch_size: int = 16,
    seed: int = 0,
    init: str | Path | None = None,
) -> Path:
    """The single-image baseline, from ``init`` (the reasoner's initialisation, so both start equal) or a
    random model."""
    if init is not None:
        from diffalign.core.tiny_vlm import load_tiny_vlm

        model, processor = load_tiny_vlm(init)
    else:
        model, processor = new_tiny_vlm(seed, cfg)
    return _train_answers_and_save(
        cfg, model, processor, pointwise_items(pairs, cfg.prompts), out_dir, steps, lr, batch_size, seed
    )


@torch.no_grad()
def caption_accuracy(model, processor, n: int = 150, seed: int = 0, image_size: int = 16) -> dict:
    """How well a captioning base perceives: for ``n`` fresh renders (every colour-shape combination), the
    caption of highest likelihood among all colour-shape captions; returns colour, shape and joint accuracy.
    A base that cannot name the shape cannot reason about faithfulness, so the benchmark checks this first."""
    from diffalign.listener_reward.modeling import render_prompts

    rng = random.Random(f"caption-eval-{seed}")
    combos = shapes_combos("all")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_QUESTION}]}]
    prompt = render_prompts(processor, [messages])[0]
    tok = processor.tokenizer
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    texts = [f"{prompt} {caption_text(c, s)}" for c, s in combos]
    model.eval()
    hits = {"colour": 0, "shape": 0, "caption": 0}
    for _ in range(n):
        color, shape = rng.choice(combos)
        image = render_shape(color, shape, image_size, rng, noise=rng.uniform(0.0, 0.08))
        batch = processor(text=texts, images=[[image]] * len(texts), return_tensors="pt", padding=True)
        if bool((batch["attention_mask"] == 0).any()):
            raise ValueError("captions of unequal token length; caption_accuracy needs one token per word")
        logp = torch.log_softmax(model(**batch).logits[:, :-1].float(), -1)
        target = batch["input_ids"][:, 1:]
        token_logp = logp.gather(-1, target[..., None])[..., 0]
        n_image = int(batch["image_grid_thw"][0].prod()) // processor.image_processor.merge_size**2 - 1
        caption_logp = token_logp[:, n_prompt + n_image - 1 :].sum(-1)
        best_color, best_shape = combos[int(caption_logp.argmax())]
        hits["colour"] += best_color == color
        hits["shape"] += best_shape == shape
        hits["caption"] += (best_color, best_shape) == (color, shape)
    return {f"{k}_accuracy": v / n for k, v in hits.items()} | {"n": n}


def build_reasoner_init(
    cfg: ListenerRewardRecipe,
    out_dir: str | Path,
    seed: int | None = None,
    base_steps: int = 0,
    base_lr: float = BASE_LR,
) -> Path:
    """The reasoner's starting point: a captioning base VLM (``base_steps``; 0 = random init)."""
    model, processor = pretrain_base_vlm(
        cfg, _sibling(out_dir, "-base-ckpt"), base_steps, cfg.seed if seed is None else seed, lr=base_lr
    )
    return save_vlm(model, processor, out_dir)


__all__ = [
    "BASE_LR",
    "SingleImageScorer",
    "build_reasoner_init",
    "caption_accuracy",
    "caption_items",
    "listener_items",
    "new_tiny_vlm",
    "pointwise_items",
    "pretrain_base_vlm",
    "train_listener",
    "train_single_image_scorer",
]
