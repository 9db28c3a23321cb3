"""Which worker holds which job: a stable worker id per host slot, and the heartbeat that renews the lease.

A job is `running` under one worker id until its lease (`lease_until` in the store) runs out; then any worker
may claim it (gateway/store/jobs.py).  The worker id is `<host>-<n>`, the first slot n whose lock file this
process can flock, so a worker restarted on the same host gets its predecessor's id back and reclaims that
job at once instead of waiting out the lease.  The heartbeat thread is also how a cancel reaches training:
when the job is no longer `running` under this worker, it sets the run's stop flag, which the trainer polls.
"""

from __future__ import annotations

import fcntl
import io
import socket
import time
from pathlib import Path

import structlog

from contracts.private_files import ensure_private_dir
from finetune.job_training import JobRun
from gateway.store import Store

__all__ = ["keep_lease", "take_slot"]

log = structlog.get_logger(__name__)

_SLOTS = 64


def take_slot(data_dir: Path) -> tuple[str, io.TextIOWrapper]:
    """`<host>-<n>` for the first free slot n on this host, and the open lock file that holds it: keep it open
    for the process's life.  The id is stable across restarts, so a restarted worker reclaims its dead
    predecessor's job at once."""
    host = socket.gethostname()
    directory = ensure_private_dir(data_dir / "workers")
    for slot in range(_SLOTS):
        fh = open(directory / f"{host}-{slot}.lock", "w")  # noqa: SIM115 - held until exit
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            continue
        return f"{host}-{slot}", fh
    raise RuntimeError(f"more than {_SLOTS} workers on this host share the data dir")


def keep_lease(store: Store, run: JobRun, worker_id: str, *, lease_seconds: float, every: float) -> None:
    """Renew the lease every `every` seconds until run.stop is set (a heartbeat thread's body).

    A job no longer `running` under `worker_id` sets run.stop, with stop_reason "cancelled" when the user
    cancelled it and "lost" when another worker took it over (our heartbeats stalled past the lease)."""
    while not run.stop.wait(every):
        try:
            ours = store.jobs.heartbeat(
                run.job.id,
                worker_id,
                lease_until=time.time() + lease_seconds,
                estimated_finish=run.estimated_finish,
            )
        except Exception as exc:  # a busy database: the lease has slack; try again next beat
            log.warning("worker.heartbeat_failed", job_id=run.job.id, error_type=type(exc).__name__)
            continue
        if not ours:
            current = store.jobs.get(run.job.id)
            run.stop_reason = "cancelled" if current is not None and current.status == "cancelled" else "lost"
            run.stop.set()
            return
