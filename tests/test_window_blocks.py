"""Sliding-window layers free the blocks that leave their window: their own tables and pool
(``PagedCache.window_tables``), the same tokens as stock, a bounded number of blocks however long
the generation. CI runs this file on the PyTorch reference, and its tile-margin test again on the
interpreted Triton kernels, whose key tiles read up to ``WINDOW_READ_MARGIN`` keys before a window
(tests/test_cuda.py runs the long generations on the GPU's)."""

import numpy as np
import pytest
import torch
from tiny_models import cache_of, left_padded_batch, make_pair

import hf_paged
from hf_paged import PagedCache, PrefixCache
from hf_paged.block_pool import BlockPool
from hf_paged.block_table import RELEASED, BlockTables
from hf_paged.kernels.tuning import WINDOW_READ_MARGIN
from hf_paged.testing import left_pad

WINDOW = 32
NEW = 10 * WINDOW  # a generation ten windows long


def _pair(family, window=WINDOW):
    paged, stock = make_pair(family, seed=3)
    for model in (paged, stock):
        model.config.sliding_window = window
        for module in model.modules():  # the attention layers read the window from the config
            if getattr(module, "sliding_window", None) is not None:
                module.sliding_window = window
    return paged, stock


def _generate(model, ids, mask, **kw):
    kw = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, "eos_token_id": None,
          "return_dict_in_generate": True, **kw}
    return model.generate(input_ids=ids, attention_mask=mask, **kw)


