"""`guardrail dev tiny-model`: a tiny checkpoint of each family goes through export-vision,
explain and the sidecar's auditor with no download."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from detectors.scorers.families import FAMILY_NAMES, family_named
from guardrail.auditor import ModelAuditor
from guardrail.cli import main
from guardrail.config import ModelSettings

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


def test_the_sidecar_audits_with_a_tiny_internvl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from guardrail.reference.tiny_models import INTERNVL_PROMPT, save_tiny_internvl

    model = save_tiny_internvl(tmp_path / "internvl")
    onnx = tmp_path / "vision.onnx"
    assert main(["export-vision", str(model), "--out", str(onnx)]) == 0
    capsys.readouterr()
    auditor = ModelAuditor(
        ModelSettings(name="internvl", path=model, family="internvl", onnx=onnx, n_regions=8)
    )
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    result = auditor.audit(image, INTERNVL_PROMPT, None, "a cat on the table")
    assert [w[2] for w in result.words] == ["cat", "table"]
    assert len(result.verdicts) == 2 and result.forward_passes > 0
    assert all("internvl-fast" in a.scorer_name for a in result.attributions)
    assert all("vision=onnx:CPUExecutionProvider" in a.scorer_name for a in result.attributions)
