from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.exc import ArgumentError

from guardrail import __version__
from guardrail.cli import main
from guardrail.demo.background_server import closed_port, free_port
from storage.engine import HEAD, check_migrated, make_engine, upgrade


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert f"guardrail {__version__}" in out and "explain-case" in out


def test_explain_case_prints_verdicts_and_writes_a_heatmap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "h.png"
    assert (
        main(["explain-case", "borrowed_evidence", "--regions", "16", "--heatmap", str(png)]) == 0
    )
    out = capsys.readouterr().out
    assert "borrowed_evidence" in out and "knife" in out and "fork" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_expected_failures_print_a_message_not_a_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "guardrail", "explain-case", "nope"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("ValueError: unknown analytic case")
    assert "Traceback" not in proc.stderr


def test_export_vision_writes_a_verified_onnx_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from detectors.reference import MODEL_DIR

    out = tmp_path / "vision.onnx"
    assert main(["export-vision", str(MODEL_DIR), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and report["bytes"] == out.stat().st_size
    assert report["max_abs_diff_real"] <= 1e-4 and report["output_shape"][1:] == [36, 128]
    missing = tmp_path / "nowhere"
    assert main(["export-vision", str(missing), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_db_upgrade_and_current(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    assert main(["db", "current", "--url", url]) == 1
    assert "needs `guardrail db upgrade`" in capsys.readouterr().out
    assert main(["db", "upgrade", "--url", url]) == 0
    assert f"schema at revision {HEAD}" in capsys.readouterr().out
    assert main(["db", "current", "--url", url]) == 0


COMMANDS = [["db", "current"], ["db", "upgrade"], ["serve"], ["worker"], ["report"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_database_url_mistakes_and_outages_are_one_line_errors(
    command: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GUARDRAIL_CONFIG", raising=False)
    with closed_port() as port:  # nothing listens there, nor can meanwhile
        monkeypatch.setenv("GUARDRAIL_PORT", str(free_port()))  # serve's own, never the default
        missing = tmp_path / "missing" / "g.db"
        cases = [
            ("not a url", "ArgumentError: database URL 'not a url' is not usable"),
            (
                "postgres+nodriver://u:hunter2@db/x",
                "NoSuchModuleError: database URL 'postgres+nodriver://u:***@db/x' is not usable",
            ),
            (
                f"postgresql+psycopg://u:hunter2@127.0.0.1:{port}/x",
                f"OperationalError: cannot use the database postgresql+psycopg://u:***@127.0.0.1:{port}/x:",
            ),
            (
                f"sqlite:///{missing}",
                f"OperationalError: cannot use the database sqlite:///{missing}: "
                "unable to open database file",
            ),
        ]
        for url, expected in cases:
            monkeypatch.setenv("GUARDRAIL_DATABASE_URL", url)
            assert main(command) == 2, url
            err = capsys.readouterr().err
            assert err.startswith(expected), err
            assert err.count("\n") == 1 and "Traceback" not in err and "hunter2" not in err


def test_sqlalchemy_errors_from_elsewhere_keep_their_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import guardrail.commands.db

    def bug(_args: object) -> int:
        raise ArgumentError("a bug in a query, not a database URL")

    monkeypatch.setattr(guardrail.commands.db, "_current", bug)
    with pytest.raises(ArgumentError, match="a bug in a query"):
        main(["db", "current", "--url", "sqlite://"])


def test_config_check_masks_every_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GUARDRAIL_CONFIG", raising=False)
    env = {
        "DATABASE_URL": "postgresql+psycopg://u:hunter2@db:5432/g?password=pw2&sslmode=require",
        "UPSTREAM_URL": "https://user:upw@api.example.com/v1?api-key=k3y&api-version=2024-02-01",
        "WEBHOOK_URL": "https://hooks.slack.com/services/T0001/B0001/sl4cksecret",
        "PUBLIC_URL": "https://admin:pubpw@guard.example.com",
    }
    for key, value in env.items():
        monkeypatch.setenv(f"GUARDRAIL_{key}", value)
    assert main(["config", "check"]) == 0
    out = capsys.readouterr().out
    for secret in ("hunter2", "pw2", "upw", "k3y", "T0001", "sl4cksecret", "pubpw"):
        assert secret not in out
    data = json.loads(out)
    assert (
        data["database_url"] == "postgresql+psycopg://u:***@db:5432/g?password=***&sslmode=require"
    )
    assert data["upstream_url"] == (
        "https://****@api.example.com/v1?api-key=****&api-version=2024-02-01"
    )
    assert data["webhook_url"] == "https://hooks.slack.com/****"
    assert data["public_url"] == "https://****@guard.example.com"
    # a token-like query value or path segment is masked whatever its name
    monkeypatch.setenv("GUARDRAIL_UPSTREAM_URL", "https://h/k/sk-ABCDEFGHIJ0123456789/v1?q=x")
    assert main(["config", "check"]) == 0
    assert json.loads(capsys.readouterr().out)["upstream_url"] == "https://h/k/****/v1?q=x"


def test_readiness_probes_do_not_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`check_migrated` runs on every /readyz: Alembic used to log two INFO lines each time."""
    engine = make_engine(f"sqlite:///{tmp_path / 'g.db'}")
    upgrade(engine)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            check_migrated(engine)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
