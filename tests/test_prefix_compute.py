"""Prefix compute sharing: prompts that share leading full blocks compute them once in a
``generate`` call, a PrefixCache keeps them for later calls, and the engine reuses them; tokens
stay stock's."""

import pytest
import torch
from tiny_models import FAMILIES, cache_of, make_pair

import hf_paged
from hf_paged import PagedCache, PrefixCache
from hf_paged.testing import left_pad

PREAMBLE = 96
SUFFIXES = (9, 21, 3, 40, 17, 30, 1, 12)
FAST = ["llama", "mistral", "gemma2", "qwen3", "gpt2", "llama4_text"]


def _batch(seed, preamble_seed=0, suffixes=SUFFIXES, preamble=PREAMBLE):
    """Left-padded prompts: one shared preamble, then each its own question."""
    g = torch.Generator().manual_seed(preamble_seed)
    pre = torch.randint(3, 256, (preamble,), generator=g)
    g = torch.Generator().manual_seed(1000 + seed)
    rows = [torch.cat([pre, torch.randint(3, 256, (n,), generator=g)]) for n in suffixes]
    ids, mask = left_pad(rows)
    return ids, mask


def _gen(model, ids, mask, **kw):
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None,
          "return_dict_in_generate": True, **kw}
    return model.generate(input_ids=ids, attention_mask=mask, **kw)


def _stats(out):
    return cache_of(out).memory_stats()


@pytest.fixture(scope="module", params=FAST)
def pair(request):
    return request.param, make_pair(request.param, seed=5)


def test_shared_preamble_is_computed_once_in_a_call(pair):
    family, (paged, stock) = pair
    ids, mask = _batch(seed=1)
    ref = _gen(stock, ids, mask, output_scores=True)
    out = _gen(paged, ids, mask, output_scores=True)
    assert torch.equal(out.sequences, ref.sequences), family
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)
    stats = _stats(out)
    # the first prompt computes the preamble; the seven others only their question
    assert stats["tokens_prefilled"] == PREAMBLE + sum(SUFFIXES)
    assert stats["tokens_reused"] == (len(SUFFIXES) - 1) * PREAMBLE
    assert stats["blocks_shared"] >= PREAMBLE // 16


