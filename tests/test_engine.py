"""generate_many: continuous batching over the paged cache (hf_paged/engine/)."""

import logging

import pytest
import torch
from tiny_models import FAMILIES, make_pair
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

import hf_paged
from hf_paged.engine import Engine
from hf_paged.engine.sampling import SamplingParams, process_logits, uniform_noise
from hf_paged.memory import config_bytes_per_token

LENGTHS = (5, 40, 17, 3, 61, 9, 33, 70)


def _prompts(seed=1, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


def _alone(model, prompt, **kw):
    """model.generate on one prompt: its new tokens."""
    ids = torch.tensor([prompt])
    kw = {"pad_token_id": 0, "eos_token_id": None, "do_sample": False, **kw}
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)[0, len(prompt):].tolist()


def _many(model, prompts, **kw):
    kw = {"pad_token_id": 0, "eos_token_id": None, "do_sample": False, **kw}
    return hf_paged.generate_many(model, prompts, **kw)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_results_equal_generate_alone(family, preemptions):
    """Mixed prompt lengths, prompts prefilled in chunks between decode steps, per-request limits
    and end tokens, and a memory cap that forces preemption: each result equals model.generate on
    its prompt alone, cut after its end token."""
    paged, stock = make_pair(family)
    prompts = _prompts()
    refs = [_alone(stock, p, max_new_tokens=20) for p in prompts]
    requests = [hf_paged.Request(p) for p in prompts]
    requests[1] = hf_paged.Request(prompts[1], eos_token_id=refs[1][5])  # ends at its 6th token
    requests[2] = hf_paged.Request(prompts[2], max_new_tokens=4)
    expected = list(refs)
    expected[1] = refs[1][: refs[1].index(refs[1][5]) + 1]
    expected[2] = refs[2][:4]
    block_bytes = config_bytes_per_token(paged.config, torch.float32) * 16
    for max_memory in (None, 8 * block_bytes):  # 8 blocks: the longest row alone takes 6
        preemptions.clear()
        results = _many(paged, requests, max_new_tokens=20, max_batch_tokens=48, max_memory=max_memory)
        assert [r.index for r in results] == list(range(len(prompts)))
        assert [r.sequences[0] for r in results] == expected, (family, max_memory)
        assert results[1].finish_reasons == ["eos"] and results[2].finish_reasons == ["length"]
        assert bool(preemptions) == (max_memory is not None), preemptions


def test_num_return_sequences_fork_after_one_prefill(monkeypatch):
    """A request's sequences fork after one prefill of its prompt, sharing its blocks; with top_k=1
    each samples the greedy tokens."""
    paged, stock = make_pair("llama")
    prompts = _prompts(lengths=(40, 7, 23))
    prefilled = []
    original = Engine._run_chunks

    def counting(self, chunks, finished):
        prefilled.extend(n for _, n in chunks)
        return original(self, chunks, finished)

    monkeypatch.setattr(Engine, "_run_chunks", counting)
    results = _many(paged, prompts, max_new_tokens=12, do_sample=True, top_k=1, num_return_sequences=3, seed=5)
    assert sum(prefilled) == sum(len(p) for p in prompts)  # each prompt once
    for prompt, result in zip(prompts, results):
        assert result.sequences == [_alone(stock, prompt, max_new_tokens=12)] * 3


def test_sampling_is_reproducible_whatever_the_order_and_the_cap(preemptions):
    paged, _ = make_pair("qwen3")
    prompts = _prompts(seed=3)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.95, num_return_sequences=2, seed=11)
    first = _many(paged, prompts, **kw)
    reversed_order = _many(paged, prompts[::-1], **kw)[::-1]
    capped = _many(paged, prompts, max_memory=12 * 16 * config_bytes_per_token(paged.config, torch.float32), **kw)
    assert preemptions  # the cap made the engine preempt and recompute
    for a, b, c in zip(first, reversed_order, capped):
        assert a.sequences == b.sequences == c.sequences
    assert any(r.sequences[0] != r.sequences[1] for r in first)  # the two samples of a prompt differ
    other_seed = _many(paged, prompts, **dict(kw, seed=12))
    assert [r.sequences for r in other_seed] != [r.sequences for r in first]
    # a request's own seed
    mine = _many(paged, [hf_paged.Request(prompts[0], seed=11)] + prompts[1:], **dict(kw, seed=99))
    assert mine[0].sequences == first[0].sequences and mine[1].sequences != first[1].sequences


