"""Copy-on-write prefix sharing: beams, num_return_sequences copies and common preambles are
stored once, with the same tokens as stock transformers."""

import pytest
import torch
from tiny_models import cache_of, left_padded_batch, make_pair

import hf_paged.cache as cache_module
from hf_paged import PagedCache
from hf_paged.testing import left_pad


@pytest.fixture(scope="module")
def llama():
    return make_pair("llama", seed=3)


@pytest.fixture
def forwards(monkeypatch):
    """Record each forward's (rows, new tokens, copy-on-write copies)."""
    seen = []
    orig = PagedCache.begin_forward

    def spy(self, attention_mask, q_len, batch_size, device, dtype=None, **kwargs):
        fwd = orig(self, attention_mask, q_len, batch_size, device, dtype, **kwargs)
        entry = (batch_size, q_len, 0 if fwd.meta.copy_src is None else len(fwd.meta.copy_src))
        if not seen or seen[-1][1] is not fwd:
            seen.append((entry, fwd))
        return fwd

    monkeypatch.setattr(cache_module.PagedCache, "begin_forward", spy)
    return seen


def _gen(model, ids, mask, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, pad_token_id=0,
                          eos_token_id=None, **kw)


def test_beam_search_stores_the_prompt_once(llama, forwards):
    paged, stock = llama
    ids, mask = left_padded_batch([96], seed=21)
    new, beams = 12, 4
    kw = dict(max_new_tokens=new, num_beams=beams, do_sample=False, output_scores=True)
    ref = _gen(stock, ids, mask, **kw)
    out = _gen(paged, ids, mask, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    stats = cache_of(out).memory_stats()
    assert stats["blocks_used"] * 16 <= 96 + beams * (new + 2 * 16)
    assert stats["blocks_shared"] >= 96 // 16  # the prompt's full blocks, referenced by every beam
    # the pool was sized once for the call: the prompt once + per beam the blocks of its 11
    # stored new tokens (positions 96..106: one block)
    assert stats["blocks_total"] == 96 // 16 + beams * 1
    # one prefill of ONE row (not 4), then decode steps of 4 rows; per step, a tail block shared
    # by r beams is copied r - 1 times (the last sharer writes in place): at most beams - 1 block
    # copies, and no other KV data moves
    (first, _), *steps = forwards
    assert first[:2] == (1, 96)
    assert all(rows == beams and q == 1 and copies <= beams - 1 for (rows, q, copies), _ in steps)
    assert sum(copies for (_, _, copies), _ in steps) > 0


def test_sampling_num_return_sequences_stores_the_prompt_once(llama, forwards):
    paged, stock = llama
    ids, mask = left_padded_batch([128], seed=22)
    n, new = 6, 10
    kw = dict(max_new_tokens=new, do_sample=True, num_return_sequences=n, output_logits=True)
    torch.manual_seed(7)
    ref = _gen(stock, ids, mask, **kw)
    torch.manual_seed(7)
    out = _gen(paged, ids, mask, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)
    stats = cache_of(out).memory_stats()
    assert stats["blocks_used"] * 16 <= 128 + n * (new + 2 * 16)
    assert forwards[0][0][:2] == (1, 128)  # the prompt's prefill ran once, for 6 samples


def test_common_preamble_is_stored_once(llama):
    paged, stock = llama
    g = torch.Generator().manual_seed(23)
    preamble = torch.randint(3, 256, (64,), generator=g)
    q1, q2 = torch.randint(3, 256, (9,), generator=g), torch.randint(3, 256, (21,), generator=g)
    rows = [torch.cat([preamble, q1]), torch.cat([preamble, q2])]
    ids, mask = left_pad(rows)
    kw = dict(max_new_tokens=8, do_sample=False)
    ref = _gen(stock, ids, mask, **kw)
    out = _gen(paged, ids, mask, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    cache = cache_of(out)
    t0, t1 = cache.block_tables
    assert t0[:4] == t1[:4]  # the 64-token preamble = 4 full blocks, shared
    assert len(set(t0[4:]) & set(t1[4:])) == 0
    stats = cache.memory_stats()
    assert stats["blocks_shared"] == 4
    unshared = sum(-(-n // 16) for n in (64 + 9 + 7, 64 + 21 + 7))
    assert stats["blocks_used"] == unshared - 4


def test_sharing_can_be_turned_off(llama):
    paged, _ = llama
    ids, mask = left_padded_batch([40], seed=24)
    cache = PagedCache(config=paged.config, share_prefixes=False)
    out = _gen(paged, ids, mask, max_new_tokens=4, do_sample=True, num_return_sequences=2, past_key_values=cache)
    assert out.sequences.shape[0] == 2
    stats = cache.memory_stats()
    assert stats["blocks_used"] == 2 * 3  # each sample keeps its own copy of the 43 tokens
    assert stats["blocks_shared"] == 0


@pytest.mark.parametrize("kind", ["beams", "samples", "preamble"])
def test_shared_prefix_decode_gives_stock_tokens(llama, forwards, monkeypatch, kind):
    """HF_PAGED_CASCADE=1: the decode steps group the rows over their shared blocks (the attention
    reads them once per group: the Triton kernels under HF_PAGED_BACKEND=triton; the reference
    computes the same attention) and generate gives stock's tokens."""
    paged, stock = llama
    monkeypatch.setenv("HF_PAGED_CASCADE", "1")
    if kind == "preamble":
        g = torch.Generator().manual_seed(25)
        preamble = torch.randint(3, 256, (48,), generator=g)
        rows = [torch.cat([preamble, torch.randint(3, 256, (n,), generator=g)]) for n in (5, 19, 11)]
        ids, mask = left_pad(rows)
        kw = dict(max_new_tokens=6, do_sample=False)
    else:
        ids, mask = left_padded_batch([40, 75], seed=26)
        kw = (dict(max_new_tokens=8, num_beams=3, do_sample=False) if kind == "beams"
              else dict(max_new_tokens=8, do_sample=True, num_return_sequences=3))
    torch.manual_seed(8)
    ref = _gen(stock, ids, mask, **kw)
    torch.manual_seed(8)
    out = _gen(paged, ids, mask, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    steps = [fwd.meta for _, fwd in forwards if fwd.meta.q_len == 1]
    assert steps and all(meta.cascade is not None for meta in steps)
    # the first decode step: every row of a prompt in one group over the prompt's full blocks
    # (3 rows of the preamble's 48 tokens; 3 beams or samples of each of the two prompts)
    own_start = steps[0].cascade.own_start.tolist()
    assert own_start == ([48] * 3 if kind == "preamble" else [32] * 3 + [64] * 3)
