"""`guardrail demo`: the whole product on the embedded default, in a few minutes, on a laptop.

It starts the reference upstream, the sidecar (proxy, API, workers, spike checks) on a fresh
SQLite database and a local webhook receiver; sends production-like chat requests (clean and
trap scenes of the reference world) through the proxy with the `openai` client; raises the
share of trap scenes until the spike alert fires; renders the audit report; and prints the
verdicts against the ground truth the reference world knows.  Everything runs in this process
and stops with it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from detectors.types import VerdictLabel

__all__ = ["register", "run_demo"]

_CYCLE: tuple[str, ...] = ("clean",) * 5 + ("control",) + ("clean",) * 5
_KINDS_CALM = (*_CYCLE, "cooccurrence_trap", *_CYCLE, "prior_trap")  # 1 trap scene in 12
_KINDS_SPIKE = ("cooccurrence_trap", "prior_trap")


def register(commands: Any) -> None:
    demo = commands.add_parser("demo", help="run the whole guardrail on the reference model")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="report and data")
    demo.add_argument("--quick", action="store_true", help="fewer requests (under 2 minutes)")
    demo.add_argument("--seed", type=int, default=12_000_000, help="picks the scenes")
    demo.set_defaults(handler=lambda args: run_demo(args.out, quick=args.quick, seed=args.seed))


@dataclass
class _Sent:
    request_id: str
    kind: str
    present: frozenset[str]
    said: str


def _truth(word: str, sent: _Sent) -> str:
    if word in sent.present:
        return "present"
    if sent.kind == "cooccurrence_trap" and word == "fork":
        return "co-occurrence halluc."
    if sent.kind == "prior_trap" and word == "spoon":
        return "language-prior halluc."
    return "other absent"


def run_demo(out: Path, *, quick: bool = False, seed: int = 12_000_000) -> int:
    from openai import OpenAI

    from detectors.reference import generate_scene
    from guardrail.commands.report import make_report
    from guardrail.config import load_settings
    from guardrail.demo.background_server import BackgroundServer
    from guardrail.reference.upstream import create_upstream_app
    from guardrail.service.api import create_app
    from guardrail.service.chat import image_messages
    from guardrail.service.images import encode_png
    from guardrail.service.runtime import build_runtime
    from guardrail.service.supervisor import Supervisor
    from storage import reads
    from storage.engine import upgrade
    from storage.models import SampleStatus

    started = time.perf_counter()
    calm, spike = (24, 18) if quick else (72, 42)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "demo.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    received: list[dict[str, Any]] = []
    hook = FastAPI()

    @hook.post("/alerts")
    async def alerts(request: Request) -> dict[str, str]:
        received.append(await request.json())
        return {"status": "received"}

    print("guardrail demo: starting the reference upstream, the sidecar and a webhook receiver")
    with (
        BackgroundServer(hook) as hook_url,
        BackgroundServer(create_upstream_app(_model_dir())) as upstream,
    ):
        settings = load_settings(
            environ={},
            database_url=f"sqlite:///{db}",
            upstream_url=upstream,
            webhook_url=f"{hook_url}/alerts",
            workers=1,
            store_raw=True,
            spike_window_minutes=0.5,
            spike_check_seconds=3.0,
            spike_floor=0.2,
            spike_ratio=1.5,
            spike_min_tokens=10,
        )
        runtime = build_runtime(settings)
        upgrade(runtime.engine)
        with BackgroundServer(create_app(runtime)) as sidecar:
            public = sidecar
            runtime.settings.public_url = public
            # as `guardrail serve` does: the audit worker and the scheduler (reports, spike
            # checks every 3 s here, retention, reaper) run in supervised child processes
            supervisor = Supervisor(runtime.settings, runtime.metrics, workers=1, scheduler=True)
            runtime.supervisor = supervisor
            supervisor.start()
            client = OpenAI(base_url=f"{sidecar}/v1", api_key="demo")
            sent: dict[str, _Sent] = {}
            fired_at: list[int] = []

            def send(i: int, kind: str) -> None:
                scene = generate_scene(seed + i, kind)
                rid = f"demo-{seed}-{i}"
                answer = client.chat.completions.create(
                    model="reference",
                    messages=image_messages(encode_png(scene.image), "Describe the image."),  # type: ignore[arg-type]
                    extra_headers={"X-Request-Id": rid},
                )
                sent[rid] = _Sent(rid, kind, scene.names, answer.choices[0].message.content or "")

            def progress(phase: str) -> None:
                with runtime.sessions() as session:
                    done = reads.sample_status_counts(session)[SampleStatus.AUDITED]
                rate = _rate(runtime)
                print(
                    f"  [{phase}] sent {len(sent):3d}  audited {done:3d}  "
                    f"hallucination rate so far {100 * rate:5.1f}%  alerts {len(received)}"
                )

            print(f"phase 1: normal traffic ({calm} requests, 1 in 12 is a trap scene)")
            for i in range(calm):
                send(i, _KINDS_CALM[i % len(_KINDS_CALM)])
                if i % 6 == 5:
                    progress("normal")
            _drain(runtime, len(sent))
            progress("normal")
            # the spike check compares its short window with the period before it: let the
            # normal traffic age out of the window first, so it becomes the baseline
            window = settings.spike_window_minutes * 60
            print(f"  (waiting {window:.0f} s for normal traffic to become the baseline)")
            time.sleep(window + 1)
            print(f"phase 2: the model starts hallucinating ({spike} requests, all trap scenes)")
            for j in range(spike):
                send(calm + j, _KINDS_SPIKE[j % 2])
                if received and not fired_at:
                    fired_at.append(len(sent))
                if j % 6 == 5:
                    progress("spike")
            _drain(runtime, len(sent))
            deadline = time.time() + 4 * settings.spike_check_seconds
            while not received and time.time() < deadline:  # the scheduler's next check
                time.sleep(0.2)
            if received and not fired_at:
                fired_at.append(len(sent))
            progress("spike")
            now = datetime.now(UTC)
            began = now - timedelta(seconds=time.perf_counter() - started + 30)
            report_id, data = make_report(runtime, began, now + timedelta(seconds=1), "demo")
            with runtime.sessions() as session:
                report = reads.report(session, report_id)
                assert report is not None
                (out / "report.html").write_text(report.html)
                alerts_rows = reads.alerts(session)
                table = _verdict_table(session, sent)
            (out / "report.json").write_text(
                json.dumps(
                    {
                        **data,
                        "worst_examples": [
                            {k: v for k, v in e.items() if k != "heatmap_png"}
                            for e in data["worst_examples"]
                        ],
                    },
                    indent=2,
                )
                + "\n"
            )
            (out / "metrics.txt").write_bytes(runtime.metrics.exposition())
            supervisor.stop()
    print()
    if received:
        alert = received[0]
        print(
            f"spike alert fired after {fired_at[0] if fired_at else '?'} requests and reached the "
            f"webhook: rate {100 * alert['rate']:.0f}% vs baseline {100 * alert['baseline']:.0f}%, "
            f"top objects {alert['top_objects']}"
        )
    else:
        print("no spike alert fired (see the rates above)")
    print(f"alerts recorded: {[(a.model, a.state) for a in alerts_rows]}")
    print(f"audit report:   {out / 'report.html'}  (and report.json)")
    print(f"metrics:        {out / 'metrics.txt'}  (live at /metrics under `guardrail serve`)")
    print("dashboards:     dashboards/grafana/guardrail.json")
    print("alert rules:    dashboards/prometheus/guardrail-rules.yml")
    print()
    print("verdicts against the ground truth (object words of the captions):")
    labels = [label.value for label in VerdictLabel]
    print(f"  {'truth':<24}" + "".join(f"{label:>19}" for label in labels))
    for truth in ("present", "co-occurrence halluc.", "language-prior halluc.", "other absent"):
        row = table.get(truth, Counter())
        if sum(row.values()):
            print(f"  {truth:<24}" + "".join(f"{row[label]:>19}" for label in labels))
    print(f"\ndone in {time.perf_counter() - started:.0f} s; nothing is left running")
    return 0


def _model_dir() -> Path:
    from detectors.reference import MODEL_DIR

    return Path(MODEL_DIR)


def _rate(runtime: Any) -> float:
    from storage import reads

    with runtime.sessions() as session:
        counts = reads.verdict_counts(session)
    total = sum(counts.values())
    return sum(counts[label] for label in VerdictLabel.hallucinated()) / total if total else 0.0


def _drain(runtime: Any, expected: int, timeout: float = 120.0) -> None:
    """Wait until the proxy's tees are stored and every sample is audited."""
    from storage import reads
    from storage.models import SampleStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        with runtime.sessions() as session:
            counts = reads.sample_status_counts(session)
        total = sum(counts.values())
        pending = counts[SampleStatus.QUEUED] + counts[SampleStatus.AUDITING]
        if total >= expected and pending == 0:
            return
        time.sleep(0.2)


def _verdict_table(session: Any, sent: dict[str, _Sent]) -> dict[str, Counter[str]]:
    from storage import reads

    table: dict[str, Counter[str]] = {}
    for row in reads.list_audits(session, limit=None):
        info = sent.get(row.request_id or "")
        if info is not None:
            table.setdefault(_truth(row.category, info), Counter())[row.label.value] += 1
    return table
