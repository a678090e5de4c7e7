"""Servers the tests start die with the test run, even when pytest is killed with SIGKILL.

The mechanism is ``minicpmv_triton.launcher.parent_death_signal`` (Linux ``PR_SET_PDEATHSIG``): the child gets a
signal when the process that started it dies. ``TritonServer(..., die_with_parent=True)`` uses it for tritonserver,
plus a watchdog for its Python-backend stubs (they outlive a killed server); for anything else a test starts:

- ``subprocess.Popen(..., preexec_fn=dies_with_us())``: a child of this process;
- ``[sys.executable, __file__, *command]`` (:func:`dying_with_parent`): a command started by another process this
  test started (a background job of a shell), which then dies with that process; run as a script, this file sets the
  signal and execs the command.

"Parent" is the thread that started the child: start long-lived children from pytest's main thread (fixtures do).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__":  # run as a script: minicpmv_triton from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minicpmv_triton.launcher import die_with_parent, parent_death_signal  # noqa: E402


def dies_with_us(sig: int = signal.SIGKILL, then: Callable[[], None] | None = None) -> Callable[[], None] | None:
    """A ``preexec_fn``: the child gets ``sig`` (SIGKILL by default) when this process dies; ``then`` runs after."""
    preexec = parent_death_signal(sig)
    if then is None or preexec is None:
        return preexec or then

    def both() -> None:
        preexec()
        then()

    return both


def dying_with_parent(command: list[str], sig: int = signal.SIGKILL, default_sigint: bool = False) -> list[str]:
    """``command`` as it runs when its parent (whatever starts it) should take it along when it dies; with
    ``default_sigint`` SIGINT at its default too (as in a terminal, even when this run inherited it ignored).
    Unlike a ``preexec_fn`` this runs no Python between fork and exec in the process that starts it (a
    ``preexec_fn`` is not safe in a process with threads: a child once hung there, on a lock another thread
    held at the fork)."""
    flags = [f"--signal={int(sig)}"] + (["--default-sigint"] if default_sigint else [])
    return [sys.executable, str(Path(__file__).resolve()), *flags, *command]


def _exec(argv: list[str]) -> None:
    sig, restore = signal.SIGKILL, [signal.SIGPIPE, signal.SIGXFSZ]
    while argv and argv[0].startswith("--"):
        flag = argv.pop(0)
        if flag.startswith("--signal="):
            sig = int(flag.split("=", 1)[1])
        elif flag == "--default-sigint":
            restore.append(signal.SIGINT)
    die_with_parent(sig)  # the parent is whatever started this script, and stays the command's after the exec
    # Python ignores SIGPIPE and SIGXFSZ at start-up; an ignored signal stays ignored across exec: give them back.
    for number in restore:
        signal.signal(number, signal.SIG_DFL)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    _exec(sys.argv[1:])
