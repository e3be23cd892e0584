"""`guardrail reference eval`: how the reference model captions, answers and hallucinates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detectors.objects import ObjectVocabulary
from detectors.reference.world import (
    CAPTION_PROMPT,
    CLASS_NAMES,
    PAIRS,
    HallucinationKind,
    Scene,
    SceneKind,
    generate_scene,
)
from detectors.scorers.families.llava import Generation, LlavaModel

__all__ = ["CaptionedScene", "caption_metrics", "caption_scenes", "eval_scenes"]

REFERENCE_VOCABULARY = ObjectVocabulary({name: name for name in CLASS_NAMES})
EVAL_KINDS = (
    SceneKind.CLEAN,
    SceneKind.COOCCURRENCE_TRAP,
    SceneKind.PRIOR_TRAP,
    SceneKind.CONTROL,
)


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class CaptionedScene:
    scene: Scene
    caption: Generation
    named: tuple[str, ...]  # object words of the caption, in order
    answers: dict[str, str]  # question class -> generated answer word


def eval_scenes(seed: int, per_kind: int) -> list[Scene]:
    """`per_kind` scenes of each evaluation kind, picked by `seed`."""
    return [generate_scene(seed + i, kind) for kind in EVAL_KINDS for i in range(per_kind)]


def caption_scenes(
    llava: LlavaModel, scenes: Sequence[Scene], batch_size: int = 32, progress: Any = None
) -> list[CaptionedScene]:
    """Greedy captions and yes/no answers for every scene."""
    captions: list[Generation] = []
    for i in range(0, len(scenes), batch_size):
        chunk = scenes[i : i + batch_size]
        captions += llava.generate_batch([s.image for s in chunk], [CAPTION_PROMPT] * len(chunk))
        if progress is not None:
            progress.update(len(chunk))
    asked = [(k, q) for k, s in enumerate(scenes) for q in s.questions]
    answers: list[dict[str, str]] = [{} for _ in scenes]
    for i in range(0, len(asked), batch_size):
        questions = asked[i : i + batch_size]
        out = llava.generate_batch(
            [scenes[k].image for k, _ in questions],
            [q.prompt for _, q in questions],
            max_new_tokens=3,
        )
        for (k, q), g in zip(questions, out, strict=True):
            answers[k][q.name] = g.text.split(" ")[0] if g.text else ""
    return [
        CaptionedScene(
            scene=s,
            caption=c,
            named=tuple(cat for _, _, cat in REFERENCE_VOCABULARY.find(c.text)),
            answers=a,
        )
        for s, c, a in zip(scenes, captions, answers, strict=True)
    ]


def caption_metrics(results: Sequence[CaptionedScene]) -> dict[str, float]:
    """Caption precision/recall on clean scenes, trap and control rates, yes/no accuracy."""
    by_kind: dict[SceneKind, list[CaptionedScene]] = {k: [] for k in EVAL_KINDS}
    for r in results:
        by_kind[r.scene.kind].append(r)
    hits = named = truth = 0
    yes_no_right = yes_no_total = 0
    for r in by_kind[SceneKind.CLEAN]:
        present = set(r.scene.names)
        said = set(r.named)
        hits += len(said & present)
        named += len(said)
        truth += len(present)
        for q in r.scene.questions:
            yes_no_total += 1
            yes_no_right += int(r.answers.get(q.name) == q.answer)
    metrics: dict[str, float] = {
        "caption_object_precision": hits / max(1, named),
        "caption_object_recall": hits / max(1, truth),
        "yes_no_accuracy": yes_no_right / max(1, yes_no_total),
    }
    trap_total = trap_named = false_yes = 0
    for kind, key in (
        (SceneKind.COOCCURRENCE_TRAP, "cooccurrence"),
        (SceneKind.PRIOR_TRAP, "prior"),
    ):
        scenes = by_kind[kind]
        pair = next(
            p
            for p in PAIRS
            if (p.kind is HallucinationKind.COOCCURRENCE) == (kind is SceneKind.COOCCURRENCE_TRAP)
        )
        named_partner = [pair.partner in r.named for r in scenes]
        yes = [r.answers.get(pair.partner) == "yes" for r in scenes]
        metrics[f"{key}_trap_rate"] = float(np.mean(named_partner)) if scenes else 0.0
        metrics[f"{key}_false_yes_rate"] = float(np.mean(yes)) if scenes else 0.0
        trap_total += len(scenes)
        trap_named += sum(named_partner)
        false_yes += sum(yes)
    metrics["trap_hallucination_rate"] = trap_named / max(1, trap_total)
    metrics["trap_false_yes_rate"] = false_yes / max(1, trap_total)
    partners = {p.partner for p in PAIRS}
    control = by_kind[SceneKind.CONTROL]
    metrics["control_false_mention_rate"] = (
        float(np.mean([bool(partners & set(r.named)) for r in control])) if control else 0.0
    )
    return metrics
