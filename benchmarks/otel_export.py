"""What the OpenTelemetry export costs an audit worker.

Starts a loopback OTLP/HTTP endpoint (it reads each request body and answers 200, as a receiver
does) and exports `--spans` verdict spans for each number of audited words in `--words`: the
time the worker's thread spends in `VerdictExporter.export` per span (building the span and
queueing it; the HTTP happens on the exporter's own thread), and the time until everything is
on the wire (`flush`), as spans per second.

    python benchmarks/otel_export.py [--spans 2000] [--words 0 4 32 128] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@contextmanager
def _endpoint() -> Iterator[tuple[str, list[int]]]:
    """A loopback endpoint answering 200 to every POST; yields its URL and the body sizes."""
    sizes: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            sizes.append(len(self.rfile.read(int(self.headers.get("content-length", "0")))))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", sizes
    finally:
        server.shutdown()
        server.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spans", type=int, default=2000)
    parser.add_argument("--words", type=int, nargs="+", default=[0, 4, 32, 128])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    from guardrail.config import load_settings
    from guardrail.service.metrics import Metrics
    from guardrail.service.otel import AuditTrace, WordEvaluation, build_exporter

    rows: list[dict[str, Any]] = []
    for n_words in args.words:
        words = [
            WordEvaluation(
                word=f"word{i}",
                position=i,
                category="other",
                label="grounded" if i % 3 else "language_prior",
                hallucination_score=i / max(1, n_words),
                reason="a sentence a person can read about this word's evidence",
                detector="eagle-language-prior",
                detector_version="0",
            )
            for i in range(n_words)
        ]
        with _endpoint() as (url, sizes):
            metrics = Metrics.create()
            settings = load_settings(
                environ={},
                otel_endpoint=url,
                otel_max_queue_spans=max(args.spans, 1),
                otel_max_words_per_span=max(n_words, 1),
            )
            exporter = build_exporter(settings, metrics)
            assert exporter is not None
            started = time.perf_counter()
            for i in range(args.spans):
                trace = AuditTrace(
                    sample_id=f"{i:032x}",
                    model="reference",
                    request_id=f"req-{i}",
                    traceparent=TRACEPARENT,
                    response_id=f"chatcmpl-{i}",
                )
                exporter.export(trace, words)
            queued = time.perf_counter() - started
            exporter.flush(120)
            total = time.perf_counter() - started
            exporter.shutdown()
            exported = metrics.registry.get_sample_value(
                "guardrail_otel_spans_total", {"outcome": "exported"}
            )
            rows.append(
                {
                    "words": n_words,
                    "spans": args.spans,
                    "export_call_us": queued / max(args.spans, 1) * 1e6,
                    "spans_per_second": args.spans / total if total else 0.0,
                    "bytes_per_span": sum(sizes) / max(args.spans, 1),
                    "exported": int(exported or 0),
                }
            )
    report = {"machine": f"{platform.machine()}, {platform.python_version()}", "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"OpenTelemetry export, {report['machine']}")
    print("| words per span | spans | export() per span | spans/s to the wire | bytes/span |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['words']} | {r['exported']}/{r['spans']} | {r['export_call_us']:.0f} us "
            f"| {r['spans_per_second']:.0f} | {r['bytes_per_span']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
