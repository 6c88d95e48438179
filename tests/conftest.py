"""Shared fixtures. ``tests/`` is on sys.path (pytest puts conftest folders there), so test
modules import helpers from ``dist_harness``."""

import logging
import os
import tempfile

import pytest
import torch
import torch.distributed as dist


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


@pytest.fixture(scope="module")
def one_rank_group():
    """The default process group on one gloo rank in this process (created if absent), so
    graphs with real functional collectives can be traced and run; yields its name."""
    created = not dist.is_initialized()
    if created:
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD.group_name
    if created:
        dist.destroy_process_group()


logging.getLogger("fsc").setLevel(logging.INFO)
