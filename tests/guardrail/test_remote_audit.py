"""Remote models end to end: configuration, `guardrail explain --remote` against `guardrail
reference serve` (the same verdicts as the local scorer), and a sidecar whose audit workers
score a remote model for traffic sent through its proxy with the `openai` client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from detectors.reference import MODEL_DIR
from guardrail.cli import main
from guardrail.config import ConfigError, load_settings, masked
from guardrail.demo.background_server import (
    BackgroundServer,
    closed_port,
    free_port,
    spawn_guardrail,
)
from guardrail.reference.upstream import create_upstream_app
from guardrail.service.chat import image_messages, user_turn
from storage.engine import make_engine, session_factory
from storage.models import AttributionRecord, Sample

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.png"))


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with BackgroundServer(create_upstream_app(MODEL_DIR)) as url:
        yield url


def _tokenizer_dir(tmp_path: Path) -> Path:
    """The reference checkpoint without its weights: what a remote model's `path` holds."""
    out = tmp_path / "reference-tokenizer"
    out.mkdir()
    for name in os.listdir(MODEL_DIR):
        if not name.endswith(".safetensors"):
            shutil.copy(Path(MODEL_DIR) / name, out / name)
    return out


def test_a_remote_model_in_settings(tmp_path: Path) -> None:
    model = {"name": "llava", "path": str(MODEL_DIR), "scorer": "remote"}
    settings = load_settings(
        environ={},
        upstream_url="http://vllm:8000",
        models=[{**model, "remote_model": "llava-hf/llava-1.5-7b-hf"}],
    )
    remote = settings.models[0]
    assert remote.remote_url == "http://vllm:8000"  # the proxy's upstream by default
    assert remote.remote_model == "llava-hf/llava-1.5-7b-hf" and remote.remote_api_key is None
    with pytest.raises(ConfigError, match="neither remote_url nor upstream_url"):
        load_settings(environ={}, models=[model])
    keyed = {
        **model,
        "remote_url": "https://user:pw@vllm.internal:8000/v1",
        "remote_api_key_env": "VLLM_KEY",
        "remote_max_requests_per_second": 50,
    }
    with pytest.raises(ConfigError, match="environment variable VLLM_KEY is not set"):
        load_settings(environ={}, models=[keyed])
    settings = load_settings(environ={"VLLM_KEY": "sk-live-abcdef"}, models=[keyed])
    assert settings.models[0].remote_api_key == "sk-live-abcdef"
    shown = json.dumps(masked(settings))
    assert "sk-live" not in shown and "pw@" not in shown and "VLLM_KEY" in shown
    assert "sk-live" not in repr(settings)
    # the key travels to the audit processes (spawned with a pickled copy of the settings)
    import pickle

    assert pickle.loads(pickle.dumps(settings)).models[0].remote_api_key == "sk-live-abcdef"
    with pytest.raises(ConfigError, match="remote_url"):
        load_settings(environ={}, models=[{**model, "remote_url": "vllm:8000"}])
    with pytest.raises(ConfigError, match="remote_api_key_env"):
        load_settings(environ={}, models=[{**model, "remote_api_key_env": "sk-pasted-key!"}])


@pytest.mark.parametrize(
    ("prompt", "template", "expected"),
    [
        ("USER: <image> Describe the image. ASSISTANT:", None, ("Describe the image.", True)),
        ("USER: What is this? <image> ASSISTANT:", None, ("What is this?", False)),
        (
            "USER: <image>\nWhat is it? ASSISTANT:",
            "USER: <image>\n{prompt} ASSISTANT:",
            ("What is it?", True),
        ),
        ("Q: hi <image>", None, ("Q: hi", False)),
    ],
)
def test_the_user_turn_is_recovered_from_the_prompt(
    prompt: str, template: str | None, expected: tuple[str, bool]
) -> None:
    assert user_turn(prompt, "<image>", template) == expected


def _explain(image: Path, out: Path, *extra: str) -> dict[str, object]:
    code = main(["explain", str(image), "--out", str(out), *extra])
    assert code == 0
    report: dict[str, object] = json.loads((out / "explanation.json").read_text())
    return report


