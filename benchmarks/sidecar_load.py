"""Load on the sidecar, on loopback: proxy overhead, ingest throughput, a database outage.

1. Proxy overhead: `guardrail reference serve` and `guardrail serve` (no workers, every request
   teed to ingest, SQLite) run as their own processes; the same chat request is sent at a steady
   rate (`--rate` per second) straight to the upstream and through the proxy; p50 / p99 of each.
2. Ingest throughput: `POST /v1/samples` to that `guardrail serve` at 100% sampling with
   `--concurrency` clients (the queue only grows); samples per second, all answered 202.
3. Database outage (in-process servers): the database file is removed mid-run and a directory
   takes its place; production requests through the proxy must keep succeeding (fail open),
   and the drops are counted.

    python benchmarks/sidecar_load.py [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _chat(url: str) -> dict[str, Any]:
    return {
        "model": "reference",
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


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def proxy_overhead(up: str, sidecar: str, body: dict[str, Any], n: int, rate: float) -> dict:
    direct, proxied = [], []
    with httpx.Client(timeout=60) as client:
        for i in range(n + 5):
            started = time.perf_counter()
            pair = []
            for base in (up, sidecar):
                t0 = time.perf_counter()
                r = client.post(
                    f"{base}/v1/chat/completions", json=body, headers={"X-Request-Id": f"load-{i}"}
                )
                assert r.status_code == 200, r.text
                pair.append(time.perf_counter() - t0)
            if i >= 5:
                direct.append(pair[0])
                proxied.append(pair[1])
            time.sleep(max(0.0, 1.0 / rate - (time.perf_counter() - started)))
    diffs = [p - d for p, d in zip(proxied, direct, strict=True)]
    return {
        "requests": n,
        "rate_per_s": rate,
        "direct_p50_ms": statistics.median(direct) * 1e3,
        "direct_p99_ms": _pct(direct, 0.99) * 1e3,
        "proxy_p50_ms": statistics.median(proxied) * 1e3,
        "proxy_p99_ms": _pct(proxied, 0.99) * 1e3,
        "proxy_overhead_p50_ms": (statistics.median(proxied) - statistics.median(direct)) * 1e3,
        "proxy_overhead_p99_ms": (_pct(proxied, 0.99) - _pct(direct, 0.99)) * 1e3,
        "paired_overhead_p50_ms": statistics.median(diffs) * 1e3,
    }


async def _ingest(sidecar: str, image_b64: str, n: int, concurrency: int) -> dict:
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            body = {
                "model": "reference",
                "prompt": "USER: <image> Describe the image. ASSISTANT:",
                "output": "fork knife car clock .",
                "image_base64": image_b64,
                "request_id": f"ingest-{i}",
            }
            r = await client.post(f"{sidecar}/v1/samples", json=body)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return {
        "samples": n,
        "concurrency": concurrency,
        "seconds": seconds,
        "ingest_samples_per_s": n / seconds,
        "statuses": {str(k): v for k, v in statuses.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="proxy requests")
    parser.add_argument("--rate", type=float, default=20.0, help="proxy requests per second")
    parser.add_argument("--samples", type=int, default=2000, help="ingest requests")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--outage-requests", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from detectors.reference import MODEL_DIR
    from guardrail.api import create_app
    from guardrail.background_server import BackgroundServer
    from guardrail.config import load_settings
    from guardrail.reference.upstream import create_upstream_app
    from guardrail.runtime import build_runtime
    from storage.engine import upgrade

    image = (ROOT / "examples" / "knife_trap.png").read_bytes()
    image_b64 = base64.b64encode(image).decode()
    body = _chat("data:image/png;base64," + image_b64)
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        from guardrail.background_server import free_port, spawn_guardrail

        up_port, side_port = free_port(), free_port()
        up, sidecar = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{side_port}"
        env = {
            "GUARDRAIL_DATABASE_URL": f"sqlite:///{tmp}/load.db",
            "GUARDRAIL_WORKERS": "0",
            "GUARDRAIL_UPSTREAM_URL": up,
        }
        subprocess.run(
            [sys.executable, "-m", "guardrail", "db", "upgrade"],
            env={**os.environ, **env},
            check=True,
            capture_output=True,
        )
        processes = [
            spawn_guardrail(["reference", "serve", "--port", str(up_port)], env, f"{up}/v1/models"),
            spawn_guardrail(["serve", "--port", str(side_port)], env, f"{sidecar}/healthz"),
        ]
        try:
            report["proxy"] = proxy_overhead(up, sidecar, body, args.requests, args.rate)
            report["ingest"] = asyncio.run(
                _ingest(sidecar, image_b64, args.samples, args.concurrency)
            )
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=10)

    with (
        tempfile.TemporaryDirectory() as tmp,
        BackgroundServer(create_upstream_app(MODEL_DIR)) as up,
    ):
        db = Path(tmp) / "g.db"
        runtime = build_runtime(
            load_settings(environ={}, database_url=f"sqlite:///{db}", upstream_url=up, workers=0)
        )
        upgrade(runtime.engine)
        with BackgroundServer(create_app(runtime)) as sidecar:
            # the database goes away: remove it and leave a directory where it was
            runtime.engine.dispose()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            db.mkdir()
            failed = 0
            with httpx.Client(timeout=60) as client:
                for i in range(args.outage_requests):
                    r = client.post(
                        f"{sidecar}/v1/chat/completions",
                        json=body,
                        headers={"X-Request-Id": f"outage-{i}"},
                    )
                    ok = r.status_code == 200 and "fork" in r.text
                    failed += not ok
                time.sleep(1.0)
                metrics = client.get(f"{sidecar}/metrics").text
            drops = sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("guardrail_proxy_fail_open_drops_total{")
            )
            report["outage"] = {
                "requests": args.outage_requests,
                "failed_requests_during_db_outage": failed,
                "fail_open_drops_counted": drops,
            }
    report["proxy_overhead_p50_ms"] = report["proxy"]["proxy_overhead_p50_ms"]
    report["proxy_overhead_p99_ms"] = report["proxy"]["proxy_overhead_p99_ms"]
    report["ingest_samples_per_s"] = report["ingest"]["ingest_samples_per_s"]
    report["failed_requests_during_db_outage"] = report["outage"][
        "failed_requests_during_db_outage"
    ]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    p, g, o = report["proxy"], report["ingest"], report["outage"]
    print(f"sidecar load on loopback, {report['machine']['cpus']} CPUs")
    print(
        f"proxy @ {p['rate_per_s']:.0f}/s, {p['requests']} requests: direct p50/p99 "
        f"{p['direct_p50_ms']:.1f}/{p['direct_p99_ms']:.1f} ms, proxy "
        f"{p['proxy_p50_ms']:.1f}/{p['proxy_p99_ms']:.1f} ms, overhead p50 "
        f"{p['proxy_overhead_p50_ms']:.2f} ms, p99 {p['proxy_overhead_p99_ms']:.2f} ms"
    )
    print(
        f"ingest: {g['samples']} samples, {g['concurrency']} clients, "
        f"{g['ingest_samples_per_s']:.0f} samples/s, statuses {g['statuses']}"
    )
    print(
        f"database outage: {o['requests']} proxied requests, "
        f"{o['failed_requests_during_db_outage']} failed, "
        f"{o['fail_open_drops_counted']:.0f} drops counted"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
