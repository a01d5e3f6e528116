import copy

import pytest
import torch

from diffalign.selma import merge as M
from diffalign.selma.lora import AdapterError, LoraAdapter, load_adapter, save_adapter


def rand_adapter(seed, modules, rank, alpha=None, out=6, inp=5, base="base/model"):
    g = torch.Generator().manual_seed(seed)
    layers = {m: (torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)) for m in modules}
    return LoraAdapter(layers, {m: float(alpha or rank) for m in modules}, base_model=base)


def brute_delta(adapter, module):
    a, b = adapter.layers[module]
    s = adapter.alphas[module] / a.shape[0]
    out = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64)
    for k in range(a.shape[0]):  # sum of rank-1 outer products, independent of the matmul path
        out += s * torch.outer(b[:, k].double(), a[k].double())
    return out


def test_linear_merge_equals_weighted_sum_of_updates():
    mods = ["x.to_q", "x.to_k"]
    ads = [
        rand_adapter(0, mods, 2, alpha=3),
        rand_adapter(1, mods, 4, alpha=4),
        rand_adapter(2, mods, 3, alpha=1),
    ]
    w = [0.2, 0.5, 0.3]
    res = M.merge_adapters(ads, method="linear", weights=w)
    for m in mods:
        ref = sum(wi * brute_delta(ad, m) for wi, ad in zip(w, ads))
        torch.testing.assert_close(res.deltas[m], ref)
    assert any("different LoRA ranks" in n for n in res.notes)
    # default weights are uniform 1/n (not the official script's 1/len(model_id string))
    uni = M.merge_adapters(ads, method="linear")
    assert uni.weights == pytest.approx([1 / 3] * 3)
    ref = sum(brute_delta(ad, "x.to_q") for ad in ads) / 3
    torch.testing.assert_close(uni.deltas["x.to_q"], ref)
    buggy = 1 / len("stabilityai/stable-diffusion-2")
    assert not torch.allclose(uni.deltas["x.to_q"], buggy * sum(brute_delta(ad, "x.to_q") for ad in ads))


def test_concatenated_lora_is_exact_and_peft_style_factor_average_is_not():
    mods = ["m"]
    ads = [rand_adapter(3, mods, 3), rand_adapter(4, mods, 3)]
    res = M.merge_adapters(ads, method="cat")
    lora, err = res.as_lora()
    assert err < 1e-12 and lora.rank("m") == 6
    torch.testing.assert_close(lora.delta("m"), res.deltas["m"], atol=1e-5, rtol=1e-5)
    # negative control: combining A's and B's separately (PEFT "linear") is not the average
    a, b = M.peft_style_linear_factors([ad.layers["m"] for ad in ads], [0.5, 0.5])
    rel = (b @ a - res.deltas["m"]).norm() / res.deltas["m"].norm()
    assert rel > 0.3


