"""Kernel tests run the Triton kernels on CPU through the Triton interpreter, in a worker.

Why a worker process rather than ``os.environ["TRITON_INTERPRET"] = "1"`` here: triton
reads the variable when ``@triton.jit`` decorates a function, and its own library
functions (``tl.zeros``, ``tl.sigmoid``, ...) are decorated when triton is first imported.
By the time pytest loads this file, earlier test modules have already imported triton
(``import fsc`` does), so setting it here is too late; and setting it for the whole
session would change every later triton import, in tests that are not ours. A worker
spawned with the variable in its environment imports triton fresh, interpreted; this
process and every other test stay as they were. Tests send it a case (plain data), get
numbers back, and assert here.

A ``ProcessPoolExecutor`` rather than a ``multiprocessing.Pool``: a worker that dies is
reported (BrokenProcessPool) instead of being silently replaced by one started without
the variable.

The worker starts as soon as collection ends when a selected test needs it, and imports
torch, fsc and triton (about 5 s) on the second core while the first runs the tests that
come before the kernel tests.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from unittest import mock

import pytest

_WORKER = pytest.StashKey[tuple[ProcessPoolExecutor, Future]]()


def _start_worker() -> tuple[ProcessPoolExecutor, Future]:
    """The worker, spawned now with TRITON_INTERPRET=1, and its answer to whether it has the
    variable. A spawn-context executor starts its worker inside the first submit, which is
    when the environment is copied; the variable is restored right after."""
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
        answer = pool.submit(os.getenv, "TRITON_INTERPRET")
    pool.submit(__import__, "_attention_cases")  # torch, fsc, triton: imported ahead of the first case
    return pool, answer


def pytest_collection_finish(session: pytest.Session) -> None:
    if any("interpreter" in getattr(item, "fixturenames", ()) for item in session.items):
        session.config.stash[_WORKER] = _start_worker()


def pytest_sessionfinish(session: pytest.Session) -> None:
    # a session that ends before any kernel test ran (-x, a failed collection) still has it
    if _WORKER in session.config.stash:
        session.config.stash[_WORKER][0].shutdown(cancel_futures=True)


@pytest.fixture(scope="session")
def interpreter(pytestconfig: pytest.Config) -> Iterator[ProcessPoolExecutor]:
    if _WORKER not in pytestconfig.stash:
        pytestconfig.stash[_WORKER] = _start_worker()
    pool, answer = pytestconfig.stash[_WORKER]
    try:
        assert answer.result(timeout=120) == "1"
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)
        del pytestconfig.stash[_WORKER]
