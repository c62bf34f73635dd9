"""Decode steps through CUDA graphs (hf_paged/graphs.py), on CPU.

The CUDA capture is replaced by a stand-in that runs the captured function again at each replay:
everything but the graph itself is exercised (static buffers, block tables padded to one width,
positions from a device tensor, the check of the first replay against the eager step, the
fallbacks). tests/test_cuda.py runs real graphs on the GPU.
"""

import logging
import weakref

import pytest
import torch

from tiny_models import FAMILIES, assert_logits_close, cache_of, cyclic_gc_off, left_padded_batch, make_pair

import hf_paged
from hf_paged import graphs
from hf_paged.testing import left_pad


@pytest.fixture(autouse=True)
def _replays_run_no_python(replays_run_no_python):
    """Every test here: the stand-in replays undo the static step's Python effects (conftest.py)."""


def _gen(model, ids, mask, **kw):
    kw.update(pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    return model.generate(input_ids=ids, attention_mask=mask, **kw)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request):
    paged, stock = make_pair(request.param)
    return request.param, paged, stock


def test_graphed_decode_equals_stock(pair, fake_graphs):
    name, paged, stock = pair
    ids, mask = left_padded_batch([5, 41, 23], seed=1)
    cases = [
        dict(max_new_tokens=12, do_sample=False, output_logits=True),
        dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False),
        dict(max_new_tokens=10, do_sample=True, top_k=0, num_return_sequences=3),
    ]
    paged.__dict__.pop("_hf_paged_graphs_verified", None)  # the module's model: as if new
    for i, kw in enumerate(cases):
        torch.manual_seed(7)
        ref = _gen(stock, ids, mask, **kw)
        torch.manual_seed(7)
        out = _gen(paged, ids, mask, **kw)
        assert torch.equal(out.sequences, ref.sequences), (name, kw)
        assert_logits_close(out, ref, kw)
        state = cache_of(out).graph_state
        # one graph for the whole generate (the table width is the reservation's bound), checked
        # against the eager step in the model's first call only, then replayed for every later step
        assert state.disabled is None, (name, state.disabled)
        assert state.captures == 1
        checked = 1 if i == 0 else 0
        assert state.replays == kw["max_new_tokens"] - 2 - checked  # prefill, capture step(, checked step)
    assert "forward" not in paged.__dict__  # the stand-in forward lives for one generate call


def test_graphs_off_by_env(fake_graphs, monkeypatch):
    paged, stock = make_pair("llama")
    ids, mask = left_padded_batch([7, 19], seed=2)
    monkeypatch.setenv(graphs.ENV_VAR, "0")
    out = _gen(paged, ids, mask, max_new_tokens=5, do_sample=False)
    assert cache_of(out).graph_state is None
    assert torch.equal(out.sequences, _gen(stock, ids, mask, max_new_tokens=5, do_sample=False).sequences)


