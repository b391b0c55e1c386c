import pytest
import torch


@pytest.fixture
def one_thread():
    """A matmul may split its sums by the threads it gets: one thread, so two runs agree bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
