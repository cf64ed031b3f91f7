"""Kill points for the crash tests: with PERSONA_KILL_AT=<table> a run SIGKILLs itself at the
worst moment for that table, inside its transaction with every write done but the commit not
yet made (`snapshot`: the new snapshot written, not yet renamed into place). Unset, a no-op."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable

KILL_ENV = "PERSONA_KILL_AT"


def kill_point(tables: Iterable[str]) -> None:
    target = os.environ.get(KILL_ENV)
    if target and target in set(tables):
        os.kill(os.getpid(), signal.SIGKILL)
