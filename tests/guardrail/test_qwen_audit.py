"""Auditing a Qwen2.5-VL model end to end, with its vision tower exported to ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from guardrail.cli import main
from guardrail.config import ModelSettings
from guardrail.reference.tiny_models import QWEN_PROMPT, save_tiny_qwen
from guardrail.service.auditor import ModelAuditor


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen(tmp_path_factory.mktemp("qwen"), image_size=56)


def test_export_vision_cli_exports_a_qwen_model_for_one_input_size(
    qwen_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q.onnx"
    assert main(["export-vision", str(qwen_dir), "--out", str(out), "--input-size", "56x56"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "qwen2_5_vl" and out.is_file()
    assert report["input_shape"][1:] == [3, 56, 56] and report["output_shape"][1:] == [4, 64]
    assert report["max_abs_diff_real"] <= 1e-4
    bad = tmp_path / "bad.onnx"
    assert main(["export-vision", str(qwen_dir), "--out", str(bad), "--input-size", "50x56"]) == 2
    assert "multiple of patch x merge" in capsys.readouterr().err and not bad.exists()
    with pytest.raises(SystemExit):
        main(["export-vision", str(qwen_dir), "--out", str(bad), "--input-size", "big"])


def test_qwen_auditor_scores_with_onnx_and_falls_back_to_torch_for_other_sizes(
    qwen_dir: Path, tmp_path: Path
) -> None:
    onnx = tmp_path / "q.onnx"
    assert main(["export-vision", str(qwen_dir), "--out", str(onnx), "--input-size", "56x56"]) == 0
    auditor = ModelAuditor(
        ModelSettings(name="qwen", path=qwen_dir, family="qwen2_5_vl", onnx=onnx, n_regions=8)
    )
    rng = np.random.default_rng(0)
    square = rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)
    result = auditor.audit(square, QWEN_PROMPT, None, "a cat on the table")
    assert [w.word for w in result.words] == ["cat", "table"]
    assert result.attributions and result.forward_passes > 0
    assert all("vision=onnx:CPUExecutionProvider" in a.scorer_name for a in result.attributions)
    # the processor keeps a 28x112 image at 28x112: not what the file was exported for
    wide = rng.integers(0, 255, (28, 112, 3), dtype=np.uint8)
    result = auditor.audit(wide, QWEN_PROMPT, None, "a cat on the table")
    assert result.attributions
    assert all("vision=torch" in a.scorer_name for a in result.attributions)


def test_qwen_auditor_serves_a_directory_of_vision_files_one_per_size(
    qwen_dir: Path, tmp_path: Path
) -> None:
    from detectors.scorers.vision import OnnxMismatchError

    files = tmp_path / "vision"
    for size in ("56x56", "28x112"):
        out = str(files / f"q-{size}.onnx")
        assert main(["export-vision", str(qwen_dir), "--out", out, "--input-size", size]) == 0
    auditor = ModelAuditor(
        ModelSettings(name="qwen", path=qwen_dir, family="qwen2_5_vl", onnx=files, n_regions=8)
    )
    assert sorted(auditor.load().visions) == [(28, 112), (56, 56)]
    rng = np.random.default_rng(0)
    for shape in ((56, 56, 3), (28, 112, 3)):
        image = rng.integers(0, 255, shape, dtype=np.uint8)
        result = auditor.audit(image, QWEN_PROMPT, None, "a cat on the table")
        assert result.attributions
        assert all("vision=onnx" in a.scorer_name for a in result.attributions)
    # two files for one size are refused when the model loads
    assert (
        main(
            [
                "export-vision",
                str(qwen_dir),
                "--out",
                str(files / "again.onnx"),
                "--input-size",
                "56x56",
            ]
        )
        == 0
    )
    again = ModelAuditor(ModelSettings(name="qwen", path=qwen_dir, family="qwen2_5_vl", onnx=files))
    with pytest.raises(OnnxMismatchError, match="both serve 56x56"):
        again.load()


def test_qwen_auditor_counts_the_image_tokens_against_the_context(tmp_path: Path) -> None:
    """At 224 x 224 the one placeholder stands for 64 image tokens: an output that fits beside
    the bare prompt text but not beside the expanded image is refused before any scoring."""
    from guardrail.service.auditor import AuditInputError

    model_dir = save_tiny_qwen(tmp_path / "q224", image_size=224)
    auditor = ModelAuditor(ModelSettings(name="q", path=model_dir, family="qwen2_5_vl"))
    tokenizer = auditor.load().tokenizer
    bare = len(tokenizer(QWEN_PROMPT).input_ids)
    ids = auditor.tokenize("a cat on the table")
    ids = (ids * 1024)[: 1024 - bare - 10]
    image = np.zeros((224, 224, 3), dtype=np.uint8)
    with pytest.raises(AuditInputError, match="over the model's 1024 positions"):
        auditor.audit(image, QWEN_PROMPT, ids, "")


def test_qwen_greedy_generation_is_the_argmax_under_teacher_forcing(qwen_dir: Path) -> None:
    """What `generate` says is what a full forward over prompt + output ranks first at every
    step: the image tokens, rope positions and placeholder expansion agree."""
    import torch

    from detectors.scorers.families.qwen2_5_vl import load_qwen

    qwen = load_qwen(qwen_dir)
    image = np.random.default_rng(4).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    said = qwen.generate(image, QWEN_PROMPT, max_new_tokens=6)
    assert len(said.token_ids) >= 1
    prompt = qwen.prompt_ids(QWEN_PROMPT, image)
    ids = torch.tensor([prompt + list(said.token_ids)])
    pixels, grid = qwen.pixel_inputs([image])
    with torch.inference_mode():
        logits = qwen.model(
            input_ids=ids,
            pixel_values=pixels,
            image_grid_thw=grid,
            mm_token_type_ids=(ids == qwen.image_token_id).int(),
        ).logits[0]
    steps = range(len(prompt) - 1, len(prompt) - 1 + len(said.token_ids))
    assert [int(logits[i].argmax()) for i in steps] == list(said.token_ids)


def test_explain_command_explains_a_qwen_output_with_onnx_vision(
    qwen_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from guardrail.service.images import write_image

    image = np.random.default_rng(5).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    write_image(tmp_path / "in.png", image)
    onnx = tmp_path / "q.onnx"
    assert main(["export-vision", str(qwen_dir), "--out", str(onnx), "--input-size", "56x56"]) == 0
    out = tmp_path / "out"
    args = ["explain", str(tmp_path / "in.png"), "--model", str(qwen_dir), "--out", str(out)]
    code = main([*args, "--output", "a cat on the table", "--onnx", str(onnx), "--regions", "8"])
    assert code == 0
    report = json.loads((out / "explanation.json").read_text())
    assert [w["word"] for w in report["words"]] == ["cat", "table"]
    assert "vision=onnx:CPUExecutionProvider" in report["scorer"]
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    # without --output the model generates one, from a caption prompt in its own format
    assert main([*args, "--regions", "8"]) == 0
    report = json.loads((out / "explanation.json").read_text())
    assert "<|image_pad|>" in report["prompt"] and report["token_ids"]
    assert "vision=torch" in report["scorer"]


def test_explain_command_explains_one_output_over_several_images(
    qwen_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from guardrail.service.images import write_image

    rng = np.random.default_rng(6)
    paths = []
    for i, shape in enumerate([(56, 56, 3), (28, 56, 3)]):
        paths.append(tmp_path / f"in{i}.png")
        write_image(paths[-1], rng.integers(0, 255, shape, dtype=np.uint8))
    out = tmp_path / "out"
    args = ["explain", *map(str, paths), "--model", str(qwen_dir), "--out", str(out)]
    assert main([*args, "--output", "a cat on the table", "--regions", "8"]) == 0
    report = json.loads((out / "explanation.json").read_text())
    assert report["image"] == [str(p) for p in paths]
    boxes = report["image_layout"]["boxes"]
    assert len(boxes) == 2 and report["prompt"].count("<|image_pad|>") == 2
    assert [w["word"] for w in report["words"]] == ["cat", "table"]
    for word in report["words"]:
        assert word["attribution"]["partition"].startswith("per-image(")
        assert set(word["compact_set_images"]) <= {0, 1} and word["compact_set_images"]
    capsys.readouterr()
    # several images need the output to audit, and a family that takes several
    assert main(args) == 2
    assert "several images need --output" in capsys.readouterr().err
    from detectors.reference import MODEL_DIR

    llava = ["explain", *map(str, paths), "--out", str(out), "--output", "cat ."]
    assert main([*llava, "--model", str(MODEL_DIR)]) == 2
    assert "at most 1 image(s)" in capsys.readouterr().err
