"""Architecture coverage: the tiny Qwen2.5-VL used everywhere is the real model class."""

import numpy as np
import torch
from PIL import Image

from diffalign.core.testing.vlm import is_tiny_vlm_dir, load_tiny_vlm, save_tiny_vlm, tiny_qwen2_5_vl


def _inputs(processor, n_images=2, size=16):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n_images)]
    content = [{"type": "text", "text": "prompt : a red circle"}]
    for k in range(n_images):
        content += [{"type": "text", "text": f"image {k + 1} :"}, {"type": "image"}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return processor(text=[text], images=[images], return_tensors="pt")


def test_tiny_qwen2_5_vl_forward_generate_and_roundtrip(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, processor = tiny_qwen2_5_vl(0)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert sum(p.numel() for p in model.parameters()) < 100_000
    inputs = _inputs(processor)
    image_id = model.config.image_token_id
    assert int((inputs["input_ids"] == image_id).sum()) == 8  # 2 images x (16/4/2)^2 merged tokens
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == image_id)
    logits = model(**inputs).logits
    assert logits.shape[-1] == model.config.text_config.vocab_size and torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert (
        out.shape[1] == inputs["input_ids"].shape[1] + 4
        or out[0, -1] == model.config.text_config.eos_token_id
    )
    # same seed -> same weights; other seed -> different weights
    same, _ = tiny_qwen2_5_vl(0)
    other, _ = tiny_qwen2_5_vl(1)
    assert torch.equal(same(**inputs).logits, logits)
    assert not torch.allclose(other(**inputs).logits, logits)
    save_tiny_vlm(model, processor, tmp_path / "m")
    assert is_tiny_vlm_dir(tmp_path / "m") and (tmp_path / "m" / "model.safetensors").is_file()
    loaded, loaded_processor = load_tiny_vlm(tmp_path / "m")
    assert torch.allclose(loaded(**_inputs(loaded_processor)).logits, logits, atol=1e-6)


def test_one_training_step_changes_weights():
    model, processor = tiny_qwen2_5_vl(0)
    inputs = _inputs(processor)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.lm_head.weight.detach().clone()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0  # gradients reach the vision tower
    opt.step()
    assert not torch.equal(before, model.lm_head.weight)


def test_tokenizer_keeps_markup_when_skipping_special_tokens():
    _, processor = tiny_qwen2_5_vl(0)
    tok = processor.tokenizer
    ids = tok("<think> image 1 : match . </think> <answer> 2 </answer> <|im_end|>")["input_ids"]
    assert tok.unk_token_id not in ids
    text = tok.decode(ids, skip_special_tokens=True)
    assert text.split() == "<think> image 1 : match . </think> <answer> 2 </answer>".split()
