import pytest
import torch

from diffalign.ecad.hooks import apply_schedule, get_schedule_state, remove_schedule
from diffalign.ecad.sampling import generate
from diffalign.ecad.schedule import Schedule, ScheduleError, fora, no_cache

PROMPTS = ["a red circle", "two blue squares"]


def _gen(pipe, steps=4):
    return generate(pipe, PROMPTS, [0, 1], steps, 4.5, 16, 16)


def test_all_recompute_is_bit_exact_and_removable(pixart_pipe):
    ref = _gen(pixart_pipe)
    forward_before = pixart_pipe.transformer.transformer_blocks[0].attn1.forward
    state = apply_schedule(pixart_pipe, no_cache(pixart_pipe.transformer, 4))
    try:
        out = _gen(pixart_pipe)
        assert state.reused == 0 and state.computed == 4 * 2 * 3
    finally:
        remove_schedule(pixart_pipe)
    assert torch.equal(out, ref)
    assert get_schedule_state(pixart_pipe) is None
    assert not hasattr(pixart_pipe.transformer, "_diffalign_ecad_state")
    assert torch.equal(_gen(pixart_pipe), ref)
    assert pixart_pipe.transformer.transformer_blocks[0].attn1.forward.__func__ is forward_before.__func__


def test_caching_changes_output_and_counts_follow_schedule(pixart_pipe):
    ref = _gen(pixart_pipe)
    sched = fora(pixart_pipe.transformer, 4, 2)
    state = apply_schedule(pixart_pipe, sched)
    try:
        out = _gen(pixart_pipe)
        assert state.reused == sched.num_cached() == 2 * 2 * 3
        assert state.computed == 2 * 2 * 3
        # a second generation with the same hooks restarts the step counter and gives the same images
        assert torch.equal(_gen(pixart_pipe), out)
    finally:
        remove_schedule(pixart_pipe)
    assert not torch.equal(out, ref)
    assert (out - ref).abs().max() < 0.5


def test_step_count_mismatch_and_double_apply_are_refused(pixart_pipe):
    apply_schedule(pixart_pipe, no_cache(pixart_pipe.transformer, 3))
    try:
        with pytest.raises(ScheduleError, match="num_inference_steps=4"):
            _gen(pixart_pipe, steps=4)
        with pytest.raises(ScheduleError, match="already applied"):
            apply_schedule(pixart_pipe, no_cache(pixart_pipe.transformer, 3))
    finally:
        remove_schedule(pixart_pipe)


