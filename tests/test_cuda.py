"""On a CUDA GPU: the generate equality suite on the Triton kernels (skipped where no GPU exists)."""

import pytest
import torch

import hf_paged.compat
import hf_paged.graphs
from hf_paged.testing import left_pad
from tiny_models import FAMILIES, GRAPH_FALLBACK, GRAPH_FALLBACK_SOMETIMES, cache_of, cyclic_gc_off, left_padded_batch, make_pair

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def cuda_pair(request):
    paged, stock = make_pair(request.param)
    return request.param, paged.cuda(), stock.cuda()


def _gen(model, ids, mask, **kw):
    return model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), return_dict_in_generate=True,
                          pad_token_id=0, eos_token_id=None, **kw)


@pytest.mark.parametrize("graphs,cascade", [("on", None), ("off", None), ("on", "1"), ("on", "0")])
def test_greedy_beam_sample_on_triton(cuda_pair, graphs, cascade, monkeypatch):
    """Stock's tokens from the Triton kernels, with the decode steps replayed as CUDA graphs (the
    default) and run eagerly; and with the shared-prefix decode forced (beams and samples share
    their prompt's blocks)."""
    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    monkeypatch.setenv("HF_PAGED_CUDA_GRAPHS", "1" if graphs == "on" else "0")
    if cascade is None:
        monkeypatch.delenv("HF_PAGED_CASCADE", raising=False)
    else:
        monkeypatch.setenv("HF_PAGED_CASCADE", cascade)
    name, paged, stock = cuda_pair
    ids, mask = left_padded_batch([5, 41, 23], seed=1)
    for kw in (dict(max_new_tokens=12, do_sample=False, output_logits=True),
               dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False),
               dict(max_new_tokens=8, do_sample=True, top_k=0, num_return_sequences=3)):
        torch.manual_seed(3)
        ref = _gen(stock, ids, mask, **kw)
        torch.manual_seed(3)
        # the model's first replay over padded rows (these are) is checked
        checked = "padded" not in paged.__dict__.get("_hf_paged_graphs_verified", ())
        out = _gen(paged, ids, mask, **kw)
        assert torch.equal(out.sequences, ref.sequences), (name, kw)
        if "output_logits" in kw:
            for a, b in zip(out.logits, ref.logits):
                torch.testing.assert_close(a, b, atol=1e-3, rtol=0)  # tf32-free fp32: far below
        cache = cache_of(out)
        assert cache.key_cache[0].is_cuda
        state = cache.graph_state
        off = paged.__dict__.get("_hf_paged_graphs_off")
        if graphs == "on" and (name in GRAPH_FALLBACK or (name in GRAPH_FALLBACK_SOMETIMES and off)):
            # tried once per model, then eager
            assert "reads a device value on the host" in off, name
            assert state is None or state.replays == 0, name
        elif graphs == "on":  # captured once (checked once per model), then replayed for every later step
            assert state.disabled is None, (name, state.disabled)
            assert (state.captures, state.replays) == (1, kw["max_new_tokens"] - 2 - checked), name
            # captured in parts, one graph per decoder layer here (2 layers; 4 for gemma3n)
            (graph,) = state.graphs.values()
            layers = len(hf_paged.compat.decoder_layers(paged))
            assert layers == paged.config.get_text_config().num_hidden_layers, name
            assert graph.replay.segments == min(layers, hf_paged.graphs.DEFAULT_SEGMENTS), name
        else:
            assert state is None


def test_prompt_lookup_on_triton(cuda_pair, monkeypatch):
    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    name, paged, stock = cuda_pair
    pattern = torch.randint(3, 256, (7,), generator=torch.Generator().manual_seed(4))
    ids = torch.cat([pattern, pattern, pattern[:4]]).unsqueeze(0)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=14, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(_gen(paged, ids, mask, **kw).sequences, _gen(stock, ids, mask, **kw).sequences), name


