import json

import pytest
import torch

from diffalign.selma import images as I
from diffalign.selma.config import TrainConfig
from diffalign.selma.lora import load_adapter
from diffalign.selma.train import batch_indices, train_lora

from .helpers import tiny_image_folder

RECORDS = [
    {"skill": "count", "text": "two blue squares"},
    {"skill": "count", "text": "one red circle"},
    {"skill": "color", "text": "a red circle and a green square"},
    {"skill": "spatial", "text": "a red circle above a blue square"},
    {"skill": "color", "text": "a yellow triangle and a blue circle"},
]


@pytest.fixture(scope="module")
def sd_images(tmp_path_factory):
    return tiny_image_folder(tmp_path_factory.mktemp("imgs") / "one", RECORDS)


def test_imagefolder_layout_and_two_process_sharding_matches_one(sd_images, tmp_path):
    from diffalign.core.testing import tiny_sd_pipeline

    recs = I.read_imagefolder(sd_images)
    assert [r["text"] for r in recs] == [r["text"] for r in RECORDS]
    assert all(r["file_name"].startswith("images/") for r in recs)
    # two processes, each writing its own shard (run one after the other), then the main finalises
    pipe = tiny_sd_pipeline()
    two = tmp_path / "two"
    kw = dict(seed=1, batch_size=2, call_kwargs={"num_inference_steps": 2}, num_processes=2)
    assert I.generate_images(pipe, RECORDS, two, process_index=1, finalize=False, **kw) is None
    I.generate_images(pipe, RECORDS, two, process_index=0, **kw)
    assert sorted(p.name for p in (two / "shards").iterdir()) == ["shard-000.jsonl", "shard-001.jsonl"]
    assert (two / "metadata.jsonl").read_text() == (sd_images / "metadata.jsonl").read_text()
    for r in recs:
        assert (two / r["file_name"]).read_bytes() == (sd_images / r["file_name"]).read_bytes()
    # resuming a kill after one batch gives the same set
    three = tmp_path / "three"
    I.generate_images(
        pipe,
        RECORDS,
        three,
        process_index=0,
        num_processes=1,
        stop_after_batches=1,
        seed=1,
        batch_size=2,
        call_kwargs={"num_inference_steps": 2},
    )
    assert not (three / "metadata.jsonl").exists()
    I.generate_images(
        pipe,
        RECORDS,
        three,
        process_index=0,
        num_processes=1,
        seed=1,
        batch_size=2,
        call_kwargs={"num_inference_steps": 2},
    )
    assert (three / "metadata.jsonl").read_text() == (sd_images / "metadata.jsonl").read_text()
    # a different seed gives different images (the test can fail)
    four = tmp_path / "four"
    I.generate_images(
        pipe,
        RECORDS[:1],
        four,
        process_index=0,
        num_processes=1,
        seed=2,
        batch_size=2,
        call_kwargs={"num_inference_steps": 2},
    )
    assert (four / recs[0]["file_name"]).read_bytes() != (sd_images / recs[0]["file_name"]).read_bytes()


