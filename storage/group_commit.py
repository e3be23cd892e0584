"""Group commit: the writes of concurrent threads committed in one transaction.

A commit is the expensive part of accepting a sample: on SQLite it is an fsync of the WAL
(about 1 ms here, more than the two inserts it makes durable), on PostgreSQL a round trip and a
WAL flush.  `GroupCommit.submit` queues one write and returns once it is durable; whichever
submitting thread holds the writer lock commits everything queued so far, its own write and the
others', in one transaction (at most `max_batch` at a time).  No thread of its own, so nothing to
start or stop: an idle writer costs nothing, and a lone request commits at once, as before.

A batch that fails on one item's data (an integrity or data error) is retried an item at a time,
each in its own transaction, so one bad item never fails the others; a failure of the database
itself (unreachable, locked, out of space) fails every item of the batch with that error, at
once, so that an outage is not paid for once per item.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["GroupCommit"]

T = TypeVar("T")
R = TypeVar("R")

# the errors that belong to one item's data, not to the database: retry the batch item by item
# (OperationalError and InterfaceError, the database's own failures, fail the whole batch)
_ITEM_ERRORS = (IntegrityError, DataError, ProgrammingError)


@dataclass(slots=True)
class _Pending(Generic[T, R]):
    item: T
    done: threading.Event = field(default_factory=threading.Event)
    result: R | None = None
    error: BaseException | None = None

    def finish(self, result: R | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


def _own_copy(exc: BaseException) -> BaseException:
    """A copy of `exc` to raise in another thread, or `exc` itself when it cannot be copied."""
    try:
        twin = copy.copy(exc)
    except Exception:
        return exc
    twin.__traceback__ = None
    return twin if type(twin) is type(exc) else exc


class GroupCommit(Generic[T, R]):
    """Commit `write(session, items)` for items submitted by many threads, several per
    transaction.

    Args:
        sessions: the session factory of the database written to.
        write: adds items to the session (it may flush, and must not commit) and returns,
            in their order, what `submit` returns for each (known before the commit, e.g. an
            id set by the caller).
        max_batch: the most items one transaction holds.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        write: Callable[[Session, Sequence[T]], list[R]],
        *,
        max_batch: int = 64,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._sessions = sessions
        self._write = write
        self._max_batch = max_batch
        self._queue_lock = threading.Lock()  # guards _queue
        self._writer = threading.Lock()  # one transaction at a time
        self._queue: list[_Pending[T, R]] = []
        self.batches = 0  # transactions committed or failed (for tests and benchmarks)
        self.items = 0

    @property
    def pending(self) -> int:
        """Items submitted and not yet taken into a transaction."""
        with self._queue_lock:
            return len(self._queue)

    def submit(self, item: T) -> R:
        """`write`'s result for `item` once its transaction has committed.

        Raises:
            Exception: what writing or committing `item` raised (the database's own failure
                is raised to every item of the batch it hit).
        """
        pending: _Pending[T, R] = _Pending(item)
        with self._queue_lock:
            self._queue.append(pending)
        while not pending.done.is_set():
            with self._writer:
                if pending.done.is_set():  # committed by the thread that held the lock
                    break
                with self._queue_lock:
                    batch = self._queue[: self._max_batch]
                    del self._queue[: self._max_batch]
                self._commit(batch)
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[return-value]

    def _commit(self, batch: Sequence[_Pending[T, R]]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            results = self._transaction([p.item for p in batch])
        except _ITEM_ERRORS as exc:
            if len(batch) == 1:
                batch[0].finish(error=exc)
                return
            for pending in batch:  # find the bad item: each alone, in its own transaction
                try:
                    (result,) = self._transaction([pending.item])
                except Exception as one:
                    pending.finish(error=one)
                else:
                    pending.finish(result)
            return
        except BaseException as exc:  # the database itself failed: every item fails with it
            for pending in batch:  # each thread raises its own copy (its own traceback)
                pending.finish(error=_own_copy(exc))
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: not ours
                raise
            return
        for pending, result in zip(batch, results, strict=True):
            pending.finish(result)

    def _transaction(self, items: Sequence[T]) -> list[R]:
        with self._sessions.begin() as session:
            results = self._write(session, items)
        if len(results) != len(items):
            raise RuntimeError(f"write returned {len(results)} results for {len(items)} items")
        return results
