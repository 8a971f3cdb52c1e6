import pytest
import torch
from slurm_fixtures import slurm_cluster  # noqa: F401  (the local SLURM cluster fixture)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and batches: one intra-op thread is faster than two on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