def test_reward_filter_is_optional_and_applied(tmp_path):
    from diffalign.core.testing import tiny_sd_pipeline

    class Bright:
        name, differentiable, input_range = "bright", False, "[-1,1]"

        def score(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    pipe = tiny_sd_pipeline()
    out = tmp_path / "f"
    I.generate_images(
        pipe,
        RECORDS,
        out,
        seed=1,
        batch_size=5,
        call_kwargs={"num_inference_steps": 2},
        process_index=0,
        num_processes=1,
        reward=Bright(),
        reward_threshold=None,
    )
    scores = [json.loads(line)["reward"] for line in (out / "metadata.jsonl").read_text().splitlines()]
    thr = sorted(scores)[2]
    I.finalize_metadata(out, len(RECORDS), reward_threshold=thr)
    kept = I.read_imagefolder(out)
    assert len(kept) == 3 and all(r["reward"] >= thr for r in kept)


def test_batch_indices_cover_each_epoch_once():
    idx = batch_indices(3, 0, 10, 5)
    assert sorted(idx[:5]) == list(range(5)) and sorted(idx[5:]) == list(range(5))
    assert batch_indices(3, 4, 3, 5) == idx[4:7]


def _tcfg(**kw):
    base = dict(rank=4, alpha=4, steps=4, checkpoint_every=2, batch_size=2, lr=1e-3, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_train_only_lora_trains_saves_and_resumes_exactly(sd_images, tmp_path):
    from diffalign.core.testing import tiny_sd_pipeline

    recs = I.read_imagefolder(sd_images)
    pipe = tiny_sd_pipeline()
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    te_before = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}
    out = train_lora(
        pipe,
        recs,
        tmp_path / "full",
        _tcfg(),
        seed=0,
        base_model="tiny-sd",
        skill="count",
        log=lambda *_: None,
    )
    # only LoRA parameters were trainable, and the base weights are untouched
    trainable = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for n, p in pipe.unet.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n.replace(".base_layer", "")]), n
    assert all(torch.equal(p, te_before[n]) for n, p in pipe.text_encoder.named_parameters())
    adapter = load_adapter(out)
    assert adapter.base_model == "tiny-sd" and set(adapter.ranks().values()) == {4}
    assert all(name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for name in adapter.layers)
    assert any(float(b.abs().max()) > 0 for _, b in adapter.layers.values())  # B moved away from zero
    meta = json.loads((out / "selma_adapter.json").read_text())
    assert meta["skill"] == "count" and meta["complete"] and len(meta["loss_history"]) == 4
    # the file loads with diffusers' own loader and changes the output
    fresh = tiny_sd_pipeline()
    kw = dict(num_inference_steps=2, output_type="pt")
    base_img = fresh(prompt="two blue squares", generator=torch.Generator().manual_seed(0), **kw).images
    fresh.load_lora_weights(str(out), adapter_name="count")
    lora_img = fresh(prompt="two blue squares", generator=torch.Generator().manual_seed(0), **kw).images
    assert (lora_img - base_img).abs().max() > 1e-4
    # interrupted after 2 steps (checkpoint), resumed in a new pipeline: same adapter as uninterrupted
    part = tmp_path / "part"
    train_lora(tiny_sd_pipeline(), recs, part, _tcfg(steps=4), steps=2, seed=0, log=lambda *_: None)
    (part / "pytorch_lora_weights.safetensors").unlink()  # simulate the kill before export
    (part / "selma_adapter.json").unlink()
    ckpts = sorted(p.name for p in (part / "checkpoints").iterdir())
    assert ckpts == ["state_00000002"]
    # the checkpoint was made for a 2-step run; restarting with 4 steps is refused clearly
    with pytest.raises(ValueError, match="use another run directory"):
        train_lora(tiny_sd_pipeline(), recs, part, _tcfg(steps=4), seed=0, log=lambda *_: None)


def test_resume_matches_uninterrupted(sd_images, tmp_path, monkeypatch):
    from diffalign.core.testing import tiny_sd_pipeline
    from diffalign.selma import train as T

    recs = I.read_imagefolder(sd_images)
    full = load_adapter(
        train_lora(
            tiny_sd_pipeline(),
            recs,
            tmp_path / "a",
            _tcfg(steps=3, checkpoint_every=1),
            seed=0,
            log=lambda *_: None,
        )
    )

    calls = {"n": 0}
    real = T.denoise

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # die during step 3 (after the step-2 checkpoint)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "denoise", dying)
    with pytest.raises(KeyboardInterrupt):
        train_lora(
            tiny_sd_pipeline(),
            recs,
            tmp_path / "b",
            _tcfg(steps=3, checkpoint_every=1),
            seed=0,
            log=lambda *_: None,
        )
    monkeypatch.setattr(T, "denoise", real)
    resumed = load_adapter(
        train_lora(
            tiny_sd_pipeline(),
            recs,
            tmp_path / "b",
            _tcfg(steps=3, checkpoint_every=1),
            seed=0,
            log=lambda *_: None,
        )
    )
    for name, (a, b) in full.layers.items():
        torch.testing.assert_close(resumed.layers[name][0], a)
        torch.testing.assert_close(resumed.layers[name][1], b)
    other = load_adapter(
        train_lora(
            tiny_sd_pipeline(),
            recs,
            tmp_path / "c",
            _tcfg(steps=3, checkpoint_every=1),
            seed=1,
            log=lambda *_: None,
        )
    )
    name = next(iter(full.layers))
    assert not torch.allclose(other.layers[name][1], full.layers[name][1])  # the seed matters


