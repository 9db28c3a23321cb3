"""The fine-tuning worker: `python -m finetune.worker [--config F]`.

One process, one job at a time, on the training device.  It shares the data dir (and so the SQLite store)
with the gateway, here or on another machine, and talks to it only through the store:

    claim     the oldest queued job, or a running one whose worker died (its lease ran out, or it had this
              worker's id: a restarted worker knows its predecessor is gone), in one BEGIN IMMEDIATE
    heartbeat every second a thread renews the lease; a job no longer `running` under this worker (the user
              cancelled it) sets the stop flag the trainer polls, so training stops within a step or two
    events    trainer events -> job events (one `metrics` event per logging step), checkpoints -> servable
              `...:ckpt-step-N` models, success -> the final adapter, a metrics CSV, `fine_tuned_model`
    resume    a job whose worker was killed restarts from the trainer's latest complete checkpoint in the
              job's work dir; after MAX_ATTEMPTS interruptions it fails with a message saying so
    shutdown  SIGTERM/SIGINT stop training at the next step and hand the job back to the queue, work dir kept
              with its sealed checkpoints only (no plaintext: see below); a second signal exits at once (the
              job resumes from its checkpoint once its lease runs out)

This module is the loop and how each job ends; the parts have modules of their own:
    finetune.lease         the worker id (a slot per host) and the heartbeat that keeps a job's lease
    finetune.job_training  one job through finetune.trainer: base model, plaintext data, config, events
    finetune.publish       checkpoints and the final adapter -> model rows; the results file

Every adapter reaches the store complete or not at all: files are written into a staging directory, which is
renamed into place, and only then is the model row added (the gateway loads nothing without a row).

At rest, with `privacy.encrypt_at_rest` on: the work dir (<data_dir>/work/<job>, 0700) holds the plaintext
training data only from its decryption until the trainer has read it (job_training removes it then), and
trainer checkpoints (adapter, optimizer state, metrics) only sealed by the data dir's cipher; resuming
decrypts them into memory.  A job handed back keeps only those sealed checkpoints; a job that ends loses its
work dir, whatever the outcome.  At start the worker sweeps what a crash can leave: plaintext data dirs,
work dirs of finished jobs, adapter staging dirs and checkpoint exports whose rows are gone.  Nothing here
logs training rows or file content.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from contracts.blobs import BlobStorage
from contracts.private_files import ensure_private_dir
from finetune.job_training import JobFailed, JobRun, JobTrainer, Stopped, add_event
from finetune.lease import keep_lease, take_slot
from finetune.publish import Publisher
from gateway.core.settings import Settings, load_settings
from gateway.security.encryption import Cipher
from gateway.security.master_key import cipher_from_settings
from gateway.store import JobRecord, Store

__all__ = ["MAX_ATTEMPTS", "Worker", "main"]

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 3


class Worker:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        cipher: Cipher | None = None,
        worker_id: str | None = None,
        lease_seconds: float = 30.0,
        heartbeat_seconds: float = 1.0,
        trainer: Any = None,
    ) -> None:
        """`trainer`: stands in for finetune.trainer (see JobTrainer); `worker_id`: None takes a host slot."""
        self.settings = settings
        self.data_dir = ensure_private_dir(settings.data_path)
        self.store = store or Store.open(self.data_dir)
        self.cipher = cipher or cipher_from_settings(settings)
        self.blobs = BlobStorage(self.cipher, self.data_dir)
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self._slot_lock: io.TextIOWrapper | None = None
        if worker_id is None:
            worker_id, self._slot_lock = take_slot(self.data_dir)
        self.worker_id = worker_id
        self.shutdown = threading.Event()
        self.publisher = Publisher(
            self.store,
            self.blobs,
            self.cipher,
            self.data_dir,
            self.worker_id,
            keep_checkpoints=settings.finetune.keep_checkpoints,
        )
        self.training = JobTrainer(
            settings, self.data_dir, self.store, self.blobs, self.publisher.checkpoint, trainer
        )

    # -- the loop ------------------------------------------------------------------------------------------

    def run_forever(self) -> None:
        log.info("worker.started", worker_id=self.worker_id)
        self._sweep_work_dirs()
        self._sweep_adapters()
        while not self.shutdown.is_set():
            if not self.run_once():
                self.shutdown.wait(self.settings.finetune.poll_seconds)
        log.info("worker.stopped", worker_id=self.worker_id)

    def run_once(self) -> bool:
        """Claim and run one job; False when the queue is empty."""
        job = self.store.jobs.claim(
            self.worker_id,
            now=time.time(),
            lease_seconds=self.lease_seconds,
            tenant_running=self.settings.quotas.running_jobs,
        )
        if job is None:
            return False
        self.run(job)
        return True

    def run(self, job: JobRecord) -> None:
        run = JobRun(job=job, work_dir=ensure_private_dir(self.data_dir / "work" / job.id))
        log.info("worker.job_claimed", job_id=job.id, attempt=job.attempts)
        beat = threading.Thread(
            target=keep_lease,
            args=(self.store, run, self.worker_id),
            kwargs={"lease_seconds": self.lease_seconds, "every": self.heartbeat_seconds},
            name="heartbeat",
            daemon=True,
        )
        beat.start()
        keep_work_dir = False
        try:
            if job.attempts > MAX_ATTEMPTS:
                raise JobFailed(
                    f"The fine-tuning worker stopped {job.attempts - 1} times while running this job "
                    "(killed, out of memory, or the machine restarted), so it was not retried again. "
                    "Check the worker's memory and logs, then create the job again.",
                    code="worker_interrupted",
                )
            if job.attempts > 1:
                add_event(
                    self.store,
                    job,
                    f"Resuming fine-tuning job (attempt {job.attempts}) from its latest checkpoint",
                )
            else:
                add_event(self.store, job, "Fine-tuning job started")
            result = self.training.train(run, lambda: self._should_stop(run))
            self.publisher.final(run, result)
        except JobFailed as exc:
            self._fail(run, exc)
        except Stopped:
            keep_work_dir = self._stopped(run)
        except Exception as exc:
            log.error("worker.job_error", job_id=job.id, error_type=type(exc).__name__)
            # a fixed message and the type only: an exception's text can quote training rows or paths
            self._fail(
                run,
                JobFailed(
                    f"Training failed with an internal error ({type(exc).__name__}). The operator can find "
                    "the job id in the worker's log; create the job again once it is fixed."
                ),
            )
        finally:
            run.stop.set()
            beat.join(timeout=5)
            if not keep_work_dir:
                shutil.rmtree(run.work_dir, ignore_errors=True)

    def _should_stop(self, run: JobRun) -> bool:
        return run.stop.is_set() or self.shutdown.is_set()

    # -- endings -------------------------------------------------------------------------------------------

    def _fail(self, run: JobRun, exc: JobFailed) -> None:
        error = {"code": exc.code, "message": exc.message, "param": exc.param}
        with self.store.db.transaction():
            if self.store.jobs.update(
                run.job.id,
                status_in=("running",),
                worker_id=self.worker_id,
                status="failed",
                error=error,
                finished_at=int(time.time()),
                estimated_finish=None,
            ):
                add_event(self.store, run.job, f"Fine-tuning job failed: {exc.message}", level="error")
        log.info("worker.job_failed", job_id=run.job.id, code=exc.code)

    def _stopped(self, run: JobRun) -> bool:
        """Training stopped early; True to keep the work dir (the job will resume)."""
        if run.stop_reason == "cancelled":
            add_event(self.store, run.job, "Training stopped; the job was cancelled")
            log.info("worker.job_cancelled", job_id=run.job.id)
            return False
        if run.stop_reason == "lost":  # another worker owns it now (our heartbeats stalled): hands off
            log.warning("worker.job_lost", job_id=run.job.id)
            return True
        # only the sealed checkpoints stay for the next attempt, never plaintext (gone before the release, so
        # no worker that claims the job next can be reading a copy we delete)
        _remove_plaintext(run.work_dir)
        if self.store.jobs.release(run.job.id, self.worker_id):
            add_event(
                self.store,
                run.job,
                "The fine-tuning worker stopped; the job is queued again and will resume from "
                "its latest checkpoint",
            )
        log.info("worker.job_released", job_id=run.job.id)
        return True

    def _sweep_work_dirs(self) -> None:
        """Remove work dirs of jobs that finished while no worker was there to clean up, and the plaintext a
        worker killed mid-job left in the others (a resumed job decrypts its data again)."""
        root = self.data_dir / "work"
        if not root.is_dir():
            return
        for path in root.iterdir():
            job = self.store.jobs.get(path.name)
            if job is None or job.finished:
                shutil.rmtree(path, ignore_errors=True)
            elif not (job.status == "running" and job.worker_id != self.worker_id):  # not another's live job
                _remove_plaintext(path, older_than=time.time() - 60)  # nor one just claimed and decrypting

    def _sweep_adapters(self, min_age_seconds: float = 3600.0) -> None:
        """Remove what a crash left under <data_dir>/adapters: staging dirs and exports with no model row (the
        row goes first when a checkpoint is pruned or a model deleted).  Only ones untouched for an hour: a
        worker elsewhere on the data dir may be between its rename and its row."""
        root = self.data_dir / "adapters"
        if not root.is_dir():
            return
        known = {Path(path) for path in self.store.models.paths()}
        cutoff = time.time() - min_age_seconds
        for job_dir in root.iterdir():
            for path in job_dir.iterdir() if job_dir.is_dir() else ():
                relative = path.relative_to(self.data_dir)
                try:
                    stale = path.stat().st_mtime < cutoff
                except FileNotFoundError:
                    continue
                if stale and relative not in known:
                    shutil.rmtree(path, ignore_errors=True)
                    log.info("worker.swept_adapter", job_id=job_dir.name)
            with contextlib.suppress(OSError):
                if job_dir.stat().st_mtime < cutoff:  # not one a worker just made to export into
                    job_dir.rmdir()  # once empty


def _remove_plaintext(work_dir: Path, *, older_than: float | None = None) -> None:
    """A kept work dir: the decrypted training data goes (checkpoints are sealed by the trainer); with
    `older_than`, only if it was last written before then."""
    data = work_dir / "data"
    try:
        if older_than is not None and data.stat().st_mtime >= older_than:
            return
    except FileNotFoundError:
        return
    shutil.rmtree(data, ignore_errors=True)


def _stop_with_gateway_parent() -> None:
    """Started by `gateway serve`: get SIGTERM (hand the job back, exit) when that gateway dies, even by
    SIGKILL, instead of training on as an orphan.  A worker started otherwise (systemd, a shell) is left
    alone."""
    parent = os.getppid()
    try:
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:  # not Linux
        return
    if b"serve" not in argv or not any(part.endswith((b"gateway", b"gateway.cli")) for part in argv):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def main(argv: list[str] | None = None) -> int:
    from contracts.private_files import restrict_umask
    from gateway.core.logs import configure_logging
    from gateway.security.egress import install_from_settings

    # Before any thread exists, so every thread inherits the mask: SIGTERM/SIGINT stay pending until
    # _run_until_signalled takes them (see there); `_stop_with_gateway_parent`'s own SIGTERM included.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    _stop_with_gateway_parent()  # first: the gateway may die while this process starts up
    parser = argparse.ArgumentParser(prog="python -m finetune.worker", description="Run fine-tuning jobs.")
    parser.add_argument("--config", help="TOML settings file (or GATEWAY_CONFIG)")
    parser.add_argument("--once", action="store_true", help="run at most one job, then exit")
    args = parser.parse_args(argv)
    restrict_umask()
    settings = load_settings(args.config)
    configure_logging(settings.server.log_level)
    install_from_settings(settings)  # no egress from the process that reads training data either
    worker = Worker(settings)
    _run_until_signalled(worker.run_once if args.once else worker.run_forever, worker.shutdown)
    return 0


def _run_until_signalled(
    loop: Callable[[], object], shutdown: threading.Event, exit_now: Callable[[int], object] = os._exit
) -> None:
    """Run `loop` on a thread of its own while this (main) thread waits for stop signals.  The first sets
    `shutdown` (training stops at its next step and hands the job back); a second exits at once with
    128 + the signal, leaving the job to resume from its checkpoint when its lease runs out.

    Not a signal handler: one runs between two bytecodes of the interrupted main thread, and `Event.set()`
    there deadlocks forever when that thread was inside `Event.wait()` holding the event's lock (a worker
    hung on SIGTERM in CI that way).  `sigtimedwait` takes the signal as an ordinary call."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            loop()
        except BaseException as exc:  # re-raised on the main thread: the process must not exit 0
            failure.append(exc)

    thread = threading.Thread(target=run, name="worker-loop")
    thread.start()
    while thread.is_alive():
        received = signal.sigtimedwait(_STOP_SIGNALS, 0.5)  # the timeout only notices the loop's end
        if received is None:
            continue
        if shutdown.is_set():
            log.warning("worker.exit_now", signal=received.si_signo)
            exit_now(128 + received.si_signo)
            return
        log.info("worker.stopping", signal=received.si_signo)
        shutdown.set()
    thread.join()
    if failure:
        raise failure[0]


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
