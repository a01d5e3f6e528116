import json

import pytest
import torch

from diffalign.ecad.schedule import (
    Schedule,
    ScheduleError,
    detect_architecture,
    evenly_spaced,
    fora,
    heuristic_population,
    no_cache,
    tgate,
)


def _random(arch, steps, sizes, seed=0):
    torch.manual_seed(seed)
    base = no_cache(arch, steps, sizes)
    return Schedule(arch, torch.rand_like(base.recompute, dtype=torch.float) < 0.5, sizes, name="rand")


@pytest.mark.parametrize("arch,sizes", [("pixart", (4,)), ("dit", (3,)), ("flux", (2, 3))])
def test_json_roundtrip_both_layouts(tmp_path, arch, sizes):
    s = _random(arch, 5, sizes)
    s.save(tmp_path / "own.json")
    s.save(tmp_path / "official.json", layout="official")
    assert Schedule.load(tmp_path / "own.json") == s
    assert Schedule.load(tmp_path / "official.json") == s
    # negative control: a different schedule does not compare equal
    other = _random(arch, 5, sizes, seed=1)
    assert Schedule.load(tmp_path / "own.json") != other


def test_reads_official_flux_layout_by_hand():
    # the layout of the schedules published with the paper: string step keys, "single_<i>" blocks
    step = {str(i): {"full_attn": True, "full_ff": i == 0, "full_ff_context": True} for i in range(2)}
    step |= {
        f"single_{i}": {"single_attn": False, "single_proj_mlp": True, "single_proj_out": True}
        for i in range(3)
    }
    data = {
        "cache_schedule": {
            "num_blocks": 2,
            "num_inference_steps": 2,
            "name": "x",
            "schedule": {"000": step, "001": step},
        }
    }
    s = Schedule.from_dict(data)
    assert s.architecture == "flux" and s.group_sizes == (2, 3) and s.recompute.shape == (2, 5, 3)
    assert s.recompute[1, 1, 1].item() is False and s.recompute[1, 0, 1].item() is True
    assert not s.recompute[1, 2:, 0].any() and s.recompute[1, 2:, 1:].all()
    pixart = {
        "cache_schedule": {
            "num_inference_steps": 1,
            "schedule": {"000": {"0": {"attn1": False, "attn2": True, "ff": True}}},
        }
    }
    p = Schedule.from_dict(pixart)
    assert p.architecture == "pixart" and p.recompute.tolist() == [[[False, True, True]]]


def test_official_custom_compute_entry_is_refused():
    data = {
        "cache_schedule": {
            "num_inference_steps": 1,
            "schedule": {"000": {"0": {"attn1": True, "attn2": "tgate_attn", "ff": True}}},
        }
    }
    with pytest.raises(ScheduleError, match="custom compute"):
        Schedule.from_dict(data)


def test_bad_files_give_clear_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ScheduleError, match="not valid JSON"):
        Schedule.load(tmp_path / "bad.json")
    with pytest.raises(ScheduleError, match="not found"):
        Schedule.load(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ScheduleError, match="not a schedule file"):
        Schedule.load(tmp_path / "other.json")
    with pytest.raises(ScheduleError, match="needs shape"):
        Schedule("pixart", torch.ones(3, 2, 2, dtype=torch.bool), (2,))
    with pytest.raises(ScheduleError, match="unknown architecture"):
        no_cache("unet", 3, 2)


def test_validation_against_models(pixart_pipe, dit_pipe, flux_pipe):
    assert detect_architecture(pixart_pipe.transformer) == "pixart"
    assert detect_architecture(dit_pipe.transformer) == "dit"
    assert detect_architecture(flux_pipe.transformer) == "flux"
    good = no_cache(pixart_pipe.transformer, 4)
    good.validate(pixart_pipe.transformer, num_inference_steps=4)
    with pytest.raises(ScheduleError, match="num_inference_steps=5"):
        good.validate(pixart_pipe.transformer, num_inference_steps=5)
    with pytest.raises(ScheduleError, match="transformer_blocks=2"):
        no_cache("pixart", 4, 28).validate(pixart_pipe.transformer)
    with pytest.raises(ScheduleError, match="for pixart transformers"):
        good.validate(dit_pipe.transformer)
    with pytest.raises(ScheduleError, match="not a supported transformer"):
        detect_architecture(torch.nn.Linear(2, 2))


def test_heuristics():
    f = fora("pixart", 7, 3, 2)
    assert [bool(f.recompute[s].all()) for s in range(7)] == [True, False, False, True, False, False, True]
    assert not f.recompute[1].any()
    t = tgate("pixart", 6, 2, 2)
    assert t.recompute[:2].all() and not t.recompute[2:, :, 1].any() and t.recompute[:, :, [0, 2]].all()
    with pytest.raises(ScheduleError, match="no 'attn2'"):
        tgate("dit", 6, 2, 2)
    e = evenly_spaced("pixart", 9, num_blocks_cached=2, num_steps_cached=4, component=2, group_sizes=4)
    cached = (~e.recompute).nonzero().tolist()
    assert {(s, b, c) for s, b, c in cached} == {(s, b, 2) for s in range(3, 7) for b in (0, 3)}
    pop = heuristic_population("pixart", 10, 4)
    assert pop[0] == no_cache("pixart", 10, 4)
    assert all(p.num_cached() > 0 for p in pop[1:])
    assert len({tuple(p.to_genome().tolist()) for p in pop}) == len(pop)


def test_step0_is_dont_care():
    s = no_cache("pixart", 3, 2)
    s.recompute[0] = False
    assert s.num_cached() == 0 and s.effective().all()
    s.recompute[2, 1, 0] = False
    assert s.num_cached() == 1
