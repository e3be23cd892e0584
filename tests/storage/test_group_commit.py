"""Group commit (`storage.group_commit`): concurrent writes in one transaction, on SQLite and
PostgreSQL, with the real samples and jobs tables."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from storage.engine import session_factory, upgrade
from storage.group_commit import GroupCommit
from storage.models import Job, Sample
from storage.repositories import NewSample, store_samples


def _new(i: int) -> NewSample:
    return NewSample(
        sample={
            "model": "reference",
            "image_sha256": f"{i:064x}",
            "image_size": (96, 96),
            "generated_text": "fork knife .",
            "token_ids": None,
            "request_id": f"r-{i}",
        },
        max_attempts=5,
        image_data=b"png",
        prompt="USER: <image> Describe the image. ASSISTANT:",
    )


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _counts(engine: Engine) -> tuple[int, int]:
    with session_factory(engine)() as session:
        samples = session.scalar(select(func.count()).select_from(Sample))
        jobs = session.scalar(select(func.count()).select_from(Job))
    return int(samples or 0), int(jobs or 0)


def test_concurrent_samples_are_committed_together_each_caller_gets_its_own(
    engine: Engine,
) -> None:
    upgrade(engine)
    started, release = threading.Event(), threading.Event()

    def write(session: Session, items: Sequence[NewSample]) -> list[str]:
        if not started.is_set():  # the first transaction holds the writer until 7 more wait
            started.set()
            assert release.wait(30)
        return store_samples(session, items)

    committer: GroupCommit[NewSample, str] = GroupCommit(session_factory(engine), write)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(committer.submit, _new(0))
        assert started.wait(30)
        rest = [pool.submit(committer.submit, _new(i)) for i in range(1, 8)]
        _wait_for(lambda: committer.pending == 7)
        assert _counts(engine) == (0, 0)  # nothing answered before it is durable
        assert not first.done()
        release.set()
        ids = [first.result(30)] + [f.result(30) for f in rest]
    assert committer.batches == 2 and committer.items == 8  # 1, then the 7 that waited
    assert len(set(ids)) == 8
    with session_factory(engine)() as session:
        for i, sample_id in enumerate(ids):
            sample = session.get(Sample, sample_id)
            assert sample is not None and sample.request_id == f"r-{i}"
            job = session.scalars(select(Job).where(Job.sample_id == sample_id)).one()
            assert job.image_data == b"png" and job.max_attempts == 5


def test_a_batch_is_at_most_max_batch(engine: Engine) -> None:
    upgrade(engine)
    started, release = threading.Event(), threading.Event()
    sizes: list[int] = []

    def write(session: Session, items: Sequence[NewSample]) -> list[str]:
        sizes.append(len(items))
        if not started.is_set():
            started.set()
            assert release.wait(30)
        return store_samples(session, items)

    committer: GroupCommit[NewSample, str] = GroupCommit(
        session_factory(engine), write, max_batch=3
    )
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(committer.submit, _new(0))]
        assert started.wait(30)
        futures += [pool.submit(committer.submit, _new(i)) for i in range(1, 8)]
        _wait_for(lambda: committer.pending == 7)
        release.set()
        assert len({f.result(30) for f in futures}) == 8
    assert sizes == [1, 3, 3, 1]
    assert _counts(engine) == (8, 8)


def test_one_bad_item_fails_alone_and_the_rest_of_its_batch_is_stored(engine: Engine) -> None:
    upgrade(engine)
    started, release = threading.Event(), threading.Event()

    def write(session: Session, items: Sequence[NewSample]) -> list[str]:
        if not started.is_set():
            started.set()
            assert release.wait(30)
        ids = store_samples(session, items)
        for item in items:
            if item.sample["request_id"] == "r-2":  # a job for a sample that does not exist
                session.add(Job(sample_id="f" * 32, max_attempts=5))
        session.flush()
        return ids

    committer: GroupCommit[NewSample, str] = GroupCommit(session_factory(engine), write)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(committer.submit, _new(0))
        assert started.wait(30)
        batch = {i: pool.submit(committer.submit, _new(i)) for i in (1, 2, 3)}
        _wait_for(lambda: committer.pending == 3)
        release.set()
        first.result(30)
        with pytest.raises(IntegrityError):
            batch[2].result(30)
        stored = [batch[1].result(30), batch[3].result(30)]
    assert _counts(engine) == (3, 3)
    with session_factory(engine)() as session:
        assert all(session.get(Sample, i) is not None for i in stored)


def test_a_database_failure_fails_the_whole_batch_at_once(engine: Engine) -> None:
    upgrade(engine)
    calls: list[int] = []
    started, release = threading.Event(), threading.Event()

    def write(session: Session, items: Sequence[NewSample]) -> list[str]:
        calls.append(len(items))
        if not started.is_set():
            started.set()
            assert release.wait(30)
            return store_samples(session, items)
        raise OperationalError("INSERT", {}, Exception("the database went away"))

    committer: GroupCommit[NewSample, str] = GroupCommit(session_factory(engine), write)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(committer.submit, _new(0))
        assert started.wait(30)
        batch = [pool.submit(committer.submit, _new(i)) for i in (1, 2, 3)]
        _wait_for(lambda: committer.pending == 3)
        release.set()
        first.result(30)
        for future in batch:
            with pytest.raises(OperationalError, match="went away"):
                future.result(30)
    assert calls == [1, 3]  # not retried item by item: an outage is paid for once
    assert _counts(engine) == (1, 1)


def test_a_lone_submit_commits_at_once(engine: Engine) -> None:
    upgrade(engine)
    committer: GroupCommit[NewSample, str] = GroupCommit(session_factory(engine), store_samples)
    for i in range(3):
        committer.submit(_new(i))
        assert _counts(engine) == (i + 1, i + 1)  # durable when submit returns
    assert committer.batches == 3
    with pytest.raises(ValueError, match="max_batch"):
        GroupCommit(session_factory(engine), store_samples, max_batch=0)
