"""The SQLite store: schema, migrations, tenancy in lookups, pagination, the job queue's claim and lease."""

from __future__ import annotations

import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.store import CheckpointRecord, FileRecord, JobRecord, ModelRecord, Store, StoreError, new_id
from gateway.store.db import DB_FILENAME, MIGRATIONS


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path)
    yield s
    s.close()


def _file(tenant: str = "acme", **kw: object) -> FileRecord:
    file_id = new_id("file-")
    values: dict[str, object] = dict(
        id=file_id,
        tenant=tenant,
        filename="train.jsonl",
        purpose="fine-tune",
        bytes=10,
        created_at=1,
        path=f"files/{file_id}",
        rows=3,
        format="alpaca",
    )
    values.update(kw)
    return FileRecord(**values)  # type: ignore[arg-type]


def _job(tenant: str = "acme", status: str = "queued", **kw: object) -> JobRecord:
    values: dict[str, object] = dict(
        id=new_id("ftjob-"),
        tenant=tenant,
        subject="alice",
        model="base",
        training_file="file-x",
        seed=1,
        hyperparameters={"n_epochs": 1},
        status=status,
        created_at=int(time.time()),
    )
    values.update(kw)
    return JobRecord(**values)  # type: ignore[arg-type]


# -- schema --------------------------------------------------------------------------------------------------


def test_database_is_private_wal_and_migrated_once(tmp_path: Path) -> None:
    first = Store.open(tmp_path)
    first.files.add(_file())
    second = Store.open(tmp_path)  # a second process opening the same data dir: no re-migration, data kept
    assert len(second.files.list_page(None).items) == 1
    path = tmp_path / DB_FILENAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert second.db.query("PRAGMA journal_mode")[0][0] == "wal"
    assert second.db.query("PRAGMA user_version")[0][0] == len(MIGRATIONS)
    first.close()
    second.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this program"):
        Store.open(tmp_path)


def test_a_failed_transaction_leaves_nothing(store: Store) -> None:
    job = _job()
    with pytest.raises(RuntimeError), store.db.transaction():
        store.jobs.add(job)
        store.events.add(job.id, "Created")
        raise RuntimeError("boom")
    assert store.jobs.get(job.id) is None
    assert store.events.list_page(job.id).items == []


# -- files ---------------------------------------------------------------------------------------------------


def test_files_are_scoped_to_their_tenant(store: Store) -> None:
    mine, theirs = store.files.add(_file("acme")), store.files.add(_file("globex"))
    assert store.files.get(mine.id, "acme") == mine
    assert store.files.get(theirs.id, "acme") is None
    assert store.files.get(theirs.id, None) == theirs  # admins and workers
    assert [f.id for f in store.files.list_page("acme").items] == [mine.id]
    assert {f.id for f in store.files.list_page(None).items} == {mine.id, theirs.id}
    assert store.files.delete(mine.id) and not store.files.delete(mine.id)
    assert store.files.get(mine.id, "acme") is None


def test_pagination_follows_the_cursor_in_both_orders(store: Store) -> None:
    ids = [store.files.add(_file()).id for _ in range(5)]
    first = store.files.list_page("acme", limit=2)
    assert [f.id for f in first.items] == ids[::-1][:2] and first.has_more
    rest = store.files.list_page("acme", after=first.items[-1].id, limit=10)
    assert [f.id for f in rest.items] == ids[::-1][2:] and not rest.has_more
    oldest = store.files.list_page("acme", limit=3, newest_first=False)
    assert [f.id for f in oldest.items] == ids[:3] and oldest.has_more
    assert store.files.list_page("acme", purpose="fine-tune-results").items == []
    # a cursor the caller cannot see (another tenant's, or unknown) ends the listing instead of restarting it
    other = store.files.add(_file("globex"))
    assert store.files.list_page("acme", after=other.id).items == []


# -- jobs ----------------------------------------------------------------------------------------------------


def test_job_round_trips_json_columns(store: Store) -> None:
    job = _job(metadata={"team": "risk"}, hyperparameters={"n_epochs": 2, "target_modules": ["q_proj"]})
    store.jobs.add(job)
    assert store.jobs.get(job.id) == job
    assert store.jobs.get(job.id, "globex") is None
    assert store.jobs.update(
        job.id, status_in=("queued",), error={"code": "x", "message": "m", "param": None}
    )
    assert store.jobs.get(job.id).error == {"code": "x", "message": "m", "param": None}  # type: ignore[union-attr]


def test_jobs_list_newest_first_with_metadata_filter(store: Store) -> None:
    a = store.jobs.add(_job(metadata={"team": "risk"}))
    b = store.jobs.add(_job(metadata={"team": "ops"}))
    c = store.jobs.add(_job())
    assert [j.id for j in store.jobs.list_page("acme").items] == [c.id, b.id, a.id]
    assert [j.id for j in store.jobs.list_page("acme", metadata={"team": "risk"}).items] == [a.id]
    page = store.jobs.list_page("acme", limit=1, after=c.id)
    assert [j.id for j in page.items] == [b.id] and page.has_more


def test_conditional_update_has_one_winner(store: Store) -> None:
    job = store.jobs.add(_job(status="running", worker_id=None))
    assert store.jobs.update(job.id, status_in=("queued", "running"), status="cancelled")
    assert not store.jobs.update(job.id, status_in=("running",), status="succeeded")
    assert store.jobs.get(job.id).status == "cancelled"  # type: ignore[union-attr]


