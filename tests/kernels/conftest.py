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
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from unittest import mock

import pytest


@pytest.fixture(scope="session")
def interpreter() -> Iterator[ProcessPoolExecutor]:
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    # The executor starts its worker on the first submit: do that while the variable is set
    # (the worker inherits the environment when it is spawned); it is restored right after.
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
        assert pool.submit(os.getenv, "TRITON_INTERPRET").result(timeout=120) == "1"
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)
