"""How fast a backlog of spike notifications drains from the alert outbox to a webhook.

After a receiver outage the outbox holds every notification it missed; this measures how long
`AlertDeliverer`s take to send a backlog of N to a loopback receiver (each request claimed with
a lease, POSTed, signed, recorded), with one or more deliverers on SQLite and PostgreSQL, and
checks that each notification arrived exactly once.

    python benchmarks/alert_outbox.py [--notifications 200] [--deliverers 1,2]
        [--databases sqlite,postgresql] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _receiver() -> tuple[ThreadingHTTPServer, list[str]]:
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            seen.append(self.headers.get("X-Guardrail-Notification-Id", ""))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def _run(database: str, url: str, notifications: int, deliverers: int) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry

    from guardrail.config import load_settings
    from guardrail.service.alert_delivery import AlertDeliverer
    from guardrail.service.metrics import Metrics
    from guardrail.service.runtime import build_runtime
    from storage import outbox
    from storage.engine import upgrade
    from storage.models import Alert

    server, seen = _receiver()
    hook = f"http://127.0.0.1:{server.server_address[1]}/hook"
    runtimes = []
    for _ in range(deliverers):
        settings = load_settings(
            environ={},
            database_url=url,
            webhook_url=hook,
            webhook_format="alertmanager",
            webhook_secret="benchmark-secret-0123456789",
        )
        runtimes.append(build_runtime(settings, Metrics.create(CollectorRegistry())))
    upgrade(runtimes[0].engine)
    now = datetime.now(UTC)
    with runtimes[0].sessions.begin() as session:
        for i in range(notifications):
            alert = Alert(
                model=f"m{i}",
                state="firing",
                started_at=now,
                rate=0.5,
                baseline=0.05,
                tokens=40,
                details={"threshold": 0.15, "top_objects": [["spoon", 3]]},
            )
            session.add(alert)
            session.flush()
            outbox.add(session, alert.id, "firing", now=now)
    senders = [AlertDeliverer.for_runtime(rt) for rt in runtimes]
    assert all(s is not None for s in senders)  # webhook_url is set
    barrier = threading.Barrier(deliverers + 1)

    def drain(sender: Any) -> None:
        barrier.wait()
        while sender.deliver_due():
            pass

    threads = [threading.Thread(target=drain, args=(s,)) for s in senders]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    server.shutdown()
    server.server_close()
    for sender, rt in zip(senders, runtimes, strict=True):
        if sender is not None:
            sender.close()
        rt.engine.dispose()
    counts = Counter(seen)
    return {
        "database": database,
        "deliverers": deliverers,
        "notifications": notifications,
        "seconds": round(seconds, 3),
        "per_second": round(notifications / seconds, 1),
        "ms_per_notification": round(1000 * seconds / notifications, 2),
        "received": len(seen),
        "duplicates": sum(c - 1 for c in counts.values() if c > 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notifications", type=int, default=200)
    parser.add_argument("--deliverers", default="1,2")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for database in args.databases.split(","):
        for deliverers in (int(d) for d in args.deliverers.split(",")):
            if database == "sqlite":
                with tempfile.TemporaryDirectory() as tmp:
                    url = f"sqlite:///{Path(tmp) / 'outbox.db'}"
                    rows.append(_run(database, url, args.notifications, deliverers))
            else:
                import pytest

                from tests.postgres import schema_url

                try:
                    with schema_url("gr_bench") as url:
                        rows.append(_run(database, url, args.notifications, deliverers))
                except pytest.skip.Exception as exc:  # PostgreSQL is not reachable
                    print(f"{database}: skipped ({exc})", file=sys.stderr)
    if args.json:
        print(json.dumps({"results": rows}, indent=2))
        return 0
    header = ("database", "deliverers", "notifications", "seconds", "per_second", "duplicates")
    print(" ".join(f"{h:>13}" for h in header))
    for row in rows:
        print(" ".join(f"{row[h]!s:>13}" for h in header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
