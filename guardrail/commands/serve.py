"""`guardrail serve`, `guardrail worker`, `guardrail config check`."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
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


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything slow starts, so a port in use is a one-line
    error at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from guardrail.logs import configure_logging, uvicorn_log_config
    from guardrail.service.api import create_app
    from guardrail.service.runtime import build_runtime
    from guardrail.service.supervisor import Supervisor
    from storage.engine import check_migrated

    settings = _settings(args, host=args.host, port=args.port, workers=args.workers)
    configure_logging(settings.log_format)
    sock = _bind(settings.host, settings.port)
    try:
        runtime = build_runtime(settings)
        check_migrated(runtime.engine)
    except BaseException:  # a refused start lets go of its port at once (not at GC)
        sock.close()
        raise
    if not settings.api_tokens:
        log.warning("no api_tokens configured: the API accepts unauthenticated requests")
    # audits and the scheduler (reports draw heatmaps) run in supervised child processes:
    # this process serves the API and the proxy and never runs model code on client data
    supervisor = Supervisor(
        settings,
        runtime.metrics,
        workers=settings.workers,
        scheduler=settings.scheduler,
        grace_seconds=settings.stop_grace_seconds,
    )
    runtime.supervisor = supervisor
    supervisor.start()
    runtime.decoders.start()  # ready before the first image: a child imports the decoders once
    app = create_app(runtime)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            # uvicorn's loggers hand their records to the root logger: one format per process
            log_config=uvicorn_log_config(access_log=settings.access_log),
            access_log=settings.access_log,
            # requests in flight (an ingest decoding a large image) get the same grace as
            # audits: cut short, a client would get a 500 for a sample committed after it
            timeout_graceful_shutdown=max(10, int(settings.stop_grace_seconds)),
            # h11 bounds a request's head (httptools takes any size: one 120 MB header held
            # the event loop for 17 s); 64 KiB is far above what clients send
            http="h11",
            h11_max_incomplete_event_size=64 * 1024,
        )
    )
    # uvicorn stops on SIGINT/SIGTERM and then re-raises the signal to the handler that was
    # there before it: record it here, so a stop is an exit status, not a traceback
    received: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda s, _f: received.append(s))
    try:
        server.run(sockets=[sock])
    finally:
        log.info("stopping: audit processes get %.0f s to finish", settings.stop_grace_seconds)
        supervisor.stop()
        runtime.tee_executor.shutdown(wait=True, cancel_futures=False)  # hands on to ingest
        runtime.ingest_executor.shutdown(wait=True, cancel_futures=False)
        runtime.decoders.close()
    return 130 if received and received[0] == signal.SIGINT else 0


def _worker(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from guardrail.logs import configure_logging
    from guardrail.service.runtime import build_runtime
    from guardrail.service.supervisor import Supervisor
    from storage.engine import check_migrated

    settings = _settings(args, workers=args.workers)
    configure_logging(settings.log_format)
    runtime = build_runtime(settings)
    check_migrated(runtime.engine)
    if args.metrics_port:
        start_http_server(args.metrics_port, registry=runtime.metrics.merged_registry())
    supervisor = Supervisor(
        settings, runtime.metrics, workers=args.workers, grace_seconds=settings.stop_grace_seconds
    )
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    supervisor.start()
    stop.wait()
    log.info("stopping: audit processes get %.0f s to finish", settings.stop_grace_seconds)
    supervisor.stop()
    return 130 if received and received[0] == signal.SIGINT else 0
