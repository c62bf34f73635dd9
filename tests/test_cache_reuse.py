"""Reusing a PagedCache: multi-turn batches, and the clear errors for rows that cannot be continued
(an exception mid-generate, another model's K/V, a cache built for another model's shape)."""

import copy

import pytest
import torch
from tiny_models import left_padded_batch, make_config, make_pair
from transformers import AutoModelForCausalLM, DynamicCache, StoppingCriteria, StoppingCriteriaList

import hf_paged
from hf_paged import CacheStateError, PagedCache


@pytest.fixture(scope="module")
def llama():
    return make_pair("llama")


def _gen(model, ids, mask, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, pad_token_id=0,
                          eos_token_id=None, **kw)


def test_multi_turn_batch_continues_like_stock(llama):
    """A batch continued with a new turn per row, left-padded on its own: the pads sit between the
    first turn and the second, a different number per row. Stock's DynamicCache takes it; so does
    the paged cache (pads anywhere are not stored; a pad's query reads the keys before it)."""
    paged, stock = llama
    ids, mask = left_padded_batch([5, 9, 2], seed=1)
    turn2, mask2 = left_padded_batch([3, 7, 1], seed=2)
    results = []
    for model, cache in ((stock, DynamicCache(config=stock.config)), (paged, PagedCache(config=paged.config))):
        first = _gen(model, ids, mask, max_new_tokens=4, past_key_values=cache)
        full = torch.cat([first.sequences, turn2], 1)
        full_mask = torch.cat([mask, torch.ones(3, 4, dtype=mask.dtype), mask2], 1)
        results.append(_gen(model, full, full_mask, max_new_tokens=6, past_key_values=cache, output_logits=True))
    ref, out = results
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    cache = hf_paged.cache_of(out)
    # each row stores its real tokens only: prompt, 4 + 5 fed-back tokens, its second turn
    assert cache.seq_lens == [5 + 4 + 3 + 5, 9 + 4 + 7 + 5, 2 + 4 + 1 + 5]
    assert [sum(n for _, n in runs) for runs in cache.tables.inner_pads] == [4, 0, 6]


class _Boom(StoppingCriteria):
    def __init__(self, at):
        self.calls, self.at = 0, at

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt("stopped by the user")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_cache_left_by_an_exception_asks_for_reset(llama):
    paged, stock = llama
    ids, mask = left_padded_batch([5, 9], seed=3)
    cache = PagedCache(config=paged.config)
    with pytest.raises(KeyboardInterrupt):
        _gen(paged, ids, mask, max_new_tokens=8, past_key_values=cache,
             stopping_criteria=StoppingCriteriaList([_Boom(at=3)]))
    assert "KeyboardInterrupt: stopped by the user" in cache.interrupted
    with pytest.raises(CacheStateError, match=r"left mid-generation by an exception \(KeyboardInterrupt.*reset\(\)"):
        _gen(paged, ids, mask, max_new_tokens=4, past_key_values=cache)
    cache.reset()
    kw = dict(max_new_tokens=6)
    assert torch.equal(_gen(paged, ids, mask, past_key_values=cache, **kw).sequences,
                       _gen(stock, ids, mask, **kw).sequences)


def test_an_error_before_any_forward_leaves_the_cache_usable(llama):
    paged, stock = llama
    ids, mask = left_padded_batch([5, 9], seed=4)
    cache = PagedCache(config=paged.config)
    with pytest.raises(ValueError, match="output_attentions=True cannot be served"):
        _gen(paged, ids, mask, max_new_tokens=4, past_key_values=cache, output_attentions=True)
    assert cache.interrupted is None
    assert torch.equal(_gen(paged, ids, mask, max_new_tokens=4, past_key_values=cache).sequences,
                       _gen(stock, ids, mask, max_new_tokens=4).sequences)