def test_processors_match_transformers():
    """Repetition penalty, temperature, top-k, top-p and min-p give the scores transformers'
    processors give, a row per setting."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 64, generator=g) * 3
    history = torch.randint(0, 64, (5, 6), generator=g)
    settings = [dict(repetition_penalty=1.3), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1)]
    params = [SamplingParams(do_sample=True, **s) for s in settings]
    ours = process_logits(logits, params, history)
    theirs = torch.stack([
        RepetitionPenaltyLogitsProcessor(1.3)(history[0:1], logits[0:1].clone())[0],
        TemperatureLogitsWarper(0.7)(history[1:2], logits[1:2].clone())[0],
        TopKLogitsWarper(5)(history[2:3], logits[2:3].clone())[0],
        TopPLogitsWarper(0.8)(history[3:4], logits[3:4].clone())[0],
        MinPLogitsWarper(0.1)(history[4:5], logits[4:5].clone())[0],
    ])
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite])


def test_sampling_noise_depends_on_seed_and_counter_only():
    a = uniform_noise(torch.tensor([7, 7, 8]), torch.tensor([0, 1, 0]), 32)
    b = uniform_noise(torch.tensor([8, 7]), torch.tensor([0, 1]), 32)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])
    assert ((a > 0) & (a < 1)).all()


def test_generation_settings_the_engine_applies_equal_generate():
    """Greedy with a repetition penalty, min_new_tokens holding back an end token, max_length."""
    paged, stock = make_pair("gemma2")
    prompts = _prompts(lengths=(6, 30))
    for kw in (dict(max_new_tokens=10, repetition_penalty=1.4), dict(max_length=40)):
        assert [r.sequences[0] for r in _many(paged, prompts, **kw)] == [_alone(stock, p, **kw) for p in prompts]
    ref = _alone(stock, prompts[0], max_new_tokens=10)
    eos = ref[1]  # without min_new_tokens it would end at the second token
    kw = dict(max_new_tokens=10, eos_token_id=eos, min_new_tokens=5)
    assert _many(paged, prompts[:1], **kw)[0].sequences[0] == _alone(stock, prompts[0], **kw)


class _CharTokenizer:
    """A stand-in tokenizer: token t is the letter chr(65 + t % 26)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(65 + t % 26) for t in ids)

    def __call__(self, text):
        return {"input_ids": [ord(c) - 65 + 26 for c in text]}


def test_stop_strings_and_text_prompts():
    paged, stock = make_pair("llama")
    tok = _CharTokenizer()
    ref = _alone(stock, tok("HELLOWORLD")["input_ids"], max_new_tokens=16)
    stop = tok.decode(ref[4:6])
    first = next(i for i in range(len(ref) - 1) if tok.decode(ref[: i + 1]).find(stop) >= 0)
    result = _many(paged, ["HELLOWORLD"], tokenizer=tok, max_new_tokens=16, stop_strings=stop)[0]
    assert result.sequences[0] == ref[: first + 1] and result.finish_reasons == ["stop_string"]
    assert result.texts == [tok.decode(ref[: first + 1])]


def test_beam_search_goes_through_generate_with_one_warning(caplog):
    paged, stock = make_pair("llama")
    prompts = _prompts(lengths=(9, 21))
    with caplog.at_level(logging.WARNING, logger="hf_paged"):
        results = _many(paged, prompts, max_new_tokens=8, num_beams=2)
    assert [r.sequences[0] for r in results] == [_alone(stock, p, max_new_tokens=8, num_beams=2) for p in prompts]
    warnings = [r for r in caplog.records if "generate_many runs 2 prompt(s) through model.generate" in r.message]
    assert len(warnings) == 1 and "num_beams" in warnings[0].message


def test_iterator_yields_each_result_when_it_finishes():
    paged, _ = make_pair("llama")
    prompts = _prompts(lengths=(5, 6, 7))
    requests = [hf_paged.Request(p, max_new_tokens=n) for p, n in zip(prompts, (12, 2, 6))]
    order = [r.index for r in hf_paged.iter_generate_many(paged, requests, do_sample=False, eos_token_id=None,
                                                           pad_token_id=0)]
    assert order == [1, 2, 0]


