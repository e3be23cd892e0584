"""Several images in one prompt (Qwen2.5-VL): one search whose regions span all the images.

The plain scorer cuts every masked canvas back into its images and runs the model on them as
the prompt's images; the fast scorer masks each image in tensor space at its own geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detectors import Fill, Target
from detectors.budget import SearchBudget
from detectors.eagle import EagleSearch
from detectors.errors import ImageTokenError
from detectors.layout import ImageLayout, layout_partition, side_by_side
from detectors.scorers import MaskedBatch, Scorer
from detectors.scorers.families.llava import LLAVA, load_llava
from detectors.scorers.families.qwen2_5_vl import QWEN2_5_VL, QwenModel, load_qwen
from guardrail.reference.tiny_models import (
    LLAVA_PROMPT,
    QWEN_PROMPT,
    save_tiny_llava,
    save_tiny_qwen,
)

ONE = "<|vision_start|> <|image_pad|> <|vision_end|>"
TWO_IMAGES = QWEN_PROMPT.replace(ONE, f"{ONE} {ONE}")
PARITY = 1e-5


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> QwenModel:
    return load_qwen(save_tiny_qwen(tmp_path_factory.mktemp("qwen"), image_size=56))


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _words(qwen: QwenModel, *words: str) -> list[int]:
    return [int(qwen.tokenizer.convert_tokens_to_ids(w)) for w in words]


@pytest.mark.parametrize("fill", [Fill.MEAN, Fill.BLACK])
def test_plain_and_fast_scorers_agree_on_two_images(tiny_qwen: QwenModel, fill: Fill) -> None:
    canvas, layout = side_by_side([_noise(56, 56, 1), _noise(56, 56, 2)])
    ids = _words(tiny_qwen, "a", "cat", "on", "the", "table")
    targets = [
        Target(position=1, token_id=ids[1], text="cat"),
        Target(position=4, token_id=ids[4], text="table"),
    ]
    partition = layout_partition(canvas, layout, 16)
    keep = np.random.default_rng(0).random((9, partition.n_regions)) < 0.5
    keep[0], keep[1] = True, False
    batch = MaskedBatch(image=canvas, partition=partition, keep=keep, fill=fill)
    plain = QWEN2_5_VL.plain_scorer(tiny_qwen, canvas, TWO_IMAGES, ids, layout=layout)
    fast = QWEN2_5_VL.fast_scorer(tiny_qwen, canvas, TWO_IMAGES, ids, chunk_size=4, layout=layout)
    assert isinstance(plain, Scorer) and isinstance(fast, Scorer)
    want = plain.score(batch, targets)
    assert np.abs(fast.score(batch, targets) - want).max() <= PARITY
    assert np.ptp(want[:, 0]) > 0
    assert "2 images" in fast.name
    # masking only the second image moves the score: the model sees both images
    ids_second = np.unique(layout.split(partition.labels[..., None])[1])
    only_second = np.ones((2, partition.n_regions), dtype=bool)
    only_second[1, ids_second] = False
    moved = fast.score(MaskedBatch(image=canvas, partition=partition, keep=only_second), targets)
    assert abs(moved[0, 0] - moved[1, 0]) > 0


def test_images_of_different_sizes_get_their_own_token_counts(tiny_qwen: QwenModel) -> None:
    canvas, layout = side_by_side([_noise(56, 56, 3), _noise(28, 112, 4)])
    assert layout.boxes == ((0, 0, 56, 56), (0, 56, 56, 224))
    ids = _words(tiny_qwen, "a", "cat")
    prompt = tiny_qwen.prompt_ids(TWO_IMAGES, canvas, layout)
    counts = [tiny_qwen.image_tokens(tiny_qwen.input_hw(i)) for i in layout.split(canvas)]
    assert prompt.count(tiny_qwen.image_token_id) == sum(counts) and counts[1] == 4
    partition = layout_partition(canvas, layout, 12)
    keep = np.random.default_rng(1).random((5, partition.n_regions)) < 0.5
    batch = MaskedBatch(image=canvas, partition=partition, keep=keep, fill=Fill.MEAN)
    target = [Target(position=1, token_id=ids[1], text="cat")]
    plain = QWEN2_5_VL.plain_scorer(tiny_qwen, canvas, TWO_IMAGES, ids, layout=layout)
    fast = QWEN2_5_VL.fast_scorer(tiny_qwen, canvas, TWO_IMAGES, ids, layout=layout)
    # the processor resizes the second image: tensor masks differ only along region borders
    assert np.abs(fast.score(batch, target) - plain.score(batch, target)).max() < 5e-3


def test_a_prompt_needs_one_placeholder_per_image(tiny_qwen: QwenModel) -> None:
    canvas, layout = side_by_side([_noise(56, 56, 1), _noise(56, 56, 2)])
    with pytest.raises(ImageTokenError, match="2 image placeholders, one per image"):
        tiny_qwen.prompt_ids(QWEN_PROMPT, canvas, layout)
    with pytest.raises(ImageTokenError, match="exactly one image placeholder"):
        tiny_qwen.prompt_ids(TWO_IMAGES, _noise(56, 56, 1))


def _evidence_token(qwen: QwenModel, canvas: np.ndarray, layout: ImageLayout) -> int:
    """The token after "a" whose log-probability the images raise most over a grey canvas."""
    import torch

    a = _words(qwen, "a")

    def logp(image: np.ndarray) -> torch.Tensor:
        ids = torch.tensor([qwen.prompt_ids(TWO_IMAGES, image, layout) + a])
        pixels, grid = qwen.pixel_inputs([np.ascontiguousarray(i) for i in layout.split(image)])
        with torch.inference_mode():
            logits = qwen.model(
                input_ids=ids,
                pixel_values=pixels,
                image_grid_thw=grid,
                mm_token_type_ids=(ids == qwen.image_token_id).int(),
            ).logits[0, -1]
        return torch.log_softmax(logits.float(), dim=-1)

    return int((logp(canvas) - logp(np.full_like(canvas, 128))).argmax())


@pytest.mark.parametrize("evidence", [0, 1])
@pytest.mark.parametrize("budget", [None, 40])
def test_the_search_finds_the_evidence_in_whichever_image_holds_it(
    tiny_qwen: QwenModel, evidence: int, budget: int | None
) -> None:
    """One image is plain grey, the colour removed regions become: masking it changes
    nothing, so every bit of evidence lies in the other image, and one search over the regions
    of both puts the word's compact set there."""
    grey = np.full((56, 56, 3), 128, dtype=np.uint8)
    images = [_noise(56, 56, 7), grey] if evidence == 0 else [grey, _noise(56, 56, 7)]
    canvas, layout = side_by_side(images)
    token = _evidence_token(tiny_qwen, canvas, layout)
    ids = [*_words(tiny_qwen, "a"), token]
    partition = layout_partition(canvas, layout, 8)
    per_image = [set(np.unique(p).tolist()) for p in layout.split(partition.labels[..., None])]
    scorer = QWEN2_5_VL.fast_scorer(tiny_qwen, canvas, TWO_IMAGES, ids, layout=layout)
    search_budget = (
        SearchBudget.exhaustive() if budget is None else SearchBudget(max_forward_passes=budget)
    )
    attribution = EagleSearch(scorer, search_budget, fill=Fill.GREY).attribute(
        canvas, partition, [Target(position=1, token_id=token, text="x")]
    )
    assert attribution.p_full[0] > attribution.p_blank[0]
    assert attribution.compact_set and set(attribution.compact_set) <= per_image[evidence]
    # the ordering ranks the regions of both images in one list
    assert sorted(attribution.order.tolist()) == list(range(partition.n_regions))


def test_a_family_that_takes_one_image_refuses_a_layout_of_several(tmp_path: Path) -> None:
    llava = load_llava(save_tiny_llava(tmp_path / "llava", image_size=64, patch_size=8))
    canvas, layout = side_by_side([_noise(64, 64, 1), _noise(64, 64, 2)])
    assert LLAVA.max_images == 1 and QWEN2_5_VL.max_images > 1
    with pytest.raises(ImageTokenError, match="at most 1 image"):
        LLAVA.fast_scorer(llava, canvas, LLAVA_PROMPT, [1, 2], layout=layout)
    with pytest.raises(ImageTokenError, match="at most 1 image"):
        llava.prompt_ids(LLAVA_PROMPT, canvas, layout)
