"""Reward adapters on tiny random CLIP / BLIP models saved to disk and loaded back offline."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffalign.core.metrics.scorers import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    AestheticScore,
    CLIPScore,
    HPSv2,
    ImageRewardScore,
    LinearMLPHead,
    PickScore,
    make_aesthetic,
    make_clip,
    make_clip_score_metric,
    make_hpsv2,
    make_imagereward,
    make_pickscore,
)
from diffalign.core.rewards import RewardModel

WORDS = (
    "a an the red green blue yellow circle square triangle two three left right of above below and".split()
)
SIZE = 16
PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def _text_config(**extra):
    return dict(
        vocab_size=len(WORDS) + 4,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        **extra,
    )


def _vision_config():
    return dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=SIZE,
        patch_size=8,
    )


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-clip")
    config = CLIPConfig(text_config=_text_config(), vision_config=_vision_config(), projection_dim=8)
    CLIPModel(config).save_pretrained(directory)
    _tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pickscore(clip_dir):
    return PickScore(clip_dir)


def _images(n=3, seed=0, size=SIZE):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _brute_force_cosine(model, tokenizer, images, prompts):
    """Through the raw submodules: vision tower -> projection, text tower at [EOS] -> projection."""
    with torch.no_grad():
        mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
        pixels = ((images + 1) / 2 - mean) / std
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        rows = [tokenizer(p)["input_ids"] for p in prompts]
        ids = torch.zeros(len(rows), 16, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, r in enumerate(rows):
            ids[k, : len(r)], mask[k, : len(r)] = torch.tensor(r), 1
        hidden = model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        eos = torch.tensor([len(r) - 1 for r in rows])
        txt = model.text_projection(hidden[torch.arange(len(rows)), eos])
        return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


def test_pickscore_matches_brute_force_and_is_a_reward_model(pickscore):
    images = _images()
    got = pickscore.score(images, PROMPTS)
    cos = _brute_force_cosine(pickscore.model, pickscore.tokenizer, images, PROMPTS)
    expected = pickscore.model.logit_scale.exp().detach() * cos
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got.shape == (3,) and isinstance(pickscore, RewardModel)
    assert pickscore.name == "pickscore" and pickscore.differentiable and pickscore.input_range == "[-1,1]"
    # negative control: pairing images with the wrong prompts changes the scores
    assert not torch.allclose(pickscore.score(images, PROMPTS[::-1]), got)


def test_clip_and_hpsv2_scales(clip_dir, pickscore):
    images = _images(seed=1)
    cos = _brute_force_cosine(pickscore.model, pickscore.tokenizer, images, PROMPTS)
    torch.testing.assert_close(HPSv2(clip_dir).score(images, PROMPTS), cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        CLIPScore(clip_dir).score(images, PROMPTS), 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-5
    )


def test_clip_score_matches_torchmetrics_with_callable_model(clip_dir):
    from torchmetrics.multimodal.clip_score import CLIPScore as TorchmetricsCLIPScore
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
    )
    try:
        processor = CLIPProcessor(image_processor=image_processor, tokenizer=_tokenizer())
    except (TypeError, ValueError) as err:  # pragma: no cover - depends on transformers' processor checks
        pytest.skip(f"CLIPProcessor rejects the offline word-level tokenizer: {err}")
    metric = make_clip_score_metric(lambda: (model, processor))
    assert isinstance(metric, TorchmetricsCLIPScore)
    uint8 = torch.randint(
        0, 256, (3, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(2), dtype=torch.uint8
    )
    metric.update(uint8, PROMPTS)
    scorer = CLIPScore(clip_dir)
    cos = scorer.cosine(uint8.float() / 127.5 - 1, PROMPTS)
    # torchmetrics accumulates 100 * cos per sample and clamps the *mean* at 0
    assert float(metric.score) == pytest.approx(float(100 * cos.sum()), abs=1e-3)
    assert float(metric.compute()) == pytest.approx(max(float(100 * cos.mean()), 0.0), abs=1e-3)
    # our per-image CLIPScore clamps each image (Hessel et al.); on this batch one cosine is negative,
    # so the two conventions differ
    per_image = scorer.score(uint8.float() / 127.5 - 1, PROMPTS)
    assert (cos < 0).any() and (cos > 0).any()
    assert float(per_image.mean()) != pytest.approx(float(metric.compute()), abs=1e-2)
    with pytest.raises(TypeError, match="callable"):
        make_clip_score_metric("openai/clip-vit-base-patch32")


def test_gradients_reach_pixels_and_pil_matches_tensor(pickscore):
    images = _images(seed=3).requires_grad_(True)
    pickscore.score(images, PROMPTS).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    from PIL import Image

    uint8 = ((_images(seed=4) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    pil = [Image.fromarray(u.permute(1, 2, 0).numpy()) for u in uint8]
    torch.testing.assert_close(
        pickscore.score(pil, PROMPTS),
        pickscore.score(uint8.float() / 127.5 - 1, PROMPTS),
        atol=1e-4,
        rtol=1e-4,
    )
    # larger, non-square images are resized and centre-cropped
    assert pickscore.score(torch.zeros(3, 3, 24, 40), PROMPTS).shape == (3,)


def test_bad_inputs_and_missing_paths(pickscore, clip_dir, tmp_path):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        pickscore.score(_images() * 255, PROMPTS)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        pickscore.score(_images(), PROMPTS[:2])
    with pytest.raises(ValueError, match="empty prompt list"):
        pickscore.score(_images(0), [])
    with pytest.raises(TypeError, match="PIL"):
        pickscore.score(np.zeros((3, 3, SIZE, SIZE)), PROMPTS)
    missing = tmp_path / "PickScore_v1"
    for factory in (make_pickscore, make_clip, make_hpsv2):
        with pytest.raises(FileNotFoundError) as info:
            factory(missing)
        assert str(missing) in str(info.value) and "never downloaded" in str(info.value)
    with pytest.raises(FileNotFoundError, match="HPS_v2_compressed.pt"):
        make_hpsv2(tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(FileNotFoundError, match="head weights file"):
        make_aesthetic(clip_dir, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(FileNotFoundError, match="imagereward"):
        make_imagereward(tmp_path / "ImageReward")


def _head_state(widths, seed):
    gen = torch.Generator().manual_seed(seed)
    state, position = {}, 0
    for k, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        state[f"layers.{position}.weight"] = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
        state[f"layers.{position}.bias"] = torch.randn(d_out, generator=gen) * 0.1
        position += 1 if k == len(widths) - 3 else 2  # dropout slots as in the published head
    return state


def _apply_head(state, x, activation=None):
    for key in sorted((k for k in state if k.endswith(".weight")), key=lambda k: int(k.split(".")[1])):
        x = x @ state[key].T + state[key.replace("weight", "bias")]
        if activation is not None and key != max(state, key=lambda k: int(k.split(".")[1])):
            x = activation(x)
    return x.squeeze(-1)


def test_aesthetic_head_from_pth_and_safetensors(clip_dir, pickscore, tmp_path):
    from safetensors.torch import save_file

    state = _head_state([8, 32, 16, 8, 4, 1], seed=0)
    assert sorted(int(k.split(".")[1]) for k in state if k.endswith("weight")) == [0, 2, 4, 6, 7]
    torch.save(state, tmp_path / "head.pth")
    save_file(state, str(tmp_path / "head.safetensors"))
    images = _images(seed=5)
    with torch.no_grad():
        pixels = ((images + 1) / 2 - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(
            OPENAI_CLIP_STD
        ).view(1, 3, 1, 1)
        model = pickscore.model
        embeds = F.normalize(
            model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1
        )
    expected = _apply_head(state, embeds)
    for head in ("head.pth", "head.safetensors"):
        scorer = AestheticScore(clip_dir, tmp_path / head)
        torch.testing.assert_close(scorer.score(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    # negative controls: ReLUs between the layers, or an unnormalised embedding, give other numbers
    assert not torch.allclose(_apply_head(state, embeds, torch.relu), expected, atol=1e-3)
    assert not torch.allclose(_apply_head(state, embeds * 3), expected, atol=1e-3)
    with pytest.raises(ValueError, match="expects 4-d"):
        AestheticScore(clip_dir, LinearMLPHead(_head_state([4, 2, 1], seed=1)))


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import BlipConfig, BlipForImageTextRetrieval

    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("tiny-blip")
    text = _text_config(encoder_hidden_size=16)
    text["max_position_embeddings"] = 40
    # BLIP's vision config initialises with std 1e-10, which would make every image look alike
    config = BlipConfig(
        text_config=text, vision_config={**_vision_config(), "initializer_range": 0.5}, projection_dim=8
    )
    BlipForImageTextRetrieval(config).save_pretrained(directory)
    _tokenizer().save_pretrained(directory)
    save_file(_head_state([16, 32, 8, 4, 2, 1], seed=2), str(directory / "reward_head.safetensors"))
    (directory / "reward_config.json").write_text('{"mean": 0.1, "std": 2.0, "max_length": 12}')
    return directory


def test_imagereward_style_matches_brute_force(blip_dir):
    from safetensors.torch import load_file

    scorer = make_imagereward(blip_dir)
    assert isinstance(scorer, ImageRewardScore) and isinstance(scorer, RewardModel)
    images = _images(seed=6)
    got = scorer.score(images, PROMPTS)
    state = load_file(str(blip_dir / "reward_head.safetensors"))
    with torch.no_grad():
        pixels = ((images + 1) / 2 - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(
            OPENAI_CLIP_STD
        ).view(1, 3, 1, 1)
        image_tokens = scorer.model.vision_model(pixel_values=pixels).last_hidden_state
        tokens = scorer.tokenizer(PROMPTS, padding="max_length", max_length=12, return_tensors="pt")

        def cls(encoder_states):
            out = scorer.model.text_encoder(
                input_ids=tokens["input_ids"],
                attention_mask=tokens["attention_mask"],
                encoder_hidden_states=encoder_states,
                encoder_attention_mask=None
                if encoder_states is None
                else torch.ones(image_tokens.shape[:2]).long(),
            )
            return out.last_hidden_state[:, 0]

        expected = (_apply_head(state, cls(image_tokens)) - 0.1) / 2.0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # negative control: the score must depend on the image through cross-attention
    assert not torch.allclose(scorer.score(_images(seed=7), PROMPTS), got, atol=1e-4)
    images.requires_grad_(True)
    scorer.score(images, PROMPTS).sum().backward()
    assert images.grad.abs().sum() > 0


ENTRY_POINTS = {
    "clip": "diffalign.core.metrics.scorers:make_clip",
    "pickscore": "diffalign.core.metrics.scorers:make_pickscore",
    "hpsv2": "diffalign.core.metrics.scorers:make_hpsv2",
    "aesthetic": "diffalign.core.metrics.scorers:make_aesthetic",
    "imagereward": "diffalign.core.metrics.scorers:make_imagereward",
}


def test_factories_work_through_the_reward_registry(clip_dir):
    from importlib.metadata import entry_points

    from diffalign.core.rewards import get_reward, register_reward, unregister_reward

    register_reward("test-pickscore", make_pickscore, overwrite=True)
    try:
        reward = get_reward("test-pickscore", model=clip_dir)
        assert isinstance(reward, PickScore) and reward.score(_images(), PROMPTS).shape == (3,)
    finally:
        unregister_reward("test-pickscore")
    # once packages/core/pyproject.toml registers them, the entry points must name these factories
    installed = {ep.name: ep.value for ep in entry_points(group="diffalign.rewards")}
    for name, value in ENTRY_POINTS.items():
        module, attr = value.split(":")
        assert callable(getattr(__import__(module, fromlist=[attr]), attr))
        if name in installed:
            assert installed[name] == value