def test_svd_merge_matches_eckart_young():
    ads = [rand_adapter(5, ["m"], 3, out=8, inp=7), rand_adapter(6, ["m"], 3, out=8, inp=7)]
    full = M.merge_adapters(ads, method="linear").deltas["m"]
    s = torch.linalg.svdvals(full)
    for k in (2, 4, 6):
        res = M.merge_adapters(ads, method="svd", svd_rank=k)
        err = (res.deltas["m"] - full).norm()
        assert float(err) == pytest.approx(float(s[k:].pow(2).sum().sqrt()), abs=1e-9)
    lora, rel = M.merge_adapters(ads, method="linear").as_lora(svd_rank=6)
    assert rel < 1e-10
    _, rel2 = M.merge_adapters(ads, method="linear").as_lora(svd_rank=2)
    assert rel2 == pytest.approx(float(s[2:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt()), rel=1e-6)


def brute_ties(ts, weights, density):
    n = len(ts)
    flat = [t.reshape(-1).tolist() for t in ts]
    k = int(density * len(flat[0]))
    trimmed = []
    for f in flat:
        order = sorted(range(len(f)), key=lambda i: -abs(f[i]))[:k]
        trimmed.append([f[i] if i in order else 0.0 for i in range(len(f))])
    out = []
    for j in range(len(flat[0])):
        total = sum(t[j] for t in trimmed)
        sign = 1.0 if total >= 0 else -1.0
        vals = [(n * w) * t[j] for t, w in zip(trimmed, weights) if t[j] != 0 and (t[j] > 0) == (sign > 0)]
        out.append(sum(vals) / max(1, len(vals)))
    return torch.tensor(out, dtype=torch.float64).reshape(ts[0].shape)


def test_ties_matches_brute_force_and_peft_reference():
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    w = [0.2, 0.3, 0.5]
    ours = M.ties_merge(ts, w, density=0.5)
    torch.testing.assert_close(ours, brute_ties(ts, w, 0.5))
    ref = merge_utils.ties(ts, torch.tensor([3 * x for x in w], dtype=torch.float64), density=0.5)
    torch.testing.assert_close(ours, ref)
    # negative control: no sign election (plain mean of the trimmed tensors) is a different merge
    naive = torch.stack([M.magnitude_trim(t, 0.5) for t in ts]).mean(0)
    assert not torch.allclose(ours, naive, atol=1e-3)
    # density 1 with agreeing signs reduces to the plain average
    pos = [t.abs() for t in ts]
    torch.testing.assert_close(M.ties_merge(pos, [1 / 3] * 3, 1.0), torch.stack(pos).mean(0))


def test_dare_is_unbiased_and_keeps_density():
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(6, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    w = [0.5, 0.5]
    lin = M.linear_merge(ts, w)
    torch.testing.assert_close(M.dare_merge(ts, w, 1.0, g), lin)
    gen = torch.Generator().manual_seed(2)
    draws = torch.stack([M.dare_merge(ts, w, 0.3, gen) for _ in range(3000)])
    assert (draws.mean(0) - lin).abs().max() < 0.12
    kept = (M.dare_drop(torch.ones(100, 100, dtype=torch.float64), 0.3, gen) != 0).double().mean()
    assert abs(float(kept) - 0.3) < 0.02
    # negative control: dropping without rescaling is biased towards zero by the density
    no_rescale = torch.stack([M.dare_drop(ts[0], 0.3, gen) * 0.3 for _ in range(3000)]).mean(0)
    assert (no_rescale - ts[0]).abs().max() > 0.3
    a = M.dare_merge(ts, w, 0.5, torch.Generator().manual_seed(7), combine="ties")
    b = M.dare_merge(ts, w, 0.5, torch.Generator().manual_seed(7), combine="ties")
    torch.testing.assert_close(a, b)  # seeded


def test_incompatible_adapters_are_refused_with_clear_messages():
    a = rand_adapter(0, ["m"], 2, base="CompVis/stable-diffusion-v1-4")
    b = rand_adapter(1, ["m"], 2, base="stabilityai/stable-diffusion-2")
    with pytest.raises(AdapterError, match="different base models"):
        M.merge_adapters([a, b], ["e1", "e2"])
    c = rand_adapter(1, ["m"], 2, out=9, base=a.base_model)
    with pytest.raises(AdapterError, match="different architectures"):
        M.merge_adapters([a, c])
    d = copy.deepcopy(a)
    d.prefix = "transformer"
    with pytest.raises(AdapterError, match="different denoisers"):
        M.merge_adapters([a, d])
    with pytest.raises(AdapterError, match="3 merge weights"):
        M.merge_adapters([a, a], weights=[1, 1, 1])
    with pytest.raises(AdapterError, match="unknown merge method"):
        M.merge_adapters([a], method="avg")
    with pytest.raises(AdapterError, match="not low-rank"):
        M.merge_adapters([a, a], method="ties").as_lora()
    with pytest.raises(AdapterError, match="equal ranks"):
        M.peft_style_linear_factors([a.layers["m"], rand_adapter(2, ["m"], 3).layers["m"]], [0.5, 0.5])


def test_partial_modules_contribute_zero():
    a = rand_adapter(0, ["m", "n"], 2)
    b = rand_adapter(1, ["m"], 2)
    res = M.merge_adapters([a, b])
    torch.testing.assert_close(res.deltas["n"], 0.5 * brute_delta(a, "n"))
    assert any("only some experts" in n for n in res.notes)


# ---------------------------------------------------------------- against diffusers, on a tiny SD UNet


def _unet_out(pipe):
    torch.manual_seed(0)
    unet = pipe.unet
    x = torch.randn(2, unet.config.in_channels, 8, 8)
    ctx = torch.randn(2, 6, unet.config.cross_attention_dim)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample


def _tiny_experts(pipe, tmp_path, ranks=(2, 2), alphas=(2.0, 4.0)):
    from diffalign.core.lora import default_targets

    paths = []
    modules = [n for n, _ in pipe.unet.named_modules() if n.endswith(tuple(default_targets("sd")))]
    for i, (r, al) in enumerate(zip(ranks, alphas)):
        g = torch.Generator().manual_seed(100 + i)
        layers = {}
        for name in modules:
            w = pipe.unet.get_submodule(name).weight
            layers[name] = (
                0.5 * torch.randn(r, w.shape[1], generator=g),
                0.5 * torch.randn(w.shape[0], r, generator=g),
            )
        ad = LoraAdapter(layers, {n: al for n in modules}, base_model="tiny")
        save_adapter(ad, tmp_path / f"e{i}")
        paths.append(tmp_path / f"e{i}")
    return paths


def test_merged_weights_and_fused_output_equal_diffusers_set_adapters(tmp_path):
    from diffalign.core.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    paths = _tiny_experts(pipe, tmp_path)
    w = [0.3, 0.7]
    # reference: diffusers loads both experts side by side and mixes them with set_adapters
    ref_pipe = tiny_sd_pipeline()
    for i, p in enumerate(paths):
        ref_pipe.load_lora_weights(str(p), adapter_name=f"e{i}")
    ref_pipe.set_adapters(["e0", "e1"], adapter_weights=w)
    ref = _unet_out(ref_pipe)
    base = _unet_out(tiny_sd_pipeline())
    assert (ref - base).abs().max() > 1e-3  # the experts do change the output
    # ours: weight-space merge fused into a fresh UNet
    ads = [load_adapter(p) for p in paths]
    assert ads[1].alphas[next(iter(ads[1].alphas))] == 4.0  # alpha survived the file round trip
    res = M.merge_adapters(ads, ["e0", "e1"], method="linear", weights=w)
    ours_pipe = tiny_sd_pipeline()
    w0 = {n: m.weight.detach().clone() for n, m in ours_pipe.unet.named_modules() if n in res.deltas}
    M.fuse_deltas(ours_pipe.unet, res.deltas)
    for name, mod in ours_pipe.unet.named_modules():
        if name in res.deltas:
            expect = sum(wi * brute_delta(ad, name) for wi, ad in zip(w, ads)).float()
            torch.testing.assert_close(mod.weight.detach() - w0[name], expect, atol=1e-5, rtol=1e-4)
    # activation-space LoRA (diffusers) and fused weights (ours) sum in a different fp32 order through
    # large intermediate activations (deltas of 0.5 * randn); the error seen is up to ~1.6e-4 absolute on
    # outputs of order 1, depending on thread count, while the inexact peft "linear" combination (the
    # negative control above) is off by > 30% relative
    tol = 5e-4
    torch.testing.assert_close(_unet_out(ours_pipe), ref, atol=tol, rtol=1e-4)
    # diffusers fuse_lora of the same mix equals it too
    ref_pipe.fuse_lora(adapter_names=["e0", "e1"])
    torch.testing.assert_close(_unet_out(ref_pipe), _unet_out(ours_pipe), atol=tol, rtol=1e-4)
    # the exported single merged LoRA (concatenation, ranks 4, alpha per module) reloads in diffusers
    lora, err = res.as_lora()
    save_adapter(lora, tmp_path / "merged")
    one = tiny_sd_pipeline()
    one.load_lora_weights(str(tmp_path / "merged"), adapter_name="merged")
    torch.testing.assert_close(_unet_out(one), ref, atol=tol, rtol=1e-4)  # same fp32-order noise as above


def test_peft_linear_combination_is_inexact_negative_control(tmp_path):
    from peft import PeftModel

    from diffalign.core.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    paths = _tiny_experts(pipe, tmp_path, alphas=(2.0, 2.0))
    ads = [load_adapter(p) for p in paths]
    exact = M.merge_adapters(ads, method="linear", weights=[0.5, 0.5])
    from diffalign.selma.lora import peft_config_for

    unet = tiny_sd_pipeline().unet
    from peft import get_peft_model, set_peft_model_state_dict

    model = get_peft_model(unet, peft_config_for(ads[0]), adapter_name="e0")
    model.add_adapter("e1", peft_config_for(ads[1]))
    for name, ad in zip(["e0", "e1"], ads):
        sd = {}
        for m, (a, b) in ad.layers.items():
            sd[f"base_model.model.{m}.lora_A.weight"] = a
            sd[f"base_model.model.{m}.lora_B.weight"] = b
        res = set_peft_model_state_dict(model, sd, adapter_name=name)
        assert not [k for k in res.unexpected_keys if "lora_" in k]
    assert isinstance(model, PeftModel)
    model.add_weighted_adapter(["e0", "e1"], [0.5, 0.5], adapter_name="lin", combination_type="linear")
    model.add_weighted_adapter(["e0", "e1"], [0.5, 0.5], adapter_name="cat", combination_type="cat")
    errors = {}
    for kind in ("lin", "cat"):
        num = den = 0.0
        for m, target in exact.deltas.items():
            layer = model.base_model.model.get_submodule(m)
            d = layer.get_delta_weight(kind).double()
            num += float((d - target).pow(2).sum())
            den += float(target.pow(2).sum())
        errors[kind] = (num / den) ** 0.5
    assert errors["cat"] < 1e-5  # PEFT's concatenation is exact, like ours
    assert errors["lin"] > 0.3  # PEFT's factor-wise linear is not SELMA's average
