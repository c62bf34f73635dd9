"""PagedCache behaviour: memory figures, caps and errors, user-built caches, generate features."""

import pytest
import torch
from tiny_models import cache_of, left_padded_batch, make_pair
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    DynamicCache,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from hf_paged import OutOfBlocksError, PagedCache, UnsupportedModelError


@pytest.fixture(scope="module")
def llama():
    return make_pair("llama")


def _gen(model, ids, mask, **kw):
    kw.setdefault("pad_token_id", 0)
    kw.setdefault("eos_token_id", None)
    kw.setdefault("do_sample", False)
    return model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **kw)


def test_pads_are_not_stored(llama):
    """A batch of prompts of lengths 4 and 200 stores ~204 tokens' worth of blocks, not 400."""
    paged, _ = llama
    ids, mask = left_padded_batch([4, 200], seed=5)
    out = _gen(paged, ids, mask, max_new_tokens=1)
    stats = cache_of(out).memory_stats()
    assert stats["tokens_logical"] == 204
    assert stats["tokens_stored"] == 204
    assert stats["tokens_dense"] == 400
    assert stats["blocks_used"] == 1 + 13  # ceil(4/16) + ceil(200/16)
    assert stats["blocks_used"] * stats["block_size"] <= 204 + 2 * 16
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (K,V) x kv heads x head_dim x fp32 bytes
    assert stats["bytes_per_token"] == per_token
    assert stats["bytes_used"] == 14 * 16 * per_token
    assert stats["bytes_dense"] == 400 * per_token
    assert stats["bytes_reserved"] >= stats["bytes_used"]


def test_memory_grows_a_block_at_a_time(llama):
    paged, _ = llama
    ids, mask = left_padded_batch([15], seed=6)
    cache = PagedCache(config=paged.config)
    used = []
    out = _gen(paged, ids, mask, max_new_tokens=20, past_key_values=cache)
    assert cache_of(out) is cache
    # 15 prompt + 19 fed-back tokens = 34 tokens -> 3 blocks of 16
    assert cache.memory_stats()["blocks_used"] == 3
    # step by step: the count only ever rises by one block when a block boundary is crossed
    cache = PagedCache(config=paged.config)
    x = ids
    for _ in range(20):
        logits = paged(x, past_key_values=cache).logits
        used.append(cache.memory_stats()["blocks_used"])
        x = logits[:, -1:].argmax(-1)
    assert used == [-(-n // 16) for n in range(15, 35)]


def test_user_cache_block_size_and_equality(llama):
    paged, stock = llama
    ids, mask = left_padded_batch([7, 50, 33], seed=7)
    ref = _gen(stock, ids, mask, max_new_tokens=8)
    cache = PagedCache(config=paged.config, block_size=32)
    out = _gen(paged, ids, mask, max_new_tokens=8, past_key_values=cache)
    assert torch.equal(out.sequences, ref.sequences)
    assert cache.memory_stats()["block_size"] == 32
    assert cache.memory_stats()["blocks_used"] == 1 + 2 + 2  # 14, 57, 40 tokens in blocks of 32


def test_out_of_blocks_is_clear_and_leaves_cache_consistent(llama):
    paged, _ = llama
    ids, mask = left_padded_batch([40, 40], seed=8)
    cache = PagedCache(config=paged.config, max_blocks=6)  # prompt needs 2 x 3 = 6 blocks
    with pytest.raises(OutOfBlocksError, match=r"needs 2 more block\(s\) but only 0 are available.*max_blocks=6"):
        _gen(paged, ids, mask, max_new_tokens=20, past_key_values=cache)
    # the failed allocation changed nothing: every count equals the table references
    cache.pool.check_consistency(cache.block_tables)
    assert cache.memory_stats()["blocks_used"] == 6
    assert cache.seq_lens == [48, 48]  # the last full step that fitted
    cache.reset()
    assert cache.pool.num_free == cache.pool.num_blocks


def test_max_memory_cap_is_converted_to_blocks(llama):
    paged, _ = llama
    per_block = 16 * 2 * 2 * 2 * 16 * 4  # block_size x per-token bytes
    cache = PagedCache(config=paged.config, max_memory=f"{per_block * 3}B")
    ids, mask = left_padded_batch([40], seed=9)
    _gen(paged, ids, mask, max_new_tokens=8, past_key_values=cache)  # 47 tokens = 3 blocks: fits
    assert cache.pool.max_blocks == 3
    cache.reset()
    with pytest.raises(OutOfBlocksError, match="max_blocks=3"):
        _gen(paged, ids, mask, max_new_tokens=10, past_key_values=cache)  # 49 tokens: 4 blocks
    with pytest.raises(ValueError, match="cannot read max_memory=.lots."):
        PagedCache(max_memory="lots")


def test_plain_forward_with_dynamic_cache_on_paged_model(llama):
    paged, stock = llama
    ids, mask = left_padded_batch([6, 19], seed=10)
    a = paged(ids, attention_mask=mask).logits
    b = stock(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=0)
    ca, cb = DynamicCache(config=paged.config), DynamicCache(config=stock.config)
    paged(ids, attention_mask=mask, past_key_values=ca)
    stock(ids, attention_mask=mask, past_key_values=cb)
    nxt = torch.tensor([[5], [9]])
    m2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    a = paged(nxt, attention_mask=m2, past_key_values=ca).logits
    b = stock(nxt, attention_mask=m2, past_key_values=cb).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_streamer_stopping_criteria_scores(llama):
    paged, stock = llama
    ids, mask = left_padded_batch([11], seed=11)

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append("end")

    class StopAfter(StoppingCriteria):
        def __init__(self, n):
            self.n = n

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.n, dtype=torch.bool)

    results = []
    for model in (stock, paged):
        streamer = Collect()
        out = _gen(model, ids, mask, max_new_tokens=30, streamer=streamer, output_scores=True,
                   stopping_criteria=StoppingCriteriaList([StopAfter(11 + 6)]))
        results.append((out, streamer))
    (ref, ref_stream), (out, stream) = results
    assert out.sequences.shape[1] == 11 + 6
    assert torch.equal(out.sequences, ref.sequences)
    assert len(stream.chunks) == len(ref_stream.chunks) and stream.chunks[-1] == "end"
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)


