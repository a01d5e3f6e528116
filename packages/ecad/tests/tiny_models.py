"""Tiny seeded diffusers pipelines for the ecad tests.

Uses ``diffalign.core.testing`` when it provides the factory, else a local fallback built from
configs (no downloads).
"""

from __future__ import annotations

import torch


def _word_tokenizer(max_length: int = 16):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "a an the one two three red green blue yellow circle circles square squares triangle triangles and of to left right above below".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>", model_max_length=max_length
    )


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


def _t5(d_model: int = 16):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=64, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=2
    )
    return T5EncoderModel(cfg).eval()


def tiny_pixart_transformer(num_layers: int = 2):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        cross_attention_dim=16,
        caption_channels=16,
        sample_size=8,
        patch_size=2,
        norm_type="ada_norm_single",
    ).eval()


def tiny_pixart_pipeline():
    try:
        from diffalign.core.testing import tiny_pixart_pipeline as core_factory

        return core_factory()
    except ImportError:
        pass
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline(
        tokenizer=_word_tokenizer(),
        text_encoder=_t5(16),
        vae=_vae(),
        transformer=tiny_pixart_transformer(),
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_dit_pipeline():
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    try:
        from diffalign.core.testing import tiny_dit_transformer as core_dit

        transformer = core_dit()
    except ImportError:
        torch.manual_seed(0)
        transformer = DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
        ).eval()
    pipe = DiTPipeline(transformer=transformer, vae=_vae(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline():
    try:
        from diffalign.core.testing import tiny_flux_pipeline as core_factory

        return core_factory()
    except ImportError:
        pass
    raise ImportError("tiny FLUX pipeline needs diffalign.core.testing")
