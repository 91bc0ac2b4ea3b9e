"""Slow tests (marked `slow`) run only with FXTP_SLOW=1, keeping the default suite fast on 2 cores.
A test is marked slow only where a default test keeps its coverage: every feature, model kind and
world-size class (1, 2, uneven 3, 4 and more) keeps at least one default test; the marker's comment
says which test that is.

Without a GPU, fxtp's Triton kernels run on CPU tensors in Triton's interpreter. It has to be on
before triton.language is imported (which decorates Triton's own functions, tl.max among them, for
the interpreter or for the GPU), and test modules import it through torch._dynamo, so it is
turned on here, before they are collected.
"""
import os
import sys

import pytest
import torch

# README's command runs two pytest-xdist workers, which share the cores
torch.set_num_threads(1 if "PYTEST_XDIST_WORKER" in os.environ else max(1, min(2, os.cpu_count() or 1)))
if not torch.cuda.is_available() and "triton.language" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# fxtp's step cache off (fxtp/runtime/step_cache.py): every test exports and plans as a user's first process
# does, and nothing is written to the home directory; tests/test_step_cache.py turns it on in a temporary one
os.environ.setdefault("FXTP_CACHE_DIR", "")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; run with FXTP_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FXTP_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set FXTP_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=[(False, True), (True, False), (True, True)], ids=["no_pdl", "pdl", "pdl_preload"])
def pdl_launch(request):
    """fxtp.kernels.dependent_launch.launching_with_pdl's (on, preload) for GPU tests of fxtp's kernels: without PDL, and
    with it, the GEMV loading its first weights after its wait or before it."""
    return request.param
