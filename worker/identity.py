"""Who is doing the work: an id unique to each worker process."""

from __future__ import annotations

import os
import socket


def worker_id() -> str:
    """`host:pid` of the calling process (call it after fork, never cache it across one)."""
    return f"{socket.gethostname()}:{os.getpid()}"
