"""Run pytest and watch what it costs: wall time and the peak memory of pytest and every process it starts.

scripts/test.sh runs the suite through this. It starts ``python -m pytest ARGS`` and samples, every
--interval seconds, the resident memory (RSS, from /proc) summed over pytest and all its descendants at that
moment: tritonserver, its Python-backend stubs, frontends, serve.sh and whatever they start. It is a child
subreaper (prctl PR_SET_CHILD_SUBREAPER), so a process whose parent dies is re-parented to it and still counted.
When pytest exits it prints one line after pytest's own summary::

    suite: wall 12m31s, peak RSS 6.9 GB (process tree)

Its exit status is pytest's. When pytest passed and ran the whole suite (not a subset chosen by paths, -k, -m,
--lf, ...; the conftest reports that through $MINICPMV_SUITE_SCOPE_FILE), a peak above the limit
(MINICPMV_TEST_MAX_RSS_GB, default 8) fails the run with status 1. Processes still running after pytest
exited (orphans: servers a test started and did not stop) are listed and killed; after a whole-suite run that
passed, they fail it too. If this process is killed, pytest gets SIGKILL (PR_SET_PDEATHSIG) and its servers follow
it the same way (``minicpmv_triton.launcher.parent_death_signal``). Linux only. Besides that, the standard library
only.

Usage: run_tests.py [pytest arguments...]
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minicpmv_triton.launcher import parent_death_signal

INTERVAL_S = float(os.environ.get("MINICPMV_TEST_RSS_INTERVAL_S", "0.5"))
DEFAULT_MAX_RSS_GB = 8.0
PR_SET_CHILD_SUBREAPER = 36
PAGE = os.sysconf("SC_PAGE_SIZE")


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, resident bytes, state letter) of every process we can read."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()  # the name in parentheses may hold spaces
        except (OSError, IndexError):
            continue
        # fields[0] is the state (field 3 of stat), fields[1] the ppid, fields[21] the rss in pages (field 24)
        table[int(entry.name)] = (int(fields[1]), int(fields[21]) * PAGE, fields[0].decode())
    return table


def descendants(root: int, table: dict[int, tuple[int, int, str]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_rss(table: dict[int, tuple[int, int, str]]) -> int:
    """RSS summed over this process's descendants (pytest, its children, and orphans re-parented here)."""
    return sum(table[pid][1] for pid in descendants(os.getpid(), table))


def command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:200]


def reap() -> dict[int, int]:
    """Collect every exited child (pytest and re-parented orphans); pid -> wait status."""
    done = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done[pid] = status


def kill_leftovers(deadline_s: float = 10.0) -> list[str]:
    """SIGKILL whatever still runs below this process (orphans of the run); returns their descriptions."""
    table = process_table()
    left = [pid for pid in descendants(os.getpid(), table) if table[pid][2] != "Z"]
    described = [f"{pid} {command_line(pid)}" for pid in left]
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + deadline_s
    while left and time.monotonic() < deadline:
        reap()
        table = process_table()
        left = [pid for pid in left if pid in table and table[pid][2] != "Z"]
        time.sleep(0.05)
    reap()
    return described


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def max_rss_bytes() -> float:
    raw = os.environ.get("MINICPMV_TEST_MAX_RSS_GB", "")
    try:
        return float(raw or DEFAULT_MAX_RSS_GB) * 1e9
    except ValueError:
        sys.exit(f"run_tests.py: MINICPMV_TEST_MAX_RSS_GB must be a number of GB, not {raw!r}")


def main(argv: list[str]) -> int:
    limit = max_rss_bytes()
    with contextlib.suppress(OSError):
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    fd, scope_file = tempfile.mkstemp(prefix="minicpmv-suite-scope-", suffix=".json")
    os.close(fd)
    env = {**os.environ, "MINICPMV_SUITE_SCOPE_FILE": scope_file}
    started = time.monotonic()
    pytest = subprocess.Popen([sys.executable, "-m", "pytest", *argv], env=env, preexec_fn=parent_death_signal())

    # Ctrl-C reaches pytest through the terminal's process group; SIGTERM/SIGHUP sent to this process alone are
    # passed on, and this process keeps sampling until pytest is done.
    def forward(signum, _frame) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pytest.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    peak = 0
    status: int | None = None
    while status is None:
        peak = max(peak, tree_rss(process_table()))
        status = reap().get(pytest.pid)
        if status is None:
            time.sleep(INTERVAL_S)
    pytest.returncode = code = os.waitstatus_to_exitcode(status)
    if code < 0:  # killed by a signal: report it the way a shell does
        code = 128 - code
    wall = time.monotonic() - started

    orphans = kill_leftovers()
    try:
        scope = json.loads(Path(scope_file).read_text() or "{}")
    except (OSError, ValueError):
        scope = {}
    finally:
        with contextlib.suppress(OSError):
            os.unlink(scope_file)
    whole = bool(scope.get("whole_suite"))

    verdict = ""
    if whole:
        verdict = f", limit {limit / 1e9:g} GB"
        if peak > limit:
            verdict += " EXCEEDED"
    else:
        verdict = " (a subset: limit not checked)" if scope else " (limit not checked)"
    print(f"suite: wall {duration(wall)}, peak RSS {peak / 1e9:.1f} GB (process tree){verdict}", flush=True)
    if orphans:
        print(f"suite: {len(orphans)} process(es) outlived pytest (killed now):", flush=True)
        for line in orphans:
            print(f"  {line}", flush=True)
    if code == 0 and whole and (peak > limit or orphans):
        return 1
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
