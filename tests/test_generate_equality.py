"""paged == stock transformers, token for token, for every supported family (CPU, fp32)."""

import pytest
import torch

from tiny_models import FAMILIES, assert_logits_close, cache_of, left_padded_batch, make_pair

from hf_paged import PagedCache

MODELS = sorted(FAMILIES)
LENGTHS = [5, 41, 23]  # very different lengths: row 0 is mostly padding; longer than the sliding windows


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    paged, stock = make_pair(request.param)
    return request.param, paged, stock


def _gen(model, ids, mask, **kw):
    kw.setdefault("pad_token_id", 0)
    return model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **kw)


def test_greedy_left_padded(pair):
    name, paged, stock = pair
    ids, mask = left_padded_batch(LENGTHS, seed=1)
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, output_logits=True)
    ref = _gen(stock, ids, mask, **kw)
    out = _gen(paged, ids, mask, **kw)
    assert isinstance(cache_of(out), PagedCache)
    assert torch.equal(out.sequences, ref.sequences), name
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)
    stats = cache_of(out).memory_stats()
    # pads are never stored: each row holds its real prompt + generated tokens (the last one
    # generated is not fed back), in whole blocks
    real = [n + 12 - 1 for n in LENGTHS]
    assert stats["tokens_logical"] == sum(real)
    assert stats["blocks_used"] == sum(-(-n // 16) for n in real)


def test_beam_search_num_return_sequences(pair):
    name, paged, stock = pair
    ids, mask = left_padded_batch([9, 30], seed=2)
    kw = dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False, eos_token_id=None,
              output_scores=True)
    ref = _gen(stock, ids, mask, **kw)
    out = _gen(paged, ids, mask, **kw)
    assert torch.equal(out.sequences, ref.sequences), name
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=2e-4, rtol=0)
    stats = cache_of(out).memory_stats()
    assert stats["blocks_shared"] > 0  # beams share the prompt's blocks


def test_seeded_sampling(pair):
    name, paged, stock = pair
    ids, mask = left_padded_batch([12, 33], seed=3)
    kw = dict(max_new_tokens=10, do_sample=True, top_k=0, temperature=1.0, num_return_sequences=3,
              eos_token_id=None, output_logits=True)
    torch.manual_seed(1234)
    ref = _gen(stock, ids, mask, **kw)
    torch.manual_seed(1234)
    out = _gen(paged, ids, mask, **kw)
    assert torch.equal(out.sequences, ref.sequences), name
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)


def test_prompt_lookup_decoding(pair):
    name, paged, stock = pair
    pattern = torch.randint(3, 256, (7,), generator=torch.Generator().manual_seed(4))
    ids = torch.cat([pattern, pattern, pattern[:4]]).unsqueeze(0)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=14, do_sample=False, eos_token_id=None, prompt_lookup_num_tokens=3)
    ref = _gen(stock, ids, mask, **kw)
    out = _gen(paged, ids, mask, **kw)
    plain = _gen(stock, ids, mask, max_new_tokens=14, do_sample=False, eos_token_id=None)
    assert torch.equal(out.sequences, ref.sequences), name
    assert torch.equal(out.sequences, plain.sequences), name


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2", "opt", "llama4_text"])
def test_prefill_in_length_sorted_groups(family, monkeypatch):
    """max_prefill_tokens splits the prefill into groups of prompts sorted by length, each trimmed
    to its longest prompt: same tokens and logits as stock, fewer padded tokens computed."""
    import hf_paged.cache as cache_module

    paged, stock = make_pair(family)
    ids, mask = left_padded_batch([5, 41, 23, 38, 9], seed=6)
    widths, calls = [], []
    orig = cache_module.PagedCache.begin_forward

    def spy(self, attention_mask, q_len, batch_size, device, dtype=None, **kwargs):
        fwd = orig(self, attention_mask, q_len, batch_size, device, dtype, **kwargs)
        if fwd is not spy.last:
            # the padded group the cache plans, and the model's input (packed: the real tokens as one row)
            widths.append((fwd.meta.batch, fwd.meta.q_len))
            calls.append((batch_size, q_len))
        spy.last = fwd
        return fwd

    spy.last = None
    monkeypatch.setattr(cache_module.PagedCache, "begin_forward", spy)
    for kw in (dict(do_sample=False, output_logits=True),
               dict(num_beams=2, num_return_sequences=2, do_sample=False)):
        widths.clear()
        calls.clear()
        cache = PagedCache(config=paged.config, max_prefill_tokens=90)
        ref = _gen(stock, ids, mask, max_new_tokens=8, eos_token_id=None, **kw)
        out = _gen(paged, ids, mask, max_new_tokens=8, eos_token_id=None, past_key_values=cache, **kw)
        assert torch.equal(out.sequences, ref.sequences), (family, kw)
        assert_logits_close(out, ref, kw)
        # groups of <= 90 padded tokens, longest prompts first: (41, 38) then (23, 9, 5); then the
        # decode steps over all rows
        rows = 10 if "num_beams" in kw else 5
        assert widths[:3] == [(2, 41), (3, 23), (rows, 1)], widths
        # the model computed the real tokens only: 41 + 38, then 23 + 9 + 5 (no pad)
        assert calls[:3] == [(1, 79), (1, 37), (rows, 1)], calls
        assert cache.get_seq_length() == 41 + 7
        assert cache.memory_stats()["tokens_logical"] == sum(n + 7 for n in (5, 41, 23, 38, 9)) * (
            2 if "num_beams" in kw else 1)


