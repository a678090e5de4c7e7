"""The watchdog of scripts/serve.sh: what serve.sh started never outlives it, even when it is killed with SIGKILL.

serve.sh starts it in a process group of its own with serve.sh's pid. While serve.sh runs, the watchdog notes
every POLL_S seconds the process groups of serve.sh's descendants (the Triton launcher, tritonserver in the session
the launcher gives it, the frontend), except serve.sh's own group and its own. Once serve.sh is gone, however it
ended, it stops those groups: SIGTERM at once (the launcher lets tritonserver drain, uvicorn closes), SIGTERM again
after --second-term seconds (the launcher then kills tritonserver, uvicorn stops waiting for connections),
SIGKILL after --kill seconds; it exits when none of them is left. After a normal exit of serve.sh nothing is left
and it exits at once. Linux only: it reads /proc. Standard library only.

Usage: serve_watchdog.py SERVE_PID [--second-term 20] [--kill 27] [--verbose]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

POLL_S = 0.25


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state letter) of every process."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        except (OSError, IndexError):
            continue
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def descendant_groups(root: int, table: dict[int, tuple[int, int, str]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    groups, todo = set(), list(children.get(root, []))
    while todo:
        pid = todo.pop()
        groups.add(table[pid][1])
        todo.extend(children.get(pid, []))
    return groups


def live_groups(groups: set[int], table: dict[int, tuple[int, int, str]]) -> set[int]:
    """Those of ``groups`` that still have a running (not zombie) member."""
    return {pgid for _, pgid, state in table.values() if pgid in groups and state != "Z"}


def signal_groups(groups: set[int], sig: signal.Signals) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pid", type=int, help="serve.sh's pid (this process's parent)")
    parser.add_argument("--second-term", type=float, default=20.0, help="seconds to the second SIGTERM")
    parser.add_argument("--kill", type=float, default=27.0, help="seconds to SIGKILL")
    parser.add_argument("--verbose", action="store_true", help="print the groups it watches when they change")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is serve.sh's to handle; this one cleans up after it
    if os.getppid() != args.pid:
        return 0  # serve.sh is already gone, or this was started by something else
    try:
        excluded = {os.getpgrp(), os.getpgid(args.pid), 0, 1}  # serve.sh's group may be its caller's: never touched
    except ProcessLookupError:
        return 0  # serve.sh ended before it started anything
    known: set[int] = set()
    while os.getppid() == args.pid:  # once serve.sh is gone, this process is someone else's child
        table = process_table()
        before, known = known, live_groups(known, table) | (descendant_groups(args.pid, table) - excluded)
        if args.verbose and known != before:
            print(f"serve_watchdog: watching process groups {sorted(known)}", file=sys.stderr, flush=True)
        time.sleep(POLL_S)
    started = time.monotonic()
    left = live_groups(known, process_table())
    signal_groups(left, signal.SIGTERM)
    second_term_sent = killed = False
    while left:
        elapsed = time.monotonic() - started
        if elapsed >= args.kill and not killed:
            signal_groups(left, signal.SIGKILL)
            killed = True
        elif elapsed >= args.second_term and not second_term_sent:
            signal_groups(left, signal.SIGTERM)
            second_term_sent = True
        if killed and elapsed >= args.kill + 5:
            break  # unkillable (stuck in the kernel): nothing more to do
        time.sleep(0.1)
        left = live_groups(left, process_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
