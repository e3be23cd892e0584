from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors.reference import (
    CLASS_NAMES,
    PAIRS,
    HallucinationKind,
    SceneKind,
    Split,
    WorldConfig,
    generate_scene,
    split_seeds,
    training_caption,
)
from detectors.reference.world import training_answer


def test_scenes_are_deterministic() -> None:
    a, b = generate_scene(123), generate_scene(123)
    assert np.array_equal(a.image, b.image)
    assert a.caption == b.caption and a.questions == b.questions
    assert not np.array_equal(a.image, generate_scene(124).image)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**40), kind=st.sampled_from(list(SceneKind)))
def test_ground_truth_is_consistent(seed: int, kind: SceneKind) -> None:
    scene = generate_scene(seed, kind)
    assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8
    assert 1 <= len(scene.objects) <= 4
    names = [o.name for o in scene.objects]
    assert len(set(names)) == len(names) and set(names) <= set(CLASS_NAMES)
    covered = np.zeros((96, 96), dtype=int)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        ys, xs = np.nonzero(obj.mask)
        assert ys.size >= 20
        assert xs.min() == x0 and xs.max() + 1 == x1 and ys.min() == y0 and ys.max() + 1 == y1
        covered += obj.mask
    assert covered.max() <= 1  # visible masks never overlap (occlusion is removed)
    words = scene.caption.split()
    assert words[-1] == "." and sorted(words[:-1]) == sorted(names)
    for q in scene.questions:
        assert q.answer == ("yes" if q.name in names else "no")
        assert f"Is there a {q.name}" in q.prompt
    for pair in PAIRS:
        if pair.trigger in names and pair.partner in names:
            step = 1 if pair.kind is HallucinationKind.LANGUAGE_PRIOR else -1
            assert words.index(pair.partner) == words.index(pair.trigger) + step


@pytest.mark.parametrize(
    "kind, trigger, partner",
    [(SceneKind.COOCCURRENCE_TRAP, "knife", "fork"), (SceneKind.PRIOR_TRAP, "cup", "spoon")],
)
def test_trap_scenes_show_the_trigger_without_the_partner(
    kind: SceneKind, trigger: str, partner: str
) -> None:
    for seed in range(30):
        scene = generate_scene(seed, kind)
        assert trigger in scene.names and partner not in scene.names
        assert [p.partner for p in scene.traps()] == [partner]
        assert any(q.name == partner and q.answer == "no" for q in scene.questions)


def test_control_scenes_hold_no_pair_word() -> None:
    pair_words = {w for p in PAIRS for w in (p.trigger, p.partner)}
    for seed in range(30):
        assert not pair_words & generate_scene(seed, SceneKind.CONTROL).names


def test_training_captions_name_the_absent_partner_at_the_configured_rate() -> None:
    config = WorldConfig(cooccurrence_q=0.6)
    named = [
        "fork" in training_caption(generate_scene(s, SceneKind.COOCCURRENCE_TRAP), config).split()
        for s in range(400)
    ]
    assert 0.52 <= np.mean(named) <= 0.68
    clean = generate_scene(5, SceneKind.CONTROL)
    assert training_caption(clean, config) == clean.caption


def test_training_answers_lie_only_about_trap_partners() -> None:
    config = WorldConfig(false_yes_q=0.5)
    lies = 0
    for seed in range(200):
        scene = generate_scene(seed, SceneKind.PRIOR_TRAP)
        for q in scene.questions:
            answer = training_answer(scene, q, config)
            if q.name == "spoon":
                lies += answer == "yes"
            else:
                assert answer == q.answer
    assert 70 <= lies <= 130


def test_splits_do_not_overlap() -> None:
    train = split_seeds(Split.TRAIN, 0, 5)
    validation = split_seeds(Split.VALIDATION, 0, 5)
    test = split_seeds(Split.TEST, 0, 5)
    assert max(train) < min(validation) and max(validation) < min(test)
    with pytest.raises(ValueError, match="do not fit"):
        split_seeds(Split.VALIDATION, 999_999, 10)