def test_right_padding_and_pads_inside_rows_give_stock_results(llama):
    """Pads anywhere in a row are not stored; a pad's query reads the real keys before it, as
    stock's does, so right-padded and holed masks give stock's logits and tokens."""
    paged, stock = llama
    ids, mask = left_padded_batch([5, 9], seed=12)
    holed = mask.clone()
    holed[1, 3] = 0
    for m in (mask.flip(1), holed):
        with torch.no_grad():
            out = paged(ids, attention_mask=m, past_key_values=PagedCache()).logits
            ref = stock(ids, attention_mask=m).logits
        seen = m.cumsum(1) > 0  # positions with a real token at or before them
        torch.testing.assert_close(out[seen], ref[seen], atol=1e-5, rtol=0)
        kw = dict(max_new_tokens=6, do_sample=False)
        assert torch.equal(_gen(paged, ids, m, **kw).sequences, _gen(stock, ids, m, **kw).sequences)


def test_cache_implementation_conflict(llama):
    paged, _ = llama
    ids, mask = left_padded_batch([5], seed=13)
    with pytest.raises(ValueError, match="cache_implementation='static' cannot be combined"):
        _gen(paged, ids, mask, max_new_tokens=2, cache_implementation="static")


UNSUPPORTED = {
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "gpt_neo": dict(hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]]),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "mpt": dict(d_model=64, n_layers=2, n_heads=4),
    "codegen": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "xglm": dict(d_model=64, num_layers=2, attention_heads=4, ffn_dim=128),
}


@pytest.mark.parametrize("model_type", sorted(UNSUPPORTED))
def test_unsupported_models_are_refused_by_name(model_type):
    cfg = AutoConfig.for_model(model_type, vocab_size=256, **UNSUPPORTED[model_type])
    with pytest.raises(UnsupportedModelError, match=rf"model_type='{model_type}'.*not supported by attn_implementation='paged'"):
        AutoModelForCausalLM.from_config(cfg, attn_implementation="paged")


def test_encoder_decoder_is_refused():
    cfg = AutoConfig.for_model("t5", vocab_size=256, d_model=64, num_layers=2, num_heads=4, d_ff=128, d_kv=16)
    with pytest.raises(UnsupportedModelError, match="model_type='t5'.*encoder-decoder"):
        AutoModelForSeq2SeqLM.from_config(cfg, attn_implementation="paged")


def test_wrong_dtype_for_an_existing_cache():
    paged, _ = make_pair("llama")
    ids, mask = left_padded_batch([5], seed=14)
    cache = PagedCache()
    paged(ids, attention_mask=mask, past_key_values=cache)
    half = paged.to(torch.bfloat16)  # the same model, now in bf16
    m2 = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
    with pytest.raises(TypeError, match="one PagedCache serves one dtype"):
        half(torch.tensor([[7]]), attention_mask=m2, past_key_values=cache)


def test_batch_size_mismatch_is_clear(llama):
    paged, _ = llama
    cache = PagedCache()
    ids, mask = left_padded_batch([5, 6], seed=15)
    paged(ids, attention_mask=mask, past_key_values=cache)
    with pytest.raises(ValueError, match="batch size 1 but the cache holds 2 rows"):
        paged(ids[:1, -1:], past_key_values=cache)


