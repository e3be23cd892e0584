"""Auditing the reference model's own captions and scoring the verdicts against ground truth."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from detectors.evaluation import auroc, pointing_game
from detectors.language_prior import PriorThresholds, judge_sample
from detectors.pipeline import AuditSettings, SampleAudit, audit_sample
from detectors.reference.world import CAPTION_PROMPT, PAIRS
from detectors.scorers.families.llava import FastLlavaScorer, LlavaModel
from detectors.scorers.vision import VisionRunner
from detectors.types import Attribution, Verdict, VerdictLabel
from guardrail.reference.evaluation import REFERENCE_VOCABULARY, CaptionedScene

__all__ = [
    "AuditedMention",
    "SceneAudit",
    "audit_scenes",
    "calibrate",
    "diagnosis_metrics",
    "mentions_of",
    "truth_of",
]


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class SceneAudit:
    captioned: CaptionedScene
    audit: SampleAudit


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class AuditedMention:
    """One object word of a generated caption, its verdict, and the ground truth."""

    seed: int
    scene_kind: str
    category: str
    hallucination: str | None  # None (present), "cooccurrence", "language_prior" or "other"
    verdict: Verdict
    attribution: Attribution
    box: tuple[int, int, int, int] | None
    mask: np.ndarray | None


def truth_of(category: str, names: frozenset[str]) -> str | None:
    """Why a mentioned category is a hallucination in a scene showing `names` (None if present)."""
    if category in names:
        return None
    for pair in PAIRS:
        if pair.partner == category and pair.trigger in names:
            return pair.kind.value
    return "other"


def audit_scenes(
    llava: LlavaModel,
    results: Sequence[CaptionedScene],
    *,
    settings: AuditSettings | None = None,
    vision: VisionRunner | None = None,
    progress: bool = True,
) -> list[SceneAudit]:
    """Audit every object word of every caption with the budgeted EAGLE search on the fast
    scorer (`vision`: an ONNX vision encoder, or None for the torch tower)."""
    from tqdm.auto import tqdm

    tokenizer = llava.tokenizer
    decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)  # noqa: E731
    out = []
    for result in tqdm(results, desc="auditing", disable=None if progress else True):
        scene = result.scene
        scorer = FastLlavaScorer(
            llava, scene.image, CAPTION_PROMPT, result.caption.token_ids, vision=vision
        )
        audit = audit_sample(
            scene.image,
            scorer,
            result.caption.token_ids,
            decode,
            settings=settings,
            vocabulary=REFERENCE_VOCABULARY,
        )
        out.append(SceneAudit(captioned=result, audit=audit))
    return out


def mentions_of(
    audits: Sequence[SceneAudit], thresholds: PriorThresholds | None = None
) -> list[AuditedMention]:
    """Every audited word with its ground truth, judged under `thresholds` (re-judging is
    free: verdicts are a function of the stored attributions and cross-evidence)."""
    mentions = []
    for record in audits:
        explanation = record.audit.explanation
        if explanation is None:
            continue
        scene = record.captioned.scene
        verdicts = judge_sample(explanation.attributions, thresholds, explanation.cross)
        for mention, verdict, attribution in zip(
            record.audit.mentions, verdicts, explanation.attributions, strict=True
        ):
            obj = scene.object(mention.category)
            mentions.append(
                AuditedMention(
                    seed=scene.seed,
                    scene_kind=scene.kind.value,
                    category=mention.category,
                    hallucination=truth_of(mention.category, scene.names),
                    verdict=verdict,
                    attribution=attribution,
                    box=None if obj is None else obj.box,
                    mask=None if obj is None else obj.mask,
                )
            )
    return mentions


def _f1(predicted: Sequence[bool], actual: Sequence[bool]) -> float:
    p, a = np.asarray(predicted, bool), np.asarray(actual, bool)
    tp = int((p & a).sum())
    return 2 * tp / max(1, int(p.sum()) + int(a.sum()))


def _best(
    audits: Sequence[SceneAudit],
    candidates: Iterable[PriorThresholds],
    label: VerdictLabel,
    kind: str,
) -> PriorThresholds:
    """The candidate whose `label` best matches the ground-truth `kind` (F1; first on ties)."""
    best_f1, best = -1.0, PriorThresholds()
    for th in candidates:
        found = mentions_of(audits, th)
        f1 = _f1(
            [m.verdict.label is label for m in found], [m.hallucination == kind for m in found]
        )
        if f1 > best_f1:
            best_f1, best = f1, th
    return best


def calibrate(audits: Sequence[SceneAudit]) -> PriorThresholds:
    """Thresholds that maximise the F1 of the language_prior and borrowed_evidence labels on
    `audits` (use the validation split, never the test split)."""
    grid = [round(x, 2) for x in np.arange(0.05, 1.0, 0.05)]
    base = PriorThresholds()
    prior = _best(
        audits,
        (
            replace(base, min_prior_ratio=r, max_prior_drop=d)
            for r, d in itertools.product(grid, grid)
        ),
        VerdictLabel.LANGUAGE_PRIOR,
        "language_prior",
    )
    return _best(
        audits,
        (replace(prior, min_borrowed=level) for level in grid),
        VerdictLabel.BORROWED_EVIDENCE,
        "cooccurrence",
    )


def _precision_recall(predicted: Sequence[bool], actual: Sequence[bool]) -> tuple[float, float]:
    p, a = np.asarray(predicted, bool), np.asarray(actual, bool)
    tp = int((p & a).sum())
    precision = tp / int(p.sum()) if p.any() else float("nan")
    recall = tp / int(a.sum()) if a.any() else float("nan")
    return precision, recall


def diagnosis_metrics(audited: Sequence[AuditedMention]) -> dict[str, Any]:
    """AUROC of the hallucination score (all, per kind), label precision/recall, pointing game,
    and the p_full baseline."""
    score = np.array([m.verdict.hallucination_score for m in audited])
    p_full = np.array([m.verdict.p_full for m in audited])
    truth = [m.hallucination for m in audited]
    present = np.array([t is None for t in truth])
    out: dict[str, Any] = {
        "n_mentions": len(audited),
        "n_hallucinated": int((~present).sum()),
        "n_cooccurrence": sum(t == "cooccurrence" for t in truth),
        "n_language_prior": sum(t == "language_prior" for t in truth),
        "hallucination_auroc": auroc(score, ~present),
        "baseline_p_full_auroc": auroc(1.0 - p_full, ~present),
    }
    for kind, key in (("language_prior", "prior"), ("cooccurrence", "cooccurrence")):
        keep = present | np.array([t == kind for t in truth])
        out[f"{key}_hallucination_auroc"] = auroc(score[keep], ~present[keep])
        out[f"baseline_p_full_{key}_auroc"] = auroc(1.0 - p_full[keep], ~present[keep])
    labels = [m.verdict.label for m in audited]
    for label, kind, key in (
        (VerdictLabel.LANGUAGE_PRIOR, "language_prior", "prior"),
        (VerdictLabel.BORROWED_EVIDENCE, "cooccurrence", "borrowed"),
    ):
        precision, recall = _precision_recall(
            [lab is label for lab in labels], [t == kind for t in truth]
        )
        out[f"{key}_label_precision"] = precision
        out[f"{key}_label_recall"] = recall
    grounded = [m for m in audited if m.hallucination is None and m.box is not None]
    boxes = [pointing_game(m.attribution.saliency(), box=m.box) for m in grounded]
    masks = [pointing_game(m.attribution.saliency(), mask=m.mask) for m in grounded]
    out["pointing_game_box"] = float(np.mean(boxes)) if grounded else float("nan")
    out["pointing_game_mask"] = float(np.mean(masks)) if grounded else float("nan")
    passes = [m.attribution.forward_passes for m in audited]
    out["forward_passes_mean"] = float(np.mean(passes)) if audited else 0.0
    return out
