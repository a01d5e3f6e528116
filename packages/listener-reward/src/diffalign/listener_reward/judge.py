"""The trained reasoner as a preference judge, an n-way ranking by anchors, and the ``listener-judge``
reward model.

``PreferenceJudge.compare(prompt, image_a, image_b)`` generates the reasoning, then reads the two-token
softmax over the answer tokens right after ``<think> reasoning </think> <answer>``: a calibrated
probability that image 1 (``image_a``) is better, the paper's probability-based pairwise scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffalign.listener_reward.config import JudgeConfig, PromptsConfig
from diffalign.listener_reward.modeling import (
    answer_probabilities,
    answer_token_ids,
    generate_completions,
    load_vlm_and_processor,
)
from diffalign.listener_reward.prompts import extract_answer, reasoner_messages, strip_answer


@dataclass
class Comparison:
    choice: int  # 1 = image_a is better, 2 = image_b
    probability: float  # probability of the chosen image
    p_image_a: float  # probability that image_a is better
    reasoning: str  # chain of thought, answer removed
    completion: str  # raw generated text
    generated_choice: int | None  # the answer the model wrote (None if unparsable)


class PreferenceJudge:
    def __init__(
        self,
        model,
        processor,
        prompts: PromptsConfig | None = None,
        judge: JudgeConfig | None = None,
        batch_size: int = 16,
    ):
        self.model = model.eval()
        self.processor = processor
        self.prompts = prompts or PromptsConfig()
        self.cfg = judge or JudgeConfig()
        self.batch_size = batch_size
        self.answer_ids = answer_token_ids(processor.tokenizer, self.prompts.answer_tokens)

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        prompts: PromptsConfig | None = None,
        judge: JudgeConfig | None = None,
        device: str = "cpu",
        dtype=None,
        min_pixels=None,
        max_pixels=None,
        **kwargs,
    ):
        model, processor = load_vlm_and_processor(source, dtype, device, min_pixels, max_pixels)
        return cls(model, processor, prompts, judge, **kwargs)

    def _one_order(self, prompts: Sequence[str], first: Sequence, second: Sequence):
        messages = [reasoner_messages(p, self.prompts) for p in prompts]
        images = [[a, b] for a, b in zip(first, second)]
        completions = generate_completions(
            self.model,
            self.processor,
            messages,
            images,
            self.cfg.max_new_tokens,
            self.cfg.do_sample,
            batch_size=self.batch_size,
        )
        reasonings = [strip_answer(c) for c in completions]
        suffixes = [f"<think> {r} </think> {self.prompts.reasoner_answer_prefix}".strip() for r in reasonings]
        probs = answer_probabilities(
            self.model, self.processor, messages, images, self.answer_ids, suffixes, self.batch_size
        )
        return probs[:, 0], completions, reasonings

    @torch.no_grad()
    def compare_batch(
        self, prompts: Sequence[str], images_a: Sequence, images_b: Sequence
    ) -> list[Comparison]:
        if not (len(prompts) == len(images_a) == len(images_b)):
            raise ValueError("prompts, images_a and images_b must have the same length")
        p_a, completions, reasonings = self._one_order(prompts, images_a, images_b)
        if self.cfg.symmetric:
            p_b_first, _, _ = self._one_order(prompts, images_b, images_a)
            p_a = 0.5 * (p_a + (1.0 - p_b_first))
        out = []
        for p, completion, reasoning in zip(p_a.tolist(), completions, reasonings):
            choice = 1 if p >= 0.5 else 2
            out.append(
                Comparison(
                    choice, p if choice == 1 else 1 - p, p, reasoning, completion, extract_answer(completion)
                )
            )
        return out

    def compare(self, prompt: str, image_a, image_b) -> Comparison:
        return self.compare_batch([prompt], [image_a], [image_b])[0]

    def win_probabilities(
        self, prompt: str | Sequence[str], images: Sequence, anchors: Sequence
    ) -> torch.Tensor:
        """``[n, k]``: p(image i beats anchor j), all n * k comparisons in one batched call. ``prompt`` is one
        prompt for every image or one per image."""
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
        pairs = [(i, j) for i in range(len(images)) for j in range(len(anchors))]
        results = self.compare_batch(
            [prompts[i] for i, _ in pairs], [images[i] for i, _ in pairs], [anchors[j] for _, j in pairs]
        )
        table = torch.zeros(len(images), len(anchors))
        for (i, j), r in zip(pairs, results):
            table[i, j] = r.p_image_a
        return table

    def rank_by_anchors(
        self, prompt: str, images: Sequence, anchors: Sequence
    ) -> tuple[torch.Tensor, list[int]]:
        """n-way ranking with n * k comparisons (k anchors) instead of n^2: score = mean win probability
        against the anchors. Returns (scores [n], indices best first)."""
        if not anchors:
            raise ValueError("rank_by_anchors needs at least one anchor image")
        scores = self.win_probabilities(prompt, images, anchors).mean(dim=1)
        return scores, torch.argsort(scores, descending=True, stable=True).tolist()

    def round_robin_scores(self, prompt: str, images: Sequence) -> torch.Tensor:
        """Mean win probability of each image against every other (all n(n-1) ordered comparisons)."""
        n = len(images)
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
        results = self.compare_batch(
            [prompt] * len(pairs), [images[i] for i, _ in pairs], [images[j] for _, j in pairs]
        )
        wins = torch.zeros(n)
        for (i, j), r in zip(pairs, results):
            wins[i] += r.p_image_a / 2
            wins[j] += (1 - r.p_image_a) / 2
        return wins / max(n - 1, 1)


def default_anchors(size: int = 16, count: int = 2, seed: int = 0) -> list:
    """Fixed anchor images: a flat grey image and seeded noise images of ``size`` pixels."""
    from PIL import Image

    anchors = [Image.new("RGB", (size, size), (128, 128, 128))]
    rng = np.random.default_rng(seed)
    while len(anchors) < count:
        anchors.append(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
    return anchors[:count]


class ListenerJudgeReward:
    """``RewardModel`` (diffalign.core.rewards protocol) backed by a :class:`PreferenceJudge`.

    ``score(images, prompts)`` = mean win probability of each image against fixed anchors.
    """

    name = "listener-judge"
    differentiable = False
    input_range = "pil"

    def __init__(self, judge: PreferenceJudge, anchors: Sequence | None = None, num_anchors: int = 2):
        self.judge = judge
        self.anchors = list(anchors) if anchors is not None else None
        self.num_anchors = num_anchors

    def score(self, images, prompts: Sequence[str]) -> torch.Tensor:
        images = _as_pil_list(images)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        if not images:
            return torch.zeros(0)
        anchors = self.anchors or default_anchors(images[0].size[0], self.num_anchors)
        return self.judge.win_probabilities(list(prompts), images, anchors).mean(dim=1)


def _as_pil_list(images) -> list:
    from PIL import Image

    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"tensor images must be [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        arrays = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu()
        return [Image.fromarray(a.numpy()) for a in arrays]
    out = list(images)
    for image in out:
        if not isinstance(image, Image.Image):
            raise TypeError(f"listener-judge scores PIL images, got {type(image).__name__}")
    return [image.convert("RGB") for image in out]


def make_listener_judge(
    source: str = "shapes/judge",
    anchors=None,
    num_anchors: int = 2,
    device: str = "cpu",
    prompts: PromptsConfig | dict | None = None,
    max_new_tokens: int = 32,
    symmetric: bool = False,
    **kwargs,
) -> ListenerJudgeReward:
    """Factory registered as ``listener-judge`` (entry-point group ``diffalign.rewards``)."""
    if isinstance(prompts, dict):
        prompts = PromptsConfig.model_validate(prompts)
    judge = PreferenceJudge.from_pretrained(
        source,
        prompts,
        JudgeConfig(max_new_tokens=max_new_tokens, symmetric=symmetric),
        device=device,
        **kwargs,
    )
    return ListenerJudgeReward(judge, anchors, num_anchors)


__all__ = [
    "Comparison",
    "ListenerJudgeReward",
    "PreferenceJudge",
    "default_anchors",
    "make_listener_judge",
]