def test_mask_hand_off_lives_in_one_mask_call(llama):
    """The cache reaches our mask function inside the kv_offset that its get_mask_sizes returns
    (an int 0 to any other mask function), never through state that outlives the call: a cache
    refused by a non-paged model does not turn up in a later paged forward that has no cache."""
    paged, stock = llama
    ids, mask = left_padded_batch([5, 9], seed=16)
    cache = PagedCache(config=paged.config)
    kv_length, kv_offset = cache.get_mask_sizes(4, 0)
    assert (kv_length, kv_offset) == (4, 0) and type(int(kv_offset)) is int
    with pytest.raises(RuntimeError, match="must be used with attn_implementation='paged'"):
        stock(ids, attention_mask=mask, past_key_values=cache)
    with torch.no_grad():
        out = paged(ids, attention_mask=mask, use_cache=False).logits
        ref = stock(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert not cache.block_tables  # the refused cache was never touched again


def test_cache_layers_follow_the_cache_contract(llama):
    """len(cache) layers, each cache.layers[i] with keys/values as a DynamicCache holds them
    (zeros at pads), as transformers' own code walks them."""
    paged, stock = llama
    ids, mask = left_padded_batch([5, 9], seed=17)
    cache, dense = PagedCache(), DynamicCache(config=stock.config)
    assert len(cache) == len(cache.layers) == 0
    out = _gen(paged, ids, mask, max_new_tokens=4, past_key_values=cache)
    ref = _gen(stock, ids, mask, max_new_tokens=4, past_key_values=dense)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(cache) == len(cache.layers) == stock.config.num_hidden_layers
    real = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1).bool()[:, None, :, None]
    for i in range(len(cache)):
        for mine, theirs in ((cache.layers[i].keys, dense.layers[i].keys),
                             (cache.layers[i].values, dense.layers[i].values)):
            assert mine.shape == theirs.shape
            torch.testing.assert_close(mine * real, theirs * real, atol=1e-5, rtol=0)
            assert not (mine * ~real).any()
        assert cache.layers[i].get_seq_length() == dense.layers[i].get_seq_length()


@pytest.mark.parametrize("kwargs,named", [
    (dict(max_blocks=2.5), "max_blocks"), (dict(max_blocks="8"), "max_blocks"), (dict(max_blocks=True), "max_blocks"),
    (dict(max_blocks=0), "max_blocks"), (dict(max_memory=float("nan")), "max_memory"),
    (dict(max_memory=float("inf")), "max_memory"), (dict(max_memory=-1), "max_memory"),
    (dict(max_memory="0GiB"), "max_memory"), (dict(max_memory=[4]), "max_memory"), (dict(block_size=16.0), "block_size"),
    (dict(max_prefill_tokens=0), "max_prefill_tokens"),
])
def test_bad_cache_arguments_raise_one_value_error_naming_the_argument(kwargs, named):
    with pytest.raises(ValueError, match=rf"hf_paged: (cannot read )?{named}"):
        PagedCache(**kwargs)


@pytest.mark.parametrize("kw", [dict(num_beams=2), dict(do_sample=True, num_return_sequences=2),
                                dict(do_sample=False, max_prefill_tokens=8)])
def test_prompt_hidden_states_have_stocks_shape(llama, kw):
    """A deduplicated or grouped prefill (beams, num_return_sequences, max_prefill_tokens) over a
    batch with pad columns (padding="max_length") returns the prompt step's hidden states with
    stock's [rows, prompt width, hidden] shape, equal to stock's at real positions."""
    paged, stock = llama
    ids, mask = left_padded_batch([5, 9], seed=18)
    ids = torch.cat([torch.zeros(2, 3, dtype=ids.dtype), ids], 1)  # 3 more pad columns than needed
    mask = torch.cat([torch.zeros(2, 3, dtype=mask.dtype), mask], 1)
    kw = dict(kw)
    cache = PagedCache(config=paged.config, max_prefill_tokens=kw.pop("max_prefill_tokens", 8192))
    outs = []
    for model, extra in ((paged, dict(past_key_values=cache)), (stock, {})):
        torch.manual_seed(0)
        outs.append(_gen(model, ids, mask, max_new_tokens=3, output_hidden_states=True, **kw, **extra))
    out, ref = outs
    assert torch.equal(out.sequences, ref.sequences)
    real = mask.bool().repeat_interleave(ref.hidden_states[0][0].shape[0] // 2, 0)
    assert len(out.hidden_states[0]) == len(ref.hidden_states[0])
    for mine, theirs in zip(out.hidden_states[0], ref.hidden_states[0]):
        assert mine.shape == theirs.shape == (real.shape[0], 12, paged.config.hidden_size)
        torch.testing.assert_close(mine[real], theirs[real], atol=1e-5, rtol=0)
