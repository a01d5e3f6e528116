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
    # tables that would broadcast against the [steps, 2, 2] schedule are refused too
    for shape in ((2, 1), (1, 2), (1, 1)):
        with pytest.raises(ScheduleError, match="does not match the cost table"):
            schedule_flops(effective, torch.ones(shape, dtype=torch.float64), 1.0)


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


def _invariant_model(step_invariant=True):
    table = torch.tensor([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    inv = torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    return CostModel("pixart", (2,), table, 100.0, 2, inv, 8.0, step_invariant, "seconds")


def test_schedule_flops_step_invariant_parts_count_at_step_zero_only_by_brute_force():
    every2 = fora("pixart", 4, 2, (2,))
    eff = every2.effective()
    model = _invariant_model()
    # brute force: each step pays the overhead and its recomputed components; after step 0 the caption-only
    # parts of the overhead (8) and of each recomputed component are not paid again
    brute = 0.0
    for s in range(4):
        brute += 100.0 - (8.0 if s > 0 else 0.0)
        for b in range(2):
            for c in range(3):
                if eff[s, b, c]:
                    brute += float(model.component_flops[b, c])
                    brute -= float(model.invariant_component_flops[b, c]) if s > 0 else 0.0
    assert model.flops(every2) == pytest.approx(2 * brute, rel=1e-12)
    assert schedule_flops(eff, model.component_flops, 100.0, 2, model.invariant_component_flops, 8.0) == (
        pytest.approx(2 * brute, rel=1e-12)
    )
    # step invariance off, or no invariant table: the plain sum
    plain = 2 * (4 * 100.0 + 2 * 66.0)
    assert model.with_step_invariant(False).flops(every2) == plain
    assert schedule_flops(eff, model.component_flops, 100.0, 2, None, 8.0) == plain
    # the no-cache denominator never uses the invariant parts
    assert model.no_cache_flops(4) == 2 * 4 * 166.0


def test_scaled_multiplies_every_cost_and_keeps_the_rest():
    model = _invariant_model(step_invariant=False)
    triple = model.scaled(3.0)
    assert torch.equal(triple.component_flops, model.component_flops * 3)
    assert torch.equal(triple.invariant_component_flops, model.invariant_component_flops * 3)
    assert triple.overhead_flops == 300.0 and triple.invariant_overhead_flops == 24.0
    assert (triple.architecture, triple.group_sizes, triple.calls_per_step) == ("pixart", (2,), 2)
    assert triple.step_invariant is False and triple.unit == "seconds"
    every2 = fora("pixart", 4, 2, (2,))
    on = model.with_step_invariant(True)
    assert on.scaled(0.25).flops(every2) == pytest.approx(0.25 * on.flops(every2), rel=1e-12)
    assert _model().scaled(2.0).invariant_component_flops is None
    # with_step_invariant returns a copy; the model it was called on keeps its setting and its tables
    assert on.step_invariant is True and model.step_invariant is False
    assert on.component_flops is not model.component_flops


def test_from_dict_defaults_and_full_round_trip():
    bare = {
        "architecture": "dit",
        "group_sizes": [3],
        "component_flops": [[1.0, 2.0]],
        "overhead_flops": 5,
        "calls_per_step": "2",
    }
    model = CostModel.from_dict(bare)
    assert model.invariant_component_flops is None and model.invariant_overhead_flops == 0.0
    assert model.step_invariant is True and model.unit == "flops"
    assert model.calls_per_step == 2 and model.overhead_flops == 5.0 and model.group_sizes == (3,)
    assert model.component_flops.dtype == torch.float64
    full = _invariant_model(step_invariant=False)
    back = CostModel.from_dict(full.to_dict())
    assert back.to_dict() == full.to_dict()
    assert back.invariant_component_flops.dtype == torch.float64
    assert back.step_invariant is False and back.unit == "seconds" and back.invariant_overhead_flops == 8.0


class _CountingPipe:
    """Calls its transformer ``calls`` times per inference step and records the keyword arguments."""

    def __init__(self, calls_per_step):
        self.transformer = torch.nn.Linear(2, 2)
        self.calls_per_step = calls_per_step
        self.seen = None

    def __call__(self, **kw):
        self.seen = kw
        for step in range(kw["num_inference_steps"]):
            for k in range(self.calls_per_step):
                self.transformer(torch.full((1, 2), float(10 * step + k)))


def test_capture_transformer_call_returns_the_first_call_and_calls_per_step():
    from diffalign.ecad.cost import capture_transformer_call

    for per_step in (1, 2, 3):
        pipe = _CountingPipe(per_step)
        kw = {"prompt": "x", "num_inference_steps": 20, "output_type": "pil"}
        args, kwargs, calls = capture_transformer_call(pipe, kw)
        assert calls == per_step and isinstance(calls, int)  # a count (it is saved as calls_per_step)
        assert torch.equal(args[0], torch.zeros(1, 2)) and kwargs == {}  # the first call: step 0, call 0
        assert pipe.seen == {"prompt": "x", "num_inference_steps": 2, "output_type": "latent"}
        assert kw["num_inference_steps"] == 20 and kw["output_type"] == "pil"  # the caller's dict is kept
        assert not pipe.transformer._forward_pre_hooks  # the hook is removed
    with pytest.raises(RuntimeError, match="never called its transformer"):
        capture_transformer_call(_CountingPipe(0), {})


def test_capture_transformer_call_rejects_a_call_count_that_is_not_per_step():
    from diffalign.ecad.cost import capture_transformer_call

    class OddPipe(_CountingPipe):
        def __call__(self, **kw):
            super().__call__(**kw)
            self.transformer(torch.zeros(1, 2))  # one extra call: 2 * 2 + 1

    pipe = OddPipe(2)
    with pytest.raises(RuntimeError, match="5 transformer calls for 2 steps"):
        capture_transformer_call(pipe, {})
    assert not pipe.transformer._forward_pre_hooks  # removed on the error path too


def _linear_sum(module):
    return float(sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear)))


