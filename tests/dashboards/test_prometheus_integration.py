"""A real Prometheus scrapes a running sidecar with real audits: every dashboard query and every
rule expression evaluates, and the ones about audits return data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from detectors.reference import CAPTION_PROMPT
from guardrail.config import load_settings
from guardrail.demo.background_server import BackgroundServer, free_port
from guardrail.service.api import create_app
from guardrail.service.ingest import IngestRequest, ingest
from guardrail.service.runtime import build_runtime
from guardrail.service.worker import Worker
from storage.engine import upgrade

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "grafana" / "guardrail.json"
RULES = ROOT / "dashboards" / "prometheus" / "guardrail-rules.yml"
SAID = {"knife_trap": "fork knife car clock .", "cup_trap": "car ball cup spoon tree ."}


def _query(prom: str, expr: str) -> dict:
    answer = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]


def test_dashboard_queries_and_rule_expressions_evaluate_on_real_data(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("GUARDRAIL_REQUIRE_PROMTOOL") == "1":
            pytest.fail("prometheus is required (apt-get install prometheus)")
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    runtime = build_runtime(
        load_settings(environ={}, database_url=f"sqlite:///{tmp_path / 'g.db'}")
    )
    upgrade(runtime.engine)
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics)
    with BackgroundServer(create_app(runtime)) as sidecar:
        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "guardrail", "static_configs": [{"targets": [sidecar.split("//")[1]]}]}
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        prom = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    if httpx.get(f"{prom}/-/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            for round_ in range(2):  # two scrapes apart, so rate() has two points
                for name, output in SAID.items():
                    ingest(
                        runtime,
                        IngestRequest(
                            model="reference",
                            prompt=CAPTION_PROMPT,
                            image_bytes=(ROOT / "examples" / f"{name}.png").read_bytes(),
                            output=output,
                            request_id=f"{name}-{round_}",
                        ),
                    )
                while worker.run_once():
                    pass
                time.sleep(2.5)
            deadline = time.time() + 20
            while time.time() < deadline:
                data = _query(prom, "guardrail_tokens_audited_total")
                if sum(float(r["value"][1]) for r in data["result"]) >= 18:
                    break
                time.sleep(0.5)
            dashboard = json.loads(DASHBOARD.read_text())
            exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
            with_data = 0
            for expr in exprs:
                expr = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
                if _query(prom, expr)["result"]:
                    with_data += 1
            for expected in (
                "sum by (verdict) (rate(guardrail_tokens_audited_total[1m]))",
                "max(guardrail_queue_depth)",
                "histogram_quantile(0.5, sum by (le) "
                "(rate(guardrail_audit_duration_seconds_bucket[1m])))",
            ):
                assert _query(prom, expected)["result"], expected
            assert with_data >= len(exprs) // 2
            rules = [
                r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
            ]
            for expr in rules:
                _query(prom, expr)
            loaded = httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
            assert {g["name"] for g in loaded} == {"guardrail-hallucinations", "guardrail-pipeline"}
            assert all(r["health"] != "err" for g in loaded for r in g["rules"])
        finally:
            process.terminate()
            process.wait(timeout=15)