def _row_bound(block_size=16):
    """Blocks a row may hold in the window layers after a decode step."""
    return -(-(WINDOW + WINDOW_READ_MARGIN) // block_size) + 1


# Mistral: every layer windowed (no layer_types); Gemma 2: a windowed layer and a full one.
@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_long_generation_holds_a_window_per_row_in_windowed_layers(family):
    paged, stock = _pair(family)
    ids, mask = left_padded_batch([37, 5, 20])
    ref = _generate(stock, ids, mask, output_scores=True)
    out = _generate(paged, ids, mask, output_scores=True)
    assert torch.equal(out.sequences, ref.sequences), family
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)
    stats = cache_of(out).memory_stats()
    assert stats["window"] == WINDOW
    assert stats["window_layers"] == (2 if family == "mistral" else 1)
    rows = ids.shape[0]
    # every token's block is kept by the other layers' tables, a window's by the windowed ones
    assert stats["blocks_used"] == sum(-(-(n + NEW - 1) // 16) for n in mask.sum(1).tolist())
    assert stats["window_blocks_used"] <= rows * _row_bound() <= stats["blocks_used"] / 2
    assert stats["window_blocks_total"] <= 2 * rows * _row_bound()
    cache = cache_of(out)
    cache.window_tables.check_consistency()
    assert all(t[0] == RELEASED for t in cache.window_tables.tables)
    # Mistral's every layer is windowed: the first tables keep the rows' bookkeeping, no plan for attention
    assert cache.tables.serves_attention == (family == "gemma2")
    # the windowed layer 0 as a DynamicCache would hold it: stock's sliding layer keeps the last
    # window - 1 positions; ours has those, and zeros where blocks were released
    keys = cache.layers[0].keys
    ref_keys = ref.past_key_values.layers[0].keys
    torch.testing.assert_close(keys[:, :, -(WINDOW - 1):], ref_keys[:, :, -(WINDOW - 1):], atol=2e-5, rtol=0)
    assert keys[:, :, :16].abs().sum() == 0


def test_beam_search_and_samples_over_released_blocks_match_stock():
    paged, stock = _pair("mistral")
    ids, mask = left_padded_batch([30, 12])
    kw = {"max_new_tokens": 8 * WINDOW, "num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.0}
    ref = _generate(stock, ids, mask, **kw)
    out = _generate(paged, ids, mask, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert cache_of(out).memory_stats()["window_blocks_used"] <= 3 * 2 * _row_bound()
    torch.manual_seed(7)
    ref = _generate(stock, ids, mask, do_sample=True, num_return_sequences=3)
    torch.manual_seed(7)
    out = _generate(paged, ids, mask, do_sample=True, num_return_sequences=3)
    assert torch.equal(out.sequences, ref.sequences)


def test_prefix_cache_reuse_with_windowed_layers():
    """A preamble longer than the window and its margin: the second call finds its blocks in both
    pools (the windowed layers' released ones wait there, hashed) and prefills only the rest."""
    paged, stock = _pair("gemma2")
    g = torch.Generator().manual_seed(0)
    preamble = torch.randint(3, 256, (WINDOW_READ_MARGIN + 3 * WINDOW,), generator=g)
    rows = [torch.cat([preamble, torch.randint(3, 256, (n,), generator=g)]) for n in (5, 9)]
    ids, mask = left_pad(rows)
    prefix = PrefixCache(max_blocks=4096)
    ref = _generate(stock, ids, mask, max_new_tokens=WINDOW)
    first = _generate(paged, ids, mask, max_new_tokens=WINDOW, prefix_cache=prefix)
    second = _generate(paged, ids, mask, max_new_tokens=WINDOW, prefix_cache=prefix)
    assert torch.equal(first.sequences, ref.sequences)
    assert torch.equal(second.sequences, ref.sequences)
    stats = cache_of(second).memory_stats()
    assert stats["tokens_reused"] >= 2 * (len(preamble) // 16 * 16)
    assert prefix.window_pools[WINDOW].num_used == 0  # every row gave its blocks back


def test_engine_with_windowed_layers_matches_generate():
    paged, _ = _pair("mistral")
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 7, 25)]
    outs = hf_paged.generate_many(paged, prompts, max_new_tokens=6 * WINDOW, do_sample=False, eos_token_id=None)
    for prompt, got in zip(prompts, outs):
        ref = paged.generate(torch.tensor([prompt]), max_new_tokens=6 * WINDOW, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        assert got.sequences[0] == ref[0, len(prompt):].tolist()


def test_crop_back_past_the_released_window_is_refused():
    paged, _ = _pair("mistral")
    ids, mask = left_padded_batch([20])
    out = _generate(paged, ids, mask, max_new_tokens=8 * WINDOW)
    cache = cache_of(out)
    held = cache.memory_stats()
    with pytest.raises(RuntimeError, match="cannot crop back .* released"):
        cache.crop(10)
    assert cache.memory_stats() == held  # nothing changed
    cache.crop(cache.get_seq_length() - 2)  # a short step back (assisted decoding's) still works
    cache.window_tables.check_consistency()


def test_window_blocks_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("HF_PAGED_WINDOW_BLOCKS", "0")
    paged, _ = _pair("mistral")
    cache = PagedCache(config=paged.config)
    assert cache.window_tables is None and "window" not in cache.memory_stats()


def test_window_tables_release_and_follow_forks_without_a_model():
    pool = BlockPool()
    tables = BlockTables(pool, 4, window=8)
    tables.window_margin = 4
    tables.add_rows(1)
    tables.plan_forward([0], np.ones((1, 10), bool))  # 10 tokens: blocks 0-2
    assert tables.tables[0] == [0, 1, 2]
    tables.select_rows([0, 0])  # a fork: both rows share the blocks
    for step in range(12):
        plan = tables.plan_forward([0, 1], np.ones((2, 1), bool))
        tables.check_consistency()
        for r in range(2):
            first = tables.seq_lens[r] - 1 - 8 + 1 - 4  # this step's query's window, and the margin
            assert tables.released[r] == max(0, first) // 4
            assert plan.block_table[r, : tables.released[r]].tolist() == [0] * tables.released[r]
    assert all(len(t) - r <= -(-(8 + 4) // 4) + 1 for t, r in zip(tables.tables, tables.released))
    tables.drop_rows([0])
    tables.check_consistency()
    tables.clear(keep_cached=True)
    assert pool.num_used == 0


def test_kernel_tiles_before_the_window_read_only_kept_blocks():
    """Prompts longer than the window and the kernels' tile margin: from the first decode step on,
    blocks are released while the kernels' first key tile still starts before the window (CI runs
    this on the interpreted Triton kernels too, where a released block would be read as another
    row's data)."""
    paged, stock = _pair("mistral", window=16)
    ids, mask = left_padded_batch([150, 171])
    ref = _generate(stock, ids, mask, max_new_tokens=40, output_logits=True)
    out = _generate(paged, ids, mask, max_new_tokens=40, output_logits=True)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)
    released = cache_of(out).window_tables.released
    assert all(r >= (n + 40 - 1 - 16 - WINDOW_READ_MARGIN) // 16 > 0 for r, n in zip(released, mask.sum(1).tolist()))


def test_engine_preempts_and_readmits_rows_with_released_blocks(preemptions):
    """A memory cap that forces preemption while rows run past their window: preempted rows give
    back the blocks of both tables, are recomputed from their tokens, and every result equals
    model.generate on its prompt alone."""
    from hf_paged.memory import config_bytes_per_token

    paged, stock = _pair("gemma2")
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (60, 9, 33, 150)]
    new = 5 * WINDOW
    block_bytes = config_bytes_per_token(paged.config, torch.float32) * 16
    results = hf_paged.generate_many(paged, prompts, max_new_tokens=new, do_sample=False, eos_token_id=None,
                                     pad_token_id=0, max_batch_tokens=64, max_memory=40 * block_bytes)
    assert preemptions, "the cap was meant to force preemption"
    for prompt, result in zip(prompts, results):
        ref = stock.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        assert result.sequences[0] == ref[0, len(prompt):].tolist()


def test_a_prefix_cache_refuses_a_model_that_splits_its_layers_otherwise(monkeypatch):
    """A PrefixCache's layer tensors are addressed by one pool per layer: a model whose windowed
    layers differ from those of the models before it (or the switch turned) would write them
    through another pool's block ids; it is refused, until clear()."""
    windowed, _ = _pair("mistral")
    plain, _ = make_pair("llama", seed=3)  # the same K/V shapes, no window
    ids, mask = left_padded_batch([20, 9])
    prefix = PrefixCache(max_blocks=256)
    _generate(windowed, ids, mask, max_new_tokens=4, prefix_cache=prefix)
    with pytest.raises(ValueError, match=r"layers \[0, 1\] windowed \(32 tokens\).*no layer windowed"):
        _generate(plain, ids, mask, max_new_tokens=4, prefix_cache=prefix)
    monkeypatch.setenv("HF_PAGED_WINDOW_BLOCKS", "0")
    with pytest.raises(ValueError, match="HF_PAGED_WINDOW_BLOCKS changed"):
        _generate(windowed, ids, mask, max_new_tokens=4, prefix_cache=prefix)
    prefix.clear()
    out = _generate(plain, ids, mask, max_new_tokens=4, prefix_cache=prefix)
    assert out.sequences.shape[1] == ids.shape[1] + 4
