"""Settings come from the environment mapping and the TOML file handed to `load_settings`; the
process's `os.environ` is read only when no mapping is given, and never written."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from guardrail.cli import main
from guardrail.config import database_url, load_settings


def _toml(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_environment_beats_the_toml_file_and_keywords_beat_both(tmp_path: Path) -> None:
    config = _toml(tmp_path, "g.toml", 'database_url = "sqlite:///toml.db"\nworkers = 3\n')
    settings = load_settings(config, environ={"GUARDRAIL_WORKERS": "5"})
    assert settings.workers == 5  # env over TOML
    assert settings.database_url.get_secret_value() == "sqlite:///toml.db"  # TOML over default
    assert load_settings(config, environ={"GUARDRAIL_WORKERS": "5"}, workers=7).workers == 7
    # GUARDRAIL_CONFIG in the given mapping names the file
    found = load_settings(environ={"GUARDRAIL_CONFIG": str(config)})
    assert (found.workers, found.config_file) == (3, config)


def test_double_underscore_nests_into_tables(tmp_path: Path) -> None:
    config = _toml(
        tmp_path, "g.toml", '[otel_resource_attributes]\nteam = "vision"\nregion = "eu"\n'
    )
    environ = {"GUARDRAIL_OTEL_RESOURCE_ATTRIBUTES__REGION": "us"}
    settings = load_settings(config, environ=environ)
    # the variable replaces one key of the table, the file's other keys stay
    assert settings.otel_resource_attributes == {"team": "vision", "region": "us"}


def test_os_environ_is_neither_written_nor_read_when_a_mapping_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_settings(environ={})  # first-time imports (OpenCV sets LD_LIBRARY_PATH) happen here
    monkeypatch.setenv("GUARDRAIL_WORKERS", "9")
    before = dict(os.environ)
    settings = load_settings(environ={"GUARDRAIL_STORE_RAW": "true"})
    assert settings.workers != 9 and settings.store_raw  # only the given mapping counts
    assert dict(os.environ) == before
    assert load_settings().workers == 9  # no mapping: the process's environment, read


def test_two_threads_load_different_settings_at_once(tmp_path: Path) -> None:
    configs = [
        _toml(tmp_path, f"{i}.toml", f'database_url = "sqlite:///db{i}.db"\n') for i in range(2)
    ]
    load_settings(environ={})  # warm the imports
    barrier = threading.Barrier(2)
    seen: dict[int, list[tuple[str, int]]] = {0: [], 1: []}
    failures: list[BaseException] = []

    def load(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(30):
                s = load_settings(configs[i], environ={"GUARDRAIL_WORKERS": str(i + 1)})
                seen[i].append((s.database_url.get_secret_value(), s.workers))
        except BaseException as exc:  # surfaced below
            failures.append(exc)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the old os.environ swap mixed them up
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures
    for i in range(2):
        assert set(seen[i]) == {(f"sqlite:///db{i}.db", i + 1)}


def test_db_resolves_its_url_from_config_or_environment_without_the_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'from-toml.db'}"
    # the models' directory does not exist here (a migration job without the volume)
    config = _toml(
        tmp_path,
        "g.toml",
        f'database_url = "{url}"\n[[models]]\nname = "m"\npath = "/nowhere"\n',
    )
    assert database_url(config, {}) == url
    assert database_url(config, {"GUARDRAIL_DATABASE_URL": "sqlite:///env.db"}) == (
        "sqlite:///env.db"
    )
    monkeypatch.delenv("GUARDRAIL_DATABASE_URL", raising=False)
    monkeypatch.delenv("GUARDRAIL_CONFIG", raising=False)
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert "from-toml.db: schema at revision" in capsys.readouterr().out
    assert (tmp_path / "from-toml.db").is_file()
    assert main(["db", "current", "--config", str(tmp_path / "missing.toml")]) == 2
    assert capsys.readouterr().err.startswith("ConfigError: config file")
