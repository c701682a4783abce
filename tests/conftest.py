import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per test: `make test` runs two workers on two cores, and tiny tensors run many times
    slower when threads oversubscribe the cores. Set before every test, since claims may change it."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """Tests not marked ``gpu`` are CPU tests (their numbers assume CPU arithmetic and CPU tensors): on a
    machine with a GPU, "auto" devices resolve to the CPU for them, here and in the processes they start.
    GPU behaviour is what the ``gpu``-marked tests and the benchmarks check."""
    if request.node.get_closest_marker("gpu") is None and torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    yield
