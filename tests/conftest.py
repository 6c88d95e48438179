"""Shared fixtures. ``tests/`` is on sys.path (pytest puts conftest folders there), so test
modules import helpers from ``dist_harness``."""

import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch; Dynamo's caches would otherwise hide compiles."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _one_thread():
    # 2-core CI machines: several ranks with default thread pools oversubscribe badly.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


logging.getLogger("fsc").setLevel(logging.INFO)
