"""Preference and alignment scorers loaded from local paths, as ``RewardModel`` s.

| reward name   | class               | score                                                            |
|---------------|---------------------|------------------------------------------------------------------|
| ``clip``      | :class:`CLIPScore`   | ``100 * max(cos(image, text), 0)`` per image (Hessel et al.)      |
| ``pickscore`` | :class:`PickScore`   | ``exp(logit_scale) * cos(image, text)`` (PickScore model card)    |
| ``hpsv2``     | :class:`HPSv2`       | ``cos(image, text)`` of the HPSv2-tuned CLIP ViT-H/14 (``hpsv2.score``) |
| ``aesthetic`` | :class:`AestheticScore` | linear MLP on the L2-normalised CLIP image embedding (LAION improved-aesthetic-predictor) |
| ``imagereward`` | :class:`ImageRewardScore` | BLIP text [CLS] cross-attending to the image -> MLP -> ``(r - mean) / std`` |

Each takes a **local directory** (or an already-built model): nothing is downloaded. A missing path
raises ``FileNotFoundError`` naming the path and how to fetch the weights on a machine with internet.
Images are float tensors ``[B, 3, H, W]`` in [-1, 1] (resized, centre-cropped and normalised inside
the module, differentiably) or a list of PIL images.

Expected local layouts:

* CLIP-style scorers: a transformers ``CLIPModel`` directory (``config.json`` + weights) with a
  tokenizer (``tokenizer.json`` or vocab files) in the same or a separate ``tokenizer`` directory;
  ``preprocessor_config.json`` (``image_mean``, ``image_std``, ``crop_size``) is read when present.
* HPSv2 also accepts the original open_clip checkpoint file (``HPS_v2_compressed.pt``); this needs
  the ``scorers`` extra (``open-clip-torch``) and the ViT-H-14 architecture is built without weights.
* ``aesthetic``: ``model`` is a CLIP ViT-L/14 ``CLIPModel`` directory; ``head`` is the predictor's
  ``.pth`` (``layers.{0,2,4,6,7}.weight/bias``) or a ``.safetensors`` with the same keys.
* ``imagereward``: a transformers ``BlipForImageTextRetrieval`` directory holding the BLIP weights,
  a tokenizer, ``reward_head.safetensors`` (MLP keys as above, input 768) and optionally
  ``reward_config.json`` (``{"mean": ..., "std": ..., "max_length": 35}``).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AestheticScore",
    "CLIPScore",
    "HPSv2",
    "ImageRewardScore",
    "LinearMLPHead",
    "PickScore",
    "clip_score",
    "make_aesthetic",
    "make_clip",
    "make_clip_score_metric",
    "make_hpsv2",
    "make_imagereward",
    "make_pickscore",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072

_HOW_TO = {
    "clip": "e.g. `huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR`",
    "pickscore": "e.g. `huggingface-cli download yuvalkirstain/PickScore_v1 --local-dir DIR` and the processor "
    "`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (pass it as tokenizer=...)",
    "hpsv2": "e.g. the HF-format conversion of HPSv2, or `HPS_v2_compressed.pt` from the xswu/HPSv2 hub repo "
    "(open_clip checkpoint; needs `pip install diffalign-core[scorers]`)",
    "aesthetic": "the CLIP ViT-L/14 directory (`openai/clip-vit-large-patch14`) and the head "
    "`sac+logos+ava1-l14-linearMSE.pth` from github.com/christophschuhmann/improved-aesthetic-predictor",
    "imagereward": "a transformers BLIP retrieval directory with `reward_head.safetensors` converted from "
    "THUDM/ImageReward `ImageReward.pt`",
}


def _missing(name: str, path: Any, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name}: {what} not found at {path}. Model weights are never downloaded at run time; copy them "
        f"to a local path on a machine with internet access ({_HOW_TO[name]}) and pass that path, or "
        f"set HF_HUB_OFFLINE=1 with the files already in the Hugging Face cache and pass the cached directory."
    )


def _local_dir(name: str, path: str | os.PathLike, what: str = "model directory") -> Path:
    path = Path(path)
    if not path.is_dir():
        raise _missing(name, path, what)
    return path


# --------------------------------------------------------------------------- image preprocessing


class ImagePreprocessor(nn.Module):
    """Pixels in [-1, 1] (or PIL) -> resized, centre-cropped, normalised ``[B, 3, size, size]``.

    Bicubic with antialiasing, differentiable for tensors; the same geometry as CLIP's processor
    (shortest side to ``size``, then centre crop).
    """

    def __init__(
        self, size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
    ):
        super().__init__()
        self.size = int(size)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_dir(cls, directory: Path | None, default_size: int) -> ImagePreprocessor:
        mean, std, size = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, default_size
        config = directory / "preprocessor_config.json" if directory is not None else None
        if config is not None and config.is_file():
            data = json.loads(config.read_text())
            mean, std = data.get("image_mean", mean), data.get("image_std", std)
            crop = data.get("crop_size", size)
            size = crop.get("height", size) if isinstance(crop, dict) else int(crop)
        return cls(size, mean, std)

    def to_unit(self, images: Any) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            from diffalign.core.rewards import check_pixel_images

            check_pixel_images(images)
            return (images + 1) / 2
        if isinstance(images, (list, tuple)) and images and all(hasattr(im, "convert") for im in images):
            import numpy as np

            return [
                torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[
                    None
                ]
                for im in images
            ]
        raise TypeError(
            "images must be a float tensor [B, 3, H, W] in [-1, 1] or a non-empty list of PIL images"
        )

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size):
            scale = self.size / min(h, w)
            new_h, new_w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
            if (new_h, new_w) != (h, w):
                x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
            top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
            x = x[..., top : top + self.size, left : left + self.size]
        return x

    def forward(self, images: Any) -> torch.Tensor:
        unit = self.to_unit(images)
        if isinstance(unit, list):
            x = torch.cat([self._resize(u) for u in unit])
        else:
            x = self._resize(unit)
        return (x - self.mean.to(x)) / self.std.to(x)


# --------------------------------------------------------------------------- CLIP family


def _features(output: Any) -> torch.Tensor:
    """transformers 4 returns a tensor from get_*_features, transformers 5 an output object."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def _check_prompts(images: Any, prompts: Sequence[str]) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of strings, one per image")
    if len(prompts) == 0:
        raise ValueError("empty prompt list")
    n = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    if n != len(prompts):
        raise ValueError(f"got {n} images but {len(prompts)} prompts")