def test_stop_read_one_step_late_on_cuda(cuda_pair, monkeypatch):
    """On CUDA a PagedCache's generate reads "every row finished" one step late (no host-device
    synchronisation per step; transformers' DeferredStopCheck with real events): rows stopping at
    EOS before max_new_tokens give stock's tokens and logits, the extra step undone, the returned
    cache as long as the sequences."""
    from transformers.generation import utils as generation_utils

    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    monkeypatch.delenv("HF_PAGED_DEFERRED_STOP", raising=False)
    undone = []
    finish = generation_utils.DeferredStopCheck.finish
    monkeypatch.setattr(generation_utils.DeferredStopCheck, "finish",
                        lambda self: undone.append(finish(self)) or undone[-1])
    name, paged, stock = cuda_pair
    ids, mask = left_padded_batch([5, 41, 23], seed=1)
    free = _gen(stock, ids, mask, max_new_tokens=12, do_sample=False).sequences
    eos = sorted({int(free[row, ids.shape[1] + step]) for row, step in enumerate((2, 5, 8))})
    kw = dict(max_new_tokens=12, do_sample=False, output_logits=True)
    ref = stock.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), return_dict_in_generate=True,
                         pad_token_id=0, eos_token_id=eos, **kw)
    out = paged.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), return_dict_in_generate=True,
                         pad_token_id=0, eos_token_id=eos, **kw)
    assert ref.sequences.shape[1] < ids.shape[1] + 12, name  # every row stopped early
    assert undone == [1], name
    assert torch.equal(out.sequences, ref.sequences), name
    assert len(out.logits) == len(ref.logits), name
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
    assert cache_of(out).get_seq_length() == out.sequences.shape[1] - 1, name


@pytest.mark.parametrize("cascade", ["0", "1"])
def test_decode_step_has_no_host_device_sync(monkeypatch, cascade):
    """A decode forward (after the prefill) on the Triton path never synchronises with the GPU
    (with the shared-prefix decode too: its plan is made on the host)."""
    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    monkeypatch.setenv("HF_PAGED_CASCADE", cascade)
    from hf_paged import PagedCache

    paged, _ = make_pair("llama")
    paged = paged.cuda()
    ids, mask = left_padded_batch([5, 41, 23], seed=2)
    ids, mask = ids.cuda(), mask.cuda()
    cache = PagedCache(config=paged.config)
    with torch.no_grad():
        logits = paged(ids, attention_mask=mask, past_key_values=cache).logits
        nxt = logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        paged(nxt, attention_mask=mask, past_key_values=cache)  # compiles the decode kernels
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            paged(nxt, attention_mask=mask, past_key_values=cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert cache.seq_lens == [5 + 2, 41 + 2, 23 + 2]


def test_finished_cache_frees_its_pools_without_the_cyclic_collector(monkeypatch):
    """With CUDA graphs (the default), a generate's cache and its pools go as soon as the user's
    last reference goes: the next call of a loop does not run beside the previous call's pools."""
    import weakref

    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    monkeypatch.setenv("HF_PAGED_CUDA_GRAPHS", "1")
    paged, _ = make_pair("llama")
    paged = paged.cuda()
    ids, mask = left_padded_batch([5, 41, 23], seed=5)
    with cyclic_gc_off():
        for kw in (dict(do_sample=False), dict(num_beams=3), dict(do_sample=True, num_return_sequences=3)):
            out = _gen(paged, ids, mask, max_new_tokens=8, **kw)
            cache = cache_of(out)
            assert cache.graph_state.replays > 0, kw  # the graph path ran
            ref = weakref.ref(cache)
            pool_bytes = sum(k.numel() * k.element_size() * 2 for k in cache.key_cache)
            del cache
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            del out
            assert ref() is None, kw
            assert torch.cuda.memory_allocated() <= before - pool_bytes, kw


def test_engine_graphed_decode_equals_generate_alone(cuda_pair, monkeypatch):
    """generate_many on the GPU: decode steps replayed as CUDA graphs over bucketed batch sizes
    (pad rows in each bucket), the batch shrinking as requests end; each result equals
    model.generate on its prompt alone, and sampling equals the eager engine's."""
    import hf_paged

    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    name, paged, stock = cuda_pair
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 40, 17, 3, 61, 9, 33)]
    limits = (20, 6, 14, 3, 11, 20, 9)
    seen = []
    results = hf_paged.generate_many(paged, [hf_paged.Request(p, max_new_tokens=n) for p, n in zip(prompts, limits)],
                                     do_sample=False, eos_token_id=None, pad_token_id=0, progress=seen.append)
    for p, n, r in zip(prompts, limits, results):
        ids = torch.tensor([p], device="cuda")
        ref = stock.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert r.sequences[0] == ref, name
    stats = seen[-1]
    off = paged.__dict__.get("_hf_paged_graphs_off")
    if name in GRAPH_FALLBACK or (name in GRAPH_FALLBACK_SOMETIMES and off):
        assert "reads a device value on the host" in stats["graphs_off"], name
    else:
        assert stats["graphs_off"] is None and stats["graph_replays"] > 0, (name, stats)
        assert stats["decode_slots"] > stats["decode_rows"]  # buckets ran pad rows
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.9, num_return_sequences=3, seed=4, eos_token_id=None,
              pad_token_id=0)
    graphed = hf_paged.generate_many(paged, prompts[:3], **kw)
    monkeypatch.setenv("HF_PAGED_CUDA_GRAPHS", "0")
    eager = hf_paged.generate_many(paged, prompts[:3], **kw)
    assert [r.sequences for r in graphed] == [r.sequences for r in eager], name