def _ticking_transformer(tr, factors):
    """A synthetic clock advanced by every Linear's weight size times the factor of the current transformer
    call (``factors[n]`` for the n-th call); returns the clock's cell and the hook handles."""
    ticks, calls = [0.0], [-1]
    handles = [tr.register_forward_pre_hook(lambda mod, a: calls.__setitem__(0, calls[0] + 1))]
    handles += [
        m.register_forward_hook(
            lambda mod, a, o: ticks.__setitem__(0, ticks[0] + mod.weight.numel() * factors[calls[0]])
        )
        for m in tr.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    return ticks, handles


def test_latency_model_keeps_the_median_of_the_repeats_after_a_warm_up(pixart_pipe, monkeypatch):
    import time

    from diffalign.ecad.cost import measure_latency_model
    from diffalign.ecad.sampling import pipeline_call_kwargs

    tr = pixart_pipe.transformer
    kw = pipeline_call_kwargs(pixart_pipe, ["a red circle"], [0], 3, 4.5, 16, 16)
    # calls: two to capture the inputs (2 steps, one call each), the warm-up (x100), then repeats x1, x2, x3
    # and, for a repeats=4 mutant, x50: the median of the three repeats is x2. Clock in nanoseconds-like units
    # (all costs < 1) and read through the default CPU clock, time.thread_time.
    factors = [0.0, 0.0, 100e-9, 1e-9, 2e-9, 3e-9, 50e-9]
    ticks, handles = _ticking_transformer(tr, factors)
    monkeypatch.setattr(time, "thread_time", lambda: ticks[0])
    try:
        cm = measure_latency_model(pixart_pipe, kw)
    finally:
        for h in handles:
            h.remove()
    block = tr.transformer_blocks[0]
    assert cm.component_flops[0, 0] == pytest.approx(2e-9 * _linear_sum(block.attn1), rel=1e-9)
    assert cm.component_flops[0, 2] == pytest.approx(2e-9 * _linear_sum(block.ff), rel=1e-9)
    assert cm.overhead_flops == pytest.approx(
        2e-9 * _linear_sum(tr) - float(cm.component_flops.sum()), rel=1e-9
    )
    assert 0 < cm.overhead_flops < 1e-3
    assert cm.invariant_overhead_flops == pytest.approx(2e-9 * _linear_sum(tr.caption_projection), rel=1e-9)
    assert cm.calls_per_step == 1 and cm.architecture == "pixart" and cm.unit == "seconds"


def test_latency_model_syncs_before_every_clock_read_and_clamps_a_negative_overhead(pixart_pipe):
    from diffalign.ecad.cost import measure_latency_model
    from diffalign.ecad.sampling import pipeline_call_kwargs

    tr = pixart_pipe.transformer
    kw = pipeline_call_kwargs(pixart_pipe, ["a red circle"], [0], 3, 4.5, 16, 16)
    ticks, handles = _ticking_transformer(tr, [1.0] * 8)
    # a clock that runs backwards once the transformer returns: the whole call looks shorter than its parts
    handles.append(tr.register_forward_hook(lambda mod, a, o: ticks.__setitem__(0, ticks[0] - 1e9)))
    state = {"synced": False, "reads": 0, "unsynced": 0}

    def sync():
        state["synced"] = True

    def clock():
        state["reads"] += 1
        state["unsynced"] += not state["synced"]
        state["synced"] = False
        return ticks[0]

    try:
        cm = measure_latency_model(pixart_pipe, kw, repeats=2, device_sync=sync, clock=clock)
    finally:
        for h in handles:
            h.remove()
    assert state["reads"] > 0 and state["unsynced"] == 0
    assert cm.overhead_flops == 0.0
    assert cm.component_flops[0, 0] == _linear_sum(tr.transformer_blocks[0].attn1)


def test_measuring_a_pipeline_that_still_has_a_schedule_is_refused(pixart_pipe):
    from diffalign.ecad.cost import measure_cost_model, measure_latency_model
    from diffalign.ecad.hooks import apply_schedule, remove_schedule
    from diffalign.ecad.sampling import pipeline_call_kwargs

    kw = pipeline_call_kwargs(pixart_pipe, ["a red circle"], [0], 2, 4.5, 16, 16)
    apply_schedule(pixart_pipe, fora(pixart_pipe.transformer, 2, 2))
    try:
        for measure in (measure_cost_model, measure_latency_model):
            with pytest.raises(ScheduleError, match="remove the caching schedule"):
                measure(pixart_pipe, kw)
    finally:
        remove_schedule(pixart_pipe)


def test_a_cost_model_fits_a_schedule_whose_names_were_read_from_a_file():
    import json

    model = CostModel.from_dict(json.loads(json.dumps(_model().to_dict())))
    arch = "".join(["pix", "art"])  # equal to, but not the same object as, the literal in the schedule
    model.architecture = arch
    sched = no_cache("pixart", 4, (2,))
    assert model.flops(sched) == 4 * 166.0
    with pytest.raises(ScheduleError, match="cost model is for"):
        model.flops(no_cache("dit", 4, (2,)))


def test_invariant_overhead_defaults_to_zero():
    table = torch.tensor([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    inv = torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    model = CostModel("pixart", (2,), table, 100.0, 1, inv)
    assert model.invariant_overhead_flops == 0.0
    # all-recompute over 3 steps: the overhead every step, the caption-only 4.5 once
    assert model.flops(no_cache("pixart", 3, (2,))) == 3 * 166.0 - 2 * 4.5
    # the same default in the sum itself
    eff = no_cache("pixart", 3, (2,)).effective()
    assert schedule_flops(eff, table, 100.0, 1, inv) == 3 * 166.0 - 2 * 4.5


def test_latency_of_a_component_that_never_runs_is_zero(pixart_pipe, monkeypatch):
    from diffalign.ecad.cost import measure_latency_model
    from diffalign.ecad.sampling import pipeline_call_kwargs

    tr = pixart_pipe.transformer
    # block 1 passes its input through: none of its sub-modules is called
    monkeypatch.setattr(tr.transformer_blocks[1], "forward", lambda hidden_states, *a, **k: hidden_states)
    kw = pipeline_call_kwargs(pixart_pipe, ["a red circle"], [0], 3, 4.5, 16, 16)
    ticks, handles = _ticking_transformer(tr, [1.0] * 8)
    try:
        cm = measure_latency_model(pixart_pipe, kw, repeats=2, clock=lambda: ticks[0])
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(cm.component_flops[1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(cm.invariant_component_flops[1], torch.zeros(3, dtype=torch.float64))
    assert cm.component_flops[0, 0] == _linear_sum(tr.transformer_blocks[0].attn1)


def test_cost_model_checks_the_architecture_both_ways_and_defaults_to_one_call_per_step():
    table = torch.tensor([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    model = CostModel("dit", (2,), table, 100.0)
    assert model.calls_per_step == 1
    # "pixart" sorts after "dit", "dit" before "pixart": both mismatches are refused
    with pytest.raises(ScheduleError, match="cost model is for"):
        model.flops(no_cache("pixart", 4, (2,)))
    with pytest.raises(ScheduleError, match="cost model is for"):
        _model().flops(no_cache("dit", 4, (2,)))
    # group sizes on either side of the model's (2,) are refused by the same check
    for sizes in ((1,), (3,)):
        with pytest.raises(ScheduleError, match="cost model is for"):
            _model().flops(no_cache("pixart", 4, sizes))


def test_module_flops_matches_names_by_value_only():
    path = "".join(["transformer_blocks.0", ".ff"])  # built, so not the same object as a literal key
    assert _module_flops({"transformer_blocks.0.ff": 3}, path) == 3
    # a name that sorts after the path is not a hit
    assert _module_flops({"zeta.block": 1, "A.x.ff": 3}, "x.ff") == 3
    assert _module_flops({"zeta.block": 1}, "x.ff") == 0


def test_cost_model_from_one_call_counts_one_call_per_step_by_default(pixart_pipe):
    from diffalign.ecad.cost import capture_transformer_call, cost_model_from_call
    from diffalign.ecad.sampling import pipeline_call_kwargs

    kw = pipeline_call_kwargs(pixart_pipe, ["a red circle"], [0], 2, 4.5, 16, 16)
    args, kwargs, _ = capture_transformer_call(pixart_pipe, kw)
    cm = cost_model_from_call(pixart_pipe.transformer, args, kwargs)
    with torch.no_grad():
        _, total, _ = count_flops(pixart_pipe.transformer, *args, **kwargs)
    assert cm.calls_per_step == 1
    assert cm.no_cache_flops(3) == 3 * total


def test_latency_measurement_leaves_no_hooks_behind(pixart_pipe):
    from diffalign.ecad.cost import measure_latency_model
    from diffalign.ecad.sampling import pipeline_call_kwargs

    tr = pixart_pipe.transformer
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tr.modules())
    kw = pipeline_call_kwargs(pixart_pipe, ["a red circle"], [0], 2, 4.5, 16, 16)
    measure_latency_model(pixart_pipe, kw, repeats=1)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tr.modules()) == before


def test_latency_clock_per_device_type():
    # the default sync and clock of measure_latency_model, checked for every device type on a CPU machine:
    # a torch.device("cuda") object needs no GPU
    import time

    from diffalign.ecad.cost import latency_clock

    for device in (torch.device("cuda"), torch.device("cuda", 1)):
        sync, clock = latency_clock(device)
        assert sync is torch.cuda.synchronize
        assert clock is time.perf_counter
    sync, clock = latency_clock(torch.device("cpu"))
    assert sync is not torch.cuda.synchronize and sync() is None
    assert clock is time.thread_time
    for device in (torch.device("meta"), torch.device("mps")):
        sync, clock = latency_clock(device)
        assert sync is not torch.cuda.synchronize and sync() is None
        assert clock is time.perf_counter


def test_latency_model_takes_its_defaults_from_the_transformers_device(pixart_pipe, monkeypatch):
    import diffalign.ecad.cost as cost

    seen = []
    ticks = [0.0]

    def fake(device):
        seen.append(device)

        def sync():
            ticks[0] += 1.0

        return sync, lambda: ticks[0]

    from diffalign.ecad.sampling import pipeline_call_kwargs

    monkeypatch.setattr(cost, "latency_clock", fake)
    kw = pipeline_call_kwargs(pixart_pipe, ["a red circle"], [0], 2, 4.5, 16, 16)
    cm = cost.measure_latency_model(pixart_pipe, kw, repeats=1)
    assert seen == [next(pixart_pipe.transformer.parameters()).device]
    # the clock only moves in the sync, so every component's time is the default sync's ticks
    assert float(cm.component_flops.min()) >= 1.0
    assert float(cm.component_flops.sum()) == int(cm.component_flops.sum())
