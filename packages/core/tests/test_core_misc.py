import subprocess
import sys

import pytest
import torch

from diffalign.core import testing as T
from diffalign.core.models import ModelNotFoundError, resolve_model_path
from diffalign.core.report import markdown_table, save_image_grid, scatter_plot, write_json
from diffalign.core.rewards import (
    check_pixel_images,
    get_reward,
    list_rewards,
    register_reward,
    unregister_reward,
)


class ConstReward:
    name = "const"
    differentiable = True
    input_range = "[-1,1]"

    def __init__(self, value=1.0):
        self.value = value

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3)) * 0 + self.value


def test_reward_registry():
    register_reward("const-test", ConstReward)
    try:
        assert "const-test" in list_rewards()
        reward = get_reward("const-test", value=2.0)
        assert reward.score(torch.zeros(2, 3, 4, 4), ["a", "b"]).tolist() == [2.0, 2.0]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("const-test", ConstReward)
    finally:
        unregister_reward("const-test")
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        get_reward("nope")


def test_module_factory_specs_resolve_in_one_place():
    from diffalign.core.factory import load_factory
    from diffalign.core.shapes.scoring import shapes_reward

    assert load_factory("diffalign.core.shapes.scoring:shapes_reward") is shapes_reward
    assert load_factory("collections:OrderedDict.fromkeys")("ab") == {"a": None, "b": None}
    # get_reward takes the same spec as a registered name
    by_spec = get_reward("diffalign.core.shapes.scoring:shapes_reward")
    assert by_spec.name == get_reward("shapes-reward").name
    cases = [
        ("diffalign.core.shapes.scoring", "must look like 'package.module:factory'"),
        ("diffalign.core.shapes.scoring:", "must look like"),
        ("no_such_module_xyz:f", "cannot import reward 'no_such_module_xyz:f'"),
        ("diffalign.core.shapes.scoring:nope", "has no attribute 'nope'"),
        ("diffalign.core.shapes.scoring:ASSETS", "not a callable"),
    ]
    for spec, message in cases:
        with pytest.raises(ValueError, match=message):
            load_factory(spec, "reward")
    with pytest.raises(ValueError, match="cannot import reward"):
        get_reward("no_such_module_xyz:f")


def test_pixel_checks():
    check_pixel_images(torch.zeros(1, 3, 8, 8), ["x"])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        check_pixel_images(torch.full((1, 3, 8, 8), 200.0))
    with pytest.raises(ValueError, match="empty prompt list"):
        check_pixel_images(torch.zeros(1, 3, 8, 8), [])
    with pytest.raises(ValueError, match="32x32"):
        check_pixel_images(torch.zeros(1, 3, 8, 8), size=32)
    with pytest.raises(ValueError, match="shape"):
        check_pixel_images(torch.zeros(1, 1, 8, 8))


def test_offline_model_error_names_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not-a-real/model-id.*local-dir"):
        resolve_model_path("not-a-real/model-id")
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model_path("./missing/dir")


@pytest.mark.parametrize(
    "factory", ["tiny_sd_pipeline", "tiny_sdxl_pipeline", "tiny_pixart_pipeline", "tiny_flux_pipeline"]
)
def test_tiny_pipelines_sample(factory):
    pipe = getattr(T, factory)()
    kwargs = {"num_inference_steps": 2, "height": 16, "width": 16, "output_type": "pt"}
    if factory == "tiny_pixart_pipeline":
        kwargs.update(max_sequence_length=16, use_resolution_binning=False)
    if factory == "tiny_flux_pipeline":
        kwargs.update(max_sequence_length=16)
    out = pipe(["a red circle"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


def test_tiny_models_are_seeded_and_forward():
    a, b = T.tiny_unet(seed=3), T.tiny_unet(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    dit = T.tiny_dit_transformer()
    out = dit(torch.randn(1, 4, 8, 8), timestep=torch.tensor([5]), class_labels=torch.tensor([1])).sample
    assert out.shape == (1, 8, 8, 8)
    tok = T.tiny_tokenizer()
    ids = tok("A red circle, left of a square!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids[1:-2]


def test_report_outputs(tmp_path):
    grid = save_image_grid(torch.rand(4, 3, 8, 8) * 2 - 1, tmp_path / "g.png", nrow=2, captions=list("abcd"))
    assert grid.stat().st_size > 0
    assert scatter_plot({"a": ([1, 2], [3, 4])}, tmp_path / "s.png").exists()
    table = markdown_table([{"x": 1.23456, "y": "z"}])
    assert "| 1.235 | z |" in table
    assert write_json({"t": torch.tensor([1.0])}, tmp_path / "r.json").read_text().strip().startswith("{")


def test_umbrella_cli_help_and_info():
    out = subprocess.run(
        [sys.executable, "-m", "diffalign.core.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "info" in out.stdout
    info = subprocess.run(
        [sys.executable, "-m", "diffalign.core.cli", "info"], capture_output=True, text=True
    )
    assert info.returncode == 0, info.stderr
    assert "diffalign-core" in info.stdout and "torch" in info.stdout and "deepspeed" in info.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "diffalign.core.cli", "config", "schema", "nope"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown method" in bad.stderr


def test_load_vlm_reads_a_saved_tiny_qwen2_5_vl(tmp_path):
    from diffalign.core.models import load_vlm
    from diffalign.core.testing.vlm import save_tiny_vlm

    model, processor = T.tiny_qwen2_5_vl()
    save_tiny_vlm(model, processor, tmp_path / "vlm")
    loaded, loaded_processor = load_vlm(tmp_path / "vlm")
    assert type(loaded).__name__ == "Qwen2_5_VLForConditionalGeneration"
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    assert (
        loaded_processor.tokenizer("a red circle").input_ids == processor.tokenizer("a red circle").input_ids
    )


def test_load_vlm_error_names_the_directory_and_tiny_vlm_is_a_production_module(tmp_path):
    from diffalign.core import testing, tiny_vlm
    from diffalign.core.models import ModelNotFoundError, load_vlm

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="could not load VLM .*empty"):
        load_vlm(tmp_path / "empty")
    assert testing.vlm.load_tiny_vlm is tiny_vlm.load_tiny_vlm  # tests keep their name for it


def test_load_pipeline_casts_every_component_to_one_dtype(tmp_path):
    """Weights stored in fp16 (as the shapes teachers are) must not leave a half-precision text encoder."""
    from diffalign.core.models import load_pipeline

    pipe = T.tiny_sd_pipeline()
    pipe.text_encoder.half()
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_pipeline(tmp_path / "pipe")
    dtypes = {
        name: next(c.parameters()).dtype for name, c in loaded.components.items() if hasattr(c, "parameters")
    }
    assert set(dtypes.values()) == {torch.float32}, dtypes
    assert (
        next(load_pipeline(tmp_path / "pipe", dtype=torch.bfloat16).unet.parameters()).dtype == torch.bfloat16
    )
