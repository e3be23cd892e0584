"""The Kubernetes manifests (deploy/kubernetes) render with kustomize and validate as they are:
core kinds against the Kubernetes API schemas (kubernetes-validate, strict: unknown fields are
errors), the Prometheus Operator and KEDA kinds against their CRD schemas (as the
cloudcoil-models-* packages carry them), and what the guardrail needs of them is checked."""

from __future__ import annotations

import copy
import functools
import importlib.util
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from detectors.reference import MODEL_DIR
from guardrail.config import Settings, load_settings
from guardrail.service.metrics import Metrics
from tests.deploy.tools import KUBERNETES, ROOT, executable

OVERLAYS = ["base", "overlays/cpu", "overlays/gpu"]
# the oldest Kubernetes still supported upstream when this was written, and the newest the
# validator knows
KUBERNETES_VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]
RULES = ROOT / "dashboards" / "prometheus" / "guardrail-rules.yml"
# paths that exist inside the images only: the shipped reference model's stable path
IMAGE_PATHS = {"/opt/guardrail/models/reference": str(MODEL_DIR)}

Doc = dict[str, Any]


@functools.cache
def _render(overlay: str) -> list[Doc]:
    kubectl = executable(
        "kubectl", "GUARDRAIL_REQUIRE_KUBECTL", "kubectl with kustomize: `kubectl kustomize DIR`"
    )
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _one(docs: list[Doc], kind: str, name_prefix: str = "") -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, f"{kind} {name_prefix!r}: {len(found)} found"
    return found[0]


def _closed(schema: Any) -> Any:
    """A pydantic-generated JSON schema made as strict as the API server's: objects with
    declared properties refuse others, and optional fields are not nullable."""
    if isinstance(schema, dict):
        options = schema.get("anyOf")
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            schema = {k: v for k, v in schema.items() if k != "anyOf"}
            if len(rest) == 1:
                schema.update(rest[0])
            else:
                schema["anyOf"] = rest
        schema = {k: _closed(v) for k, v in schema.items()}
        if schema.get("type") == "object" and "properties" in schema:
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@functools.cache
def _crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    # the Prometheus Operator's and KEDA's CRD schemas, as generated models (Apache-2.0)
    from cloudcoil.models.keda.v1alpha1 import ScaledObject
    from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

    out = {}
    for model, api_version in (
        (ServiceMonitor, "monitoring.coreos.com/v1"),
        (PrometheusRule, "monitoring.coreos.com/v1"),
        (ScaledObject, "keda.sh/v1alpha1"),
    ):
        schema = _closed(model.model_json_schema(by_alias=True, mode="validation"))
        out[(api_version, model.__name__)] = jsonschema.Draft202012Validator(schema)
    return out


def _validate(doc: Doc) -> None:
    key = (doc["apiVersion"], doc["kind"])
    crds = _crd_validators()
    if key in crds:
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crds[key].iter_errors(doc)
        ]
        assert not errors, f"{key} {doc['metadata']['name']}: {errors}"
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{key} {doc['metadata']['name']} on Kubernetes {version}: {exc}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_validates_against_its_schema(overlay: str) -> None:
    docs = _render(overlay)
    kinds = sorted({d["kind"] for d in docs})
    for kind in (
        "ConfigMap",
        "Deployment",
        "Job",
        "PodDisruptionBudget",
        "PrometheusRule",
        "ScaledObject",
        "Secret",
        "Service",
        "ServiceMonitor",
    ):
        assert kind in kinds, kinds
    for doc in docs:
        _validate(doc)


