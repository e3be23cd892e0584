"""`guardrail serve`, `guardrail worker`, `guardrail config check`."""

from __future__ import annotations

import argparse
import json
import logging
import threading
from typing import Any

__all__ = ["register"]

log = logging.getLogger("guardrail.serve")


def register(commands: Any) -> None:
    config = commands.add_parser("config", help="the resolved configuration")
    sub = config.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    check = sub.add_parser("check", help="validate and print the configuration, secrets masked")
    check.add_argument("--config", help="TOML file (default: $GUARDRAIL_CONFIG)")
    check.set_defaults(handler=_config_check)

    serve = commands.add_parser("serve", help="run the API and in-process audit workers")
    serve.add_argument("--config", help="TOML file (default: $GUARDRAIL_CONFIG)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="in-process audit workers")
    serve.set_defaults(handler=_serve)

    worker = commands.add_parser("worker", help="run audit workers only (shared database)")
    worker.add_argument("--config", help="TOML file (default: $GUARDRAIL_CONFIG)")
    worker.add_argument("--workers", type=int, default=1)
    worker.add_argument("--metrics-port", type=int, default=0, help="serve /metrics here")
    worker.set_defaults(handler=_worker)


def _settings(args: argparse.Namespace, **overrides: Any) -> Any:
    from guardrail.config import load_settings

    return load_settings(args.config, **{k: v for k, v in overrides.items() if v is not None})


def _config_check(args: argparse.Namespace) -> int:
    from guardrail.config import masked

    print(json.dumps(masked(_settings(args)), indent=2))
    return 0


def _start_workers(runtime: Any, count: int) -> list[Any]:
    from guardrail.worker import Worker

    for auditor in runtime.auditors.values():
        auditor.load()
    workers = []
    for _ in range(count):
        worker = Worker(
            runtime.sessions,
            runtime.auditors,
            runtime.metrics,
            lease_seconds=runtime.settings.lease_seconds,
        )
        threading.Thread(target=worker.run, name=f"worker-{worker.owner}", daemon=True).start()
        workers.append(worker)
    runtime.workers = workers
    threading.Thread(target=_gauges, args=(runtime,), daemon=True).start()
    return workers


def _gauges(runtime: Any) -> None:
    worker = runtime.workers[0]
    while not worker.stop.wait(5.0):
        try:
            worker.update_queue_gauges()
        except Exception:
            log.exception("could not read the queue depth")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from guardrail.api import create_app
    from guardrail.runtime import build_runtime
    from storage.engine import check_migrated

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = _settings(args, host=args.host, port=args.port, workers=args.workers)
    runtime = build_runtime(settings)
    check_migrated(runtime.engine)
    if not settings.api_tokens:
        log.warning("no api_tokens configured: the API accepts unauthenticated requests")
    workers = _start_workers(runtime, settings.workers) if settings.workers else []
    scheduler = None
    if settings.scheduler:
        from guardrail.scheduler import Scheduler

        scheduler = Scheduler(runtime)
        scheduler.start()
    try:
        uvicorn.run(create_app(runtime), host=settings.host, port=settings.port, log_level="info")
    finally:
        for worker in workers:
            worker.stop.set()
        if scheduler is not None:
            scheduler.stop()
    return 0


def _worker(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from guardrail.runtime import build_runtime
    from storage.engine import check_migrated

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runtime = build_runtime(_settings(args))
    check_migrated(runtime.engine)
    if args.metrics_port:
        start_http_server(args.metrics_port, registry=runtime.metrics.registry)
    workers = _start_workers(runtime, args.workers)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        for worker in workers:
            worker.stop.set()
    return 0