def _block_inputs(transformer, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    cond = torch.randn(batch, 5, transformer.config.caption_channels, generator=g)
    return x, cond


def test_reuse_is_regated_by_current_step_modulation(pixart_pipe):
    """Hand-built 2-block case: block 1 reuses its step-0 self-attention output at step 1.

    Reference: run block 1 at step 1 with ``attn1`` replaced by a module returning the raw step-0
    output; the block applies the *step-1* gate_msa to it. Negative control: reusing the already gated
    step-0 contribution (gate of step 0) gives a different result.
    """
    tr = pixart_pipe.transformer
    x, cond = _block_inputs(tr)
    kw = {
        "encoder_hidden_states": cond,
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "return_dict": False,
    }
    t0, t1 = torch.tensor([900, 900]), torch.tensor([500, 500])

    # record raw attn1 output of block 1 at step 0 and block-1 inputs at step 1 (plain model)
    rec = {}
    h1 = tr.transformer_blocks[1].attn1.register_forward_hook(lambda m, a, o: rec.setdefault("attn1_t0", o))
    with torch.no_grad():
        tr(x, timestep=t0, **kw)
    h1.remove()
    h2 = tr.transformer_blocks[1].register_forward_pre_hook(
        lambda m, a, k: rec.setdefault("in_t1", (a, k)), with_kwargs=True
    )
    h3 = tr.transformer_blocks[1].register_forward_hook(lambda m, a, o: rec.setdefault("plain_out_t1", o))
    x1 = x * 0.7  # a different latent at the second step
    with torch.no_grad():
        tr(x1, timestep=t1, **kw)
    h2.remove(), h3.remove()

    sched = no_cache(tr, 2)
    sched.recompute[1, 1, 0] = False  # step 1, block 1, attn1 -> reuse
    apply_schedule(tr, sched)
    hooked = {}
    h4 = tr.transformer_blocks[1].register_forward_hook(lambda m, a, o: hooked.setdefault(len(hooked), o))
    try:
        with torch.no_grad():
            tr(x, timestep=t0, **kw)
            out_cached = tr(x1, timestep=t1, **kw)[0]
    finally:
        h4.remove()
        remove_schedule(tr)
    block_out_cached = hooked[1]

    class Replay(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, *a, **k):
            return self.value

    block = tr.transformer_blocks[1]
    original = block.attn1
    args, kwargs = rec["in_t1"]
    try:
        block.attn1 = Replay(rec["attn1_t0"])
        with torch.no_grad():
            expected = block(*args, **kwargs)
    finally:
        block.attn1 = original
    assert torch.equal(block_out_cached, expected)
    assert not torch.equal(block_out_cached, rec["plain_out_t1"])  # caching did change something

    # negative control: reuse of the gated contribution (step-0 gate) is a different approximation
    hs, temb = args[0], kwargs["timestep"]
    gate_t1 = (block.scale_shift_table[None] + temb.reshape(hs.shape[0], 6, -1)).chunk(6, dim=1)[2]
    with torch.no_grad():
        _, kw0 = _capture_block_kwargs(tr, x, t0, kw)
    gate_t0 = (block.scale_shift_table[None] + kw0["timestep"].reshape(hs.shape[0], 6, -1)).chunk(6, dim=1)[2]
    assert not torch.allclose(gate_t0, gate_t1)
    wrong = expected + (gate_t0 - gate_t1) * rec["attn1_t0"]  # stale gate applied to the stale output
    assert not torch.allclose(wrong, block_out_cached)
    assert torch.isfinite(out_cached).all()


def _capture_block_kwargs(tr, x, t, kw):
    rec = {}
    h = tr.transformer_blocks[1].register_forward_pre_hook(
        lambda m, a, k: rec.setdefault("in", (a, k)), with_kwargs=True
    )
    tr(x, timestep=t, **kw)
    h.remove()
    return rec["in"]


def test_separate_calls_per_step_get_separate_caches(pixart_pipe):
    """Two transformer calls at the same timestep (split CFG) must not share cached outputs."""
    tr = pixart_pipe.transformer
    xa, cond = _block_inputs(tr, seed=1)
    xb, _ = _block_inputs(tr, seed=2)
    kw = {
        "encoder_hidden_states": cond,
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "return_dict": False,
    }
    ts = [torch.tensor([900, 900]), torch.tensor([500, 500])]
    sched = Schedule.from_genome(torch.zeros(2 * 2 * 3, dtype=torch.bool), no_cache(tr, 2))
    with torch.no_grad():
        apply_schedule(tr, sched)
        try:
            outs = [tr(x, timestep=t, **kw)[0] for t in ts for x in (xa, xb)]
        finally:
            remove_schedule(tr)
        # reference: each stream cached on its own
        ref = []
        for x in (xa, xb):
            apply_schedule(tr, sched)
            try:
                ref.append([tr(x, timestep=t, **kw)[0] for t in ts])
            finally:
                remove_schedule(tr)
    assert torch.equal(outs[2], ref[0][1]) and torch.equal(outs[3], ref[1][1])
    assert not torch.equal(outs[2], outs[3])


class _HostSyncRecorder:
    """Patches the Tensor methods that copy a value to the host and records calls made from hooks.py."""

    METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        import sys

        import diffalign.ecad.hooks as hooks_module

        self.target = hooks_module.__file__
        self.calls: list[str] = []
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def patched(tensor, *a, _original=original, _name=name, **k):
                if sys._getframe(1).f_code.co_filename == self.target:
                    self.calls.append(_name)
                return _original(tensor, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, patched)


def test_hooks_never_copy_to_host_per_call(pixart_pipe, monkeypatch):
    """The step counter runs on the host (scheduler calls) and the schedule is a Python list: no
    `.cpu()`/`.item()`/`bool(tensor)` inside the hooks during a generation."""
    sched = fora(pixart_pipe.transformer, 4, 2)
    state = apply_schedule(pixart_pipe, sched)
    try:
        recorder = _HostSyncRecorder(monkeypatch)
        _gen(pixart_pipe)
        assert state.num_calls == 4 and state.reused == sched.num_cached()
        assert recorder.calls == []
        # negative control: the bare-transformer fallback reads the timestep, and the recorder sees it
        tr = pixart_pipe.transformer
        x, cond = _block_inputs(tr)
        kw = {
            "encoder_hidden_states": cond,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
            "return_dict": False,
        }
        remove_schedule(pixart_pipe)
        apply_schedule(tr, sched)
        with torch.no_grad():
            tr(x, timestep=torch.tensor([900, 900]), **kw)
        assert recorder.calls, "the recorder must catch a host copy made inside hooks.py"
    finally:
        remove_schedule(tr)
        monkeypatch.undo()


def test_replacing_the_scheduler_after_apply_is_refused(pixart_pipe):
    import copy

    apply_schedule(pixart_pipe, no_cache(pixart_pipe.transformer, 4))
    original = pixart_pipe.scheduler
    try:
        pixart_pipe.scheduler = copy.deepcopy(original)
        with pytest.raises(ScheduleError, match="scheduler was replaced"):
            _gen(pixart_pipe)
    finally:
        pixart_pipe.scheduler = original
        remove_schedule(pixart_pipe)
    assert "step" not in vars(original) and "set_timesteps" not in vars(original)


def test_step_invariant_cache_is_bit_exact_and_computes_caption_kv_once(pixart_pipe, monkeypatch):
    from diffalign.ecad.hooks import apply_step_invariant_cache, remove_step_invariant_cache

    ref = _gen(pixart_pipe)
    tr = pixart_pipe.transformer
    weight = tr.transformer_blocks[0].attn2.to_k.weight
    calls = []
    linear = torch.nn.functional.linear

    def counting_linear(x, w, *a, **k):  # counts real evaluations of block 0's caption key projection
        if w is weight:
            calls.append(1)
        return linear(x, w, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    state = apply_schedule(pixart_pipe, no_cache(tr, 4))
    out = _gen(pixart_pipe)
    hits = {h.name: h.hits for h in state.memo_hooks}
    remove_schedule(pixart_pipe)
    assert len(calls) == 1  # once per generation instead of once per step
    assert hits["caption_projection"] == 3 and hits["transformer_blocks.0.attn2.to_v"] == 3
    assert torch.equal(out, ref)
    # on its own (beside a built-in cache, say) and with the schedule's memo switched off
    calls.clear()
    apply_step_invariant_cache(pixart_pipe)
    assert torch.equal(_gen(pixart_pipe), ref)
    remove_step_invariant_cache(pixart_pipe)
    assert len(calls) == 1
    calls.clear()
    apply_schedule(pixart_pipe, no_cache(tr, 4), step_invariant=False)
    assert torch.equal(_gen(pixart_pipe), ref)
    remove_schedule(pixart_pipe)
    assert len(calls) == 4
    monkeypatch.undo()
    assert torch.equal(_gen(pixart_pipe), ref)


def test_step_invariant_hook_recomputes_for_a_modified_or_new_input():
    """Negative controls: a memo keyed on shape (or on the object alone) would return stale outputs."""
    from diffusers.hooks import HookRegistry

    from diffalign.ecad.hooks import MEMO_HOOK, StepInvariantHook

    lin = torch.nn.Linear(3, 2).eval()
    hook = StepInvariantHook("lin")
    HookRegistry.check_if_exists_or_initialize(lin).register_hook(hook, MEMO_HOOK)
    x = torch.ones(1, 3)
    with torch.no_grad():
        a = lin(x)
        assert lin(x) is a and hook.hits == 1
        x.add_(1)  # same object, new values
        b = lin(x)
        assert not torch.equal(a, b) and torch.equal(b, torch.nn.functional.linear(x, lin.weight, lin.bias))
        c = lin(torch.ones(1, 3))  # same shape, different object
        assert torch.equal(c, a) and c is not a and hook.hits == 1
    assert lin(x).requires_grad  # with autograd on, the memo is bypassed
