import contextlib
import os

import torch

# Triton kernels run on CPU through Triton's interpreter; the variable must be set before triton
# is imported (hf_paged imports its Triton modules lazily, so setting it here is early enough).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hf_paged.block_table import BlockTables  # noqa: E402

# Every forward of every test also builds its block table afresh and compares it with the one
# kept and patched from the last forward (a row operation that forgot to invalidate it fails here).
BlockTables.check_dense = True


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# CUDA graphs on the CPU (tests/test_graphs.py, tests/test_engine.py): the capture is replaced by
# a stand-in that runs the captured function again at each replay, so everything but the graph
# itself is exercised; tests/test_cuda.py runs real graphs on the GPU.


@pytest.fixture
def replays_run_no_python(monkeypatch):
    """The stand-ins replay by running the captured Python again; a real replay runs none, so
    nothing the static step does to the cache's Python state may last: the stand-in undoes it
    (here, the logical length its update() commits). Whatever the graph path needs must come
    from outside the replay, as on the GPU."""
    import hf_paged

    real = hf_paged.PagedCache.replaying

    @contextlib.contextmanager
    def replaying(self, *args, **kwargs):
        logical_len = self.tables.logical_len
        with real(self, *args, **kwargs) as fwd:
            yield fwd
        self.tables.logical_len = logical_len

    monkeypatch.setattr(hf_paged.PagedCache, "replaying", replaying)


@pytest.fixture
def fake_graphs(monkeypatch):
    """Graphs on CPU tensors too, captured by the stand-in."""
    from hf_paged import graphs

    monkeypatch.setattr(graphs, "_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(graphs, "_CAPTURE", lambda run, pool, starts=(): run)


@pytest.fixture
def preemptions(monkeypatch):
    """The request indices of the sequences the engine preempts (in order), while the test runs."""
    from hf_paged.engine import Engine

    calls = []
    original = Engine._preempt

    def counting(self, seq):
        calls.append(seq.request.index)
        return original(self, seq)

    monkeypatch.setattr(Engine, "_preempt", counting)
    return calls
