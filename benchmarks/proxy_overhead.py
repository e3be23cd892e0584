"""What the proxy adds to a chat completion's latency.

Starts the reference upstream and `guardrail serve`'s app (SQLite, no workers, every request
sampled, so the tee to ingest runs) as real HTTP servers, sends the same image chat request
`--requests` times directly and through the proxy (non-streaming and streaming), and prints the
median and 95th percentile latencies and their difference.

    python benchmarks/proxy_overhead.py [--requests 50] [--json]
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _quantiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "p50_ms": statistics.median(values) * 1e3,
        "p95_ms": values[min(len(values) - 1, int(0.95 * len(values)))] * 1e3,
    }


def _teed(runtime: Any, expected: int, timeout: float = 30.0) -> int:
    """Samples stored once the tee has caught up (it ingests after each answer went back):
    `expected`, or what there is when `timeout` runs out."""
    from storage.models import Sample

    deadline = time.monotonic() + timeout
    while True:
        with runtime.sessions() as session:
            count = session.query(Sample).count()
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from detectors.reference import MODEL_DIR
    from guardrail.config import load_settings
    from guardrail.demo.background_server import BackgroundServer as _Server
    from guardrail.reference.upstream import create_upstream_app
    from guardrail.service.api import create_app
    from guardrail.service.runtime import build_runtime
    from storage.engine import upgrade

    image = (ROOT / "examples" / "knife_trap.png").read_bytes()
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, _Server(create_upstream_app(MODEL_DIR)) as up:
        settings = load_settings(
            environ={}, database_url=f"sqlite:///{tmp}/g.db", upstream_url=up, workers=0
        )
        runtime = build_runtime(settings)
        upgrade(runtime.engine)
        runtime.decoders.start()  # as `guardrail serve` does
        with _Server(create_app(runtime)) as sidecar, httpx.Client(timeout=60) as client:
            for stream in (False, True):
                timings: dict[str, list[float]] = {"direct": [], "proxy": []}
                for i in range(args.requests + 3):
                    body = {
                        "model": "reference",
                        "stream": stream,
                        "messages": [
                            {
                                "role": "user",
                                "content": [
                                    {"type": "image_url", "image_url": {"url": url}},
                                    {"type": "text", "text": "Describe the image."},
                                ],
                            }
                        ],
                    }
                    headers = {"X-Request-Id": f"bench-{stream}-{i}"}
                    for name, base in (("direct", up), ("proxy", sidecar)):
                        started = time.perf_counter()
                        response = client.post(
                            f"{base}/v1/chat/completions", json=body, headers=headers
                        )
                        response.read()
                        elapsed = time.perf_counter() - started
                        assert response.status_code == 200, response.text
                        if i >= 3:  # warm-up
                            timings[name].append(elapsed)
                direct, proxy = _quantiles(timings["direct"]), _quantiles(timings["proxy"])
                rows["stream" if stream else "plain"] = {
                    "direct": direct,
                    "proxy": proxy,
                    "overhead_p50_ms": proxy["p50_ms"] - direct["p50_ms"],
                    "overhead_p95_ms": proxy["p95_ms"] - direct["p95_ms"],
                }
            rows["samples_teed"] = _teed(runtime, expected=2 * (args.requests + 3))
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
        "requests": args.requests,
        **rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"proxy overhead, {args.requests} requests each, {report['machine']['processor']}")
    print(
        f"{'mode':<8}{'direct p50':>12}{'proxy p50':>12}{'+p50':>9}{'direct p95':>12}"
        f"{'proxy p95':>12}{'+p95':>9}  (ms)"
    )
    for mode in ("plain", "stream"):
        r = rows[mode]
        print(
            f"{mode:<8}{r['direct']['p50_ms']:>12.1f}{r['proxy']['p50_ms']:>12.1f}"
            f"{r['overhead_p50_ms']:>9.1f}{r['direct']['p95_ms']:>12.1f}"
            f"{r['proxy']['p95_ms']:>12.1f}{r['overhead_p95_ms']:>9.1f}"
        )
    print(f"samples teed to ingest: {rows['samples_teed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
