import os

import invprop  # noqa: F401  (first: it sets OpenMP's wait policy, which torch reads when it loads)

# isort: split
import torch

# Without CUDA the Triton kernels (invprop/kernels) run in Triton's interpreter, which Triton only offers when
# this is set before its first import (torch's own imports load it later, in the test modules).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from slurm_fixtures import slurm_cluster  # noqa: F401, E402  (the local SLURM cluster fixture)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and batches: one intra-op thread is faster than two on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def exact_topk_calls(monkeypatch):
    """(queries, k) of every exact top-k the bank runs (`TopK.chunked`, which every strategy's exact path
    uses), in call order."""
    from invprop.bank.select import TopK

    calls = []
    chunked = TopK.chunked

    def recorded(topk, zq, rows, start, k, chunk):
        calls.append((zq.shape[0], k))
        return chunked(topk, zq, rows, start, k, chunk)

    monkeypatch.setattr(TopK, "chunked", recorded)
    return calls
