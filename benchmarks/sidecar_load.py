"""Load on the sidecar, on loopback: proxy overhead, ingest throughput, a database outage.

1. Proxy overhead: `guardrail reference serve` and `guardrail serve` (no workers, every request
   teed to ingest, SQLite) run as their own processes; the same chat request is sent at a steady
   rate (`--rate` per second) straight to the upstream and through the proxy; p50 / p99 of each.
2. Ingest throughput: `POST /v1/samples` to that `guardrail serve` at 100% sampling with
   `--concurrency` clients (the queue only grows); samples per second, all answered 202.
3. Database outage (in-process servers): the database file is removed mid-run and a directory
   takes its place; production requests through the proxy must keep succeeding (fail open),
   and the drops are counted; `POST /v1/samples` meanwhile must answer the documented 503
   (JSON reason, `Retry-After`), never another 5xx.
4. Large-image flood: `guardrail serve` with one supervised audit worker takes `--flood`
   small files that decode to huge images (6300x6300 PNG, 8000x1800 PNG, 5000x5000 JPEG,
   6300x6300 progressive JPEG, in turn), half posted to `/v1/samples` and half through the
   proxy as data URLs, 8 at a time; the peak resident memory (VmHWM) of the serve process
   and of its worker process is read from /proc at the end.

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


async def _post_loop(
    host: str, port: int, bodies: asyncio.Queue[bytes], statuses: dict[int, int]
) -> None:
    """One keep-alive HTTP/1.1 connection posting `bodies` to /v1/samples until none is left.

    A few lines over asyncio streams instead of an HTTP client library: the load generator
    shares the machine's cores with the server it measures (httpx took half a core at 400
    requests/s, a quarter of the machine), so it should take as little as it can, as wrk or
    h2load would.  The answers are read fully (Content-Length) and their status counted."""
    reader, writer = await asyncio.open_connection(host, port)
    head = f"POST /v1/samples HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
    try:
        while not bodies.empty():
            body = bodies.get_nowait()
            writer.write(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            status = int(status_line.split()[1])
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def _ingest(sidecar: str, image_b64: str, n: int, concurrency: int) -> dict:
    # the body is encoded once and only its request id is filled in per request
    template = json.dumps(
        {
            "model": "reference",
            "prompt": "USER: <image> Describe the image. ASSISTANT:",
            "output": "fork knife car clock .",
            "image_base64": image_b64,
            "request_id": "ingest-%d",
        }
    )
    bodies: asyncio.Queue[bytes] = asyncio.Queue()
    for i in range(n):
        bodies.put_nowait(template.replace("%d", str(i), 1).encode())
    statuses: dict[int, int] = {}
    address = httpx.URL(sidecar)
    host, port = address.host, address.port or 80
    started = time.perf_counter()
    await asyncio.gather(*(_post_loop(host, port, bodies, statuses) for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    return {
        "samples": n,
        "concurrency": concurrency,
        "seconds": seconds,
        "ingest_samples_per_s": n / seconds,
        "statuses": {str(k): v for k, v in statuses.items()},
    }


def _large_images() -> list[tuple[str, bytes]]:
    """Small files that decode to many pixels: flat canvases with a few shapes."""
    import io

    from PIL import Image, ImageDraw

    out = []
    for kind, (w, h), fmt, progressive in (
        ("png", (6300, 6300), "PNG", False),
        ("png", (8000, 1800), "PNG", False),
        ("jpeg", (5000, 5000), "JPEG", False),
        ("jpeg", (6300, 6300), "JPEG", True),  # libjpeg holds all its coefficients
    ):
        image = Image.new("RGB", (w, h), (200, 200, 190))
        draw = ImageDraw.Draw(image)
        draw.ellipse((w // 8, h // 8, w // 2, h // 2), fill=(200, 30, 30))
        draw.rectangle((w // 2, h // 2, 7 * w // 8, 7 * h // 8), fill=(30, 30, 200))
        buffer = io.BytesIO()
        image.save(buffer, fmt, optimize=True, progressive=progressive)
        out.append((kind, buffer.getvalue()))
    return out


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _serve_children(pid: int) -> tuple[list[int], list[int]]:
    """`serve`'s audit processes and its image decoders (children of its forkserver)."""
    workers, decoders = [], []
    for child in _children(pid):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"forkserver" in cmdline:
            decoders += _children(child)
        else:
            workers.append(child)
    return workers, decoders


