"""Shared test setup. TRITON_INTERPRET is read when kernels are decorated (at import), so it is
set here, before anything imports kphi3_kernels: on a machine without a GPU the Triton tests run
the real kernels through Triton's CPU interpreter."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("KPHI3_BACKEND", None)  # tests choose backends explicitly

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (bf16 tl.dot is wrong in the interpreter)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_poison_and_reset_backend():
    """Every test: a fixed seed, NaN-poisoned kernel outputs, the default backend."""
    import kphi3_kernels
    from kphi3_kernels.ops import outputs

    torch.manual_seed(0)
    kphi3_kernels.set_backend("auto")
    outputs.POISON = True
    yield
    outputs.POISON = False
    kphi3_kernels.set_backend("auto")