def test_replay_that_disagrees_with_eager_turns_graphs_off(monkeypatch, caplog):
    """A graph whose replay gives other logits than the eager step (what a host value kept from
    the capture step would do) is dropped with a warning; decoding continues eagerly, exactly."""
    def bad_capture(run, pool, starts=()):
        def replay():
            cls, fields = run()
            fields["logits"] = fields["logits"] + 1.0
            return cls, fields
        return replay

    monkeypatch.setattr(graphs, "_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(graphs, "_CAPTURE", bad_capture)
    paged, stock = make_pair("llama")
    ids, mask = left_padded_batch([7, 19], seed=2)
    with caplog.at_level(logging.WARNING, logger="hf_paged"):
        out = _gen(paged, ids, mask, max_new_tokens=8, do_sample=False)
    state = cache_of(out).graph_state
    assert "replayed decode step gave logits up to 1 away" in state.disabled
    assert state.replays == 0
    assert "CUDA graphs are off for this model" in caplog.text
    assert torch.equal(out.sequences, _gen(stock, ids, mask, max_new_tokens=8, do_sample=False).sequences)


def test_capture_failure_falls_back(monkeypatch, caplog):
    attempts = []

    def failing_capture(run, pool, starts=()):
        attempts.append(1)
        raise graphs.NotCapturable("the model's forward reads a device value on the host")

    monkeypatch.setattr(graphs, "_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(graphs, "_CAPTURE", failing_capture)
    paged, stock = make_pair("qwen2")
    ids, mask = left_padded_batch([4, 30, 17], seed=4)
    kw = dict(max_new_tokens=6, num_beams=2, do_sample=False)
    with caplog.at_level(logging.WARNING, logger="hf_paged"):
        out = _gen(paged, ids, mask, **kw)
    assert "CUDA graphs are off for this model: capturing the decode step failed (the model's forward reads" in caplog.text
    assert cache_of(out).graph_state.disabled
    assert torch.equal(out.sequences, _gen(stock, ids, mask, **kw).sequences)
    # the model is not tried again: no second capture, no second warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_paged"):
        again = _gen(paged, ids, mask, **kw)
    assert attempts == [1] and "CUDA graphs" not in caplog.text
    assert torch.equal(again.sequences, out.sequences)


def test_transient_capture_failure_is_tried_again(monkeypatch, caplog):
    """A capture that fails for another reason (say, out of memory) turns graphs off for that
    generate call only."""
    attempts = []

    def flaky_capture(run, pool, starts=()):
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("CUDA error: out of memory")
        return run

    monkeypatch.setattr(graphs, "_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(graphs, "_CAPTURE", flaky_capture)
    paged, stock = make_pair("llama")
    ids, mask = left_padded_batch([4, 30], seed=6)
    kw = dict(max_new_tokens=7, do_sample=False)
    with caplog.at_level(logging.WARNING, logger="hf_paged"):
        first = _gen(paged, ids, mask, **kw)
    assert "CUDA graphs are off for this generate call: capturing the decode step failed (RuntimeError: CUDA error" \
        in caplog.text
    second = _gen(paged, ids, mask, **kw)
    assert cache_of(second).graph_state.replays == 7 - 3
    ref = _gen(stock, ids, mask, **kw).sequences
    assert torch.equal(first.sequences, ref) and torch.equal(second.sequences, ref)


def test_new_width_recaptures(fake_graphs):
    """A cache continued past the bound of its generate call gets a wider graph."""
    paged, stock = make_pair("llama")
    ids, mask = left_padded_batch([30], seed=5)
    cache = hf_paged.PagedCache(config=paged.config)
    kw = dict(max_new_tokens=20, do_sample=False)
    out = _gen(paged, ids, mask, past_key_values=cache, **kw)
    assert cache.graph_state.captures == 1
    cache.max_row_blocks = 1  # as if the reservation knew less: widths then grow by powers of two
    graph = next(iter(cache.graph_state.graphs.values()))
    assert graph.width == 4  # ceil((30 + 20 - 1) / 16)
    seq = out.sequences
    out2 = _gen(paged, seq, torch.ones_like(seq), past_key_values=cache, max_new_tokens=300, do_sample=False)
    ref = _gen(stock, ids, mask, max_new_tokens=320, do_sample=False)
    assert torch.equal(out2.sequences, ref.sequences)
    widths = [g.width for g in cache.graph_state.graphs.values()]
    assert widths == [32]  # the old graph is dropped; 30 + 320 tokens need 22 blocks -> 32
    assert cache.graph_state.captures >= 2


def test_tensor_parallel_ranks_decode_eagerly(fake_graphs, monkeypatch):
    """Under torch.distributed with several ranks no rank captures (ranks must run the same
    collectives, so a capture failing on one rank alone must never happen)."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    paged, stock = make_pair("llama")
    ids, mask = left_padded_batch([6, 20], seed=8)
    out = _gen(paged, ids, mask, max_new_tokens=6, do_sample=False)
    assert cache_of(out).graph_state is None
    assert torch.equal(out.sequences, _gen(stock, ids, mask, max_new_tokens=6, do_sample=False).sequences)


def test_finished_cache_is_freed_without_the_cyclic_collector(fake_graphs):
    """The cache holds its graphs and nothing captured holds the cache: once the user's last
    reference goes, so do the pools (a loop of generate calls must not hold the previous call's
    pools while the next runs). Checked with the cyclic collector off."""
    paged, _ = make_pair("llama")
    ids, mask = left_padded_batch([5, 20], seed=1)
    with cyclic_gc_off():
        for kw in (dict(do_sample=False), dict(num_beams=2), dict(do_sample=True, num_return_sequences=2)):
            out = _gen(paged, ids, mask, max_new_tokens=6, **kw)
            cache = cache_of(out)
            assert cache.graph_state.captures == 1, kw  # the graph path ran
            ref = weakref.ref(cache)
            del out, cache
            assert ref() is None, kw


@pytest.mark.parametrize("family", ["gemma2", "llama4_text"])
def test_graphed_steps_between_crops_of_assisted_decoding(family, fake_graphs):
    """Prompt-lookup decoding mixes verify steps (several tokens, eager), crops of the rejected
    tokens and one-token steps (replayed): a replay must leave the cache's length where the step
    ends, or the next crop keeps rejected tokens."""
    paged, stock = make_pair(family)
    pattern = torch.randint(3, 256, (7,), generator=torch.Generator().manual_seed(4))
    ids = torch.cat([pattern, pattern, pattern[:4]]).unsqueeze(0)
    kw = dict(max_new_tokens=14, do_sample=False, prompt_lookup_num_tokens=3)
    out = _gen(paged, ids, torch.ones_like(ids), **kw)
    assert cache_of(out).graph_state.replays > 0
    assert torch.equal(out.sequences, _gen(stock, ids, torch.ones_like(ids), **kw).sequences)


def test_graphed_decode_over_a_prefix_cache(fake_graphs):
    """Calls over one PrefixCache: the pool is shared and outlives each call's cache; every call's
    decode is replayed (the reservation leaves nothing to grow inside a graph), and the second call
    replays the graph the first one captured (the prefix cache keeps it with its pools): no capture,
    no eager step, every decode step a replay."""
    paged, stock = make_pair("llama")
    paged.__dict__.pop("_hf_paged_graphs_verified", None)  # the module's model: as if new
    prefix = hf_paged.PrefixCache(max_memory="16MiB")
    g = torch.Generator().manual_seed(3)
    preamble = torch.randint(3, 256, (48,), generator=g)
    for seed in (1, 2):
        q = [torch.randint(3, 256, (n,), generator=g) for n in (5, 17, 9)]
        rows = [torch.cat([preamble, x]) for x in q]
        ids, mask = left_pad(rows)
        ref = _gen(stock, ids, mask, max_new_tokens=10, do_sample=False)
        out = _gen(paged, ids, mask, max_new_tokens=10, do_sample=False, prefix_cache=prefix)
        assert torch.equal(out.sequences, ref.sequences), seed
        state = cache_of(out).graph_state
        assert state.disabled is None, seed
        if seed == 1:  # one graph for the call: a capture step, a checked step, then replays
            assert (state.captures, state.replays) == (1, 10 - 3)
        else:  # the first call's graph: every decode step replayed
            assert (state.captures, state.replays) == (0, 10 - 1)
        assert len(prefix.graph_store.graphs) == 1
    assert cache_of(out).memory_stats()["tokens_reused"] == 3 * 48
    # another model (other weights) over the same pools never replays the first one's graph
    other, other_stock = make_pair("llama", seed=5)
    out = _gen(other, ids, mask, max_new_tokens=10, do_sample=False, prefix_cache=prefix)
    assert torch.equal(out.sequences, _gen(other_stock, ids, mask, max_new_tokens=10, do_sample=False).sequences)
    assert cache_of(out).graph_state.captures == 1 and len(prefix.graph_store.graphs) == 2
    prefix.clear()  # its tensors are freed: the graphs that address them go too
    assert prefix.graph_store is None


def _prefix_calls(paged, stock, prefix, questions, seed=3, new=10):
    """Calls over ``prefix``, one per entry of ``questions`` (question lengths of its 3 rows after a
    48-token preamble): each call's tokens equal stock's; returns each call's (captures, replays,
    pools' version before the call, after)."""
    g = torch.Generator().manual_seed(seed)
    preamble = torch.randint(3, 256, (48,), generator=g)
    seen = []
    for lengths in questions:
        rows = [torch.cat([preamble, torch.randint(3, 256, (n,), generator=g)]) for n in lengths]
        ids, mask = left_pad(rows)
        version = prefix.pools.version
        out = _gen(paged, ids, mask, max_new_tokens=new, do_sample=False, prefix_cache=prefix)
        assert torch.equal(out.sequences, _gen(stock, ids, mask, max_new_tokens=new, do_sample=False).sequences)
        state = cache_of(out).graph_state
        assert state.disabled is None
        seen.append((state.captures, state.replays, version, prefix.pools.version))
    return seen


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_kept_graph_serves_calls_after_its_prefix_cache_pools_grew(family, fake_graphs):
    """The kernels find the pools through LayerPools.addresses, so the graph a PrefixCache keeps
    outlives the growth of its pools: a later call over enlarged pools replays it (no capture),
    with stock's tokens (a real replay reading the freed pools would not give them:
    test_cuda.py runs this on the GPU)."""
    paged, stock = make_pair(family)
    prefix = hf_paged.PrefixCache(max_memory="16MiB")
    # the same table width (4 blocks of 16: 48 + 5..13 + 10 tokens); many more rows in the third
    seen = _prefix_calls(paged, stock, prefix, [(5, 9, 13), (6, 8, 12), (5, 9, 13) * 4])
    (c1, _, _, v1), (c2, r2, _, v2), (c3, r3, before3, v3) = seen
    assert c1 == 1 and (c2, r2) == (0, 10 - 1) and v2 == v1
    assert v3 > before3, "the third call's rows did not make the pool grow: the case tests nothing"
    assert c3 == 1 and len(prefix.graph_store.graphs) == 2  # a batch of 12 rows: a graph of its own
    # and the batch of 3 again, over the grown pools: the first call's graph replays
    (c4, r4, _, _), = _prefix_calls(paged, stock, prefix, [(5, 9, 13)], seed=4)
    assert (c4, r4) == (0, 10 - 1)


def test_a_graph_kept_from_an_inference_mode_call_replays_in_a_plain_call(fake_graphs):
    """A PrefixCache's graph captured under torch.inference_mode serves a later call made without
    it: its static buffers, updated in place at every replay, are not inference tensors."""
    paged, stock = make_pair("llama")
    prefix = hf_paged.PrefixCache(max_memory="16MiB")
    with torch.inference_mode():
        _prefix_calls(paged, stock, prefix, [(5, 9, 13)])
    (captures, replays, _, _), = _prefix_calls(paged, stock, prefix, [(6, 8, 12)], seed=4)
    assert (captures, replays) == (0, 10 - 1)


def test_a_graph_that_read_pools_directly_is_captured_again_after_they_grew(fake_graphs):
    """A step whose attention read a pool other than through its addresses tensor (latent
    attention gathers it in PyTorch) holds the pools' own addresses: after they grew it is captured
    again, never replayed over the freed tensors."""
    paged, stock = make_pair("deepseek_v3")
    prefix = hf_paged.PrefixCache(max_memory="64MiB")
    seen = _prefix_calls(paged, stock, prefix, [(5, 9, 13), (6, 8, 12), (5, 9, 13) * 4, (5, 9, 13)])
    graph = next(iter(prefix.graph_store.graphs.values()))
    assert graph.direct_pool_reads[0]
    assert seen[1][0] == 0 and seen[1][3] == seen[0][3]  # same pools: replayed
    assert seen[2][3] > seen[2][2]  # the third call grew them
    assert seen[3][0] == 1  # the batch of 3 again: captured anew over the grown pools


def test_a_reset_cache_never_replays_another_models_graph(fake_graphs):
    """A user's cache, reset and given to another model with the same shapes (the pools stay): the
    graph key carries the model's key, so the second model captures its own graph and gets its own
    tokens (it replayed the first model's graph before the key had it)."""
    a, a_stock = make_pair("llama", seed=0)
    b, b_stock = make_pair("llama", seed=5)
    ids, mask = left_padded_batch([5, 41, 23], seed=1)
    kw = dict(max_new_tokens=10, do_sample=False)
    cache = hf_paged.PagedCache()
    out = _gen(a, ids, mask, past_key_values=cache, **kw)
    assert torch.equal(out.sequences, _gen(a_stock, ids, mask, **kw).sequences)
    cache.reset()
    out = _gen(b, ids, mask, past_key_values=cache, **kw)
    assert torch.equal(out.sequences, _gen(b_stock, ids, mask, **kw).sequences)
    assert cache.graph_state.captures == 2


def test_replay_check_once_per_model_for_padded_and_for_unpadded_rows(fake_graphs):
    """The replay runs without the 2D mask: a model checked on unpadded rows only is checked again
    at its first graph over padded rows, then neither is checked again."""
    paged, stock = make_pair("qwen2", seed=2)
    kw = dict(max_new_tokens=8, do_sample=False)
    full = torch.randint(3, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    padded, padded_mask = left_padded_batch([5, 12, 9], seed=3)
    for ids, mask, checked in ((full, torch.ones_like(full), 1), (full, torch.ones_like(full), 0),
                               (padded, padded_mask, 1), (padded, padded_mask, 0)):
        out = _gen(paged, ids, mask, **kw)
        assert torch.equal(out.sequences, _gen(stock, ids, mask, **kw).sequences)
        state = cache_of(out).graph_state
        assert (state.captures, state.replays) == (1, 8 - 2 - checked), checked
    assert paged.__dict__["_hf_paged_graphs_verified"] == {"padded", "unpadded"}


def test_a_kept_graph_is_checked_at_its_models_first_padded_replay(fake_graphs):
    """A prefix cache's graph captured and checked over unpadded rows, replayed by a later call
    over padded rows of the same shapes: that replay is checked (the model's first over padded
    rows), not trusted for being the same graph."""
    paged, stock = make_pair("qwen2", seed=4)
    prefix = hf_paged.PrefixCache(max_memory="16MiB")
    kw = dict(max_new_tokens=8, do_sample=False)
    full = torch.randint(3, 200, (3, 12), generator=torch.Generator().manual_seed(1))
    padded, padded_mask = left_padded_batch([12, 7, 10], seed=5)  # the same width: the same graph
    for ids, mask, expected in ((full, torch.ones_like(full), (1, 8 - 3)), (padded, padded_mask, (0, 8 - 2)),
                                (padded, padded_mask, (0, 8 - 1))):
        out = _gen(paged, ids, mask, prefix_cache=prefix, **kw)
        assert torch.equal(out.sequences, _gen(stock, ids, mask, **kw).sequences)
        state = cache_of(out).graph_state
        assert (state.captures, state.replays) == expected


def test_graphed_shared_prefix_decode_replays_any_plan(fake_graphs, monkeypatch):
    """A step captured with the shared-prefix (cascade) attention keeps it for the graph's life: its
    groups live in the static metadata buffer, refreshed every step, and the kernels' grids depend
    on the batch size only, so steps whose groups differ from the capture step's (beams reordered
    every step) replay correctly. Runs the Triton kernels (the interpreter on CPU)."""
    from hf_paged.kernels import available_backends

    if "triton" not in available_backends():
        pytest.skip("needs the Triton kernels (a GPU or TRITON_INTERPRET=1)")
    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    monkeypatch.setenv("HF_PAGED_CASCADE", "1")
    paged, stock = make_pair("llama", seed=3)
    ids, mask = left_padded_batch([40, 75], seed=27)
    kw = dict(max_new_tokens=8, num_beams=3, do_sample=False)
    out = _gen(paged, ids, mask, **kw)
    assert torch.equal(out.sequences, _gen(stock, ids, mask, **kw).sequences)
    state = cache_of(out).graph_state
    assert state.disabled is None and state.captures == 1 and state.replays == 8 - 3
    graph = next(iter(state.graphs.values()))
    assert graph.meta.cascade is not None
    static = graph.meta.packed.untyped_storage().data_ptr()
    assert graph.meta.cascade.own_start.untyped_storage().data_ptr() == static  # a view of the static buffer


def test_graph_segments_setting_and_split_points(monkeypatch):
    """HF_PAGED_GRAPH_SEGMENTS: graphs per decode step, split at evenly spread decoder layers (at
    most one per layer); a bad value names the variable."""
    model, _ = make_pair("llama")
    layers = hf_paged.compat.decoder_layers(model)  # 2
    monkeypatch.delenv("HF_PAGED_GRAPH_SEGMENTS", raising=False)
    assert graphs.graph_segments() == graphs.DEFAULT_SEGMENTS
    monkeypatch.setenv("HF_PAGED_GRAPH_SEGMENTS", "1")
    assert graphs.graph_segments() == 1
    assert graphs.segment_starts(model, 1) == ()
    assert graphs.segment_starts(model, 2) == (layers[1],)
    assert graphs.segment_starts(model, 8) == (layers[1],)
    for bad in ("0", "two", "-3"):
        monkeypatch.setenv("HF_PAGED_GRAPH_SEGMENTS", bad)
        with pytest.raises(ValueError, match="HF_PAGED_GRAPH_SEGMENTS"):
            graphs.graph_segments()
    # read once per generate call, at its start
    ids, mask = left_padded_batch([3, 5], seed=1)
    with pytest.raises(ValueError, match="HF_PAGED_GRAPH_SEGMENTS='-3'"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)

    class Deep(torch.nn.Module):  # 32 layers into 4 graphs: the later ones start at 8, 16, 24
        def __init__(self):
            super().__init__()
            self.config = type(model.config)(num_hidden_layers=32)
            self.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(32))

    deep = Deep()
    assert graphs.segment_starts(deep, 4) == (deep.layers[8], deep.layers[16], deep.layers[24])


@pytest.mark.parametrize("name", ["HF_PAGED_CUDA_GRAPHS", "HF_PAGED_WINDOW_BLOCKS", "HF_PAGED_PACKED_PREFILL",
                                  "HF_PAGED_CASCADE", "HF_PAGED_DEFERRED_STOP", "HF_PAGED_FUSED_NORMS"])
def test_on_off_switches_read_alike(name, monkeypatch):
    """Every on/off switch takes 1/true/on/yes and 0/false/off/no in any case, is on (auto for
    the cascade) when unset, and refuses a typo by name instead of keeping its default."""
    from hf_paged.cache import _window_layers
    from hf_paged.generation import deferred_stop_enabled, packed_prefill_enabled
    from hf_paged import norms
    from hf_paged.kernels import cascade

    mistral = make_pair("mistral")[0].config
    read = {"HF_PAGED_CUDA_GRAPHS": graphs.graphs_enabled,
            "HF_PAGED_WINDOW_BLOCKS": lambda: bool(_window_layers(mistral)[1]),
            "HF_PAGED_PACKED_PREFILL": packed_prefill_enabled,
            "HF_PAGED_CASCADE": cascade.setting,
            "HF_PAGED_DEFERRED_STOP": deferred_stop_enabled,
            "HF_PAGED_FUSED_NORMS": norms.enabled}[name]
    monkeypatch.delenv(name, raising=False)
    assert read() is (None if name == "HF_PAGED_CASCADE" else True)
    for value, expected in (("1", True), (" On", True), ("YES", True), ("0", False), ("off", False), ("No", False)):
        monkeypatch.setenv(name, value)
        assert read() is expected, value
    monkeypatch.setenv(name, "maybe")
    with pytest.raises(ValueError, match=f"{name}='maybe' is not understood"):
        read()