def test_the_validators_catch_mistakes() -> None:
    docs = _render("base")
    deployment = copy.deepcopy(_one(docs, "Deployment", "guardrail-worker"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    scaled = copy.deepcopy(_one(docs, "ScaledObject"))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 10  # KEDA wants strings
    with pytest.raises(AssertionError, match="not of type 'string'"):
        _validate(scaled)
    monitor = copy.deepcopy(_one(docs, "ServiceMonitor"))
    monitor["spec"]["endpoint"] = monitor["spec"].pop("endpoints")
    with pytest.raises(AssertionError, match="endpoint"):
        _validate(monitor)


def test_the_prometheus_rule_is_the_shipped_rules_file() -> None:
    spec = importlib.util.spec_from_file_location(
        "render_prometheusrule", KUBERNETES / "render_prometheusrule.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.OUT.read_text() == script.render(RULES.read_text()), (
        "base/prometheusrule.yaml is stale: run python deploy/kubernetes/render_prometheusrule.py"
    )
    shipped = yaml.safe_load(RULES.read_text())
    for overlay in OVERLAYS:
        rule = _one(_render(overlay), "PrometheusRule")
        assert rule["spec"] == shipped, overlay


def _pod_specs(docs: list[Doc]) -> dict[str, Doc]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in ("Deployment", "Job")
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_and_reach_their_config(overlay: str) -> None:
    docs = _render(overlay)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    fields = set(Settings.model_fields)
    secret = _one(docs, "Secret", "guardrail-secrets")
    for name, spec in _pod_specs(docs).items():
        # a Service named guardrail would set GUARDRAIL_PORT=tcp://... in every pod
        assert spec["enableServiceLinks"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == 10001, name  # the image's user
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            for source in container.get("envFrom", []):
                assert ("Secret", source["secretRef"]["name"]) in names, name
            for env in container.get("env", []):
                key = env["name"].removeprefix("GUARDRAIL_").lower()
                assert env["name"] == "GUARDRAIL_CONFIG" or key in fields, env
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])}, name
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, volume
    for key in secret["stringData"]:
        assert key.startswith("GUARDRAIL_") and key.removeprefix("GUARDRAIL_").lower() in fields


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_settings_file_is_valid(overlay: str, tmp_path: Path) -> None:
    docs = _render(overlay)
    config = _one(docs, "ConfigMap", "guardrail-config")
    text = config["data"]["guardrail.toml"]
    for inside, here in IMAGE_PATHS.items():
        text = text.replace(inside, here)
    path = tmp_path / "guardrail.toml"
    path.write_text(text)
    settings = load_settings(path, environ={})  # every key is known and valid
    assert settings.log_format == "json" and settings.workers == 0
    # and with the Secret's variables over it, as the pods see them
    secret = _one(docs, "Secret", "guardrail-secrets")["stringData"]
    with_secret = load_settings(path, environ=secret)
    assert with_secret.database_url.get_secret_value() == secret["GUARDRAIL_DATABASE_URL"]
    assert with_secret.database_url.get_secret_value().startswith("postgresql+psycopg://")
    if overlay.endswith("gpu"):
        assert [m.device for m in settings.models] == ["cuda"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_services_and_scaling_fit_the_guardrail(overlay: str) -> None:
    docs = _render(overlay)
    specs = _pod_specs(docs)
    api = specs["guardrail"]["containers"][0]
    assert api["args"] == ["serve"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # /readyz never touches the database: an outage does not take the proxy out of service
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"name": "GUARDRAIL_HOST", "value": "0.0.0.0"} in api["env"]
    worker_deployment = _one(docs, "Deployment", "guardrail-worker")
    worker = specs["guardrail-worker"]["containers"][0]
    assert worker["args"][0] == "worker"
    assert "replicas" not in worker_deployment["spec"]  # KEDA owns the count
    gpus = worker["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus == 1) if overlay.endswith("gpu") else gpus is None
    if overlay.endswith("gpu"):
        assert worker["image"].startswith("eagle-guardrail-cuda:")
    job = specs["guardrail-migrate"]["containers"][0]
    assert job["args"] == ["db", "upgrade"]

    # every named port a probe or a Service uses exists on the pods the Service selects
    for kind_name, spec in specs.items():
        for container in spec["containers"]:
            ports = {p["name"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe in container:
                    assert container[probe]["httpGet"]["port"] in ports, kind_name
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    services = [d for d in docs if d["kind"] == "Service"]
    for service in services:
        selector = service["spec"]["selector"]
        pods = [
            d
            for d in deployments
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, service["metadata"]["name"]
        container_ports = {
            p["name"] for c in pods[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, service["metadata"]["name"]

    # the ServiceMonitor scrapes both Services' /metrics ports
    monitor = _one(docs, "ServiceMonitor")
    labels = monitor["spec"]["selector"]["matchLabels"].items()
    scraped = {
        p["name"]
        for s in services
        if labels <= s["metadata"].get("labels", {}).items()
        for p in s["spec"]["ports"]
    }
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == scraped == {"http", "metrics"}

    # KEDA scales the worker Deployment on a metric the sidecar exports
    scaled = _one(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker_deployment["metadata"]["name"]
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == "max(guardrail_queue_depth)"
    assert float(trigger["metadata"]["threshold"]) > 0
    backlog = {m.name for m in Metrics.create().backlog.describe()}
    assert "guardrail_queue_depth" in backlog
