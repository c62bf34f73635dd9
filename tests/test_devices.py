"""Device bookkeeping for models split over devices (accelerate's device_map), on a fake two-device
layout: layer 0 on the CPU, layers 1-2 on the "meta" device, kernels replaced by a recorder."""

import pytest
import torch

import hf_paged.cache as cache_module
from hf_paged import PagedCache


class RecordingBackend:
    """Stands in for the kernels: records which device each call's tensors are on."""

    def __init__(self):
        self.calls = []

    def store_kv(self, key, value, key_cache, value_cache, slot_mapping):
        self.calls.append(("store", key.device, key_cache.device, slot_mapping.device, id(slot_mapping)))

    def copy_blocks(self, key_cache, value_cache, src, dst):
        self.calls.append(("copy", key_cache.device, src.device, dst.device, id(src)))


@pytest.fixture
def recorder(monkeypatch):
    rec = RecordingBackend()
    monkeypatch.setattr(cache_module, "_backend_for", lambda device: rec)
    return rec


def test_each_layer_pool_lives_on_its_layer_device_and_metadata_moves_once_per_device(recorder):
    cache = PagedCache()
    mask = torch.ones(2, 5, dtype=torch.bool)
    fwd = cache.begin_forward(mask, 5, 2, torch.device("cpu"))
    devices = [torch.device("cpu"), torch.device("meta"), torch.device("meta")]
    for layer, dev in enumerate(devices):
        k = torch.empty(2, 2, 5, 8, device=dev)
        cache.update(k, k, layer)
    assert [cache.key_cache[i].device for i in range(3)] == devices
    assert [cache.value_cache[i].device for i in range(3)] == devices
    # every store got its slot mapping on its own layer's device
    assert [(c[1], c[2], c[3]) for c in recorder.calls] == [(d, d, d) for d in devices]
    # the two meta layers share ONE moved copy of the metadata (moved once per device and forward)
    assert recorder.calls[1][4] == recorder.calls[2][4]
    assert list(fwd._per_device) == [torch.device("meta")]
    assert fwd.on(torch.device("meta")).block_table.device.type == "meta"
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
    assert fwd.copy_src is not None and len(fwd.copy_src) == 1  # one row copies, the other writes in place
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
    cache_module._BACKENDS.clear()
    cache = PagedCache()
    cache.begin_forward(torch.ones(1, 3, dtype=torch.bool), 3, 1, torch.device("cpu"))
    k = torch.randn(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*HF_PAGED_BACKEND=torch"):
        cache.update(k, k, 0)
    cache_module._BACKENDS.clear()
