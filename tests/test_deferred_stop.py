"""Over a PagedCache, generate's sampling loop reads "every row finished" one step late
(transformers' DeferredStopCheck, which hf_paged turns on for CUDA): no host-device
synchronisation per decode step. When the rows stop at EOS before max_new_tokens, the loop runs
one step too many and transformers undoes it: tokens, logits and the returned cache must be
stock's and the synchronising loop's.

On CPU, with a stand-in for the device event the deferred check waits on (CPU tensors have no
events; a CPU op has finished when it returns, so there is nothing to wait for).
tests/test_cuda.py runs it with real events."""

import pytest
import torch
from tiny_models import cache_of, left_padded_batch, make_pair
from transformers.generation import utils as generation_utils

import hf_paged
from hf_paged import PrefixCache, generation

LENGTHS = [5, 41, 23]
MAX_NEW = 12


class _DoneEvent:
    """A CPU stand-in for torch.Event: the work it marks is done when record() returns."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def deferred(monkeypatch):
    """The deferred check on for CPU tensors too; returns the steps each generate call undid
    (one entry per call that deferred)."""
    monkeypatch.setattr(torch, "Event", _DoneEvent)
    monkeypatch.setattr(generation, "_DEFERRED_STOP_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.delenv(generation.DEFERRED_STOP_ENV_VAR, raising=False)
    undone = []
    finish = generation_utils.DeferredStopCheck.finish

    def counting_finish(self):
        steps = finish(self)
        undone.append(steps)
        return steps

    monkeypatch.setattr(generation_utils.DeferredStopCheck, "finish", counting_finish)
    return undone


@pytest.fixture(scope="module", params=["llama", "mistral", "gemma2"])
def pair(request):
    """Full attention; sliding-window layers (their tables release blocks out of the window)."""
    paged, stock = make_pair(request.param)
    return request.param, paged, stock


def _gen(model, ids, mask, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, return_dict_in_generate=True,
                          output_logits=True, **kw)


def _early_eos(stock, ids, mask):
    """EOS ids that stop each row at a different step, all before MAX_NEW: a token each row
    generates (without EOS) at steps 2, 5 and 8."""
    free = _gen(stock, ids, mask, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None).sequences
    return sorted({int(free[row, ids.shape[1] + step]) for row, step in enumerate((2, 5, 8))})


def test_rows_stopping_at_eos_one_step_late_give_stock_outputs(pair, deferred, monkeypatch):
    name, paged, stock = pair
    ids, mask = left_padded_batch(LENGTHS, seed=1)
    eos = _early_eos(stock, ids, mask)
    kw = dict(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos)
    ref = _gen(stock, ids, mask, **kw)
    assert ref.sequences.shape[1] < ids.shape[1] + MAX_NEW  # every row stopped early
    out = _gen(paged, ids, mask, **kw)
    assert deferred == [1], name  # the loop ran one step too many and undid it
    assert torch.equal(out.sequences, ref.sequences), name
    assert len(out.logits) == len(ref.logits)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)
    # the returned cache holds what the synchronising loop's does: the extra step's token cropped
    monkeypatch.setenv(generation.DEFERRED_STOP_ENV_VAR, "0")
    synced = _gen(paged, ids, mask, **kw)
    assert deferred == [1]  # that call did not defer
    assert torch.equal(synced.sequences, ref.sequences), name
    got, want = cache_of(out), cache_of(synced)
    assert got.get_seq_length() == want.get_seq_length() == ref.sequences.shape[1] - 1
    assert got.seq_lens == want.seq_lens
    for key in ("tokens_logical", "blocks_used"):
        assert got.memory_stats()[key] == want.memory_stats()[key], (name, key)
    got.tables.check_consistency()


def test_sampled_rows_stopping_at_eos_one_step_late(deferred):
    paged, stock = make_pair("llama")
    ids, mask = left_padded_batch([12, 33], seed=3)
    kw = dict(max_new_tokens=MAX_NEW, do_sample=True, top_k=0, num_return_sequences=3, eos_token_id=list(range(3, 80)))
    torch.manual_seed(5)
    ref = _gen(stock, ids, mask, **kw)
    assert ref.sequences.shape[1] < ids.shape[1] + MAX_NEW
    torch.manual_seed(5)
    out = _gen(paged, ids, mask, **kw)
    assert deferred == [1]
    assert torch.equal(out.sequences, ref.sequences)


def test_max_new_tokens_stop_runs_no_extra_step(deferred):
    """Stopping at max_new_tokens is known on the host: no step too many, none undone."""
    paged, stock = make_pair("llama")
    ids, mask = left_padded_batch(LENGTHS, seed=1)
    kw = dict(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None)
    out = _gen(paged, ids, mask, **kw)
    assert deferred == [0]
    assert torch.equal(out.sequences, _gen(stock, ids, mask, **kw).sequences)
    assert cache_of(out).get_seq_length() == ids.shape[1] + MAX_NEW - 1


def test_extra_step_blocks_go_back_to_the_prefix_cache(deferred, fake_graphs, replays_run_no_python):
    """A call over a prefix cache (its cache not returned: nothing cropped) with graphed decode
    steps: the extra step's blocks go back with the rows, and the next call reuses the prompts."""
    paged, stock = make_pair("llama")
    ids, mask = left_padded_batch(LENGTHS, seed=1)
    eos = _early_eos(stock, ids, mask)
    kw = dict(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos)
    ref = _gen(stock, ids, mask, **kw).sequences
    prefix = PrefixCache(max_blocks=64)
    for call in range(2):
        out = paged.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, prefix_cache=prefix, **kw)
        assert torch.equal(out, ref), call
        assert prefix.stats()["blocks_held"] == 0, call
    assert deferred == [1, 1]
    assert hf_paged.graphs.STATS["replays"] > 0


