"""Who is doing the work: an id unique to each worker process."""

from __future__ import annotations

import os
import socket


def worker_id(pid: int | None = None) -> str:
    """`host:pid` of the calling process (call it after fork, never cache it across one), or of
    process `pid` on this host (a worker's parent naming a pool process of its own)."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"
