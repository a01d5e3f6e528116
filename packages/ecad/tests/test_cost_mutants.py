"""Reference checks of diffalign.ecad.cost's pure parts (no pipeline): the FLOP sum, the cost model's
checks, ratio and serialisation, the per-module lookup and the FLOP counter on a known matmul."""

import pytest
import torch

from diffalign.ecad.cost import CostModel, _module_flops, count_flops, schedule_flops
from diffalign.ecad.schedule import ScheduleError, fora, no_cache


def test_schedule_flops_brute_force_with_calls_per_step():
    effective = torch.tensor([[[1, 1], [1, 0]], [[0, 1], [0, 0]], [[1, 0], [1, 1]]], dtype=torch.bool)
    table = torch.tensor([[2.0, 3.0], [5.0, 7.0]], dtype=torch.float64)
    bits = 0.0
    for s in range(3):
        for b in range(2):
            for c in range(2):
                bits += float(effective[s, b, c]) * float(table[b, c])
    assert schedule_flops(effective, table, 11.0) == 3 * 11.0 + bits
    assert schedule_flops(effective, table, 11.0, calls_per_step=2) == 2 * (3 * 11.0 + bits)
    with pytest.raises(ScheduleError, match="does not match the cost table"):
        schedule_flops(effective, torch.ones(2, 3, dtype=torch.float64), 1.0)
    with pytest.raises(ScheduleError, match="does not match the cost table"):
        schedule_flops(effective, torch.ones(3, 2, dtype=torch.float64), 1.0)


def _model(calls_per_step=1):
    table = torch.tensor([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    return CostModel("pixart", (2,), table, 100.0, calls_per_step)


def test_cost_model_no_cache_ratio_and_checks():
    model = _model(calls_per_step=2)
    assert model.no_cache_flops(4) == 2 * 4 * (100.0 + 66.0)
    assert model.flops(no_cache("pixart", 4, (2,))) == model.no_cache_flops(4)
    every2 = fora("pixart", 4, 2, (2,))
    expected = 2 * (4 * 100.0 + 2 * 66.0)  # components run on steps 0 and 2 only
    assert model.flops(every2) == expected
    assert model.flop_ratio(every2) == pytest.approx(expected / model.no_cache_flops(4))
    with pytest.raises(ScheduleError, match="cost model is for"):
        model.flops(no_cache("pixart", 4, (3,)))


def test_cost_model_round_trip(tmp_path):
    model = _model(calls_per_step=2)
    back = CostModel.from_dict(model.to_dict())
    assert back.architecture == "pixart" and back.group_sizes == (2,) and back.calls_per_step == 2
    assert back.overhead_flops == 100.0 and torch.equal(back.component_flops, model.component_flops)
    path = model.save(tmp_path / "cost.json")
    import json

    assert CostModel.from_dict(json.loads(path.read_text())).to_dict() == model.to_dict()


def test_module_flops_lookup():
    per_module = {
        "Global": 99,
        "PixArt.transformer_blocks.1.attn1": 7,
        "PixArt.transformer_blocks.11.attn1": 5,
    }
    assert _module_flops(per_module, "transformer_blocks.1.attn1") == 7  # not block 11
    assert _module_flops(per_module, "transformer_blocks.2.attn1") == 0
    assert _module_flops({"transformer_blocks.0.ff": 3}, "transformer_blocks.0.ff") == 3
    with pytest.raises(RuntimeError, match="ambiguous"):
        _module_flops({"A.x.ff": 1, "B.x.ff": 2}, "x.ff")


def test_count_flops_counts_a_matmul_as_two_per_multiply_add():
    lin = torch.nn.Linear(3, 5, bias=False)
    x = torch.randn(4, 3)
    out, total, per_module = count_flops(lin, x)
    assert out.shape == (4, 5)
    assert total == 2 * 4 * 3 * 5
    assert max(per_module.values()) == total
