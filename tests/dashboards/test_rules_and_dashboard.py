"""The alert rules pass their promtool unit tests, and every metric the dashboard and the rules
use exists in the guardrail's registry."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from guardrail.service.metrics import Metrics

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
RULES = DASHBOARDS / "prometheus" / "guardrail-rules.yml"
DASHBOARD = DASHBOARDS / "grafana" / "guardrail.json"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("GUARDRAIL_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool is required (apt-get install prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def _expressions() -> list[str]:
    exprs = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    return exprs


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = _promtool()
    subprocess.run([promtool, "check", "rules", str(RULES)], check=True, capture_output=True)
    test = subprocess.run(
        [promtool, "test", "rules", "guardrail-rules.test.yml"],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
    )
    assert test.returncode == 0, test.stdout + test.stderr


def test_every_metric_used_exists_in_the_registry() -> None:
    # metrics only appear in collect() once a labelled child exists: create one of each
    metrics = Metrics.create()
    known = {s.name for m in metrics.registry.collect() for s in m.samples}
    # the backlog gauges are read from the database at scrape time: their collector describes them
    for metric in [*metrics.registry.collect(), *metrics.backlog.describe()]:
        known.add(metric.name)
        if metric.type == "counter":
            known.add(metric.name + "_total")
        if metric.type == "histogram":
            known.update(metric.name + s for s in ("_bucket", "_sum", "_count"))
    used = {n for e in _expressions() for n in re.findall(r"\bguardrail_[a-z_]+", e)}
    assert used, "no guardrail_ metric found in the dashboard or rules"
    missing = sorted(used - known)
    assert not missing, f"not in the registry: {missing}"


def test_every_alert_has_for_severity_summary_and_runbook() -> None:
    alerts = [
        r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r
    ]
    assert {a["alert"] for a in alerts} >= {
        "GuardrailHallucinationSpike",
        "GuardrailAuditsStalled",
        "GuardrailQueueBacklogGrowing",
        "GuardrailScorerErrors",
        "GuardrailProxyFailOpenDrops",
        "GuardrailNoLiveWorkers",
        "GuardrailWorkersCrashing",
        "GuardrailDatabaseUnreachable",
    }
    runbook = (DASHBOARDS.parent / "docs" / "runbook.md").read_text().lower()
    for alert in alerts:
        assert alert["for"] and alert["labels"]["severity"] in {"page", "warning"}
        assert alert["annotations"]["summary"] and alert["annotations"]["runbook_url"]
        anchor = alert["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert f"## {anchor}" in runbook.replace("## ", "## ").lower(), anchor


def test_the_dashboard_uses_the_provisioned_datasource_and_no_import_placeholders() -> None:
    text = DASHBOARD.read_text()
    assert "${DS_" not in text
    dashboard = json.loads(text)
    provisioned = yaml.safe_load(
        (
            DASHBOARDS / "grafana" / "provisioning" / "datasources" / "guardrail-prometheus.yml"
        ).read_text()
    )
    uid = provisioned["datasources"][0]["uid"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
