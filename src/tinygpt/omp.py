"""How idle OpenMP threads wait, chosen per command before torch starts OpenMP.

Spinning waits (ACTIVE) answer fastest when every core is ours: batch-1 decoding, one small
operation after another, gains the most. On a machine where other processes are busy they
are ruinous: a thread spins on a core another process needs, its sibling is descheduled,
and every parallel operation waits a time slice. So: the user's OMP_WAIT_POLICY wins;
commands that run for hours, serve others or wait for a person (train, sweep, serve, chat) sleep
(PASSIVE), since the machine's load will change under them; short commands (sample, eval,
bench) spin when the machine is quiet now.
BENCHMARKS.md ("OpenMP wait policy") has the measurements. This module imports no torch.
"""

from __future__ import annotations

import os
import sys

LONG_RUNNING = ("train", "sweep", "serve", "chat")  # chat waits at its prompt: spinning threads would hold the cores
QUIET_LOAD = 0.5  # below this 1-minute load average, no other process competes for a core


def choose(command: str) -> tuple[str, str]:
    """The wait policy for `command` and why."""
    if os.environ.get("OMP_WAIT_POLICY"):
        return os.environ["OMP_WAIT_POLICY"].upper(), "set in the environment"
    if command in LONG_RUNNING:
        return "PASSIVE", f"`{command}` runs long, and the machine's load will change under it"
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform: assume company
        return "PASSIVE", "the machine's load is unknown"
    if load < QUIET_LOAD:
        return "ACTIVE", f"the machine is quiet (1-minute load average {load:.2f})"
    return "PASSIVE", f"other processes are busy (1-minute load average {load:.2f})"


def set_for(command: str) -> str:
    """Set OMP_WAIT_POLICY for this process and return one line saying what and why."""
    policy, reason = choose(command)
    os.environ["OMP_WAIT_POLICY"] = policy
    late = " (torch was already loaded: OpenMP keeps the policy it started with)" if "torch" in sys.modules else ""
    return f"OMP_WAIT_POLICY={policy}: {reason}; set OMP_WAIT_POLICY to choose{late}"