async def _flood(sidecar: str, images: list[tuple[str, bytes]], n: int) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    semaphore = asyncio.Semaphore(8)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        kind, data = images[i % len(images)]
        b64 = base64.b64encode(data).decode()
        async with semaphore:
            if i % 2 == 0:
                r = await client.post(
                    f"{sidecar}/v1/samples",
                    json={
                        "model": "reference",
                        "prompt": "USER: <image> Describe the image. ASSISTANT:",
                        "output": "fork knife car clock .",
                        "image_base64": b64,
                        "request_id": f"flood-{i}",
                        "audit": True,
                    },
                )
                key = f"samples:{r.status_code}"
            else:
                chat = _chat(f"data:image/{kind};base64,{b64}")
                r = await client.post(
                    f"{sidecar}/v1/chat/completions",
                    json=chat,
                    headers={"X-Request-Id": f"flood-{i}", "X-Guardrail-Audit": "always"},
                )
                key = f"proxy:{r.status_code}"
        statuses[key] = statuses.get(key, 0) + 1

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))
    return statuses


def _start(db: str, workers: int, *, scheduler: bool = True) -> tuple[str, Any, Any]:
    """A migrated SQLite database, `guardrail reference serve` and `guardrail serve` in their own
    processes; returns the sidecar's URL and the two processes (upstream, serve)."""
    from guardrail.demo.background_server import free_port, spawn_guardrail

    up_port, side_port = free_port(), free_port()
    up, sidecar = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{side_port}"
    env = {
        "GUARDRAIL_DATABASE_URL": f"sqlite:///{db}",
        "GUARDRAIL_WORKERS": str(workers),
        "GUARDRAIL_SCHEDULER": "true" if scheduler else "false",
        "GUARDRAIL_UPSTREAM_URL": up,
    }
    subprocess.run(
        [sys.executable, "-m", "guardrail", "db", "upgrade"],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
    )
    upstream = spawn_guardrail(
        ["reference", "serve", "--port", str(up_port)], env, f"{up}/v1/models"
    )
    probe = f"{sidecar}/readyz/audit" if workers else f"{sidecar}/healthz"
    serve = spawn_guardrail(["serve", "--port", str(side_port)], env, probe, timeout=120)
    return up, sidecar, (upstream, serve)