def test_deferred_only_over_a_paged_cache_on_cuda(monkeypatch):
    """The answer hf_paged gives transformers: yes for a PagedCache on CUDA (not for assisted
    decoding's assistant, not with HF_PAGED_DEFERRED_STOP=0); anything else, transformers' own."""
    from transformers import DynamicCache

    check = generation_utils.DeferredStopCheck.is_supported
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(generation.DEFERRED_STOP_ENV_VAR, raising=False)
    assert check(cuda, hf_paged.PagedCache(), True, is_assistant=False) is True
    assert check(cuda, hf_paged.PagedCache(), True, is_assistant=True) is False
    assert check(cpu, hf_paged.PagedCache(), True, is_assistant=False) is False  # no CPU events
    assert check(cuda, DynamicCache(), True, is_assistant=False) is False  # transformers': mps only
    monkeypatch.setenv(generation.DEFERRED_STOP_ENV_VAR, "0")
    assert check(cuda, hf_paged.PagedCache(), True, is_assistant=False) is False


def test_streamer_gets_stock_tokens_one_step_late(deferred):
    """A streamer receives each token a step late (transformers' deferred check streams what it
    has read back), and in the end exactly the tokens the synchronising loop streams: not the
    extra step's."""
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    paged, stock = make_pair("llama")
    ids, mask = left_padded_batch([9], seed=4)
    free = _gen(stock, ids, mask, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None).sequences
    kw = dict(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=int(free[0, ids.shape[1] + 5]))
    streamed = {}
    for name, model in (("stock", stock), ("paged", paged)):
        streamer = Collect()
        model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, streamer=streamer, **kw)
        assert streamer.ended, name
        streamed[name] = streamer.puts
    assert deferred == [1]
    assert streamed["paged"] == streamed["stock"]
    assert len(streamed["paged"]) == 1 + 6  # the prompt, then the tokens up to and with EOS


def test_every_prefill_path_hands_the_loop_its_paged_cache(monkeypatch):
    """The loop asks with the prefill's cache: each of hf_paged's prefill paths (one forward,
    length-sorted groups, rows forked after one prefill per distinct prompt, shared prefixes over
    a PrefixCache) must return it, or the decode would silently wait for the GPU every step."""
    from hf_paged import PagedCache

    asked = []
    monkeypatch.setattr(generation_utils.DeferredStopCheck, "is_supported",
                        staticmethod(lambda device, cache, *a, **k: asked.append(cache) or False))
    paged, _ = make_pair("llama")
    ids, mask = left_padded_batch(LENGTHS, seed=1)
    kw = dict(max_new_tokens=3, pad_token_id=0, eos_token_id=None)
    grouped = {hf_paged.compat.generate_cache_kwarg(): PagedCache(config=paged.config, max_prefill_tokens=48)}
    calls = [dict(), grouped,
             dict(do_sample=True, num_return_sequences=3), dict(prefix_cache=PrefixCache(max_blocks=64))]
    for extra in calls:
        paged.generate(input_ids=ids, attention_mask=mask, **kw, **extra)
    assert len(asked) == len(calls)
    assert all(isinstance(cache, PagedCache) for cache in asked)
