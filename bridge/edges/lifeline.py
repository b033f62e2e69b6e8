"""A child process of provbridge dies with its parent, however the parent ends.

`serve` starts child processes (the claim worker, the `--processes` bridges). Killed with SIGKILL, it
cannot stop them, and a child busy in a long step (a regex, an SQLite call) holds its GIL, so no
thread inside it can notice the parent is gone: it would run on, orphaned, sharing the database with
the next `serve`. Only the kernel can end it: `prctl(PR_SET_PDEATHSIG, SIGKILL)` has it send SIGKILL
to the child when the parent dies, even to a child that is stopped or in a session of its own.

The trap: the signal fires when the *thread* that started the child ends, not the process. Each
parent therefore starts its children from a thread that lives as long as it does (see the callers).

The child calls `die_with_parent` first thing. A parent that died before the call would never send the
signal, so the call then checks that the parent is still the one that started it.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ORPHANED_EXIT_STATUS = 1  # nobody reads it: the parent that would is gone


def die_with_parent(parent_pid: int) -> bool:
    """Have the kernel SIGKILL this process when its parent ends; exit now if it already has.

    `parent_pid` is the pid of the process that started this one, passed in by it. Returns whether the
    parent-death signal is armed: only Linux has one. Elsewhere this is a no-op (beyond the check),
    and the callers fall back on what their own code can see: the claim worker ends at the end of its
    socket, a `--processes` bridge watches its parent from a thread.
    """
    armed = False
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
        prctl.restype = ctypes.c_int
        # prctl(2) is variadic and reads its arguments as unsigned longs: pass them at that width.
        status = prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL), *[ctypes.c_ulong(0)] * 3)
        if status != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
        armed = True
    if os.getppid() != parent_pid:  # the parent died before the signal was armed: re-parented already
        os._exit(ORPHANED_EXIT_STATUS)
    return armed