def test_claim_takes_the_oldest_queued_job_once(store: Store) -> None:
    first, second = store.jobs.add(_job()), store.jobs.add(_job())
    store.jobs.add(_job(status="validating_files"))
    claimed = store.jobs.claim("w1", now=time.time(), lease_seconds=30)
    assert claimed is not None and claimed.id == first.id
    assert claimed.status == "running" and claimed.worker_id == "w1" and claimed.attempts == 1
    assert claimed.started_at is not None and claimed.lease_until is not None
    assert store.jobs.claim("w2", now=time.time(), lease_seconds=30).id == second.id  # type: ignore[union-attr]
    assert (
        store.jobs.claim("w3", now=time.time(), lease_seconds=30) is None
    )  # validating jobs are not runnable


def test_concurrent_claims_from_separate_connections_never_share_a_job(tmp_path: Path) -> None:
    setup = Store.open(tmp_path)
    ids = {setup.jobs.add(_job()).id for _ in range(20)}
    claimed: dict[str, list[str]] = {}
    barrier = threading.Barrier(4)

    def worker(name: str) -> None:
        own = Store.open(tmp_path)  # its own connection, as a separate process would have
        barrier.wait()
        got: list[str] = []
        # a fresh id per claim: a worker reclaims jobs running under its own id (its dead predecessor's)
        while (job := own.jobs.claim(f"{name}-{len(got)}", now=time.time(), lease_seconds=30)) is not None:
            got.append(job.id)
        claimed[name] = got
        own.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [j for got in claimed.values() for j in got]
    assert sorted(everything) == sorted(ids)  # every job claimed, none twice
    setup.close()


def test_an_expired_lease_lets_another_worker_take_over(store: Store) -> None:
    job = store.jobs.add(_job())
    now = time.time()
    assert store.jobs.claim("w1", now=now, lease_seconds=10) is not None
    assert store.jobs.claim("w2", now=now + 5, lease_seconds=10) is None  # w1's lease still runs
    assert store.jobs.heartbeat(job.id, "w1", lease_until=now + 20)
    assert store.jobs.claim("w2", now=now + 15, lease_seconds=10) is None  # renewed
    taken = store.jobs.claim("w2", now=now + 25, lease_seconds=10)
    assert taken is not None and taken.worker_id == "w2" and taken.attempts == 2
    assert not store.jobs.heartbeat(job.id, "w1", lease_until=now + 40)  # the old worker learns it lost it


def test_a_restarted_worker_reclaims_its_predecessors_job_at_once(store: Store) -> None:
    job = store.jobs.add(_job())
    now = time.time()
    store.jobs.claim("host-0", now=now, lease_seconds=60)
    again = store.jobs.claim("host-0", now=now + 1, lease_seconds=60)
    assert again is not None and again.id == job.id and again.attempts == 2


def test_heartbeat_fails_once_the_job_is_cancelled(store: Store) -> None:
    job = store.jobs.add(_job())
    store.jobs.claim("w1", now=time.time(), lease_seconds=30)
    assert store.jobs.heartbeat(job.id, "w1", lease_until=time.time() + 30)
    store.jobs.update(job.id, status_in=("running",), status="cancelled")
    assert not store.jobs.heartbeat(job.id, "w1", lease_until=time.time() + 30)


def test_release_requeues_without_counting_an_attempt(store: Store) -> None:
    job = store.jobs.add(_job())
    store.jobs.claim("w1", now=time.time(), lease_seconds=30)
    assert not store.jobs.release(job.id, "w2")  # only the owner may hand it back
    assert store.jobs.release(job.id, "w1")
    back = store.jobs.get(job.id)
    assert back is not None and back.status == "queued" and back.worker_id is None and back.attempts == 0


# -- events, checkpoints, models -----------------------------------------------------------------------------


def test_events_are_listed_newest_first(store: Store) -> None:
    job = store.jobs.add(_job())
    events = [store.events.add(job.id, f"event {i}", data={"i": i}) for i in range(5)]
    page = store.events.list_page(job.id, limit=3)
    assert [e.message for e in page.items] == ["event 4", "event 3", "event 2"] and page.has_more
    older = store.events.list_page(job.id, after=page.items[-1].id, limit=3)
    assert [e.message for e in older.items] == ["event 1", "event 0"] and not older.has_more
    assert older.items[-1].data == {"i": 0} and older.items[-1].id == events[0].id


def test_checkpoints_and_models_ignore_a_repeated_step(store: Store) -> None:
    job = store.jobs.add(_job())
    ckpt = CheckpointRecord(
        id=new_id("ftckpt-"),
        job_id=job.id,
        step=5,
        created_at=1,
        metrics={"step": 5},
        model="ft:base:acme::x:ckpt-step-5",
    )
    assert store.checkpoints.add(ckpt)
    assert not store.checkpoints.add(CheckpointRecord(**{**ckpt.__dict__, "id": new_id("ftckpt-")}))
    assert [c.step for c in store.checkpoints.list_page(job.id).items] == [5]
    model = ModelRecord(
        id="ft:base:acme::x", tenant="acme", base="base", job_id=job.id, path="adapters/x/final", created_at=1
    )
    assert store.models.add(model) and not store.models.add(model)
    added = store.models.since(0)
    assert [m.id for m in added] == [model.id] and store.models.since(added[-1].seq) == []
    assert [m.id for m in store.models.delete(model.id)] == [model.id] and store.models.get(model.id) is None