def test_shared_preamble_computed_once_on_triton(cuda_pair, monkeypatch):
    """Prefix compute sharing on the GPU: 8 prompts with a 96-token preamble compute it once in a
    call (the others prefill their question against the stored blocks through the Triton kernels),
    a second call over a PrefixCache computes only the questions, and the engine shares it too;
    every path gives stock's tokens."""
    import hf_paged

    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    name, paged, stock = cuda_pair
    g = torch.Generator().manual_seed(0)
    preamble = torch.randint(3, 256, (96,), generator=g)
    suffixes = (9, 21, 3, 40, 17, 30, 1, 12)
    prefix = hf_paged.PrefixCache(max_memory="64MiB")
    for call in range(2):
        rows = [torch.cat([preamble, torch.randint(3, 256, (n,), generator=g)]) for n in suffixes]
        ids, mask = left_pad(rows)
        ref = _gen(stock, ids, mask, max_new_tokens=6, do_sample=False)
        out = _gen(paged, ids, mask, max_new_tokens=6, do_sample=False, prefix_cache=prefix)
        assert torch.equal(out.sequences, ref.sequences), (name, call)
        stats = cache_of(out).memory_stats()
        assert stats["tokens_prefilled"] == (96 if call == 0 else 0) + sum(suffixes), (name, call)
        prompts = [r.tolist() for r in rows]
    seen = []
    results = hf_paged.generate_many(paged, prompts, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                     pad_token_id=0, progress=seen.append)
    assert seen[-1]["tokens_prefilled"] == 96 + sum(suffixes), name
    for prompt, result in zip(prompts, results):
        alone = torch.tensor([prompt])
        expected = _gen(stock, alone, torch.ones_like(alone), max_new_tokens=6, do_sample=False).sequences
        assert result.sequences[0] == expected[0, len(prompt):].tolist(), name


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_kept_graph_replays_over_grown_prefix_cache_pools(family, monkeypatch):
    """Real CUDA graphs over a PrefixCache whose pools grow between calls: the graph the first
    call captured reads the enlarged pools through their addresses tensors, so a later call of
    the same shape replays it (no capture) and gets stock's tokens. (Latent attention, which
    captures again after growth, is tested on CPU: DeepSeek's graphs are not always capturable.)"""
    import hf_paged

    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    paged, stock = make_pair(family)
    paged, stock = paged.cuda(), stock.cuda()
    g = torch.Generator().manual_seed(1)
    preamble = torch.randint(3, 256, (48,), generator=g)
    prefix = hf_paged.PrefixCache(max_memory="256MiB")
    seen = []
    for lengths in [(5, 9, 13), (6, 8, 12), (5, 9, 13) * 4, (7, 9, 13)]:
        rows = [torch.cat([preamble, torch.randint(3, 256, (n,), generator=g)]) for n in lengths]
        ids, mask = left_pad(rows)
        version = prefix.pools.version
        out = _gen(paged, ids, mask, max_new_tokens=10, do_sample=False, prefix_cache=prefix)
        ref = _gen(stock, ids, mask, max_new_tokens=10, do_sample=False)
        assert torch.equal(out.sequences, ref.sequences), (family, lengths)
        state = cache_of(out).graph_state
        assert state.disabled is None, family
        seen.append((state.captures, state.replays, version, prefix.pools.version))
    assert seen[2][3] > seen[2][2], "the third call did not grow the pools: the case tests nothing"
    assert seen[1][0] == 0 and (seen[3][0], seen[3][1]) == (0, 10 - 1), (family, seen)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text"])
def test_window_blocks_released_on_triton(family, monkeypatch):
    """Sliding-window layers free the blocks that leave their window while the Triton kernels
    (with their key tiles that start before the window) and the CUDA graphs run: stock's tokens
    over ten windows, and a bounded number of blocks held by the windowed layers."""
    from test_window_blocks import NEW, WINDOW, _pair, _row_bound

    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    paged, stock = _pair(family)
    paged, stock = paged.cuda(), stock.cuda()
    ids, mask = left_padded_batch([37, 5, 20], seed=2)
    ref = _gen(stock, ids, mask, max_new_tokens=NEW, do_sample=False, output_logits=True)
    out = _gen(paged, ids, mask, max_new_tokens=NEW, do_sample=False, output_logits=True)
    assert torch.equal(out.sequences, ref.sequences), family
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
    stats = cache_of(out).memory_stats()
    assert stats["window"] == WINDOW and stats["window_blocks_used"] <= 3 * _row_bound(), (family, stats)
    assert cache_of(out).graph_state.replays > NEW // 2, family