@pytest.mark.slow
def test_explain_through_the_remote_scorer_gives_the_local_verdicts(
    upstream: str, tmp_path: Path
) -> None:
    assert [p.name for p in EXAMPLES] == ["cup_trap.png", "knife_trap.png"]
    for image in EXAMPLES:
        local = _explain(image, tmp_path / f"local-{image.stem}")
        # the cup's output is given; the knife's is asked of the server (greedy, with its ids)
        given = ["--output", str(local["output"])] if image.stem == "cup_trap" else []
        remote = _explain(
            image,
            tmp_path / f"remote-{image.stem}",
            "--remote",
            upstream,
            "--remote-model",
            "reference",
            *given,
        )
        local_ids, remote_ids = local["token_ids"], remote["token_ids"]
        assert isinstance(local_ids, list) and isinstance(remote_ids, list)
        # a generation ends with </s> (id 3); the given text does not
        assert local_ids == (remote_ids if not given else [*remote_ids, 3])
        assert str(remote["scorer"]) == f"remote({upstream}; model=reference; image=png)"
        local_words, remote_words = local["words"], remote["words"]
        assert isinstance(local_words, list) and isinstance(remote_words, list)
        assert [w["word"] for w in remote_words] == [w["word"] for w in local_words]
        assert len(local_words) >= 3
        for mine, theirs in zip(remote_words, local_words, strict=True):
            assert mine["verdict"]["label"] == theirs["verdict"]["label"], mine["word"]
            assert abs(mine["verdict"]["p_full"] - theirs["verdict"]["p_full"]) <= 1e-4
        stats = remote["remote"]
        assert isinstance(stats, dict)
        passes = sum(w["attribution"]["forward_passes"] for w in remote_words)
        assert stats["rows"] >= passes and stats["failures"] == 0


def test_explain_names_a_server_that_is_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with closed_port() as port:
        code = main(
            [
                "explain",
                str(EXAMPLES[0]),
                "--out",
                str(tmp_path),
                "--remote",
                f"http://127.0.0.1:{port}",
                "--output",
                "cup spoon .",
            ]
        )
    assert code == 2
    err = capsys.readouterr().err
    assert "RemoteUnavailableError: remote(http://127.0.0.1:" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_sidecar_audits_a_remote_model_end_to_end(tmp_path: Path) -> None:
    up_port, side_port = free_port(), free_port()
    tokenizer = _tokenizer_dir(tmp_path)
    model = {
        "name": "reference",
        "path": str(tokenizer),
        "scorer": "remote",
        "remote_model": "reference",
        "remote_concurrency": 2,
        "remote_max_requests_per_second": 200,
        "n_regions": 16,
        "allow_uncalibrated": True,
    }
    env = {
        "GUARDRAIL_DATABASE_URL": f"sqlite:///{tmp_path / 'g.db'}",
        "GUARDRAIL_UPSTREAM_URL": f"http://127.0.0.1:{up_port}",
        "GUARDRAIL_MODELS": json.dumps([model]),
        "GUARDRAIL_WORKERS": "1",
        "GUARDRAIL_SCHEDULER": "false",
        "GUARDRAIL_TORCH_THREADS": "1",
    }
    subprocess.run(
        [sys.executable, "-m", "guardrail", "db", "upgrade"],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
    )
    processes = [
        spawn_guardrail(
            ["reference", "serve", "--port", str(up_port)],
            env,
            f"http://127.0.0.1:{up_port}/v1/models",
        ),
        spawn_guardrail(
            ["serve", "--port", str(side_port)], env, f"http://127.0.0.1:{side_port}/readyz"
        ),
    ]
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{side_port}/v1", api_key="none")
        answer = client.chat.completions.create(
            model="reference",
            messages=image_messages(  # type: ignore[arg-type]
                (ROOT / "examples" / "knife_trap.png").read_bytes(), "Describe the image."
            ),
            extra_headers={"X-Request-Id": "remote-e2e"},
        )
        assert answer.choices[0].message.content == "fork knife car clock ."
        engine = make_engine(env["GUARDRAIL_DATABASE_URL"])
        sessions = session_factory(engine)
        deadline, status = time.time() + 240, None
        while time.time() < deadline:
            with sessions() as session:
                sample = session.query(Sample).one_or_none()
                status = sample.status.value if sample is not None else None
            if status in ("audited", "failed"):
                break
            time.sleep(0.5)
        assert status == "audited"
        with sessions() as session:
            sample = session.query(Sample).one()
            verdicts = {t.word: t.verdict.label if t.verdict else None for t in sample.tokens}
            names = {r.scorer_name for r in session.query(AttributionRecord).all()}
            passes = sum(r.forward_passes for r in session.query(AttributionRecord).all())
        engine.dispose()
        assert set(verdicts) == {"fork", "knife", "car", "clock"}
        assert verdicts["knife"] == "grounded"
        # the scorer and the server, recorded with every attribution
        assert names == {f"remote(http://127.0.0.1:{up_port}; model=reference; image=png)"}
        deadline, sent = time.time() + 10, 0.0
        while time.time() < deadline and sent < passes:
            for line in httpx.get(f"http://127.0.0.1:{side_port}/metrics").text.splitlines():
                if line.startswith('guardrail_remote_requests_total{model="reference"}'):
                    sent = float(line.rsplit(" ", 1)[1])
            time.sleep(0.2)
        assert sent >= passes > 0  # every forward pass was one request, counted by the worker
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
