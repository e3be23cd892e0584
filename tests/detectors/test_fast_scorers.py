"""The fast scorers against a plain full forward per masked image, and their misuse errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detectors import Fill, Target
from detectors.errors import ImageTokenError, InvalidImageError, InvalidTargetError
from detectors.reference import CAPTION_PROMPT, MODEL_DIR, SceneKind, generate_scene
from detectors.regions import slic_partition
from detectors.scorers import MaskedBatch, Scorer
from detectors.scorers.families.llava import (
    FastLlavaScorer,
    LlavaModel,
    LlavaScorer,
    llava_onnx_vision,
    llava_vision_module,
    load_llava,
)
from detectors.scorers.families.qwen2_5_vl import (
    FastQwenScorer,
    QwenModel,
    QwenScorer,
    load_qwen,
    patchify,
    qwen_onnx_vision,
    unpatchify,
)
from detectors.scorers.families.qwen2_5_vl_vision import qwen_vision_module
from detectors.scorers.families.registry import model_family
from detectors.scorers.loading import ModelLoadError
from detectors.scorers.onnx_export import ExportMismatchError, export_vision
from detectors.scorers.vision import OnnxMismatchError, TorchVision
from guardrail.reference.tiny_models import (
    LLAVA_PROMPT,
    QWEN_PROMPT,
    save_tiny_llava,
    save_tiny_qwen,
)

PARITY = 1e-5


def _plain(scorer: Scorer, batch: MaskedBatch, targets: list[Target]) -> np.ndarray:
    """One full forward per masked image (the reference implementation's way)."""
    rows = [
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
    return np.concatenate(rows)


def _batch(image: np.ndarray, regions: int, rows: int, fill: Fill, seed: int = 0) -> MaskedBatch:
    partition = slic_partition(image, regions)
    keep = np.random.default_rng(seed).random((rows, partition.n_regions)) < 0.5
    keep[0] = True
    keep[1] = False
    return MaskedBatch(image=image, partition=partition, keep=keep, fill=fill)


@pytest.fixture(scope="module")
def reference() -> LlavaModel:
    return load_llava(MODEL_DIR)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> LlavaModel:
    return load_llava(
        save_tiny_llava(tmp_path_factory.mktemp("llava"), image_size=64, patch_size=8)
    )


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> QwenModel:
    return load_qwen(save_tiny_qwen(tmp_path_factory.mktemp("qwen"), image_size=56))


def _reference_sample(llava: LlavaModel) -> tuple[np.ndarray, tuple[int, ...], list[Target]]:
    scene = generate_scene(11_000_003, SceneKind.CLEAN)
    said = llava.generate(scene.image, CAPTION_PROMPT)
    targets = [
        Target(position=i, token_id=t, text=llava.tokenizer.decode([t]))
        for i, t in enumerate(said.token_ids[:-1])
    ]
    return scene.image, said.token_ids, targets


@pytest.mark.parametrize("fill", [Fill.MEAN, Fill.BLACK, Fill.BLUR])
def test_reference_model_fast_path_equals_a_full_forward_per_image(
    reference: LlavaModel, fill: Fill
) -> None:
    image, generated, targets = _reference_sample(reference)
    batch = _batch(image, 48, 20, fill)
    plain = LlavaScorer(reference, image, CAPTION_PROMPT, generated, max_batch_size=1)
    fast = FastLlavaScorer(reference, image, CAPTION_PROMPT, generated, chunk_size=7)
    assert isinstance(fast, Scorer)
    want = _plain(plain, batch, targets)
    got = fast.score(batch, targets)
    assert got.shape == (20, len(targets))
    assert np.abs(got - want).max() <= PARITY
    # removing regions really moves the probabilities (a blur keeps these icons readable)
    assert np.ptp(want[:, 0]) > (0.05 if fill is not Fill.BLUR else 0.0)
    assert fast.timings.rows == 20 and fast.timings.language_model > 0


def test_tensor_masks_equal_pixel_masks_when_the_processor_does_not_resize(
    reference: LlavaModel,
) -> None:
    image, generated, _ = _reference_sample(reference)
    batch = _batch(image, 32, 6, Fill.MEAN)
    fast = FastLlavaScorer(reference, image, CAPTION_PROMPT, generated)
    tensor = fast.masked_pixels(batch).numpy()
    pixel = reference.pixel_values(list(batch.pixels())).numpy()
    assert np.abs(tensor - pixel).max() < 1e-5


def test_tensor_masks_differ_only_at_region_borders_when_the_processor_resizes(
    tiny_llava: LlavaModel,
) -> None:
    """At 100x80 -> 64x64 the processor's resize mixes kept and removed pixels along borders:
    whole-image keeps are exact, partial ones differ by a bounded amount (documented)."""
    image = generate_scene(11_000_004, SceneKind.CLEAN).image[:80, :100].copy()
    generated = [tiny_llava.tokenizer.convert_tokens_to_ids(w) for w in ["a", "cat", "."]]
    targets = [Target(position=1, token_id=generated[1], text="cat")]
    batch = _batch(image, 24, 8, Fill.MEAN)
    plain = LlavaScorer(tiny_llava, image, LLAVA_PROMPT, generated, max_batch_size=1)
    fast = FastLlavaScorer(tiny_llava, image, LLAVA_PROMPT, generated)
    want, got = _plain(plain, batch, targets), fast.score(batch, targets)
    assert np.abs(got[:2] - want[:2]).max() <= PARITY
    tensor = fast.masked_pixels(batch).numpy()
    pixel = tiny_llava.pixel_values(list(batch.pixels())).numpy()
    mean_diff = float(np.abs(tensor - pixel).mean())
    assert 0 < mean_diff < 0.05
    assert np.abs(got - want).max() < 0.05


def test_scoring_reuses_its_chunk_buffers_but_never_the_callers_images(
    tiny_llava: LlavaModel,
) -> None:
    """`score` blends every chunk into the same buffers (chunks of 3, 3 and 2 here) and keeps
    parity; images handed out by `masked_pixels` stay as they were after later scoring."""
    image = generate_scene(11_000_004, SceneKind.CLEAN).image[:80, :100].copy()
    generated = [tiny_llava.tokenizer.convert_tokens_to_ids(w) for w in ["a", "cat", "."]]
    targets = [Target(position=1, token_id=generated[1], text="cat")]
    first, second = _batch(image, 24, 8, Fill.MEAN), _batch(image, 24, 8, Fill.MEAN, seed=1)
    fast = FastLlavaScorer(tiny_llava, image, LLAVA_PROMPT, generated, chunk_size=3)
    handed_out = fast.masked_pixels(first)
    kept = handed_out.clone()
    got = fast.score(second, targets)
    one_chunk = FastLlavaScorer(tiny_llava, image, LLAVA_PROMPT, generated, chunk_size=8)
    assert np.abs(got - one_chunk.score(second, targets)).max() <= PARITY
    assert torch.equal(handed_out, kept)
    assert fast._masks["buffers"][1].shape[0] == 3  # one chunk's worth, reused


def test_tiny_llava_with_256_image_tokens_keeps_parity(tmp_path: Path) -> None:
    llava = load_llava(save_tiny_llava(tmp_path, image_size=128, patch_size=8))
    image = np.random.default_rng(3).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    ids = [llava.tokenizer.convert_tokens_to_ids(w) for w in ["a", "dog", "on", "a", "table"]]
    targets = [
        Target(position=1, token_id=ids[1], text="dog"),
        Target(position=4, token_id=ids[4], text="table"),
    ]
    batch = _batch(image, 16, 5, Fill.MEAN)
    plain = LlavaScorer(llava, image, LLAVA_PROMPT, ids, max_batch_size=1)
    fast = FastLlavaScorer(llava, image, LLAVA_PROMPT, ids, chunk_size=2)
    assert fast.lm.image_tokens == 256
    assert np.abs(fast.score(batch, targets) - _plain(plain, batch, targets)).max() <= PARITY


def test_onnx_vision_matches_torch_and_keeps_parity(reference: LlavaModel, tmp_path: Path) -> None:
    image, generated, targets = _reference_sample(reference)
    report = export_vision(reference, tmp_path / "vision.onnx", real_images=[image])
    assert report.max_abs_diff_random <= 1e-4 and report.max_abs_diff_real <= 1e-4
    assert report.input_shape[1:] == (3, 96, 96) and report.output_shape[1:] == (36, 128)
    vision = llava_onnx_vision(reference, report.path)
    assert vision.name == "vision=onnx:CPUExecutionProvider"
    torch_vision = TorchVision(llava_vision_module(reference.model))
    pixels = reference.pixel_values([image, image[::-1].copy(), image[:, ::-1].copy()])
    assert np.abs(vision(pixels).numpy() - torch_vision(pixels).numpy()).max() <= 1e-4
    fast = FastLlavaScorer(reference, image, CAPTION_PROMPT, generated, vision=vision)
    assert "onnx:CPUExecutionProvider" in fast.name
    batch = _batch(image, 48, 10, Fill.MEAN)
    plain = LlavaScorer(reference, image, CAPTION_PROMPT, generated, max_batch_size=1)
    assert np.abs(fast.score(batch, targets) - _plain(plain, batch, targets)).max() <= PARITY


def test_export_fuses_attention_into_ort_kernels_and_keeps_parity(
    tiny_llava: LlavaModel, tmp_path: Path
) -> None:
    import onnx

    fused = export_vision(tiny_llava, tmp_path / "fused.onnx")
    plain = export_vision(tiny_llava, tmp_path / "plain.onnx", fuse=False)
    assert plain.fusions == {} and fused.fusions.get("attention", 0) >= 1

    def ops(path: Path) -> set[str]:
        return {n.op_type for n in onnx.load(str(path)).graph.node}

    assert "Softmax" in ops(plain.path) and "Softmax" not in ops(fused.path)
    assert {"Attention", "MultiHeadAttention"} & ops(fused.path)
    metadata = {p.key: p.value for p in onnx.load(str(fused.path)).metadata_props}
    assert "attention=" in metadata["guardrail.fusions"]
    for report in (fused, plain):
        assert report.max_abs_diff_random <= 1e-6
    torch_vision = TorchVision(llava_vision_module(tiny_llava.model))
    pixels = tiny_llava.pixel_values(
        [np.random.default_rng(s).integers(0, 255, (64, 64, 3), dtype=np.uint8) for s in (1, 2)]
    )
    for report in (fused, plain):
        got = llava_onnx_vision(tiny_llava, report.path)(pixels).numpy()
        assert np.abs(got - torch_vision(pixels).numpy()).max() <= 1e-5


def test_onnx_file_from_another_model_is_refused(
    reference: LlavaModel, tiny_llava: LlavaModel, tmp_path: Path
) -> None:
    path = export_vision(tiny_llava, tmp_path / "tiny.onnx").path
    with pytest.raises(OnnxMismatchError, match=r"takes pixels of shape"):
        llava_onnx_vision(reference, path)
    # same shapes, different weights: the fingerprint catches it
    other = load_llava(save_tiny_llava(tmp_path / "other", image_size=64, patch_size=8, seed=1))
    with pytest.raises(OnnxMismatchError, match="exported from another model"):
        llava_onnx_vision(other, path)
    with pytest.raises(OnnxMismatchError, match="does not exist"):
        llava_onnx_vision(tiny_llava, tmp_path / "missing.onnx")


def test_export_refuses_to_write_a_file_that_disagrees(
    tiny_llava: LlavaModel, tmp_path: Path
) -> None:
    out = tmp_path / "strict.onnx"
    with pytest.raises(ExportMismatchError, match="was not written"):
        export_vision(tiny_llava, out, tolerance=0.0)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_keeps_weights_over_2_gb_in_a_file_beside_the_graph(
    tiny_qwen: QwenModel, tmp_path: Path
) -> None:
    """Qwen2.5-VL-7B's tower is 2.7 GB in float32, over protobuf's 2 GB: its weights go to
    `<name>.data` beside the graph (forced here on a tiny model); both land together."""
    out = tmp_path / "models" / "q.onnx"
    report = export_vision(tiny_qwen, out, input_hw=(56, 56), external_data=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx", "q.onnx.data"]
    assert report.files == (out, out.parent / "q.onnx.data")
    assert report.bytes == sum(p.stat().st_size for p in report.files)
    assert out.stat().st_size < report.files[1].stat().st_size  # the weights live beside it
    vision = qwen_onnx_vision(tiny_qwen, out)
    assert vision.input_hw == (56, 56)
    image = np.random.default_rng(1).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    pixels = tiny_qwen.vision_spec((56, 56)).pixels([image])
    torch_vision = TorchVision(tiny_qwen.vision_spec((56, 56)).module)
    assert np.abs(vision(pixels).numpy() - torch_vision(pixels).numpy()).max() <= 1e-4


def test_export_refuses_a_half_precision_model(tmp_path: Path) -> None:
    half = load_llava(
        save_tiny_llava(tmp_path / "m", image_size=64, patch_size=8), dtype="bfloat16"
    )
    with pytest.raises(ValueError, match="from a float32 model"):
        export_vision(half, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_qwen_patchify_is_the_image_processors_layout(tiny_qwen: QwenModel) -> None:
    image = np.random.default_rng(5).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    pixels, grid = tiny_qwen.pixel_inputs([image])
    hw = (int(grid[0, 1]), int(grid[0, 2]))
    again = patchify(unpatchify(pixels, hw, 14, 2, 2), 14, 2, 2)
    assert again.shape == pixels.shape and float((again - pixels).abs().max()) == 0.0


def test_qwen_fast_path_equals_a_full_forward_per_image(tiny_qwen: QwenModel) -> None:
    image = np.random.default_rng(1).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    ids = [tiny_qwen.tokenizer.convert_tokens_to_ids(w) for w in ["a", "cat", "on", "the", "table"]]
    targets = [
        Target(position=1, token_id=ids[1], text="cat"),
        Target(position=4, token_id=ids[4], text="table"),
    ]
    batch = _batch(image, 16, 9, Fill.MEAN)
    plain = QwenScorer(tiny_qwen, image, QWEN_PROMPT, ids)
    fast = FastQwenScorer(tiny_qwen, image, QWEN_PROMPT, ids, chunk_size=4)
    assert isinstance(fast, Scorer) and isinstance(plain, Scorer)
    want = _plain(plain, batch, targets)
    assert np.abs(fast.score(batch, targets) - want).max() <= PARITY
    assert np.ptp(want[:, 0]) > 0


def test_qwen_batched_vision_equals_the_transformers_tower(tiny_qwen: QwenModel) -> None:
    """At 252x224 the 18x16 patch grid leaves partial windows (4x4 patches each): the batched,
    fixed-geometry tower gives what transformers gives on the concatenated patches."""
    import torch

    module = qwen_vision_module(tiny_qwen.model, (252, 224))
    pixels = torch.randn(3, 3, 252, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = module(pixels)
        grid = torch.tensor([[1, 18, 16]] * 3)
        want = tiny_qwen.model.model.visual(patchify(pixels, 14, 2, 2), grid_thw=grid)
    assert got.shape == (3, 72, 64)
    assert float((got - want.pooler_output.reshape(3, 72, 64)).abs().max()) <= 1e-5
    with pytest.raises(ImageTokenError, match="multiple of patch x merge"):
        qwen_vision_module(tiny_qwen.model, (250, 224))


def test_qwen_onnx_vision_matches_torch_and_keeps_parity(
    tiny_qwen: QwenModel, tmp_path: Path
) -> None:
    image = np.random.default_rng(1).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    report = export_vision(tiny_qwen, tmp_path / "qwen.onnx", real_images=[image])
    assert report.max_abs_diff_random <= 1e-4 and report.max_abs_diff_real <= 1e-4
    assert report.input_shape[1:] == (3, 56, 56) and report.output_shape[1:] == (4, 64)
    vision = qwen_onnx_vision(tiny_qwen, report.path, tiny_qwen.input_hw(image))
    ids = [tiny_qwen.tokenizer.convert_tokens_to_ids(w) for w in ["a", "cat", "on", "the", "table"]]
    targets = [
        Target(position=1, token_id=ids[1], text="cat"),
        Target(position=4, token_id=ids[4], text="table"),
    ]
    fast = FastQwenScorer(tiny_qwen, image, QWEN_PROMPT, ids, vision=vision, chunk_size=4)
    assert "vision=onnx:CPUExecutionProvider" in fast.name
    batch = _batch(image, 16, 9, Fill.MEAN)
    want = _plain(QwenScorer(tiny_qwen, image, QWEN_PROMPT, ids), batch, targets)
    assert np.abs(fast.score(batch, targets) - want).max() <= PARITY


def test_qwen_onnx_file_for_another_size_or_model_is_refused(
    tiny_qwen: QwenModel, tiny_llava: LlavaModel, tmp_path: Path
) -> None:
    path = export_vision(tiny_qwen, tmp_path / "q.onnx", input_hw=(56, 56)).path
    with pytest.raises(OnnxMismatchError, match="takes pixels of shape"):
        qwen_onnx_vision(tiny_qwen, path, (84, 56))
    with pytest.raises(OnnxMismatchError, match="takes pixels of shape"):
        llava_onnx_vision(tiny_llava, path)
    other = load_qwen(save_tiny_qwen(tmp_path / "other", image_size=56, seed=1))
    with pytest.raises(OnnxMismatchError, match="exported from another model"):
        qwen_onnx_vision(other, path, (56, 56))
    # a file for one input size is refused by a sample the processor sizes differently
    small = export_vision(tiny_qwen, tmp_path / "small.onnx", input_hw=(28, 28)).path
    vision = qwen_onnx_vision(tiny_qwen, small, (28, 28))
    image = np.zeros((56, 56, 3), dtype=np.uint8)
    with pytest.raises(OnnxMismatchError, match="exported for 28x28"):
        FastQwenScorer(tiny_qwen, image, QWEN_PROMPT, [3], vision=vision)


def test_misuse_fails_clearly(reference: LlavaModel, tiny_qwen: QwenModel, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_qwen(tmp_path / "nowhere")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ModelLoadError, match="BertModel"):
        model_family(tmp_path / "bert")
    with pytest.raises(ModelLoadError, match="Qwen2_5_VL"):
        load_qwen(MODEL_DIR)
    image, generated, targets = _reference_sample(reference)
    with pytest.raises(ImageTokenError, match="exactly one image placeholder"):
        FastLlavaScorer(reference, image, "USER: describe the image . ASSISTANT:", generated)
    with pytest.raises(ImageTokenError, match="exactly one image placeholder"):
        FastQwenScorer(tiny_qwen, image, QWEN_PROMPT.replace("<|image_pad|>", ""), [3])
    fast = FastLlavaScorer(reference, image, CAPTION_PROMPT, generated)
    batch = _batch(image, 16, 2, Fill.MEAN)
    outside = Target(position=len(generated), token_id=generated[0], text="x")
    with pytest.raises(InvalidTargetError, match="outside the"):
        fast.score(batch, [outside])
    wrong = Target(position=0, token_id=generated[0] + 1, text="x")
    with pytest.raises(InvalidTargetError, match="but the model generated"):
        fast.score(batch, [wrong])
    other = _batch(image[:64].copy(), 16, 2, Fill.MEAN)
    with pytest.raises(InvalidImageError, match="built for"):
        fast.score(other, targets)


@pytest.mark.parametrize("hw", [(56, 56), (96, 96), (28, 112), (100, 37), (300, 200), (17, 19)])
def test_qwen_input_size_follows_the_image_processor(
    tiny_qwen: QwenModel, hw: tuple[int, int]
) -> None:
    image = np.zeros((*hw, 3), dtype=np.uint8)
    _, grid = tiny_qwen.pixel_inputs([image])
    assert tiny_qwen.input_hw(image) == (int(grid[0, 1]) * 14, int(grid[0, 2]) * 14)


def test_a_float16_checkpoint_loads_in_float32_unless_asked(tmp_path: Path) -> None:
    """transformers would load a float16 checkpoint (llava-1.5-7b-hf is stored so) as float16,
    on the CPU too: the loaders default to float32, where the parity holds."""
    import torch

    path = save_tiny_llava(tmp_path / "half", image_size=64, patch_size=8)
    load_llava(path).model.to(torch.float16).save_pretrained(path)
    assert next(load_llava(path).model.parameters()).dtype == torch.float32
    assert next(load_llava(path, dtype="float16").model.parameters()).dtype == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_llava(path, dtype="int8")


@pytest.mark.parametrize(("dtype", "bound"), [("bfloat16", 5e-2), ("float16", 1e-2)])
def test_half_precision_scores_stay_close_to_float32(
    reference: LlavaModel, tiny_qwen: QwenModel, dtype: str, bound: float
) -> None:
    import torch

    image, generated, targets = _reference_sample(reference)
    batch = _batch(image, 48, 8, Fill.MEAN)
    want = FastLlavaScorer(reference, image, CAPTION_PROMPT, generated).score(batch, targets)
    half = load_llava(MODEL_DIR, dtype=dtype)
    got = FastLlavaScorer(half, image, CAPTION_PROMPT, generated).score(batch, targets)
    assert 0 < np.abs(got - want).max() <= bound
    # Qwen2.5-VL's batched tower runs in the weights' dtype too
    qwen_image = np.random.default_rng(1).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    ids = [tiny_qwen.tokenizer.convert_tokens_to_ids(w) for w in ["a", "cat", "on", "the", "table"]]
    qwen_targets = [Target(position=1, token_id=ids[1], text="cat")]
    qwen_batch = _batch(qwen_image, 16, 4, Fill.MEAN)
    want = FastQwenScorer(tiny_qwen, qwen_image, QWEN_PROMPT, ids).score(qwen_batch, qwen_targets)
    half_qwen = load_qwen(tiny_qwen.path, dtype=dtype)
    assert {p.dtype for p in half_qwen.model.parameters()} == {getattr(torch, dtype)}
    got = FastQwenScorer(half_qwen, qwen_image, QWEN_PROMPT, ids).score(qwen_batch, qwen_targets)
    assert np.abs(got - want).max() <= bound