def test_errors_name_the_cause():
    paged, _ = make_pair("llama")
    with pytest.raises(ValueError, match="prompt 0 is a string: pass tokenizer="):
        hf_paged.generate_many(paged, ["hello"])
    with pytest.raises(ValueError, match=r"not generation settings: \['bogus'\]"):
        hf_paged.generate_many(paged, [[5, 6]], bogus=1)
    with pytest.raises(ValueError, match="num_return_sequences"):  # transformers' own validation
        hf_paged.generate_many(paged, [[5, 6]], num_return_sequences=2, do_sample=False)
    with pytest.raises(ValueError, match="num_return_sequences"):
        hf_paged.generate_many(paged, [hf_paged.Request([5, 6], num_return_sequences=2)], do_sample=False)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        hf_paged.generate_many(paged, [[5, 6], []])
    with pytest.raises(hf_paged.OutOfBlocksError, match="request 0"):
        hf_paged.generate_many(paged, [list(range(3, 200))], max_new_tokens=2, max_memory=4 * 8192)  # 4 blocks


def test_progress_reports_the_engine_counters():
    paged, _ = make_pair("llama")
    seen = []
    results = _many(paged, [[5, 6, 7], [8, 9, 10, 11, 12]], max_new_tokens=4, progress=seen.append)
    last = seen[-1]
    assert last["finished_requests"] == 2 and last["new_tokens"] == 8
    assert last["prompt_tokens"] == 8 and last["running"] == 0 and last["waiting"] == 0
    # every decode step fed the rows that were still generating: 2 rows for the 3 steps after the first token
    assert last["decode_rows"] == 6 and last["decode_steps"] == 3
    assert [s["new_tokens"] for s in seen] == sorted(s["new_tokens"] for s in seen)
    assert all(len(r.sequences[0]) == 4 for r in results)


@pytest.fixture
def graphed(fake_graphs, replays_run_no_python):
    """The engine's decode graphs on the CPU, through the capture stand-in of conftest.py."""


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen3", "gpt2"])
def test_graphed_decode_steps_equal_generate_alone(family, graphed, preemptions):
    """Decode steps through the bucketed graphs: the batch shrinks as requests end (per-request
    limits), pad rows fill each bucket, a memory cap preempts; results equal generate's."""
    paged, stock = make_pair(family)
    prompts = _prompts()
    limits = (20, 20, 4, 20, 20, 20, 20, 11)
    requests = [hf_paged.Request(p, max_new_tokens=n) for p, n in zip(prompts, limits)]
    expected = [_alone(stock, p, max_new_tokens=n) for p, n in zip(prompts, limits)]
    block_bytes = config_bytes_per_token(paged.config, torch.float32) * 16
    for max_memory in (None, 6 * block_bytes):  # the longest row alone takes 6 blocks
        preemptions.clear()
        seen = []
        results = _many(paged, requests, max_batch_tokens=48, max_memory=max_memory, progress=seen.append)
        assert [r.sequences[0] for r in results] == expected, (family, max_memory)
        stats = seen[-1]
        assert stats["graphs_off"] is None and stats["graph_replays"] > 0
        if max_memory is None:
            assert stats["decode_slots"] > stats["decode_rows"]  # some steps ran pad rows (e.g. 7 rows in 8)
        assert bool(preemptions) == (max_memory is not None)


def test_graphed_sampling_equals_eager_sampling(graphed, monkeypatch):
    """Forked rows (num_return_sequences) copy their shared tail block before the graph writes it;
    samples are those of the eager engine."""
    paged, _ = make_pair("qwen3")
    prompts = _prompts(seed=4, lengths=(9, 30, 17))
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.9, num_return_sequences=3, seed=3)
    graphed = _many(paged, prompts, **kw)
    monkeypatch.setenv("HF_PAGED_CUDA_GRAPHS", "0")
    eager = _many(paged, prompts, **kw)
    assert [r.sequences for r in graphed] == [r.sequences for r in eager]


def test_bucket_sizes():
    from hf_paged.engine.graphs import BUCKETS, bucket

    assert [bucket(n) for n in (1, 3, 8, 9, 65, 256, 257, 513, 700)] == [1, 4, 8, 12, 96, 256, 320, 640, 768]
    assert all(bucket(n) >= n for n in range(1, 2000))
    assert list(BUCKETS) == sorted(BUCKETS)


