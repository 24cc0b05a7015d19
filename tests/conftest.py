"""Test-wide settings: no network, one thread per process, fixed seeds."""

import os

import pytest


# tests never reach the hub: fail fast instead of waiting on a network that is not there
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "scenarios(*names): the run_distributed_batch scenarios a test reads (testing_utils.selected_scenarios)",
    )


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    # the spawned ranks run with one thread; so does a simulation, to keep the kernels' reduction order the same
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
