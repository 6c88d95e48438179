"""Linux futexes on shared memory, through ``syscall(2)`` via ctypes.

A futex word in a shared mapping is keyed by (inode, offset), so a thread in one process
can sleep on a word that a thread in another process changes and wakes. ctypes releases
the GIL around foreign calls, so a sleeping copy thread does not block the caller's
Python. We use the process-shared forms (no ``FUTEX_PRIVATE_FLAG``).
"""

from __future__ import annotations

import ctypes
import functools
import platform

# Syscall numbers from the kernel's unistd tables (asm/unistd_64.h; asm-generic for arm64).
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_INT_MAX = 2**31 - 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def supported() -> bool:
    """Whether this machine has a futex syscall number we know."""
    return platform.system() == "Linux" and platform.machine() in _SYS_FUTEX


@functools.cache
def _syscall() -> tuple[ctypes._CFuncPtr, int]:
    if not supported():
        raise OSError(f"futexes need Linux on {sorted(_SYS_FUTEX)}; this is {platform.system()} {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.syscall
    fn.restype = ctypes.c_long
    return fn, _SYS_FUTEX[platform.machine()]


def wait(address: int, expected: int, timeout_s: float) -> None:
    """Sleep while the 32-bit word at ``address`` equals ``expected``, at most ``timeout_s``.

    Returns on a wake, a timeout, a signal, or at once when the word already differs
    (EAGAIN); callers re-check their condition in every case.
    """
    fn, nr = _syscall()
    timeout_s = max(timeout_s, 0.0)
    ts = _Timespec(int(timeout_s), int((timeout_s - int(timeout_s)) * 1e9))
    fn(ctypes.c_long(nr), ctypes.c_void_p(address), ctypes.c_int(_FUTEX_WAIT), ctypes.c_int(expected),
       ctypes.byref(ts), None, ctypes.c_int(0))


def wake(address: int) -> None:
    """Wake every thread sleeping on the word at ``address``."""
    fn, nr = _syscall()
    fn(ctypes.c_long(nr), ctypes.c_void_p(address), ctypes.c_int(_FUTEX_WAKE), ctypes.c_int(_INT_MAX),
       None, None, ctypes.c_int(0))
