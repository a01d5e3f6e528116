"""A LoRA written by a method loads with plain diffusers (peft for PixArt, which has no pipeline loader)
and changes the network output by exactly as much as the method's own loader does.

selma writes experts and merges (its own loader fuses ``alpha/r B A`` into the weights); mlcm writes
LoRA students (its own loader is ``apply_student``). DI* exports a fused pipeline, not a LoRA file.
"""

from __future__ import annotations

import pytest
import torch

from diffalign.core import testing
from diffalign.core.denoisers import denoiser_for
from diffalign.core.models import network_of

FACTORIES = {
    "sd": testing.tiny_sd_pipeline,
    "sdxl": testing.tiny_sdxl_pipeline,
    "pixart": testing.tiny_pixart_pipeline,
}
PROMPTS = ["a red circle", "two blue squares"]


def _output(pipe) -> torch.Tensor:
    den = denoiser_for(pipe)
    z = torch.randn(den.latent_shape(2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return den.forward(None, z, torch.tensor([10, 600]), den.encode(PROMPTS).cond)


def _plain_load(pipe, folder) -> None:
    """Nothing of diffalign's: diffusers' pipeline loader, or peft with the config stored in the file."""
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(str(folder))
        return
    import json

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), framework="pt") as fh:
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
        state = {k.split(".", 1)[1]: fh.get_tensor(k) for k in fh.keys()}
    config = {k.split(".", 1)[1]: v for k, v in meta.items()}
    known = set(LoraConfig.__dataclass_fields__)
    inject_adapter_in_model(LoraConfig(**{k: v for k, v in config.items() if k in known}), pipe.transformer)
    set_peft_model_state_dict(pipe.transformer, state)


@pytest.mark.parametrize("family", list(FACTORIES))
def test_selma_expert_file_acts_as_selma_fuses_it(family, tmp_path):
    from diffalign.core.lora import default_targets
    from diffalign.selma.lora import LoraAdapter, load_adapter, save_adapter
    from diffalign.selma.merge import fuse_deltas

    make = FACTORIES[family]
    base = _output(make())
    model = network_of(make())
    targets = tuple(default_targets(family))
    g = torch.Generator().manual_seed(7)
    layers = {}
    for name, module in model.named_modules():
        if name.endswith(targets) and hasattr(module, "weight"):
            out_dim, in_dim = module.weight.shape[:2]
            layers[name] = (
                0.3 * torch.randn(2, in_dim, generator=g),
                0.3 * torch.randn(out_dim, 2, generator=g),
            )
    prefix = "transformer" if family == "pixart" else "unet"
    save_adapter(LoraAdapter(layers, dict.fromkeys(layers, 6.0), prefix=prefix), tmp_path)

    plain = make()
    _plain_load(plain, tmp_path)
    fused = make()
    fuse_deltas(network_of(fused), load_adapter(tmp_path).deltas())
    change_plain, change_selma = _output(plain) - base, _output(fused) - base
    assert change_plain.abs().max() > 1e-3
    torch.testing.assert_close(change_plain, change_selma, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(FACTORIES))
def test_mlcm_student_file_acts_as_apply_student_and_the_trained_student(family, tmp_path):
    from diffalign.mlcm.config import MLCMRecipe
    from diffalign.mlcm.inference import apply_student
    from diffalign.mlcm.train import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = MLCMRecipe.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "model": {"source": "tiny"},
            "student": {"lora_rank": 2, "lora_alpha": 6.0},
            "data": {"prompts_file": str(prompts)},
            "distill": {"batch_size": 2, "guidance_scale": 4.0},
            "stage1": {"iterations": 1, "lr": 1e-2},
            "stage2": {"iterations": 0},
        }
    )
    make = FACTORIES[family]
    base = _output(make())
    trained_pipe = make()
    result = train(cfg, pipe=trained_pipe)
    trained = _output(trained_pipe)
    plain = make()
    _plain_load(plain, result.student_dir)
    own = apply_student(make(), result.student_dir)
    assert (trained - base).abs().max() > 1e-6
    torch.testing.assert_close(_output(plain) - base, trained - base, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_output(own) - base, trained - base, atol=1e-5, rtol=1e-4)
