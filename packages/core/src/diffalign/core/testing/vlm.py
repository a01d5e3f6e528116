"""Tests' name for the tiny Qwen2.5-VL models; they live in ``diffalign.core.tiny_vlm``."""

from diffalign.core.tiny_vlm import (
    CHAT_TEMPLATE,
    DEFAULT_WORDS,
    MARKUP_TOKENS,
    PROCESSOR_MARKER,
    SPECIAL_TOKENS,
    build_processor,
    build_word_tokenizer,
    is_tiny_vlm_dir,
    load_tiny_processor,
    load_tiny_vlm,
    save_tiny_vlm,
    tiny_qwen2_5_vl,
    tiny_qwen2_5_vl_config,
)

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_WORDS",
    "MARKUP_TOKENS",
    "PROCESSOR_MARKER",
    "SPECIAL_TOKENS",
    "build_processor",
    "build_word_tokenizer",
    "is_tiny_vlm_dir",
    "load_tiny_processor",
    "load_tiny_vlm",
    "save_tiny_vlm",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_5_vl_config",
]
