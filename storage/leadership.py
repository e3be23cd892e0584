"""A PostgreSQL advisory lock held on a dedicated connection: who runs the scheduled jobs."""

from __future__ import annotations

import logging

from sqlalchemy import Connection, Engine, text

__all__ = ["AdvisoryLock"]

log = logging.getLogger("guardrail.service.scheduler")


class AdvisoryLock:
    """`pg_try_advisory_lock(key)` on a connection of its own, kept while held: the lock lives
    as long as that connection's backend (a terminated backend lets it go at once)."""

    def __init__(self, engine: Engine, key: int) -> None:
        self.engine = engine
        self.key = key
        self.connection: Connection | None = None

    def try_hold(self) -> bool:
        """True while this process holds the lock: checks the connection it is held on (a dead
        one is invalidated, closed, and the lock tried again on a new one)."""
        if self.connection is not None:
            try:
                self.connection.execute(text("select 1"))
                return True
            except Exception:  # the backend is gone (terminated, restarted): so is the lock
                log.warning("lost the leader's database connection; electing again")
                dead, self.connection = self.connection, None
                try:
                    dead.invalidate()  # not returned to the pool
                    dead.close()
                except Exception:
                    pass
        connection = self.engine.connect()
        got = bool(
            connection.execute(text("select pg_try_advisory_lock(:k)"), {"k": self.key}).scalar()
        )
        connection.commit()
        if got:
            self.connection = connection
        else:
            connection.close()
        return got

    def release(self) -> None:
        """Unlock and close; on a dead connection (its backend already let the lock go) log
        instead of raising."""
        if self.connection is not None:
            try:
                self.connection.execute(text("select pg_advisory_unlock(:k)"), {"k": self.key})
                self.connection.commit()
            except Exception:  # a dead connection: its backend already let the lock go
                log.warning("could not unlock the leader's lock; its connection is gone")
            finally:
                self.connection.close()
                self.connection = None