def test_lora_init_depends_on_the_run_seed_not_on_the_global_rng(sd_images, tmp_path):
    from diffalign.core.testing import tiny_sd_pipeline

    recs = I.read_imagefolder(sd_images)

    def first_a(seed: int, global_seed: int, name: str) -> torch.Tensor:
        torch.manual_seed(global_seed)  # whatever ran before in the process
        out = train_lora(
            tiny_sd_pipeline(), recs, tmp_path / name, _tcfg(steps=1), seed=seed, log=lambda *_: None
        )
        return next(iter(load_adapter(out).layers.values()))[0]

    a = first_a(0, 1, "a")
    torch.testing.assert_close(first_a(0, 2, "b"), a)  # same run seed: same init, whatever the global RNG
    assert not torch.allclose(first_a(1, 1, "c"), a)  # another run seed: another init


@pytest.mark.parametrize("factory", ["tiny_sdxl_pipeline", "tiny_pixart_pipeline"])
def test_architecture_coverage_train_step_and_sampling(factory, sd_images, tmp_path):
    import diffalign.core.testing as testing
    from diffalign.core.lora import load_lora

    pipe = getattr(testing, factory)()
    recs = I.read_imagefolder(sd_images)
    out = train_lora(
        pipe,
        recs,
        tmp_path / "e",
        _tcfg(steps=1, batch_size=2, init="default"),
        seed=0,
        base_model=factory,
        log=lambda *_: None,
    )
    adapter = load_adapter(out)
    assert adapter.prefix == ("unet" if "sdxl" in factory else "transformer")
    fresh = getattr(testing, factory)()
    kw = I.pipeline_call_kwargs(fresh, num_inference_steps=2, height=16, width=16)
    base = fresh(
        prompt=["a red circle"], generator=[torch.Generator().manual_seed(0)], output_type="pt", **kw
    ).images
    load_lora(fresh, out, adapter_name="e")
    img = fresh(
        prompt=["a red circle"], generator=[torch.Generator().manual_seed(0)], output_type="pt", **kw
    ).images
    assert img.shape == base.shape == (1, 3, 16, 16)
    assert (img - base).abs().max() > 1e-5  # the loaded expert (default init: B = 0 then one step) acts


def test_metrics_have_each_step_once_after_a_kill_and_resume(sd_images, tmp_path, monkeypatch):
    """Step 3 is logged, the run dies in step 4 before its checkpoint, the resume from step 2 logs 3 again:
    core's MetricsLog cuts the file back to the checkpoint first."""
    from diffalign.core.testing import tiny_sd_pipeline
    from diffalign.selma import train as T

    recs = I.read_imagefolder(sd_images)
    calls = {"n": 0}
    real = T.denoise

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # die during step 4: step 3 is logged, the last checkpoint is step 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    tcfg = _tcfg(steps=4, checkpoint_every=2, log_every=1)
    monkeypatch.setattr(T, "denoise", dying)
    with pytest.raises(KeyboardInterrupt):
        train_lora(tiny_sd_pipeline(), recs, tmp_path / "run", tcfg, seed=0, log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    monkeypatch.setattr(T, "denoise", real)
    train_lora(tiny_sd_pipeline(), recs, tmp_path / "run", tcfg, seed=0, log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
