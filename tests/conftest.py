"""Slow tests (marked `slow`) run only with FXTP_SLOW=1, keeping the default suite fast on 2 cores."""
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; run with FXTP_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FXTP_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set FXTP_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