def test_forward_cut_short_is_refused(llama):
    """Outside generate: a forward that stopped part-way (some layers wrote, some did not) is
    caught at the next forward."""
    paged, _ = llama
    ids, mask = left_padded_batch([5, 9], seed=5)
    cache = PagedCache(config=paged.config)
    with torch.no_grad():
        paged(ids, attention_mask=mask, past_key_values=cache)  # complete: 2 layers
        layer = paged.model.layers[1]
        original = layer.forward
        layer.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
        try:
            with pytest.raises(RuntimeError, match="out of memory"):
                paged(torch.tensor([[7], [8]]), attention_mask=torch.ones(2, 10, dtype=torch.long),
                      past_key_values=cache)
        finally:
            layer.forward = original
        with pytest.raises(CacheStateError, match="stopped after 1 of 2 layers"):
            paged(torch.tensor([[7], [8]]), attention_mask=torch.ones(2, 10, dtype=torch.long),
                  past_key_values=cache)


def test_another_models_cache_is_refused(llama):
    paged, _ = llama
    other, _ = make_pair("llama", seed=1)  # same shapes, other weights
    ids, mask = left_padded_batch([5, 9], seed=6)
    cache = PagedCache(config=paged.config)
    _gen(paged, ids, mask, max_new_tokens=3, past_key_values=cache)
    with pytest.raises(CacheStateError, match="holds the K/V of another model.*reset\\(\\)"):
        _gen(other, ids, mask, max_new_tokens=3, past_key_values=cache)
    cache.reset()
    _, other_stock = make_pair("llama", seed=1)
    assert torch.equal(_gen(other, ids, mask, max_new_tokens=3, past_key_values=cache).sequences,
                       _gen(other_stock, ids, mask, max_new_tokens=3).sequences)


def test_cache_built_for_another_shape_is_refused_at_the_first_forward(llama):
    """A cap in bytes is turned into blocks through the config's K/V shape: a cache built from a
    1-layer config and run by a 2-layer model would hold twice its cap. It is refused."""
    paged, _ = llama
    small = make_config("llama")
    small.num_hidden_layers = 1
    cache = PagedCache(config=small, max_memory="1MiB")
    ids, mask = left_padded_batch([5, 9], seed=7)
    with pytest.raises(ValueError, match=r"built from a config with .* = \(1, 2, 16, 16\) but the model using it has "
                                         r"\(2, 2, 16, 16\)"):
        _gen(paged, ids, mask, max_new_tokens=3, past_key_values=cache)


def test_reset_cache_serves_a_model_of_another_shape(llama):
    paged, _ = llama
    config = make_config("llama")
    config.num_key_value_heads = 4
    torch.manual_seed(0)
    wide = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="paged").eval()
    wide_stock = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    wide_stock.load_state_dict(wide.state_dict())
    ids, mask = left_padded_batch([5, 9], seed=8)
    cache = PagedCache()
    _gen(paged, ids, mask, max_new_tokens=3, past_key_values=cache)
    cache.reset()
    out = _gen(wide, ids, mask, max_new_tokens=3, past_key_values=cache)
    assert torch.equal(out.sequences, _gen(wide_stock, ids, mask, max_new_tokens=3).sequences)
    assert cache.key_cache[0].shape[2] == 4


def test_pads_inside_rows_are_refused_with_chunked_attention():
    """Llama 4 counts a chunk's positions over a row's inner pads, the paged cache over stored
    tokens: a continued multi-turn batch is refused with the reason instead of silently differing."""
    paged, _ = make_pair("llama4_text")
    ids, mask = left_padded_batch([5, 9], seed=9)
    turn2, mask2 = left_padded_batch([3, 7], seed=10)
    cache = PagedCache()
    first = _gen(paged, ids, mask, max_new_tokens=3, past_key_values=cache)
    full = torch.cat([first.sequences, turn2], 1)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype), mask2], 1)
    with pytest.raises(CacheStateError, match="not supported with chunked attention"):
        _gen(paged, full, full_mask, max_new_tokens=3, past_key_values=cache)
