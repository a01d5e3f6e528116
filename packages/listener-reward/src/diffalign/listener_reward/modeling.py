"""Loading VLMs and turning (messages, images) into model inputs; the two-token answer probability."""

from __future__ import annotations

import os
from pathlib import Path

import torch

SHAPES_PREFIX = "shapes/"
SHAPES_DIR_ENV = "DIFFALIGN_LISTENER_SHAPES_DIR"


def shapes_models_dir() -> Path:
    """Where ``build-models`` writes and ``shapes/<name>`` ids are read: ``$DIFFALIGN_LISTENER_SHAPES_DIR``,
    else a per-user cache (``$XDG_CACHE_HOME`` or ``~/.cache``), so the ids resolve from any directory."""
    if os.environ.get(SHAPES_DIR_ENV):
        return Path(os.environ[SHAPES_DIR_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "diffalign" / "listener-reward" / "shapes-models"


def resolve_source(source: str | os.PathLike) -> str:
    """``shapes/<name>`` -> the local directory of a shapes-world model built by this package; a local
    directory is returned as is; anything else is treated as a hub id."""
    source = str(source)
    if source.startswith(SHAPES_PREFIX):
        path = shapes_models_dir() / source[len(SHAPES_PREFIX) :]
        if not path.is_dir():
            raise FileNotFoundError(
                f"shapes-world model {source!r} not found at {path}. Build it with "
                f"`diffalign listener-reward build-models recipe.yaml` (or set {SHAPES_DIR_ENV})."
            )
        return str(path)
    return source


def load_vlm_and_processor(
    source: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    trust_remote_code: bool = False,
):
    """Load a Qwen2.5-VL-style model and its processor from a hub id, a local dir or a tiny-VLM dir
    (core's ``load_vlm``), with the pixel budget set and left padding for generation."""
    from diffalign.core.models import load_vlm

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    budget = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    model, processor = load_vlm(
        resolve_source(source), dtype=dtype, trust_remote_code=trust_remote_code, processor_kwargs=budget
    )
    if min_pixels is not None or max_pixels is not None:
        set_pixel_budget(processor, min_pixels, max_pixels)
    processor.tokenizer.padding_side = "left"
    return model.to(device).eval(), processor


def set_pixel_budget(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Per-image pixel budget of a Qwen2-VL-style image processor."""
    ip = processor.image_processor
    size = dict(getattr(ip, "size", None) or {})
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    ip.size = size
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None and hasattr(ip, name):
            setattr(ip, name, int(value))


def answer_token_ids(tokenizer, answer_tokens=("1", "2")) -> tuple[int, int]:
    """Ids of the two answer tokens; each must be exactly one token of the vocabulary."""
    ids = []
    for token in answer_tokens:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(
                f"answer token {token!r} is {len(encoded)} tokens for this tokenizer; it must be one"
            )
        if encoded[0] == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"answer token {token!r} is not in the tokenizer vocabulary")
        ids.append(encoded[0])
    if ids[0] == ids[1]:
        raise ValueError(f"answer tokens {answer_tokens} map to the same id")
    return ids[0], ids[1]


def two_token_probs(last_logits: torch.Tensor, ids: tuple[int, int]) -> torch.Tensor:
    """Softmax restricted to the two answer tokens: ``[N, V] -> [N, 2]`` (columns: image 1, image 2)."""
    if last_logits.dim() != 2:
        raise ValueError(f"expected logits [N, V], got shape {tuple(last_logits.shape)}")
    pair = last_logits[:, list(ids)].float()
    return torch.softmax(pair, dim=-1)


def render_prompts(processor, messages_batch: list[list[dict]], suffix: str | list[str] = "") -> list[str]:
    """Chat template with the generation prompt, plus ``suffix`` (one string, or one per row)."""
    suffixes = [suffix] * len(messages_batch) if isinstance(suffix, str) else list(suffix)
    if len(suffixes) != len(messages_batch):
        raise ValueError(f"got {len(suffixes)} suffixes for {len(messages_batch)} prompts")
    texts = []
    for messages, end in zip(messages_batch, suffixes):
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        texts.append(text + (" " + end if end else ""))
    return texts


def encode(processor, texts: list[str], images: list[list], device="cpu") -> dict:
    """Tokenise chat texts with their images (left padding), ready for ``model(**inputs)``."""
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}


@torch.no_grad()
def answer_probabilities(
    model, processor, messages_batch, images, answer_ids, suffix: str | list[str] = "", batch_size: int = 16
) -> torch.Tensor:
    """p(answer 1), p(answer 2) at the position after ``suffix``; one forward pass per mini-batch."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(messages_batch), batch_size):
        part = suffix if isinstance(suffix, str) else suffix[start : start + batch_size]
        texts = render_prompts(processor, messages_batch[start : start + batch_size], part)
        inputs = encode(processor, texts, images[start : start + batch_size], device)
        logits = model(**inputs).logits[:, -1, :]
        out.append(two_token_probs(logits, answer_ids).cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


@torch.no_grad()
def generate_completions(
    model,
    processor,
    messages_batch,
    images,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    batch_size: int = 16,
) -> list[str]:
    """Decode completions (special tokens skipped, as TRL does)."""
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(messages_batch), batch_size):
        texts = render_prompts(processor, messages_batch[start : start + batch_size])
        inputs = encode(processor, texts, images[start : start + batch_size], device)
        kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens}
        if do_sample:
            kwargs["temperature"] = temperature
        ids = model.generate(**inputs, **kwargs)
        new = ids[:, inputs["input_ids"].shape[1] :]
        out.extend(processor.batch_decode(new, skip_special_tokens=True))
    return out


__all__ = [
    "answer_probabilities",
    "generate_completions",
    "answer_token_ids",
    "encode",
    "load_vlm_and_processor",
    "render_prompts",
    "resolve_source",
    "set_pixel_budget",
    "shapes_models_dir",
    "two_token_probs",
]
