"""Tiny Qwen2.5-VL models built from configs, with an offline word-level processor.

Nothing here downloads anything: the model is ``Qwen2_5_VLForConditionalGeneration`` built from a small
config, the tokenizer is a ``tokenizers`` word-level model wrapped in ``PreTrainedTokenizerFast``, and the
image processor is the PIL (torchvision-free) Qwen2-VL processor. Production code uses them: they are the
shapes-world reasoner / listener initialisation, and ``diffalign.core.models.load_vlm`` reads a saved one
from a local path. The architecture coverage tests build them too.

``save_tiny_vlm(model, processor, path)`` / ``load_tiny_vlm(path)`` round-trip both through safetensors and
plain JSON files, so a trained tiny model can be referenced by a local path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "[UNK]",
]
# Markup of the reasoner's output. These are normal (non-special) added tokens: decoding with
# ``skip_special_tokens=True`` (as TRL does) must keep them in the completion text.
MARKUP_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

DEFAULT_WORDS = (
    # chat roles and template words
    "system user assistant you are a an the does judge which image is better for prompt answer 1 2 3 "
    "with or based on this reasoning look at both images think then give final choice : . , ? "
    # shapes world
    "red green blue yellow circle circles square squares triangle triangles one two three "
    "and to left right of above below matches match mismatch good bad yes no wrong color count "
    "shape position missing extra object objects"
).split()

PROCESSOR_MARKER = "diffalign_tiny_processor.json"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} <|vision_start|><|image_pad|><|vision_end|> "
    "{% elif part['type'] == 'text' %} {{ part['text'] }} {% endif %}"
    "{% endfor %}{% endif %} <|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def _vocabulary(extra_words=()) -> list[str]:
    words: list[str] = []
    for w in [*SPECIAL_TOKENS, *MARKUP_TOKENS, *DEFAULT_WORDS, *extra_words]:
        if w not in words:
            words.append(w)
    return words


def build_word_tokenizer(extra_words=(), chat_template: str = CHAT_TEMPLATE):
    """A ``PreTrainedTokenizerFast`` over a fixed word vocabulary (whitespace/punctuation split)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_vocabulary(extra_words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=[
            t for t in SPECIAL_TOKENS if t not in ("[UNK]", "<|endoftext|>", "<|im_end|>")
        ],
        padding_side="left",
    )
    fast.chat_template = chat_template
    return fast


def _processor_class():
    from transformers import Qwen2_5_VLProcessor

    class OfflineQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL processor without a video processor (which would need torchvision)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def save_pretrained(self, save_directory, **kwargs):
            # the base class would iterate over the missing video processor
            path = Path(save_directory)
            path.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save_pretrained(path)
            self.image_processor.save_pretrained(path)
            (path / PROCESSOR_MARKER).write_text(
                json.dumps({"processor": "offline-qwen2_5_vl", "version": 1})
            )
            return [str(path)]

    return OfflineQwen2_5_VLProcessor


def build_processor(
    tokenizer=None,
    patch_size: int = 4,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int = 16 * 16,
    max_pixels: int = 32 * 32,
):
    """The offline processor: word tokenizer + PIL Qwen2-VL image processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = tokenizer if tokenizer is not None else build_word_tokenizer()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    cls = _processor_class()
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    if half < 3:
        return [1] * half
    side = half // 3
    return [half - 2 * side, side, side]


def tiny_qwen2_5_vl_config(
    tokenizer,
    hidden_size: int = 16,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vision_depth: int = 2,
    vision_hidden_size: int = 16,
    vision_heads: int = 4,
    patch_size: int = 4,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    max_position_embeddings: int = 1024,
):
    from transformers import Qwen2_5_VLConfig

    head_dim = hidden_size // num_heads
    ids = tokenizer.convert_tokens_to_ids
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e4,
            "mrope_section": _mrope_section(head_dim),
        },
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    vision_config = dict(
        depth=vision_depth,
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_heads=vision_heads,
        out_hidden_size=hidden_size,
        fullatt_block_indexes=list(range(vision_depth)),
        patch_size=patch_size,
        spatial_merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        window_size=112,
    )
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def tiny_qwen2_5_vl(
    seed: int = 0,
    *,
    extra_words=(),
    hidden_size: int = 16,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_depth: int = 2,
    vision_hidden_size: int = 16,
    vision_heads: int = 4,
    patch_size: int = 4,
    min_pixels: int = 16 * 16,
    max_pixels: int = 32 * 32,
):
    """A random-init ``Qwen2_5_VLForConditionalGeneration`` and its offline processor.

    Defaults give a ~40k-parameter model; 16x16 images become 4 image tokens, 32x32 become 16.
    The model is seeded with ``seed`` so two calls with the same seed give identical weights.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = build_word_tokenizer(extra_words)
    processor = build_processor(
        tokenizer, patch_size=patch_size, min_pixels=min_pixels, max_pixels=max_pixels
    )
    config = tiny_qwen2_5_vl_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        vision_depth=vision_depth,
        vision_hidden_size=vision_hidden_size,
        vision_heads=vision_heads,
        patch_size=patch_size,
    )
    devnull_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    torch.random.set_rng_state(devnull_state)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.bos_token_id = None
    return model.eval(), processor


def save_tiny_vlm(model, processor, path: str | Path) -> Path:
    """Save model (safetensors) + processor so :func:`load_tiny_vlm` can rebuild both offline."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def is_tiny_vlm_dir(path: str | Path) -> bool:
    return (Path(path) / PROCESSOR_MARKER).is_file()


def load_tiny_processor(path: str | Path):
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    if not is_tiny_vlm_dir(path):
        raise FileNotFoundError(f"{path} is not a tiny VLM directory (missing {PROCESSOR_MARKER})")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    cls = _processor_class()
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def load_tiny_vlm(path: str | Path, dtype=None):
    """Load a model saved by :func:`save_tiny_vlm` (safetensors only, no remote code)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = load_tiny_processor(path)
    kwargs = {"use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, **kwargs)
    return model.eval(), processor


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