def _llama4_pair(chunk, seed=0):
    """(paged, stock) tiny Llama 4 text models, same weights, layer 0 chunked (layer_types)."""
    from transformers import AutoModelForCausalLM, Llama4TextConfig

    def config():
        return Llama4TextConfig(
            vocab_size=256, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
            attention_chunk_size=chunk, no_rope_layers=[1, 0], max_position_embeddings=512, pad_token_id=0,
            bos_token_id=1, eos_token_id=2,
        )

    torch.manual_seed(seed)
    stock = AutoModelForCausalLM.from_config(config(), attn_implementation="sdpa")
    paged = AutoModelForCausalLM.from_config(config(), attn_implementation="paged")
    paged.load_state_dict(stock.state_dict())
    assert paged.config.layer_types == ["chunked_attention", "full_attention"]
    return paged.eval(), stock.eval()


def test_llama4_chunked_attention_matches_stock():
    """Llama 4's chunked layers attend only within their chunk of 8 positions (counted from the
    row's first real token): stock's tokens exactly for greedy, beam and seeded sampling on
    left-padded prompts longer than several chunks. The same weights with a chunk longer than any
    row give other tokens, so this cannot pass by ignoring the chunks."""
    paged, stock = _llama4_pair(8)
    _, unchunked = _llama4_pair(10**6)
    unchunked.load_state_dict(stock.state_dict())
    ids, mask = left_padded_batch([5, 30, 19], seed=7)
    cases = [
        dict(do_sample=False, output_logits=True),
        dict(num_beams=2, do_sample=False),
        dict(do_sample=True, top_k=0, num_return_sequences=2),
    ]
    for kw in cases:
        kw = dict(max_new_tokens=12, eos_token_id=None, **kw)
        runs = {}
        for name, model in (("stock", stock), ("paged", paged), ("unchunked", unchunked)):
            torch.manual_seed(1234)
            runs[name] = _gen(model, ids, mask, **kw)
        ref, out = runs["stock"], runs["paged"]
        assert isinstance(cache_of(out), PagedCache)
        assert torch.equal(out.sequences, ref.sequences), kw
        assert_logits_close(out, ref, kw)
        assert not torch.equal(runs["unchunked"].sequences, ref.sequences), f"chunks make no difference here: {kw}"
    # Without a paged cache the "paged" attention falls back to a dense one with transformers' mask,
    # which carries the chunks itself.
    with torch.no_grad():
        dense, ref = (m(input_ids=ids, attention_mask=mask, use_cache=False).logits for m in (paged, stock))
    real = mask.bool()
    torch.testing.assert_close(dense[real], ref[real], atol=2e-4, rtol=0)


def test_packed_prefill_only_where_every_per_row_input_is_packed(monkeypatch):
    """A trimmed group runs packed when the model takes positions and a tensor logits_to_keep,
    generate gave a position per prompt token, and no other per-row input (token_type_ids) would
    need packing too; HF_PAGED_PACKED_PREFILL=0 turns it off."""
    from hf_paged.generation import can_pack

    paged, _ = make_pair("llama")
    ids, mask = left_padded_batch([5, 9], seed=1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    base = {"attention_mask": mask, "position_ids": pos, "use_cache": True, "logits_to_keep": 1}
    monkeypatch.delenv("HF_PAGED_PACKED_PREFILL", raising=False)
    assert can_pack(paged, base, ids)
    assert not can_pack(paged, {**base, "token_type_ids": torch.zeros_like(ids)}, ids)
    assert not can_pack(paged, {**base, "position_ids": None}, ids)
    assert not can_pack(paged, {**base, "position_ids": pos[:, 1:]}, ids)
    monkeypatch.setenv("HF_PAGED_PACKED_PREFILL", "0")
    assert not can_pack(paged, base, ids)
