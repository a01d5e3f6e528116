"""Offline word-level tokenizer of the shapes world (a ``PreTrainedTokenizerFast`` folder)."""

from __future__ import annotations

from pathlib import Path

from .grammar import vocabulary

PAD, UNK = "[PAD]", "[UNK]"
MAX_LENGTH = 20


def build_tokenizer(max_length: int = MAX_LENGTH):
    """Word-level tokenizer over the grammar's vocabulary; id 0 is [PAD], 1 is [UNK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, UNK: 1}
    for w in vocabulary():
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
    )


def save_tokenizer(path: str | Path, max_length: int = MAX_LENGTH) -> Path:
    path = Path(path)
    build_tokenizer(max_length).save_pretrained(str(path))
    return path
