"""Device bookkeeping for models split over devices (accelerate's device_map), on a fake two-device
layout: layer 0 on the CPU, layers 1-2 on the "meta" device, kernels replaced by a recorder."""

from types import SimpleNamespace

import pytest
import torch

import hf_paged.forward as forward_module
from hf_paged import PagedCache
from hf_paged.attention import paged_attention_forward


class RecordingBackend:
    """Stands in for the kernels: records which device each call's tensors are on."""

    def __init__(self):
        self.calls = []

    def store_kv(self, key, value, key_cache, value_cache, slot_mapping, pool_addresses=None):
        assert pool_addresses is None or pool_addresses.device == key_cache.device
        self.calls.append(("store", key.device, key_cache.device, slot_mapping.device, id(slot_mapping)))

    def copy_blocks(self, key_cache, value_cache, src, dst):
        self.calls.append(("copy", key_cache.device, src.device, dst.device, id(src)))

    def attend(self, query, key_cache, value_cache, batch, layer, *, new_key=None, new_value=None, plans=None,
               pool_addresses=None):
        # the attention launch writes the layer's new K/V (see PagedCache.update), at the pools
        # whose addresses it reads from a tensor on their device
        assert pool_addresses.device == key_cache.device
        self.calls.append(("store", new_key.device, key_cache.device, batch.slot_mapping.device,
                           id(batch.slot_mapping)))
        assert batch.block_table.device == batch.seq_lens.device == batch.query_pos.device == key_cache.device
        return query.transpose(1, 2)


def _attend(fwd, layer, device):
    """What the model's attention layer does after cache.update: the "paged" attention function."""
    module = SimpleNamespace(layer_idx=layer, scaling=1.0, training=False)
    q = torch.empty(fwd.meta.batch, 4, fwd.meta.q_len, 8, device=device)
    paged_attention_forward(module, q, None, None, fwd)


@pytest.fixture
def recorder(monkeypatch):
    rec = RecordingBackend()
    monkeypatch.setattr(forward_module, "backend_for", lambda device: rec)
    return rec


def test_each_layer_pool_lives_on_its_layer_device_and_metadata_moves_once_per_device(recorder):
    cache = PagedCache()
    mask = torch.ones(2, 5, dtype=torch.bool)
    fwd = cache.begin_forward(mask, 5, 2, torch.device("cpu"))
    devices = [torch.device("cpu"), torch.device("meta"), torch.device("meta")]
    for layer, dev in enumerate(devices):
        k = torch.empty(2, 2, 5, 8, device=dev)
        cache.update(k, k, layer)
        _attend(fwd, layer, dev)
    assert [cache.key_cache[i].device for i in range(3)] == devices
    assert [cache.value_cache[i].device for i in range(3)] == devices
    # every store got its slot mapping on its own layer's device
    assert [(c[1], c[2], c[3]) for c in recorder.calls] == [(d, d, d) for d in devices]
    # the two meta layers share ONE moved copy of the metadata (moved once per device and forward)
    assert recorder.calls[1][4] == recorder.calls[2][4]
    assert list(fwd._on_device) == [torch.device("meta")]
    assert fwd.on(torch.device("meta")).meta.block_table.device.type == "meta"
    assert fwd.on(torch.device("cpu")) is fwd


def test_copy_on_write_sources_follow_each_device(recorder):
    cache = PagedCache()
    cache.begin_forward(torch.ones(1, 5, dtype=torch.bool), 5, 1, torch.device("cpu"))
    for layer, dev in enumerate(("cpu", "meta")):
        k = torch.empty(1, 2, 5, 8, device=dev)
        cache.update(k, k, layer)
    cache.batch_repeat_interleave(2)  # two rows share a partial tail block
    recorder.calls.clear()
    fwd = cache.begin_forward(None, 1, 2, torch.device("cpu"))
    assert fwd.meta.copy_src is not None and len(fwd.meta.copy_src) == 1  # one row copies, the other in place
    for layer, dev in enumerate(("cpu", "meta")):
        k = torch.empty(2, 2, 1, 8, device=dev)
        cache.update(k, k, layer)
    copies = [c for c in recorder.calls if c[0] == "copy"]
    assert [(c[1].type, c[2].type, c[3].type) for c in copies] == [("cpu",) * 3, ("meta",) * 3]


def test_triton_forced_on_a_cpu_layer_is_a_clear_error(monkeypatch):
    """A layer offloaded to the CPU while HF_PAGED_BACKEND=triton is forced (no interpreter)."""
    import hf_paged.kernels as kernels

    monkeypatch.setattr(kernels, "interpreter_enabled", lambda: False)
    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    cache = PagedCache()
    k = torch.randn(1, 2, 3, 8)
    # The kernels are resolved once per forward (when its metadata is built), so it fails there.
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*HF_PAGED_BACKEND=torch"):
        cache.begin_forward(torch.ones(1, 3, dtype=torch.bool), 3, 1, torch.device("cpu"))
        cache.update(k, k, 0)
    assert cache.block_tables == [] and cache.pool.num_used == 0  # failed before allocating anything


def test_new_tokens_no_attention_wrote_are_written_before_the_cache_moves_on(recorder):
    """update() leaves the write to the attention launch; if none comes (a layer whose attention
    never ran), the end of the forward (here: a row operation, or the next forward) writes them,
    on each layer's device."""
    cache = PagedCache()
    cache.begin_forward(torch.ones(1, 5, dtype=torch.bool), 5, 1, torch.device("cpu"))
    for layer, dev in enumerate(("cpu", "meta")):
        k = torch.empty(1, 2, 5, 8, device=dev)
        cache.update(k, k, layer)
    assert recorder.calls == []
    cache.batch_repeat_interleave(2)
    assert [(c[0], c[1].type, c[2].type, c[3].type) for c in recorder.calls] == [
        ("store", "cpu", "cpu", "cpu"), ("store", "meta", "meta", "meta")]
    recorder.calls.clear()
    cache.begin_forward(None, 1, 2, torch.device("cpu"))  # nothing left to write
    assert [c for c in recorder.calls if c[0] == "store"] == []