def large_image_flood(n: int) -> dict[str, Any]:
    images = _large_images()
    with tempfile.TemporaryDirectory() as tmp:
        _, sidecar, (upstream, serve) = _start(f"{tmp}/flood.db", 1, scheduler=False)
        try:
            started = time.perf_counter()
            statuses = asyncio.run(_flood(sidecar, images, n))
            seconds = time.perf_counter() - started
            audited = 0
            deadline = time.time() + 600
            while time.time() < deadline:  # let the worker audit what was queued
                ready = httpx.get(f"{sidecar}/readyz/audit", timeout=30).json()
                if ready["backlog"].get("queued", 1) == 0 and ready["backlog"]["running"] == 0:
                    break
                time.sleep(1.0)
            metrics = httpx.get(f"{sidecar}/metrics", timeout=30).text
            audited = int(
                sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in metrics.splitlines()
                    if line.startswith("guardrail_audits_total{")
                )
            )
            workers, decoders = _serve_children(serve.pid)
            peak_worker = max((_peak_rss_mb(pid) for pid in workers), default=float("nan"))
            peak_decoder = max((_peak_rss_mb(pid) for pid in decoders), default=float("nan"))
            return {
                "requests": n,
                "images": [f"{k} {len(d) // 1024} KB" for k, d in images],
                "seconds": seconds,
                "statuses": statuses,
                "audited": audited,
                "peak_rss_mb_serve": _peak_rss_mb(serve.pid),
                "peak_rss_mb_worker": peak_worker,
                "peak_rss_mb_decoder": peak_decoder,
            }
        finally:
            for process in (serve, upstream):
                process.terminate()
                process.wait(timeout=60)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="proxy requests")
    parser.add_argument("--rate", type=float, default=20.0, help="proxy requests per second")
    parser.add_argument("--samples", type=int, default=2000, help="ingest requests")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--outage-requests", type=int, default=50)
    parser.add_argument("--flood", type=int, default=48, help="large-image requests")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from detectors.reference import MODEL_DIR
    from guardrail.config import load_settings
    from guardrail.demo.background_server import BackgroundServer
    from guardrail.reference.upstream import create_upstream_app
    from guardrail.service.api import create_app
    from guardrail.service.runtime import build_runtime
    from storage.engine import upgrade

    image = (ROOT / "examples" / "knife_trap.png").read_bytes()
    image_b64 = base64.b64encode(image).decode()
    body = _chat("data:image/png;base64," + image_b64)
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        up, sidecar, processes = _start(f"{tmp}/load.db", 0)
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
            ingest_statuses: dict[str, int] = {}
            ingest_5xx = 0
            with httpx.Client(timeout=60) as client:
                for i in range(args.outage_requests):
                    r = client.post(
                        f"{sidecar}/v1/chat/completions",
                        json=body,
                        headers={"X-Request-Id": f"outage-{i}"},
                    )
                    ok = r.status_code == 200 and "fork" in r.text
                    failed += not ok
                    r = client.post(
                        f"{sidecar}/v1/samples",
                        json={
                            "model": "reference",
                            "prompt": "USER: <image> Describe the image. ASSISTANT:",
                            "output": "fork knife car clock .",
                            "image_base64": image_b64,
                            "request_id": f"outage-ingest-{i}",
                        },
                    )
                    code = str(r.status_code)
                    ingest_statuses[code] = ingest_statuses.get(code, 0) + 1
                    # the documented answer: 503, a JSON reason and Retry-After; nothing else
                    documented = (
                        r.status_code == 503
                        and "retry-after" in r.headers
                        and bool(r.json().get("error", {}).get("message"))
                    )
                    ingest_5xx += r.status_code >= 500 and not documented
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
                "ingest_statuses": ingest_statuses,
                "ingest_5xx_during_db_outage": ingest_5xx,
            }
    report["flood"] = large_image_flood(args.flood)
    report["proxy_overhead_p50_ms"] = report["proxy"]["proxy_overhead_p50_ms"]
    report["proxy_overhead_p99_ms"] = report["proxy"]["proxy_overhead_p99_ms"]
    report["ingest_samples_per_s"] = report["ingest"]["ingest_samples_per_s"]
    report["failed_requests_during_db_outage"] = report["outage"][
        "failed_requests_during_db_outage"
    ]
    report["ingest_5xx_during_db_outage"] = report["outage"]["ingest_5xx_during_db_outage"]
    report["peak_rss_mb_serve"] = report["flood"]["peak_rss_mb_serve"]
    report["peak_rss_mb_worker"] = report["flood"]["peak_rss_mb_worker"]
    report["peak_rss_mb_decoder"] = report["flood"]["peak_rss_mb_decoder"]
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
        f"{o['fail_open_drops_counted']:.0f} drops counted; ingest answered "
        f"{o['ingest_statuses']}, {o['ingest_5xx_during_db_outage']} undocumented 5xx"
    )
    f = report["flood"]
    print(
        f"large-image flood: {f['requests']} requests ({', '.join(f['images'])}) in "
        f"{f['seconds']:.1f} s, statuses {f['statuses']}, {f['audited']} audited; peak RSS "
        f"serve {f['peak_rss_mb_serve']:.0f} MB, worker {f['peak_rss_mb_worker']:.0f} MB, "
        f"image decoder {f['peak_rss_mb_decoder']:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
