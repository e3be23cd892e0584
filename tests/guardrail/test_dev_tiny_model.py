"""`guardrail dev tiny-model`: a tiny checkpoint of each family goes through export-vision,
explain and the sidecar's auditor with no download."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from detectors.scorers.families import FAMILY_NAMES, family_named
from guardrail.cli import main
from guardrail.config import ModelSettings
from guardrail.service.auditor import ModelAuditor

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "internvl"])
def test_tiny_model_exports_and_explains(
    family: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / family
    assert main(["dev", "tiny-model", family, "--out", str(model)]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["family"] == family
    assert made["architecture"] == family_named(family).architecture
    names = {p.name for p in model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert names & {"preprocessor_config.json", "processor_config.json"}
    # the family's special tokens are single tokens of the shipped vocabulary plus them
    loaded = family_named(family).load(model)
    placeholder = family_named(family).image_placeholder
    assert len(loaded.tokenizer(placeholder, add_special_tokens=False).input_ids) == 1
    assert loaded.tokenizer("a cat .", add_special_tokens=False).input_ids[1] != (
        loaded.tokenizer.unk_token_id
    )

    onnx = model / "vision.onnx"
    assert main(["export-vision", str(model), "--out", str(onnx)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert onnx.is_file() and report["family"] == family
    assert max(report["max_abs_diff_random"], report["max_abs_diff_real"]) <= 1e-4

    out = tmp_path / "explained"
    args = ["explain", str(EXAMPLE), "--model", str(model), "--onnx", str(onnx)]
    assert main([*args, "--output", "a cat .", "--out", str(out)]) == 0
    assert "cat" in capsys.readouterr().out
    explanation = json.loads((out / "explanation.json").read_text())
    assert explanation["output"] == "a cat ."
    assert [w["word"] for w in explanation["words"]] == ["cat"]
    assert "vision=onnx:CPUExecutionProvider" in explanation["scorer"]
    for name in ("image.png", "summary.png", explanation["words"][0]["heatmap"]):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_tiny_model_refuses_an_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["dev", "tiny-model", "blip", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_the_config_takes_its_families_from_the_registry(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="family must be one of llava, qwen2_5_vl, internvl"):
        ModelSettings(name="m", path=tmp_path, family="blip")
    assert set(FAMILY_NAMES) == {"llava", "qwen2_5_vl", "internvl"}


@pytest.fixture(scope="module")
def tiny_internvl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny InternVL (the small word vocabulary: "table" is a word of it) and its ONNX
    vision file."""
    from detectors.scorers.onnx_export import export_vision
    from guardrail.reference.tiny_models import save_tiny_internvl

    model = save_tiny_internvl(tmp_path_factory.mktemp("internvl"))
    onnx = model / "vision.onnx"
    export_vision(family_named("internvl").load(model), onnx)
    return model, onnx


def test_the_auditor_audits_with_a_tiny_internvl(tiny_internvl: tuple[Path, Path]) -> None:
    from guardrail.reference.tiny_models import INTERNVL_PROMPT

    model, onnx = tiny_internvl
    auditor = ModelAuditor(
        ModelSettings(name="internvl", path=model, family="internvl", onnx=onnx, n_regions=8)
    )
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    result = auditor.audit(image, INTERNVL_PROMPT, None, "a cat on the table")
    assert [w.word for w in result.words] == ["cat", "table"]
    assert len(result.verdicts) == 2 and result.forward_passes > 0
    assert all("internvl-fast" in a.scorer_name for a in result.attributions)
    assert all("vision=onnx:CPUExecutionProvider" in a.scorer_name for a in result.attributions)


def test_the_sidecar_serves_an_internvl_audit(
    tiny_internvl: tuple[Path, Path], tmp_path: Path
) -> None:
    """A sample for a configured InternVL model goes in over HTTP, a worker audits it, and
    the result comes back out with the InternVL scorer's provenance."""
    import base64

    from fastapi.testclient import TestClient

    from guardrail.config import load_settings
    from guardrail.reference.tiny_models import INTERNVL_PROMPT
    from guardrail.service.api import create_app
    from guardrail.service.images import encode_png, read_image
    from guardrail.service.runtime import build_runtime
    from guardrail.service.worker import Worker
    from storage.engine import upgrade

    model, onnx = tiny_internvl
    token = "s3cret-token-0001"
    auth = {"Authorization": f"Bearer {token}"}
    settings = load_settings(
        environ={},
        database_url=f"sqlite:///{tmp_path / 'g.db'}",
        api_tokens=[token],
        models=[
            {
                "name": "tiny-internvl",
                "path": str(model),
                "family": "internvl",
                "onnx": str(onnx),
                "n_regions": 8,
            }
        ],
    )
    runtime = build_runtime(settings)
    upgrade(runtime.engine)
    client = TestClient(create_app(runtime))
    image = base64.b64encode(encode_png(read_image(EXAMPLE))).decode()
    body = {
        "model": "tiny-internvl",
        "prompt": INTERNVL_PROMPT,
        "output": "a cat on the table",
        "image_base64": image,
    }
    answer = client.post("/v1/samples", json=body, headers=auth)
    assert answer.status_code == 202, answer.text
    sample_id = answer.json()["id"]
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics)
    assert worker.run_once() is True
    view = client.get(f"/v1/samples/{sample_id}", headers=auth).json()
    assert view["status"] == "audited", view
    assert [t["word"] for t in view["tokens"]] == ["cat", "table"]
    scorer = view["tokens"][0]["attribution"]["scorer"]
    assert scorer.startswith("internvl-fast(") and "vision=onnx:CPUExecutionProvider" in scorer
