"""Factories of tiny diffusers / transformers models (random weights, fixed seeds)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

TINY_WORDS: tuple[str, ...] = (
    "a an the one two three of and with to on in is are image photo picture showing there",
    "red green blue yellow black white orange purple pink",
    "circle circles square squares triangle triangles shape shapes object objects",
    "left right above below next beside top bottom",
    "cat dog car tree house person astronaut horse riding sitting standing big small",
    ", . ! ? ; :",
)

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
TEXT_HIDDEN = 32
LATENT_CHANNELS = 4


def _vocab(words: Sequence[str] | None = None) -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for line in words or TINY_WORDS:
        for word in line.split():
            vocab.setdefault(word, len(vocab))
    return vocab


def tiny_tokenizer(max_length: int = 16, words: Sequence[str] | None = None, add_bos: bool = True):
    """An offline word-level ``PreTrainedTokenizerFast`` (lower-cased, punctuation split off).

    Sequences are ``<bos> words <eos>`` padded with ``<pad>`` to ``max_length``; unknown words map to
    ``<unk>``.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab(words)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    template = "<bos> $A <eos>" if add_bos else "$A <eos>"
    tok.post_processor = processors.TemplateProcessing(
        single=template,
        special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=max_length,
    )


def _seeded(seed: int):
    torch.manual_seed(seed)


def tiny_clip_text_encoder(
    seed: int = 0, hidden_size: int = TEXT_HIDDEN, max_length: int = 16, vocab_size=None
):
    from transformers import CLIPTextConfig, CLIPTextModel

    _seeded(seed)
    vocab = _vocab()
    config = CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size or len(vocab),
        max_position_embeddings=max_length,
        bos_token_id=vocab["<bos>"],
        eos_token_id=vocab["<eos>"],
        pad_token_id=vocab["<pad>"],
        projection_dim=hidden_size,
    )
    return CLIPTextModel(config).eval()


def tiny_clip_text_encoder_with_projection(
    seed: int = 1, hidden_size: int = TEXT_HIDDEN, max_length: int = 16
):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    _seeded(seed)
    vocab = _vocab()
    config = CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(vocab),
        max_position_embeddings=max_length,
        bos_token_id=vocab["<bos>"],
        eos_token_id=vocab["<eos>"],
        pad_token_id=vocab["<pad>"],
        projection_dim=hidden_size,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_t5_encoder(seed: int = 0, d_model: int = TEXT_HIDDEN):
    from transformers import T5Config, T5EncoderModel

    _seeded(seed)
    vocab = _vocab()
    config = T5Config(
        vocab_size=len(vocab),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["<eos>"],
        decoder_start_token_id=vocab["<pad>"],
    )
    return T5EncoderModel(config).eval()


def _tiny_autoencoder(seed: int, latent_channels: int = LATENT_CHANNELS, **extra):
    from diffusers import AutoencoderKL

    _seeded(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=16,
        **extra,
    ).eval()


def tiny_vae(seed: int = 0, latent_channels: int = LATENT_CHANNELS):
    """``AutoencoderKL`` mapping 16x16x3 pixels to 8x8x4 latents."""
    return _tiny_autoencoder(seed, latent_channels)


def tiny_flux_vae(seed: int = 0):
    """FLUX-style autoencoder: no quant convs, latent shift and scale."""
    return _tiny_autoencoder(
        seed, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=0.9
    )


def tiny_unet(seed: int = 0, cross_attention_dim: int = TEXT_HIDDEN):
    """SD-style ``UNet2DConditionModel`` on 8x8x4 latents."""
    from diffusers import UNet2DConditionModel

    _seeded(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def tiny_sdxl_unet(seed: int = 0):
    """SDXL-style UNet: text_time added conditions, cross-attention over two concatenated encoders."""
    from diffusers import UNet2DConditionModel

    _seeded(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN,
        cross_attention_dim=2 * TEXT_HIDDEN,
        norm_num_groups=8,
    ).eval()


def tiny_pixart_transformer(seed: int = 0, caption_channels: int = TEXT_HIDDEN):
    """PixArt-alpha-style ``PixArtTransformer2DModel`` on 8x8x4 latents, learned sigma (8 output channels)."""
    from diffusers import PixArtTransformer2DModel

    _seeded(seed)
    return PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,
        caption_channels=caption_channels,
        cross_attention_dim=16,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
        norm_num_groups=8,
    ).eval()


def tiny_dit_transformer(seed: int = 0):
    """Class-conditional ``DiTTransformer2DModel`` (the original DiT) on 8x8x4 latents."""
    from diffusers import DiTTransformer2DModel

    _seeded(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()


def tiny_flux_transformer(seed: int = 0):
    """FLUX.1-style ``FluxTransformer2DModel``: one double-stream and one single-stream block."""
    from diffusers import FluxTransformer2DModel

    _seeded(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,
        axes_dims_rope=[4, 4, 8],
    ).eval()


def _scheduler_ddim(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A ``StableDiffusionPipeline`` (tiny UNet, VAE, CLIP text encoder, word-level tokenizer)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_encoder(seed),
        tokenizer=tiny_tokenizer(),
        unet=tiny_unet(seed),
        scheduler=_scheduler_ddim(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_encoder(seed),
        text_encoder_2=tiny_clip_text_encoder_with_projection(seed + 1),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=tiny_sdxl_unet(seed),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
        ),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_pipeline(seed: int = 0):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_t5_encoder(seed),
        vae=tiny_vae(seed),
        transformer=tiny_pixart_transformer(seed),
        scheduler=_scheduler_ddim("epsilon"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_sized_pipeline(seed: int = 0):
    """PixArt-alpha-1024-style: a transformer with ``sample_size`` 128, so it embeds (resolution, aspect
    ratio) as PixArt-XL-2-1024-MS does (width 24, divisible by 3 for the size embedding)."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    _seeded(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=128,
        num_layers=2,
        patch_size=2,
        attention_head_dim=12,
        num_attention_heads=2,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,
        caption_channels=TEXT_HIDDEN,
        cross_attention_dim=24,
        norm_type="ada_norm_single",
        norm_num_groups=8,
    ).eval()
    pipe = PixArtAlphaPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_t5_encoder(seed),
        vae=tiny_vae(seed),
        transformer=transformer,
        scheduler=_scheduler_ddim("epsilon"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_flux_vae(seed),
        text_encoder=tiny_clip_text_encoder(seed),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_t5_encoder(seed),
        tokenizer_2=tiny_tokenizer(),
        transformer=tiny_flux_transformer(seed),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
