"""Reasoner / listener prompts and the parsing of the reasoner's output (pure string functions).

Reasoner output format (``answer_format="tags"``)::

    <think> ... reasoning ... </think> <answer> 1 </answer>

or (``answer_format="json"``) ``<think> ... </think> {"choice": "1"}``. ``extract_answer`` accepts both and
is robust to malformed text (returns ``None``); ``strip_answer`` returns the reasoning with every trace of
the final answer removed, which is all the listener ever sees.
"""

from __future__ import annotations

import re
from typing import Any

from diffalign.listener_reward.config import PromptsConfig

_THINK = re.compile(r"<think>(.*?)</think>", re.S | re.I)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_JSON_CHOICE = re.compile(
    r"\{\s*\"?(?:choice|answer)\"?\s*:\s*\"?\s*(?:image\s*)?([12])\s*\"?\s*\}", re.S | re.I
)
_CHOICE_BODY = re.compile(r"^\s*(?:image\s*)?([12])\s*\.?\s*$", re.I)
_TAGS_FORMAT = re.compile(
    r"^\s*<think>(?P<think>(?:(?!<think>|</think>).)*?\S(?:(?!<think>|</think>).)*?)</think>"
    r"\s*<answer>\s*(?:image\s*)?[12]\s*</answer>\s*$",
    re.S | re.I,
)
_JSON_FORMAT = re.compile(
    r"^\s*<think>(?P<think>(?:(?!<think>|</think>).)*?\S(?:(?!<think>|</think>).)*?)</think>"
    r"\s*\{\s*\"choice\"\s*:\s*\"?[12]\"?\s*\}\s*$",
    re.S | re.I,
)


def completion_text(completion: Any) -> str:
    """TRL passes completions as strings or as conversational message lists; return the text."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        parts = []
        for message in completion:
            content = message.get("content", "") if isinstance(message, dict) else message
            if isinstance(content, list):
                parts.extend(
                    p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
                )
            elif content is not None:
                parts.append(str(content))
        return " ".join(parts)
    if completion is None:
        return ""
    raise TypeError(f"completion must be a string or a list of messages, got {type(completion).__name__}")


def extract_answer(text: str) -> int | None:
    """The final choice (1 or 2), or ``None`` if the text holds no unambiguous answer.

    The last ``<answer>`` tag wins; else the last JSON ``{"choice": k}``; an answer tag whose body is not
    exactly one of 1/2 (e.g. "1 or 2") gives ``None``.
    """
    text = completion_text(text)
    tags = _ANSWER_TAG.findall(text)
    if tags:
        match = _CHOICE_BODY.match(tags[-1])
        return int(match.group(1)) if match else None
    choices = _JSON_CHOICE.findall(text)
    if choices:
        return int(choices[-1])
    return None


def strip_answer(text: str) -> str:
    """The reasoning with the final answer removed: what the listener reads.

    Keeps the body of the first ``<think>`` block if there is one; otherwise everything before the first
    answer marker. Any answer tag, dangling ``<answer>``/``</answer>`` or JSON choice left inside is removed.
    """
    text = completion_text(text)
    think = _THINK.search(text)
    if think:
        body = think.group(1)
    else:
        body = text
        cut = [
            m.start() for m in (re.search(r"<answer>|</answer>", body, re.I), _JSON_CHOICE.search(body)) if m
        ]
        if cut:
            body = body[: min(cut)]
        body = re.sub(r"</?think>", " ", body, flags=re.I)
    body = _ANSWER_TAG.sub(" ", body)
    body = _JSON_CHOICE.sub(" ", body)
    body = re.sub(r"</?answer>", " ", body, flags=re.I)
    return " ".join(body.split())


def is_well_formed(text: str, answer_format: str = "tags") -> bool:
    """True iff the text is exactly one non-empty ``<think>`` block followed by one final answer."""
    text = completion_text(text)
    pattern = _TAGS_FORMAT if answer_format == "tags" else _JSON_FORMAT
    if answer_format not in ("tags", "json"):
        raise ValueError(f"answer_format must be 'tags' or 'json', got {answer_format!r}")
    return pattern.match(text) is not None


def format_completion(reasoning: str, choice: int, answer_format: str = "tags") -> str:
    """Render a reasoner target (used for SFT targets and tests)."""
    if choice not in (1, 2):
        raise ValueError(f"choice must be 1 or 2, got {choice!r}")
    if answer_format == "json":
        return f'<think> {reasoning} </think> {{"choice": "{choice}"}}'
    return f"<think> {reasoning} </think> <answer> {choice} </answer>"


# ---------------------------------------------------------------------------------------------- messages


def _image_block(image=None) -> dict:
    return {"type": "image"} if image is None else {"type": "image", "image": image}


def reasoner_messages(prompt: str, cfg: PromptsConfig, image_a=None, image_b=None) -> list[dict]:
    """Chat messages for the reasoner. Without images, image blocks are placeholders (TRL fills them)."""
    content = [
        {"type": "text", "text": cfg.reasoner_prefix.format(prompt=prompt)},
        {"type": "text", "text": cfg.image1_label},
        _image_block(image_a),
        {"type": "text", "text": cfg.image2_label},
        _image_block(image_b),
        {"type": "text", "text": cfg.reasoner_question},
    ]
    messages = []
    if cfg.reasoner_system:
        messages.append({"role": "system", "content": [{"type": "text", "text": cfg.reasoner_system}]})
    messages.append({"role": "user", "content": content})
    return messages


def listener_messages(
    prompt: str, reasoning: str, cfg: PromptsConfig, image_a=None, image_b=None
) -> list[dict]:
    """Chat messages for the listener: prompt, both images and the answer-free reasoning."""
    if _ANSWER_TAG.search(reasoning) or re.search(r"</?answer>", reasoning, re.I):
        raise ValueError("the listener must never see the answer: pass strip_answer(completion)")
    content = [
        {"type": "text", "text": cfg.reasoner_prefix.format(prompt=prompt)},
        {"type": "text", "text": cfg.image1_label},
        _image_block(image_a),
        {"type": "text", "text": cfg.image2_label},
        _image_block(image_b),
        {"type": "text", "text": cfg.listener_question.format(reasoning=reasoning)},
    ]
    messages = []
    if cfg.listener_system:
        messages.append({"role": "system", "content": [{"type": "text", "text": cfg.listener_system}]})
    messages.append({"role": "user", "content": content})
    return messages


__all__ = [
    "completion_text",
    "extract_answer",
    "format_completion",
    "is_well_formed",
    "listener_messages",
    "reasoner_messages",
    "strip_answer",
]
