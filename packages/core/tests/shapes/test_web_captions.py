"""Web-like captions and the ``shapes/unet-web`` base (LoRA adapter on the UNet teacher)."""

import json
import random

import pytest
import torch

from diffalign.core.shapes.grammar import parse_prompt, sample_specs, vocabulary
from diffalign.core.shapes.questions import scene_scores
from diffalign.core.shapes.render import scene_for_spec
from diffalign.core.shapes.web_captions import (
    ADAPTER_FILE,
    WEB_ASSET,
    WebBaseConfig,
    WebCaptionConfig,
    web_caption,
)

N = 3000


def _captions(skill, cfg, n=N, seed=0):
    rng = random.Random(seed)
    out = []
    for spec, prompt in sample_specs(skill, n, "train", rng):
        scene = scene_for_spec(spec, rng)
        cap, err = web_caption(spec, prompt, rng, cfg)
        out.append((spec, prompt, scene, cap, err))
    return out


@pytest.mark.parametrize(
    "skill,errors",
    [
        ("count", ("count_drop", "count_wrong")),
        ("spatial", ("relation_drop", "relation_swap")),
        ("color", ("color_drop", "color_swap")),
    ],
)
def test_error_rates_follow_the_config(skill, errors):
    cfg = WebCaptionConfig(
        count_drop=0.25,
        count_wrong=0.15,
        relation_drop=0.2,
        relation_swap=0.35,
        color_drop=0.1,
        color_swap=0.45,
    )
    got = [e for *_, e in _captions(skill, cfg)]
    for err in errors:
        rate = getattr(cfg, err)
        sd = (rate * (1 - rate) / N) ** 0.5
        assert abs(got.count(err) / N - rate) < 4 * sd, (err, got.count(err) / N)
    assert set(got) <= {"ok", *errors}


def test_object_captions_stay_exact():
    for _, prompt, _, cap, err in _captions("object", WebCaptionConfig(), n=200):
        assert cap == prompt and err == "ok"


@pytest.mark.parametrize("skill", ["count", "spatial", "color"])
def test_captions_say_what_each_error_says_about_the_render(skill):
    """Brute force on the rendered scene: exact captions hold, wrong / swapped ones are false of it,
    dropped ones say less (their grammar reading, when there is one, holds)."""
    vocab = set(vocabulary())
    for spec, prompt, scene, cap, err in _captions(skill, WebCaptionConfig(), n=400):
        assert set(cap.split()) <= vocab, cap
        if err == "ok":
            assert parse_prompt(cap) == spec, (prompt, cap)
            assert scene_scores([scene], [cap]) == [1.0]
        elif err in ("count_wrong", "relation_swap", "color_swap"):
            assert scene_scores([scene], [cap])[0] < 1.0, (prompt, cap, err)
        else:  # a drop: the caption carries less, never something false
            try:
                parsed = parse_prompt(cap)
            except ValueError:
                parsed = None
            if parsed is not None:
                assert parsed.skill != skill or skill == "count"
                assert scene_scores([scene], [cap]) == [1.0], (prompt, cap, err)
            if err == "count_drop":
                assert not {"one", "two", "three"} & set(cap.split())
            if err == "color_drop":
                assert not {"red", "green", "blue", "yellow"} & set(cap.split())
            if err == "relation_drop":
                assert " and " in cap


def test_config_is_validated():
    with pytest.raises(ValueError, match="count_drop"):
        WebCaptionConfig(count_drop=0.7, count_wrong=0.5)
    with pytest.raises(ValueError, match="unknown web-caption"):
        WebCaptionConfig.from_dict({"count_dropp": 0.1})
    with pytest.raises(ValueError, match="unknown web-base"):
        WebBaseConfig.from_dict({"rank": 4, "lora": 1})
    cfg = WebBaseConfig.from_dict({"rank": 4, "captions": {"color_swap": 0.5}})
    assert cfg.captions.color_swap == 0.5 and cfg.captions.count_drop == WebCaptionConfig.count_drop


def test_committed_adapter_records_its_rates():
    meta = json.loads((WEB_ASSET / "config.json").read_text())
    rates = WebCaptionConfig.from_dict(meta["config"]["captions"])
    assert rates.count_drop + rates.count_wrong > 0 and rates.relation_drop + rates.relation_swap > 0
    assert (WEB_ASSET / ADAPTER_FILE).stat().st_size < 2_000_000


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    e = torch.randn(2, 20, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), encoder_hidden_states=e).sample


