import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per test: `make test` runs two workers on two cores, and tiny tensors run many times
    slower when threads oversubscribe the cores. Set before every test, since claims may change it."""
    torch.set_num_threads(1)
    yield
