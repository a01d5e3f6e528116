"""A checkpoint whose weights do not match its model is an error, never a silent re-initialisation."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffalign.core.models import WeightLoadingError, check_loading_info, load_pipeline, load_unet
from diffalign.core.shapes import model_path


def _copy_unet_teacher(tmp_path):
    dst = tmp_path / "teacher"
    shutil.copytree(model_path("unet"), dst)
    return dst


def _edit(file, fn):
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file)


def test_check_loading_info_rejects_missing_unexpected_and_mismatched():
    check_loading_info({"missing_keys": [], "unexpected_keys": set(), "mismatched_keys": []}, "m")  # clean
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        with pytest.raises(WeightLoadingError, match=f"1 {key.replace('_', ' ')}: a.weight"):
            check_loading_info({key: ["a.weight"]}, "m")


def test_pipeline_with_a_text_encoder_missing_weights_is_an_error(tmp_path):
    path = _copy_unet_teacher(tmp_path)
    pipe = load_pipeline(path)  # control: the intact copy loads, in float32
    assert pipe.text_encoder.dtype == torch.float32
    file = path / "text_encoder" / "model.safetensors"
    dropped = sorted(load_file(file))[-1]
    _edit(file, lambda t: t.pop(dropped))
    with pytest.raises(WeightLoadingError, match="missing keys") as err:
        load_pipeline(path)
    assert dropped.split(".")[-2] in str(err.value) and "text_encoder" in str(err.value)


def test_renamed_weights_are_missing_and_unexpected(tmp_path):
    path = _copy_unet_teacher(tmp_path)
    file = path / "unet" / "diffusion_pytorch_model.safetensors"
    key = sorted(load_file(file))[0]
    _edit(file, lambda t: t.__setitem__("renamed." + key, t.pop(key)))
    with pytest.raises(WeightLoadingError, match="unet"):
        load_unet(path)
    with pytest.raises(WeightLoadingError):
        load_pipeline(path)