def test_suffixes_run_packed_without_pads(pair, monkeypatch):
    """The rows' suffixes (3 to 40 tokens) run as one packed row of their real tokens: the model
    computes no pad (a padded group would run 7 x 40 positions); HF_PAGED_PACKED_PREFILL=0 pads."""
    family, (paged, stock) = pair
    ids, mask = _batch(seed=1)
    ref = _gen(stock, ids, mask)
    for packed in ("1", "0"):
        monkeypatch.setenv("HF_PAGED_PACKED_PREFILL", packed)
        shapes = []
        hook = paged.register_forward_pre_hook(
            lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
        try:
            out = _gen(paged, ids, mask)
        finally:
            hook.remove()
        assert torch.equal(out.sequences, ref.sequences), (family, packed)
        prefill = [s for s in shapes if s[1] > 1]
        suffixes = [n for n in SUFFIXES[1:]]
        # the first prompt computes the preamble and its question (one row: nothing to pack);
        # then the seven other questions
        if packed == "1":
            assert prefill == [(1, PREAMBLE + SUFFIXES[0]), (1, sum(suffixes))], (family, prefill)
        else:
            assert prefill == [(1, PREAMBLE + SUFFIXES[0]), (len(suffixes), max(suffixes))], (family, prefill)
        assert _stats(out)["tokens_prefilled"] == PREAMBLE + sum(SUFFIXES)


def test_prefix_cache_serves_a_later_call(pair):
    family, (paged, stock) = pair
    prefix = PrefixCache(max_memory="64MiB")
    for seed in (2, 3):
        ids, mask = _batch(seed=seed)
        ref = _gen(stock, ids, mask)
        out = _gen(paged, ids, mask, prefix_cache=prefix)
        assert torch.equal(out.sequences, ref.sequences), (family, seed)
    stats = _stats(out)
    assert stats["tokens_prefilled"] == sum(SUFFIXES)  # the preamble came from the first call
    assert stats["tokens_reused"] == len(SUFFIXES) * PREAMBLE
    assert stats["rows"] == 0  # generate gave the rows back to the prefix cache
    assert prefix.stats()["blocks_held"] == 0 and prefix.stats()["blocks_cached"] > 0
    prefix.pool.check_consistency([])


def test_pools_made_under_inference_mode_grow_in_a_later_plain_call():
    """A first call under torch.inference_mode, a later one without it that grows the prefix
    cache's pools: the pools' addresses tensors (updated in place when the pools grow) must not be
    inference tensors, which no in-place update outside inference_mode may touch."""
    paged, stock = make_pair("llama", seed=6)
    prefix = PrefixCache(max_memory="64MiB")
    ids, mask = _batch(seed=1, suffixes=(5, 9))
    with torch.inference_mode():
        _gen(paged, ids, mask, prefix_cache=prefix)
    version = prefix.pools.version
    ids, mask = _batch(seed=2, suffixes=SUFFIXES * 3)
    out = _gen(paged, ids, mask, prefix_cache=prefix)
    assert prefix.pools.version > version, "the pools did not grow: the case tests nothing"
    assert torch.equal(out.sequences, _gen(stock, ids, mask).sequences)


def test_eviction_under_a_cap_keeps_tokens_right():
    paged, stock = make_pair("llama", seed=6)
    # a call takes 21 blocks (the preamble's 6, each row's question and new tokens 15): room for
    # one call and a little more, so each new preamble evicts the previous one's cached blocks
    prefix = PrefixCache(max_blocks=26)
    for preamble_seed in (0, 1, 0, 2, 1):
        ids, mask = _batch(seed=preamble_seed + 7, preamble_seed=preamble_seed)
        ref = _gen(stock, ids, mask)
        out = _gen(paged, ids, mask, prefix_cache=prefix)
        assert torch.equal(out.sequences, ref.sequences), preamble_seed
        prefix.pool.check_consistency([])
    assert prefix.pool.evictions > 0
    assert prefix.pool.num_blocks <= 26


def test_attached_prefix_cache_and_explicit_paged_cache():
    paged, stock = make_pair("qwen3", seed=7)
    prefix = PrefixCache(max_memory="16MiB").attach(paged)
    try:
        ids, mask = _batch(seed=4)
        assert torch.equal(_gen(paged, ids, mask).sequences, _gen(stock, ids, mask).sequences)
        ids, mask = _batch(seed=5)
        cache = PagedCache(config=paged.config, prefix_cache=prefix)
        out = _gen(paged, ids, mask, **{hf_paged.compat.generate_cache_kwarg(): cache})
        assert torch.equal(out.sequences, _gen(stock, ids, mask).sequences)
        assert cache.memory_stats()["tokens_reused"] == len(SUFFIXES) * PREAMBLE
        assert cache.memory_stats()["rows"] == len(SUFFIXES)  # the user's cache keeps its rows
        held = prefix.stats()["blocks_held"]
        assert held > 0
        cache.reset()
        assert prefix.stats()["blocks_held"] == 0
    finally:
        PrefixCache.detach(paged)
    with pytest.raises(ValueError, match="prefix_cache= or a cache, not both"):
        _gen(paged, ids, mask, prefix_cache=prefix, past_key_values=PagedCache(config=paged.config))


def test_another_model_or_new_weights_never_hit_the_blocks():
    paged_a, _ = make_pair("llama", seed=8)
    paged_b, stock_b = make_pair("llama", seed=9)  # same shapes, other weights
    prefix = PrefixCache(max_memory="64MiB")
    ids, mask = _batch(seed=6)
    _gen(paged_a, ids, mask, prefix_cache=prefix)
    out = _gen(paged_b, ids, mask, prefix_cache=prefix)
    assert torch.equal(out.sequences, _gen(stock_b, ids, mask).sequences)
    assert _stats(out)["tokens_prefilled"] == PREAMBLE + sum(SUFFIXES)  # only within the call
    # model A given B's weights in place: its earlier blocks must not be hit either
    paged_a.load_state_dict(paged_b.state_dict())
    out = _gen(paged_a, ids, mask, prefix_cache=prefix)
    assert torch.equal(out.sequences, _gen(stock_b, ids, mask).sequences)
    assert _stats(out)["tokens_prefilled"] == PREAMBLE + sum(SUFFIXES)
    # and the same model again hits its own
    out = _gen(paged_a, ids, mask, prefix_cache=prefix)
    # every full block hit (a whole-block prompt keeps its last token to compute: its logits)
    lengths = [PREAMBLE + n for n in SUFFIXES]
    assert _stats(out)["tokens_prefilled"] == sum(n - (n - 1) // 16 * 16 for n in lengths)


def test_model_key_follows_adapter_state_once_peft_is_imported(monkeypatch):
    """An adapter layer's active / merged / disabled adapters key the prefix hashes; the module
    walk that finds them runs once ``peft`` is imported (no adapter layer exists before)."""
    import sys
    import types

    from hf_paged.prefix_cache import model_key

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].active_adapters = ["a"]
    monkeypatch.delitem(sys.modules, "peft", raising=False)
    before = model_key(model)
    model[1].active_adapters = ["b"]
    assert model_key(model) == before  # no peft: adapters are not looked for
    monkeypatch.setitem(sys.modules, "peft", types.ModuleType("peft"))
    with_b = model_key(model)
    model[1].active_adapters = ["a"]
    with_a = model_key(model)
    assert with_a != with_b and model_key(model) == with_a
    model[1].disable_adapters = True
    assert model_key(model) != with_a


def test_hidden_states_keep_the_full_prefill():
    paged, stock = make_pair("llama", seed=10)
    ids, mask = _batch(seed=8)
    kw = dict(output_hidden_states=True)
    out, ref = _gen(paged, ids, mask, **kw), _gen(stock, ids, mask, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.hidden_states[0][-1].shape == ref.hidden_states[0][-1].shape
    stats = _stats(out)
    assert stats["tokens_reused"] == 0 and stats["tokens_prefilled"] == int(mask.sum())


def test_beams_and_samples_with_a_shared_preamble():
    paged, stock = make_pair("mistral", seed=11)
    ids, mask = _batch(seed=9, suffixes=(5, 19, 33))
    kw = dict(num_beams=3, num_return_sequences=2)
    assert torch.equal(_gen(paged, ids, mask, **kw).sequences, _gen(stock, ids, mask, **kw).sequences)
    kw = dict(do_sample=True, num_return_sequences=3)
    torch.manual_seed(3)
    ref = _gen(stock, ids, mask, **kw)
    torch.manual_seed(3)
    out = _gen(paged, ids, mask, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert _stats(out)["tokens_prefilled"] == PREAMBLE + 5 + 19 + 33


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(FAST)))
def test_other_families_share_the_preamble(family):
    paged, stock = make_pair(family, seed=12)
    prefix = PrefixCache(max_memory="64MiB")
    for seed in (10, 11):
        ids, mask = _batch(seed=seed, suffixes=(9, 21, 3, 40))
        out = _gen(paged, ids, mask, prefix_cache=prefix, max_new_tokens=4)
        assert torch.equal(out.sequences, _gen(stock, ids, mask, max_new_tokens=4).sequences), (family, seed)
    assert _stats(out)["tokens_reused"] == 4 * PREAMBLE


@pytest.mark.parametrize("family", ["llama", "gemma2", "llama4_text"])
def test_engine_reuses_a_shared_preamble(family):
    paged, stock = make_pair(family, seed=13)
    ids, mask = _batch(seed=12)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    progress = []
    results = hf_paged.generate_many(paged, prompts, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                     eos_token_id=None, max_batch_tokens=256, progress=progress.append)
    for prompt, result in zip(prompts, results):
        t = torch.tensor([prompt])
        ref = stock.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=6, do_sample=False,
                             pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        assert result.sequences[0] == ref, family
    stats = progress[-1]
    assert stats["tokens_reused"] == (len(prompts) - 1) * PREAMBLE
    assert stats["tokens_prefilled"] == PREAMBLE + sum(SUFFIXES)


def test_blocks_of_a_failed_call_are_never_hit():
    """An exception in the middle of a prefill forward leaves blocks hashed but not written: the
    prefix cache must not give them to a later call."""
    paged, stock = make_pair("llama", seed=14)
    prefix = PrefixCache(max_memory="64MiB")
    ids, mask = _batch(seed=15)
    calls = []

    def fail_once(module, args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    handle = paged.model.layers[1].register_forward_pre_hook(fail_once)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            _gen(paged, ids, mask, prefix_cache=prefix)
    finally:
        handle.remove()
    assert prefix.stats()["blocks_held"] == 0 and prefix.stats()["blocks_cached"] == 0
    out = _gen(paged, ids, mask, prefix_cache=prefix)
    assert torch.equal(out.sequences, _gen(stock, ids, mask).sequences)
    assert _stats(out)["tokens_reused"] == (len(SUFFIXES) - 1) * PREAMBLE  # within the call only


def test_clear_and_errors():
    paged, stock = make_pair("llama", seed=16)
    prefix = PrefixCache(max_blocks=64)
    cache = PagedCache(config=paged.config, prefix_cache=prefix)
    ids, mask = _batch(seed=17, suffixes=(3, 5))
    _gen(paged, ids, mask, **{hf_paged.compat.generate_cache_kwarg(): cache})
    with pytest.raises(RuntimeError, match="held by a live PagedCache"):
        prefix.clear()
    cache.reset()
    assert prefix.stats()["blocks_cached"] > 0
    prefix.clear()
    assert prefix.stats() == {"blocks_total": 0, "blocks_held": 0, "blocks_cached": 0, "evictions": 0,
                              "max_blocks": 64, "bytes_reserved": 0}
    before = cache.memory_stats()["tokens_reused"]  # counted over the cache's life
    out = _gen(paged, ids, mask, **{hf_paged.compat.generate_cache_kwarg(): cache})  # the same cache, after clear
    assert torch.equal(out.sequences, _gen(stock, ids, mask).sequences)
    assert cache.memory_stats()["tokens_reused"] - before == PREAMBLE  # within the call only: nothing was kept
    with pytest.raises(ValueError, match="needs a cap"):
        PrefixCache()
    with pytest.raises(ValueError, match="uses the prefix cache's cap"):
        PagedCache(config=paged.config, prefix_cache=prefix, max_memory="1GiB")
    with pytest.raises(ValueError, match="attn_implementation='paged'"):
        _gen(stock, ids, mask, prefix_cache=prefix)
    gpt2, _ = make_pair("gpt2")  # another K/V shape
    cache.reset()
    with pytest.raises(ValueError, match="give each model its own PrefixCache"):
        _gen(gpt2, ids, mask, prefix_cache=prefix)