def test_a_row_ending_at_an_end_token_decodes_one_step_past_it_and_that_token_is_dropped():
    """The engine reads a step's tokens after launching the next one: a row whose token in flight
    is an end token runs one step more, whose token is dropped; a row whose token in flight is its
    last by max_new_tokens does not."""
    paged, stock = make_pair("llama")
    prompt = _prompts()[0]
    ref = _alone(stock, prompt, max_new_tokens=20)
    seen = []
    ended = _many(paged, [hf_paged.Request(prompt, eos_token_id=ref[5])], max_new_tokens=20, progress=seen.append)
    assert ended[0].sequences[0] == ref[: ref.index(ref[5]) + 1] and ended[0].finish_reasons == ["eos"]
    n = len(ended[0].sequences[0])  # the first token comes from the prefill, n - 1 from decode steps
    assert seen[-1]["decode_rows"] == n - 1 and seen[-1]["decode_slots"] == n  # one step on speculation
    seen.clear()
    limited = _many(paged, [prompt], max_new_tokens=7, progress=seen.append)
    assert limited[0].sequences[0] == ref[:7]
    assert seen[-1]["decode_rows"] == seen[-1]["decode_slots"] == 6


def test_block_size_of_the_engine_cache():
    paged, stock = make_pair("llama")
    prompts = _prompts(lengths=(40, 7, 23))
    seen = []
    results = _many(paged, prompts, max_new_tokens=8, block_size=32, progress=seen.append)
    assert seen[-1]["block_size"] == 32
    assert [r.sequences[0] for r in results] == [_alone(stock, p, max_new_tokens=8) for p in prompts]


def test_a_prefix_cache_carries_a_preamble_to_the_next_call():
    """generate_many over a PrefixCache: the second call finds the preamble's blocks the first left
    there and prefills only its questions; results equal generate's."""
    paged, stock = make_pair("llama")
    g = torch.Generator().manual_seed(8)
    preamble = torch.randint(3, 256, (64,), generator=g).tolist()  # 4 full blocks
    calls = [[preamble + torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]
             for lengths in ((5, 12), (9, 3, 20))]
    prefix = hf_paged.PrefixCache(max_memory="8MiB")
    for i, prompts in enumerate(calls):
        seen = []
        results = _many(paged, prompts, max_new_tokens=6, prefix_cache=prefix, progress=seen.append)
        assert [r.sequences[0] for r in results] == [_alone(stock, p, max_new_tokens=6) for p in prompts]
        reused = seen[-1]["tokens_reused"]
        if i == 1:  # every prompt of the second call found the preamble
            assert reused == 64 * len(prompts)
            assert seen[-1]["tokens_prefilled"] == sum(len(p) - 64 for p in prompts)
    assert prefix.stats()["blocks_held"] == 0 and prefix.stats()["blocks_cached"] > 0


def test_chunked_prompts_hash_only_their_new_blocks(monkeypatch):
    """Long prompts prefilled chunk after chunk (max_batch_tokens 24): the hashes of each chunk's
    blocks, chained on the row's stored hashes, are those of hashing its whole prompt again; two
    prompts sharing a preamble still compute it once, and the results equal generate's."""
    paged, stock = make_pair("llama")
    g = torch.Generator().manual_seed(4)
    preamble = torch.randint(3, 256, (80,), generator=g).tolist()
    prompts = [preamble + torch.randint(3, 256, (n,), generator=g).tolist() for n in (30, 7)]
    checked = []
    chained = Engine._chunk_block_hashes

    def compare(self, row, seq, n):
        got = chained(self, row, seq, n)
        assert got == self._block_hashes(seq.tokens[:seq.stored + n])[seq.stored // self.cache.block_size:]
        checked.append(len(got))
        return got

    monkeypatch.setattr(Engine, "_chunk_block_hashes", compare)
    seen = []
    results = _many(paged, prompts, max_new_tokens=5, max_batch_tokens=24, progress=seen.append)
    assert [r.sequences[0] for r in results] == [_alone(stock, p, max_new_tokens=5) for p in prompts]
    assert len(checked) >= 3 and sum(checked) > 0
    assert seen[-1]["tokens_prefilled"] == sum(len(p) for p in prompts) - 80