class _CLIPBased(nn.Module):
    name = "clip"
    differentiable = True
    input_range = "[-1,1]"

    def __init__(
        self,
        model: str | os.PathLike | nn.Module,
        tokenizer: str | os.PathLike | Any | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
    ):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        directory = tok_dir = None
        if isinstance(model, nn.Module):
            self.model = model
        else:
            directory = _local_dir(self.name, model)
            self.model = CLIPModel.from_pretrained(directory, local_files_only=True, dtype=dtype)
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tok_dir = Path(tokenizer) if tokenizer is not None else directory
            if tok_dir is None:
                raise ValueError(f"{self.name}: pass tokenizer=... when model is an nn.Module")
            _local_dir(self.name, tok_dir, "tokenizer directory")
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        self.tokenizer = tokenizer
        config = self.model.config
        self.max_length = max_length or config.text_config.max_position_embeddings
        has_processor = tok_dir is not None and (tok_dir / "preprocessor_config.json").is_file()
        self.preprocess = ImagePreprocessor.from_dir(
            tok_dir if has_processor else directory, config.vision_config.image_size
        )
        self.model.requires_grad_(False).eval()
        self.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed_images(self, images: Any) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.device, next(self.model.parameters()).dtype)
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        out = self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return F.normalize(_features(out).float(), dim=-1)

    def cosine(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        _check_prompts(images, prompts)
        return (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)

    def forward(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        return self.score(images, prompts)


class CLIPScore(_CLIPBased):
    """CLIPScore ``100 * max(cos, 0)`` per image (Hessel et al.'s w = 100).

    torchmetrics' ``CLIPScore`` instead clamps the *batch mean* (``max(100 * mean cos, 0)``); the two
    agree when every cosine is positive, which is the usual case for real CLIP models.
    """

    name = "clip"

    def score(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        return 100 * self.cosine(images, prompts).clamp(min=0)


class PickScore(_CLIPBased):
    """PickScore: the PickScore_v1 CLIP-H model's ``logit_scale.exp() * cos(image, text)``."""

    name = "pickscore"

    def score(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)


class HPSv2(_CLIPBased):
    """HPSv2: ``cos(image, text)`` of the HPSv2-tuned CLIP ViT-H/14 (multiply by 100 for the paper scale).

    ``model`` is an HF-format ``CLIPModel`` directory, or the original open_clip checkpoint file
    (``HPS_v2_compressed.pt``; needs ``open-clip-torch``).
    """

    name = "hpsv2"

    def __init__(self, model: str | os.PathLike | nn.Module, tokenizer: Any = None, **kwargs: Any):
        if isinstance(model, (str, os.PathLike)) and Path(model).suffix in (".pt", ".pth", ".bin"):
            nn.Module.__init__(self)
            self._init_open_clip(Path(model), kwargs.get("device", "cpu"))
            return
        super().__init__(model, tokenizer, **kwargs)

    def _init_open_clip(self, checkpoint: Path, device: Any) -> None:
        if not checkpoint.is_file():
            raise _missing(self.name, checkpoint, "checkpoint file")
        try:
            import open_clip
        except ImportError as err:
            raise ImportError(
                "loading the original HPSv2 checkpoint needs open_clip: pip install 'diffalign-core[scorers]'"
            ) from err
        model = open_clip.create_model("ViT-H-14", pretrained=None)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
        self.model = model.requires_grad_(False).eval().to(device)
        self._open_clip_tokenizer = open_clip.get_tokenizer("ViT-H-14")
        self.preprocess = ImagePreprocessor(224)
        self.tokenizer = None

    def embed_images(self, images: Any) -> torch.Tensor:
        if getattr(self, "_open_clip_tokenizer", None) is None:
            return super().embed_images(images)
        pixels = self.preprocess(images).to(self.device)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        if getattr(self, "_open_clip_tokenizer", None) is None:
            return super().embed_texts(prompts)
        return F.normalize(
            self.model.encode_text(self._open_clip_tokenizer(list(prompts)).to(self.device)).float(), dim=-1
        )

    def score(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        return self.cosine(images, prompts)


def clip_score(images: Any, prompts: Sequence[str], model: nn.Module, tokenizer: Any) -> torch.Tensor:
    """Per-image CLIPScore ``100 * max(cos, 0)`` with an already-loaded CLIP model and tokenizer."""
    return CLIPScore(model, tokenizer).score(images, prompts)


class _TensorFeatureCLIP(nn.Module):
    """Makes ``get_image_features`` / ``get_text_features`` return tensors (transformers 5 returns
    output objects, which torchmetrics 1.9's CLIPScore cannot normalise)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _features(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _features(self.model.get_text_features(*args, **kwargs))


def make_clip_score_metric(loader: Any):
    """torchmetrics ``CLIPScore`` with the model given as a callable ``() -> (CLIPModel, CLIPProcessor)``.

    Hub ids are not accepted (torchmetrics would download them); load from a local directory in the
    callable, e.g. ``lambda: (CLIPModel.from_pretrained(d, local_files_only=True),
    CLIPProcessor.from_pretrained(d, local_files_only=True))``.
    """
    if not callable(loader):
        raise TypeError(
            "pass a callable returning (model, processor) loaded from a local directory; string ids make "
            "torchmetrics download (and local directories raise ValueError in torchmetrics 1.9)"
        )
    from torchmetrics.multimodal.clip_score import CLIPScore as TorchmetricsCLIPScore

    def wrapped():
        model, processor = loader()
        return _TensorFeatureCLIP(model), processor

    return TorchmetricsCLIPScore(model_name_or_path=wrapped)


# --------------------------------------------------------------------------- MLP heads


class LinearMLPHead(nn.Module):
    """The aesthetic / ImageReward head: Linear layers with dropout and **no** activations between them.

    Built from a state dict with keys ``layers.<i>.weight`` / ``layers.<i>.bias`` (any index gaps are
    the dropout slots), so both published heads load without knowing their widths in advance.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        state = {k.removeprefix("mlp."): v for k, v in state_dict.items()}
        indices = sorted(
            {int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")}
        )
        if not indices:
            raise ValueError(f"no 'layers.<i>.weight' keys in the head state dict; got {sorted(state)[:6]}")
        layers: dict[str, nn.Module] = {}
        for position in range(indices[-1] + 1):
            if position in indices:
                weight = state[f"layers.{position}.weight"]
                layers[str(position)] = nn.Linear(weight.shape[1], weight.shape[0])
            else:
                layers[str(position)] = nn.Dropout(0.0)
        self.layers = nn.Sequential(OrderedDict(layers))
        self.layers.load_state_dict(
            {k.removeprefix("layers."): v for k, v in state.items() if k.startswith("layers.")}, strict=True
        )
        self.in_features = state[f"layers.{indices[0]}.weight"].shape[1]
        if state[f"layers.{indices[-1]}.weight"].shape[0] != 1:
            raise ValueError("the head's last Linear layer must output one value")

    @classmethod
    def load(cls, path: str | os.PathLike, name: str) -> LinearMLPHead:
        path = Path(path)
        if not path.is_file():
            raise _missing(name, path, "head weights file")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        return cls(state)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)


class AestheticScore(nn.Module):
    """LAION improved-aesthetic-predictor: MLP head on the L2-normalised CLIP image embedding.

    ``prompts`` are accepted for the ``RewardModel`` interface and ignored beyond a length check.
    """

    name = "aesthetic"
    differentiable = True
    input_range = "[-1,1]"

    def __init__(
        self,
        model: str | os.PathLike | nn.Module,
        head: str | os.PathLike | nn.Module,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        from transformers import CLIPModel

        directory = None
        if isinstance(model, nn.Module):
            self.model = model
        else:
            directory = _local_dir(self.name, model)
            self.model = CLIPModel.from_pretrained(directory, local_files_only=True, dtype=dtype)
        self.head = head if isinstance(head, nn.Module) else LinearMLPHead.load(head, self.name)
        proj = self.model.config.projection_dim
        if getattr(self.head, "in_features", proj) != proj:
            raise ValueError(
                f"aesthetic head expects {self.head.in_features}-d embeddings, the CLIP model gives {proj}"
            )
        self.preprocess = ImagePreprocessor.from_dir(directory, self.model.config.vision_config.image_size)
        self.requires_grad_(False).eval()
        self.to(device)

    def score(self, images: Any, prompts: Sequence[str] | None = None) -> torch.Tensor:
        if prompts is not None:
            _check_prompts(images, prompts)
        param = next(self.model.parameters())
        pixels = self.preprocess(images).to(param.device, param.dtype)
        embeds = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        return self.head(embeds)

    def forward(self, images: Any, prompts: Sequence[str] | None = None) -> torch.Tensor:
        return self.score(images, prompts)


class ImageRewardScore(nn.Module):
    """ImageReward-style reward: BLIP text encoder [CLS] cross-attending to ViT image tokens -> MLP.

    The score is ``(mlp(cls) - mean) / std`` with ImageReward-v1.0's mean/std unless
    ``reward_config.json`` says otherwise; prompts are tokenised to ``max_length`` 35 as in ImageReward.
    """

    name = "imagereward"
    differentiable = True
    input_range = "[-1,1]"

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        directory = _local_dir(self.name, model)
        self.model = BlipForImageTextRetrieval.from_pretrained(directory, local_files_only=True, dtype=dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.head = LinearMLPHead.load(directory / "reward_head.safetensors", self.name)
        config_path = directory / "reward_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.mean = float(config.get("mean", IMAGEREWARD_MEAN))
        self.std = float(config.get("std", IMAGEREWARD_STD))
        self.max_length = int(config.get("max_length", 35))
        self.preprocess = ImagePreprocessor.from_dir(directory, self.model.config.vision_config.image_size)
        self.requires_grad_(False).eval()
        self.to(device)

    def score(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        _check_prompts(images, prompts)
        param = next(self.model.parameters())
        pixels = self.preprocess(images).to(param.device, param.dtype)
        image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(param.device)
        text = self.model.text_encoder(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        )
        reward = self.head(text.last_hidden_state[:, 0, :].float())
        return (reward - self.mean) / self.std

    def forward(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        return self.score(images, prompts)


# --------------------------------------------------------------------------- entry-point factories


def make_clip(
    model: str | os.PathLike, tokenizer: str | os.PathLike | None = None, **kwargs: Any
) -> CLIPScore:
    return CLIPScore(model, tokenizer, **kwargs)


def make_pickscore(
    model: str | os.PathLike, tokenizer: str | os.PathLike | None = None, **kwargs: Any
) -> PickScore:
    return PickScore(model, tokenizer, **kwargs)


def make_hpsv2(model: str | os.PathLike, tokenizer: str | os.PathLike | None = None, **kwargs: Any) -> HPSv2:
    return HPSv2(model, tokenizer, **kwargs)


def make_aesthetic(model: str | os.PathLike, head: str | os.PathLike, **kwargs: Any) -> AestheticScore:
    return AestheticScore(model, head, **kwargs)


def make_imagereward(model: str | os.PathLike, **kwargs: Any) -> ImageRewardScore:
    return ImageRewardScore(model, **kwargs)
