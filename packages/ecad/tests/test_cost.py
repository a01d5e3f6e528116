import itertools

import pytest
import torch

from diffalign.ecad.cost import count_flops, measure_cost_model, schedule_flops
from diffalign.ecad.hooks import apply_schedule, remove_schedule
from diffalign.ecad.sampling import pipeline_call_kwargs
from diffalign.ecad.schedule import Schedule, fora, no_cache


def test_schedule_flops_matches_brute_force_sum():
    torch.manual_seed(0)
    eff = torch.rand(5, 3, 2) < 0.5
    table = torch.rand(3, 2, dtype=torch.float64) * 100
    brute = 0.0
    for s, b, c in itertools.product(range(5), range(3), range(2)):
        brute += float(table[b, c]) if eff[s, b, c] else 0.0
    brute += 5 * 7.0
    assert schedule_flops(eff, table, 7.0, 1) == pytest.approx(brute, rel=1e-12)
    assert schedule_flops(eff, table, 7.0, 2) == pytest.approx(2 * brute, rel=1e-12)
    # negative control: counting cached bits instead of recomputed ones gives another number
    assert schedule_flops(~eff, table, 7.0, 1) != pytest.approx(brute, rel=1e-6)


def _counted_transformer_flops(pipe, kw):
    kw = dict(kw, output_type="latent")
    _, _, per_module = count_flops(pipe, **kw)
    name = type(pipe.transformer).__name__
    return per_module[name]


@pytest.mark.parametrize("which", ["pixart_pipe", "dit_pipe", "flux_pipe"])
def test_analytic_cost_equals_counted_run(request, which):
    pipe = request.getfixturevalue(which)
    prompts = ["1", "2"] if which == "dit_pipe" else ["a red circle", "two blue squares"]
    guidance = 1.0 if which == "dit_pipe" else 4.5
    kw = pipeline_call_kwargs(pipe, prompts, [0, 1], 3, guidance, 16, 16)
    cm = measure_cost_model(pipe, kw)
    assert (cm.component_flops > 0).all() and cm.overhead_flops > 0
    template = no_cache(pipe.transformer, 3)
    torch.manual_seed(1)
    scheds = [template, fora(pipe.transformer, 3, 2)]
    scheds += [Schedule.from_genome(torch.rand(template.recompute.numel()) < p, template) for p in (0.3, 0.7)]
    for s in scheds:
        apply_schedule(pipe, s)
        try:
            counted = _counted_transformer_flops(
                pipe, pipeline_call_kwargs(pipe, prompts, [0, 1], 3, guidance, 16, 16)
            )
        finally:
            remove_schedule(pipe)
        assert cm.flops(s) == counted, s
        if which == "pixart_pipe":  # negative control: ignoring the once-per-generation caption K/V
            assert cm.with_step_invariant(False).flops(s) > counted
            apply_schedule(pipe, s, step_invariant=False)
            try:
                plain = _counted_transformer_flops(
                    pipe, pipeline_call_kwargs(pipe, prompts, [0, 1], 3, guidance, 16, 16)
                )
            finally:
                remove_schedule(pipe)
            assert cm.with_step_invariant(False).flops(s) == plain
    assert cm.with_step_invariant(False).flop_ratio(template) == 1.0
    # caption-only projections are computed once: all-recompute already costs less than the plain run
    assert (cm.flop_ratio(template) < 1.0) == (which != "dit_pipe")  # FLUX: context embedder
    assert cm.flop_ratio(scheds[1]) < cm.flop_ratio(template)


def test_attention_is_counted_only_under_math_sdpa(pixart_pipe):
    """Negative control for the counting method: the default SDPA kernel hides attention FLOPs on CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffalign.ecad.cost import capture_transformer_call

    kw = pipeline_call_kwargs(pixart_pipe, ["a red circle"], [0], 2, 4.5, 16, 16)
    args, kwargs, calls = capture_transformer_call(pixart_pipe, kw)
    assert calls == 1
    with torch.no_grad():
        _, total_math, _ = count_flops(pixart_pipe.transformer, *args, **kwargs)
        with FlopCounterMode(display=False) as fc:
            pixart_pipe.transformer(*args, **kwargs)
    assert total_math > fc.get_total_flops()


def test_latency_model_attributes_measured_time_to_components(pixart_pipe):
    """A synthetic clock advanced by every Linear's weight size makes the 'latency' of a module exactly
    the sum of its Linears' sizes: the measured table must equal that brute-force sum, the caption K/V
    must be split out of attn2, and the overhead must hold everything else."""
    from diffalign.ecad.cost import measure_latency_model
    from diffalign.ecad.schedule import block_layout

    tr = pixart_pipe.transformer
    ticks = [0.0]
    handles = [
        m.register_forward_hook(lambda mod, a, o: ticks.__setitem__(0, ticks[0] + mod.weight.numel()))
        for m in tr.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        kw = pipeline_call_kwargs(pixart_pipe, ["a red circle"], [0], 3, 4.5, 16, 16)
        cm = measure_latency_model(pixart_pipe, kw, repeats=2, clock=lambda: ticks[0])
    finally:
        for h in handles:
            h.remove()

    def linear_sum(module):
        return float(sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear)))

    assert cm.unit == "seconds"
    for b, (group, index) in enumerate(block_layout(tr)):
        block = getattr(tr, group.attr)[index]
        for slot, comp in enumerate(group.components):
            assert cm.component_flops[b, slot] == linear_sum(getattr(block, comp))
        assert cm.invariant_component_flops[b, 1] == linear_sum(block.attn2.to_k) + linear_sum(
            block.attn2.to_v
        )
        assert cm.invariant_component_flops[b, 0] == 0 and cm.invariant_component_flops[b, 2] == 0
    assert cm.overhead_flops == linear_sum(tr) - float(cm.component_flops.sum())
    assert cm.invariant_overhead_flops == linear_sum(tr.caption_projection)
    # the same additive prediction as FLOPs: a cheaper schedule is predicted cheaper
    assert cm.flop_ratio(fora(tr, 3, 2)) < cm.flop_ratio(no_cache(tr, 3)) < 1.0
