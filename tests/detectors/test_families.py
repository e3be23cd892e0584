"""The model-family registry, and the InternVL family against transformers' own forward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detectors import Fill, Target
from detectors.errors import ImageTokenError
from detectors.regions import slic_partition
from detectors.scorers import MaskedBatch, Scorer
from detectors.scorers.families import (
    FAMILY_NAMES,
    UnknownArchitectureError,
    family_for_architecture,
    family_named,
    family_of_checkpoint,
)
from detectors.scorers.families.internvl import (
    FastInternVLScorer,
    InternVLModel,
    InternVLScorer,
    internvl_vision_module,
    load_internvl,
)
from detectors.scorers.loading import ModelLoadError
from detectors.scorers.onnx_export import export_vision
from detectors.scorers.vision import OnnxMismatchError
from guardrail.reference.tiny_models import INTERNVL_PROMPT, save_tiny_internvl

PARITY = 1e-5


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_internvl(tmp_path_factory.mktemp("internvl"), image_size=64, patch_size=8)


@pytest.fixture(scope="module")
def internvl(internvl_dir: Path) -> InternVLModel:
    return load_internvl(internvl_dir)


def _sample(model: InternVLModel) -> tuple[np.ndarray, list[int], list[Target]]:
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    generated = [model.tokenizer.convert_tokens_to_ids(w) for w in ["a", "cat", "."]]
    targets = [
        Target(position=1, token_id=generated[1], text="cat"),
        Target(position=2, token_id=generated[2], text="."),
    ]
    return image, generated, targets


def _batch(image: np.ndarray, rows: int, fill: Fill) -> MaskedBatch:
    partition = slic_partition(image, 16)
    keep = np.random.default_rng(0).random((rows, partition.n_regions)) < 0.5
    keep[0], keep[1] = True, False
    return MaskedBatch(image=image, partition=partition, keep=keep, fill=fill)


def _one_by_one(scorer: Scorer, batch: MaskedBatch, targets: list[Target]) -> np.ndarray:
    return np.concatenate(
        [
            scorer.score(
                MaskedBatch(
                    image=batch.image,
                    partition=batch.partition,
                    keep=batch.keep[i : i + 1],
                    fill=batch.fill,
                ),
                targets,
            )
            for i in range(batch.size)
        ]
    )


def test_the_registry_finds_each_family_by_its_architecture() -> None:
    expected = {
        "LlavaForConditionalGeneration": "llava",
        "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
        "InternVLForConditionalGeneration": "internvl",
    }
    for architecture, name in expected.items():
        family = family_for_architecture(architecture)
        assert family.name == name and family.architecture == architecture
        assert family_named(name) is family
        assert family.caption_prompt.count(family.image_placeholder) == 1
        assert family.yes_no_prompt("Is there a cat?").count(family.image_placeholder) == 1
    assert set(FAMILY_NAMES) == set(expected.values())


def test_an_unknown_architecture_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownArchitectureError) as caught:
        family_for_architecture("BertModel")
    message = str(caught.value)
    assert "BertModel" in message
    for architecture in ("Llava", "Qwen2_5_VL", "InternVL"):
        assert f"{architecture}ForConditionalGeneration" in message
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ModelLoadError, match="InternVLForConditionalGeneration"):
        family_of_checkpoint(tmp_path)
    with pytest.raises(UnknownArchitectureError, match="known: llava, qwen2_5_vl, internvl"):
        family_named("blip")


def test_a_checkpoint_is_served_by_its_family(internvl_dir: Path) -> None:
    family = family_of_checkpoint(internvl_dir)
    assert family.name == "internvl"
    with pytest.raises(ModelLoadError, match="supported: LlavaForConditionalGeneration"):
        family_of_checkpoint(internvl_dir, expected="llava")
    with pytest.raises(ModelLoadError, match="supported: InternVLForConditionalGeneration"):
        load_internvl(_llava_config(internvl_dir))


def _llava_config(internvl_dir: Path) -> Path:
    other = internvl_dir.parent / "llava-config"
    other.mkdir(exist_ok=True)
    (other / "config.json").write_text(
        json.dumps({"architectures": ["LlavaForConditionalGeneration"]})
    )
    return other


def test_internvl_prompt_expands_its_placeholder_as_the_processor_does(
    internvl: InternVLModel,
) -> None:
    image, _, _ = _sample(internvl)
    ids = internvl.prompt_ids(INTERNVL_PROMPT, image)
    start, end = internvl.tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
    at = ids.index(start)
    assert internvl.image_tokens() == 16  # (64 / 8 * 0.5)^2
    assert ids[at + 1 : at + 17] == [internvl.image_token_id] * 16 and ids[at + 17] == end
    with pytest.raises(ImageTokenError, match="exactly one image placeholder"):
        internvl.prompt_ids(INTERNVL_PROMPT.replace("<IMG_CONTEXT>", ""), image)
    with pytest.raises(ImageTokenError, match="found 2"):
        internvl.prompt_ids(INTERNVL_PROMPT + " <IMG_CONTEXT>", image)


def test_internvl_audits_the_base_tile_only(internvl: InternVLModel) -> None:
    """The checkpoint's processor tiles dynamically (crop_to_patches, up to 12 tiles); an audit
    sees one tile of the processor's size, whatever the image's shape."""
    assert internvl.image_processor.crop_to_patches is True
    wide = np.zeros((80, 200, 3), dtype=np.uint8)
    assert tuple(internvl.pixel_values([wide]).shape) == (1, 3, 64, 64)
    assert internvl.input_hw(wide) == (64, 64)


def test_internvl_vision_module_equals_transformers_image_features(
    internvl: InternVLModel,
) -> None:
    import torch

    image, _, _ = _sample(internvl)
    pixels = torch.cat([internvl.pixel_values([image]), torch.randn(2, 3, 64, 64)])
    module = internvl_vision_module(internvl.model, internvl.tile_hw)
    with torch.inference_mode():
        ours = module(pixels)
        theirs = internvl.model.model.get_image_features(pixel_values=pixels).pooler_output
    assert ours.shape == (3, 16, 64)
    assert float((ours - theirs).abs().max()) <= 1e-6


@pytest.mark.parametrize(("fill", "chunk"), [(Fill.MEAN, 4), (Fill.BLACK, 16), (Fill.BLUR, 3)])
def test_internvl_fast_path_equals_a_full_forward_per_image(
    internvl: InternVLModel, fill: Fill, chunk: int
) -> None:
    image, generated, targets = _sample(internvl)
    batch = _batch(image, 9, fill)
    plain = InternVLScorer(internvl, image, INTERNVL_PROMPT, generated)
    fast = FastInternVLScorer(internvl, image, INTERNVL_PROMPT, generated, chunk_size=chunk)
    assert isinstance(fast, Scorer)
    want = _one_by_one(plain, batch, targets)
    got = fast.score(batch, targets)
    assert got.shape == (9, 2)
    assert np.abs(got - want).max() <= PARITY
    assert np.ptp(want[:, 0]) > 0  # the masks reach the model
    assert fast.timings.rows == 9 and fast.timings.language_model > 0


def test_internvl_onnx_vision_matches_torch_and_keeps_parity(
    internvl: InternVLModel, internvl_dir: Path, tmp_path: Path
) -> None:
    family = family_named("internvl")
    image, generated, targets = _sample(internvl)
    report = export_vision(internvl, tmp_path / "vision.onnx", real_images=[image])
    assert report.output_shape[1:] == (16, 64)
    assert max(report.max_abs_diff_random, report.max_abs_diff_real) <= 1e-4
    visions = family.open_visions(internvl, report.path)
    vision = visions[internvl.input_hw(image)]
    fast = family.fast_scorer(internvl, image, INTERNVL_PROMPT, generated, vision=vision)
    plain = family.plain_scorer(internvl, image, INTERNVL_PROMPT, generated)
    assert "vision=onnx:CPUExecutionProvider" in fast.name
    batch = _batch(image, 6, Fill.MEAN)
    assert np.abs(fast.score(batch, targets) - _one_by_one(plain, batch, targets)).max() <= PARITY
    with pytest.raises(ValueError, match="base tile"):
        export_vision(internvl, tmp_path / "other.onnx", input_hw=(32, 32))
    other = load_internvl(save_tiny_internvl(tmp_path / "other", seed=1))
    with pytest.raises(OnnxMismatchError, match="exported from another model"):
        family.open_visions(other, report.path)


def test_internvl_greedy_generation_is_the_argmax_under_teacher_forcing(
    internvl: InternVLModel,
) -> None:
    """What `generate` says is what a full forward over prompt + output ranks first at every
    step: the placeholder expansion and the base tile agree with the model's own forward."""
    import torch

    image, _, _ = _sample(internvl)
    said = internvl.generate(image, INTERNVL_PROMPT, max_new_tokens=5)
    assert len(said.token_ids) >= 1
    prompt = internvl.prompt_ids(INTERNVL_PROMPT, image)
    ids = torch.tensor([prompt + list(said.token_ids)])
    with torch.inference_mode():
        logits = internvl.model(input_ids=ids, pixel_values=internvl.pixel_values([image])).logits[
            0
        ]
    steps = range(len(prompt) - 1, len(prompt) - 1 + len(said.token_ids))
    assert [int(logits[i].argmax()) for i in steps] == list(said.token_ids)


def test_internvl_in_bfloat16_stays_close_to_float32(
    internvl: InternVLModel, internvl_dir: Path
) -> None:
    family = family_named("internvl")
    half = family.load(internvl_dir, dtype="bfloat16")
    image, generated, targets = _sample(internvl)
    batch = _batch(image, 4, Fill.MEAN)
    full = family.fast_scorer(internvl, image, INTERNVL_PROMPT, generated).score(batch, targets)
    got = family.fast_scorer(half, image, INTERNVL_PROMPT, generated).score(batch, targets)
    assert np.abs(got - full).max() < 2e-2
