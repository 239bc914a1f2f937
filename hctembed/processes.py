"""Whether a process of this host is still running: how a heartbeat or a temporary folder named by a process id is
told from one a killed process left behind."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """True when process ``pid`` exists here (also when it belongs to another user), False when it is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