def test_adapter_round_trips_through_load_lora_weights(tmp_path):
    from diffalign.core.shapes import model_path
    from diffalign.core.shapes.evaluate import load_shapes_pipeline
    from diffalign.core.shapes.web_captions import add_unet_lora, save_unet_lora

    pipe = load_shapes_pipeline(model_path("unet"))
    base = _unet_out(pipe.unet)
    params = add_unet_lora(pipe.unet, rank=4)
    assert params and all(p.requires_grad for p in params)
    assert torch.allclose(_unet_out(pipe.unet), base, atol=1e-6)  # B = 0 at init: no change yet
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    adapted = _unet_out(pipe.unet)
    assert (adapted - base).abs().max() > 1e-3
    save_unet_lora(pipe.unet, tmp_path / "ad", {"config": {}}, dtype=torch.float32)
    save_unet_lora(pipe.unet, tmp_path / "ad16", {"config": {}})  # the default: fp16, half the size
    size16 = (tmp_path / "ad16" / ADAPTER_FILE).stat().st_size
    assert size16 < 0.6 * (tmp_path / "ad" / ADAPTER_FILE).stat().st_size
    fresh = load_shapes_pipeline(model_path("unet"))
    fresh.load_lora_weights(str(tmp_path / "ad"), weight_name=ADAPTER_FILE)
    assert torch.allclose(_unet_out(fresh.unet), adapted, atol=1e-5)
    half = load_shapes_pipeline(model_path("unet"))
    half.load_lora_weights(str(tmp_path / "ad16"), weight_name=ADAPTER_FILE)
    assert torch.allclose(_unet_out(half.unet), adapted, atol=5e-3)
    fresh.fuse_lora()
    fresh.unload_lora_weights()
    assert torch.allclose(_unet_out(fresh.unet), adapted, atol=1e-4)


def test_training_resumes_and_changes_only_the_adapter(tmp_path):
    from safetensors.torch import load_file

    from diffalign.core.shapes.web_captions import train_web_base

    cfg = WebBaseConfig(steps=2, batch_size=2, export_every=0, log_every=1, rank=2)
    logs = []
    train_web_base(cfg, tmp_path / "run", log=logs.append)
    first = load_file(str(tmp_path / "run" / "adapter" / ADAPTER_FILE))
    assert first and all("lora_" in k for k in first)
    # rerun with the same horizon: nothing trains, the restored LoRA is written again unchanged
    train_web_base(cfg, tmp_path / "run", log=logs.append)
    again = load_file(str(tmp_path / "run" / "adapter" / ADAPTER_FILE))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(v.abs().max() > 0 for k, v in first.items() if "lora_B" in k)  # it trained
    cfg3 = WebBaseConfig(steps=3, batch_size=2, export_every=0, log_every=1, rank=2)
    logs = []
    train_web_base(cfg3, tmp_path / "run", log=logs.append)
    assert any("resumed from step 2" in m for m in logs)
    assert any("step 3" in m for m in logs) and not any("step 1 " in m for m in logs)
    meta = json.loads((tmp_path / "run" / "adapter" / "config.json").read_text())
    assert meta["steps"] == 3


def test_resolver_finds_the_web_base(tmp_path, monkeypatch):
    from diffalign.core.models import resolve_model_path
    from diffalign.core.shapes.evaluate import load_shapes_pipeline
    from diffalign.core.shapes.web_captions import load_web_pipeline

    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path))
    path = resolve_model_path("shapes/unet-web")
    assert (path / "model_index.json").exists() and str(path).startswith(str(tmp_path))
    assert (path / "web_captions.json").exists()
    web = load_shapes_pipeline(path)
    clean = load_shapes_pipeline(resolve_model_path("shapes/unet"))
    fused = load_web_pipeline()
    a, b, c = _unet_out(web.unet), _unet_out(clean.unet), _unet_out(fused.unet)
    assert torch.allclose(a, c, atol=1e-5)
    assert (a - b).abs().max() > 1e-3  # the web base is not the clean teacher
    stamp = (path / "model_index.json").stat().st_mtime
    assert resolve_model_path("shapes/unet-web") == path  # cached, not rebuilt
    assert (path / "model_index.json").stat().st_mtime == stamp
