"""core.lora: a saved adapter loads with plain diffusers / peft and acts exactly as the trained one."""

from __future__ import annotations

import pytest
import torch

from diffalign.core import testing
from diffalign.core.lora import (
    LORA_WEIGHT_NAME,
    LoraError,
    add_lora,
    default_targets,
    inject_lora,
    load_lora,
    make_lora_config,
    read_lora,
    save_lora,
)
from diffalign.core.models import detect_family, network_of

FACTORIES = {
    "sd": testing.tiny_sd_pipeline,
    "sdxl": testing.tiny_sdxl_pipeline,
    "pixart": testing.tiny_pixart_pipeline,
}


def _output(pipe) -> torch.Tensor:
    from diffalign.core.denoisers import denoiser_for

    den = denoiser_for(pipe)
    z = torch.randn(den.latent_shape(2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return den.forward(
            None, z, torch.tensor([10, 600]), den.encode(["a red circle", "a blue square"]).cond
        )


def _trained_adapter(pipe, rank=2, alpha=6.0, preset="attention"):
    """An adapter with non-zero B (as after training) and alpha != rank, so the scale matters."""
    model = network_of(pipe)
    add_lora(model, make_lora_config(rank, alpha, default_targets(detect_family(pipe), preset)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("family", list(FACTORIES))
def test_saved_adapter_loads_with_plain_diffusers_or_peft(family, tmp_path):
    pipe = FACTORIES[family]()
    base = _output(pipe)
    _trained_adapter(pipe)
    trained = _output(pipe)
    assert (trained - base).abs().max() > 1e-3
    save_lora(tmp_path, network_of(pipe), family)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LORA_WEIGHT_NAME]  # no temporary left behind

    fresh = FACTORIES[family]()
    if hasattr(fresh, "load_lora_weights"):  # SD, SDXL: diffusers' own loader, nothing of ours
        fresh.load_lora_weights(str(tmp_path))
    else:  # PixArt has no pipeline loader: plain peft with the config stored in the file
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

        _, layers, config = read_lora(tmp_path)
        known = set(LoraConfig.__dataclass_fields__)
        inject_adapter_in_model(
            LoraConfig(**{k: v for k, v in config.items() if k in known}), fresh.transformer
        )
        set_peft_model_state_dict(fresh.transformer, layers)
    torch.testing.assert_close(_output(fresh), trained, atol=1e-5, rtol=1e-5)

    ours = FACTORIES[family]()
    load_lora(ours, tmp_path, adapter_name="mine")
    torch.testing.assert_close(_output(ours), trained, atol=1e-5, rtol=1e-5)

    # negative control: the same tensors without the stored alpha (scale 1 instead of 3) act differently
    _, layers, _ = read_lora(tmp_path)
    unscaled = FACTORIES[family]()
    inject_lora(network_of(unscaled), layers, config=None)
    assert (_output(unscaled) - trained).abs().max() > 1e-4


def test_full_preset_covers_unet_convolutions(tmp_path):
    pipe = testing.tiny_sd_pipeline()
    base = _output(pipe)
    model = _trained_adapter(pipe, preset="full")
    wrapped = {n.split(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert any(n.endswith("conv1") for n in wrapped) and any(n.endswith("time_emb_proj") for n in wrapped)
    trained = _output(pipe)
    save_lora(tmp_path, model, "sd")
    fresh = testing.tiny_sd_pipeline()
    fresh.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(_output(fresh), trained, atol=1e-5, rtol=1e-5)
    assert (trained - base).abs().max() > 1e-3


def test_add_lora_trains_only_the_adapter_and_refuses_unmatched_targets():
    pipe = testing.tiny_pixart_pipeline()
    wrapped = add_lora(pipe.transformer, make_lora_config(2, targets=default_targets("pixart", "full")))
    assert wrapped and all(
        n.endswith(("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")) for n in wrapped
    )
    trainable = [n for n, p in pipe.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(LoraError, match="no_such_module"):
        add_lora(testing.tiny_unet(), make_lora_config(2, targets=["no_such_module"]))
    with pytest.raises(LoraError, match="preset"):
        default_targets("sd", "everything")
    with pytest.raises(LoraError, match="rank"):
        make_lora_config(0)


def test_wrong_architecture_is_refused_with_a_clear_error(tmp_path):
    pipe = testing.tiny_sd_pipeline()
    _trained_adapter(pipe)
    save_lora(tmp_path, pipe.unet, "sd")
    with pytest.raises(LoraError, match="adapts a 'unet'"):
        load_lora(testing.tiny_pixart_pipeline(), tmp_path)
    sdxl = testing.tiny_sdxl_pipeline()
    with pytest.raises(LoraError, match="another architecture"):
        load_lora(sdxl, tmp_path)
    assert not any("lora_" in n for n, _ in sdxl.unet.named_parameters())  # nothing was attached
    with pytest.raises(LoraError, match="no LoRA weights"):
        load_lora(testing.tiny_sd_pipeline(), tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / LORA_WEIGHT_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match="cannot read"):
        read_lora(tmp_path / "bad")
