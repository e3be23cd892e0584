"""`guardrail probe PATH`: exit 0 when an HTTP endpoint of this machine answers 200.

For container health checks (a slim image has no curl): `guardrail probe /healthz` asks the
sidecar on 127.0.0.1 at `--port` (default `GUARDRAIL_PORT`, else 8700); `guardrail probe --port
9400 /metrics` asks a worker's metrics endpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from typing import Any

__all__ = ["register"]


def register(commands: Any) -> None:
    probe = commands.add_parser("probe", help="exit 0 when a local HTTP endpoint answers 200")
    probe.add_argument("path", nargs="?", default="/healthz", help="default /healthz")
    probe.add_argument("--host", default="127.0.0.1")
    probe.add_argument("--port", type=int, default=None, help="default: $GUARDRAIL_PORT, else 8700")
    probe.add_argument("--timeout", type=float, default=3.0, help="seconds")
    probe.set_defaults(handler=_probe)


def _probe(args: argparse.Namespace) -> int:
    port = args.port if args.port is not None else int(os.environ.get("GUARDRAIL_PORT", "8700"))
    if not args.path.startswith("/"):
        raise ValueError(f"the path must start with '/', got: {args.path!r}")
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{port}{args.path}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"probe {url}: {reason}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"probe {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0
