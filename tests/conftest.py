"""Shared test set-up: one intra-op thread (small ops on a busy 2-core machine run many times
faster single-threaded, and results do not depend on the thread count)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
