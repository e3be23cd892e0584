"""The shipped reference model: files, checksum, generation, scoring, and the CLI around it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detectors import Fill, Target, grid_partition
from detectors.reference import CAPTION_PROMPT, MODEL_DIR, SceneKind, generate_scene
from detectors.scorers import MaskedBatch, Scorer
from detectors.scorers.families.llava import LlavaModel, LlavaScorer, ModelLoadError, load_llava
from guardrail.cli import main
from guardrail.reference.training import weights_checksum
from guardrail.service.images import write_image


@pytest.fixture(scope="module")
def llava() -> LlavaModel:
    return load_llava(MODEL_DIR)


def test_shipped_files_match_the_recorded_checksum() -> None:
    record = json.loads((MODEL_DIR / "training.json").read_text())
    assert weights_checksum(MODEL_DIR) == record["sha256"]
    size = sum(f.stat().st_size for f in MODEL_DIR.iterdir())
    assert size < 25 * 2**20
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (MODEL_DIR / name).is_file(), name


def test_it_describes_clean_scenes(llava: LlavaModel) -> None:
    scenes = [generate_scene(11_000_000 + i, SceneKind.CLEAN) for i in range(16)]
    captions = llava.generate_batch([s.image for s in scenes], [CAPTION_PROMPT] * len(scenes))
    exact = np.mean([c.text == s.caption for c, s in zip(captions, scenes, strict=True)])
    assert exact >= 0.7


def test_scorer_equals_a_plain_forward_per_masked_image(llava: LlavaModel) -> None:
    import torch

    scene = generate_scene(11_000_001, SceneKind.CLEAN)
    generation = llava.generate(scene.image, CAPTION_PROMPT)
    scorer = LlavaScorer(llava, scene.image, CAPTION_PROMPT, generation.token_ids, max_batch_size=3)
    assert isinstance(scorer, Scorer)
    targets = [
        Target(position=i, token_id=t, text=str(i)) for i, t in enumerate(generation.token_ids[:2])
    ]
    partition = grid_partition(scene.image, 3, 3)
    keep = np.random.default_rng(0).random((5, 9)) > 0.4
    batch = MaskedBatch(image=scene.image, partition=partition, keep=keep, fill=Fill.MEAN)
    fast = scorer.score(batch, targets)
    for row, pixels in enumerate(batch.pixels()):
        encoded = llava.processor(images=[pixels], text=[CAPTION_PROMPT], return_tensors="pt")
        ids = torch.cat([encoded["input_ids"], torch.tensor([list(generation.token_ids)])], 1)
        with torch.inference_mode():
            logits = llava.model(input_ids=ids, pixel_values=encoded["pixel_values"]).logits
        width = encoded["input_ids"].shape[1]
        for col, t in enumerate(targets):
            p = torch.softmax(logits[0, width + t.position - 1].float(), -1)[t.token_id]
            assert fast[row, col] == pytest.approx(float(p), abs=1e-5)


def test_scorer_refuses_targets_it_did_not_generate(llava: LlavaModel) -> None:
    from detectors.errors import InvalidTargetError

    scene = generate_scene(3)
    scorer = LlavaScorer(llava, scene.image, CAPTION_PROMPT, [20, 10, 3])
    batch = MaskedBatch(
        image=scene.image,
        partition=grid_partition(scene.image, 2, 2),
        keep=np.ones((1, 4), dtype=np.bool_),
    )
    with pytest.raises(InvalidTargetError, match="outside the 3 generated tokens"):
        scorer.score(batch, [Target(position=5, token_id=3)])
    with pytest.raises(InvalidTargetError, match="generated 20 there"):
        scorer.score(batch, [Target(position=0, token_id=21)])


def test_loading_refuses_what_is_not_a_llava_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_llava(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_llava(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(ModelLoadError, match="supported: LlavaForConditionalGeneration"):
        load_llava(tmp_path)


def test_generate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scene = generate_scene(11_000_002, SceneKind.CLEAN)
    write_image(tmp_path / "scene.png", scene.image)
    assert main(["reference", "generate", str(tmp_path / "scene.png")]) == 0
    said = capsys.readouterr().out.strip()
    assert said.endswith(".") and len(said.split()) >= 2
    name = scene.objects[0].name
    assert main(["reference", "generate", str(tmp_path / "scene.png"), "--question", name]) == 0
    assert capsys.readouterr().out.strip() in ("yes .", "no .")


def test_explain_command_writes_heatmaps_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scene = generate_scene(11_000_003, SceneKind.COOCCURRENCE_TRAP)
    write_image(tmp_path / "trap.png", scene.image)
    out = tmp_path / "out"
    code = main(
        [
            "explain",
            str(tmp_path / "trap.png"),
            "--out",
            str(out),
            "--regions",
            "24",
            "--allow-uncalibrated",
        ]
    )
    assert code == 0
    report = json.loads((out / "explanation.json").read_text())
    assert report["words"], report["output"]
    for word in report["words"]:
        assert (out / word["heatmap"]).read_bytes()[:4] == b"\x89PNG"
        assert word["verdict"]["label"] in {
            "grounded",
            "language_prior",
            "borrowed_evidence",
            "undetermined",
        }
        assert word["attribution"]["forward_passes"] >= 0  # shared masks come from the cache
    assert sum(w["attribution"]["forward_passes"] for w in report["words"]) > 0
    table = capsys.readouterr().out
    assert "verdict" in table and report["words"][0]["word"] in table


def test_missing_image_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(tmp_path / "nope.png"), "--out", str(tmp_path)]) == 2
    assert "FileNotFoundError: no image file" in capsys.readouterr().err


def test_training_pixels_match_the_shipped_image_processor(llava: LlavaModel) -> None:
    from guardrail.reference.training import pixel_values

    images = np.stack([generate_scene(s).image for s in range(3)])
    ours = pixel_values(images).numpy()
    theirs = llava.pixel_values(list(images)).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
