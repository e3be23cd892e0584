"""Hallucination detection on held-out reference scenes: ours against the cheap baselines.

The shipped reference model captions `--scenes-per-kind` scenes of each evaluation kind (clean,
co-occurrence trap, language-prior trap, control) and answers their yes/no questions.  Every
object word of every caption is audited as the sidecar audits it (`audit_sample`: SLICO with
48 regions, mean fill, a tenth of the exact search's passes, the fast LLaVA scorer with the
ONNX vision encoder, the thresholds calibrated for these settings), and the baselines of
`detectors.baselines` score the same words on the same scorer, partition and fill.

Seeds.  The model was trained on the train split (seeds 0..10^7, `split_seeds(TRAIN, ...)`),
its thresholds were fitted on the validation split (10^7..1.1*10^7, from 10^7 on); the test
split starts at 1.1*10^7, where `guardrail reference eval` (11_000_000 + i), the tests
(11_000_000..11_000_400) and `benchmarks/explain_speed.py` (11_000_100 + i) draw.  This
script draws from `--seed` (default 11_500_000) on, scene i of each kind being seed + i, a
range of the test split nothing else uses (the demo starts at 12_000_000).

Reported:
- AUROC of `hallucination_score` and of each baseline, with a 95% interval from a bootstrap
  over scenes (words of a scene stay together), overall, per hallucination kind (present words
  against that kind's hallucinations), and on a confidence-matched subset (each hallucinated
  word with the present word nearest in p_full, without replacement);
- the paired bootstrap interval of (ours - best baseline) AUROC;
- label precision/recall of `language_prior` and `borrowed_evidence`; forward passes per word;
- the correction test (EAGLE.md section 8) for wrong "yes" answers: the correct "no" is
  explained with the audit's budget, the tail of the ordering is removed region by region,
  and the answer is regenerated (correct when P(no) > P(yes)); AMCR and CSR@10% against
  occlusion and RISE at the search's pass count on the same answer token;
- the pointing game (the saliency maximum inside the object's box) and the energy-based
  pointing game (share of the positive saliency inside the box) on present words;
- yes/no answers, the hallucinations whose donor no word names: every "yes" is audited as a
  one-word output (the same search, budget and thresholds; no second word to lend evidence, so
  no borrowing test), and ours and each baseline are scored on telling the wrong "yes" from the
  right one.  A wrong "yes" to "Is there a fork?" in a knife scene rests on the knife, which
  the answer never names (`unnamed_donor`); one about the spoon beside a cup is prior-driven.
  `auroc_by_kind["unnamed_donor"]` is ours on those (`--no-yes-no` skips this part).

Attention mass on image tokens is left out: the `Scorer` protocol exposes probabilities only.

The cheap-first cascade (`detectors.cascade`) is reported as a split: its AUROC, its passes per
word, and how many words of each ground-truth kind each stage decided.

Cost: the default (5 scenes per kind, 20 scenes, ~50 words) took 320 s wall on 2 CPU cores
shared with other work; `--scenes-per-kind 25` (100 scenes, ~290 words) is about five times
that.  RISE gets, per sample, as many masks as the search spent passes on that sample.

    python benchmarks/detection.py                          # table (small default, minutes)
    python benchmarks/detection.py --json                   # one JSON object
    python benchmarks/detection.py --scenes-per-kind 25     # the README's setting (100 scenes)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detectors import baselines
from detectors.cascade import STAGES as CASCADE_STAGES
from detectors.cascade import cascade
from detectors.eagle import EagleSearch
from detectors.evaluation import amcr, auroc, csr_at, pointing_game
from detectors.explanation import explain
from detectors.language_prior import PriorThresholds
from detectors.pipeline import AuditSettings, audit_sample
from detectors.reference import CAPTION_PROMPT, MODEL_DIR, SceneKind, generate_scene
from detectors.regions import RegionPartition, slic_partition
from detectors.saliency import measured_values
from detectors.scorers.families.llava import FastLlavaScorer, LlavaModel, load_llava
from detectors.scorers.masked import MaskedBatch
from detectors.types import Target
from guardrail.reference.diagnosis import SceneAudit, diagnosis_metrics, mentions_of
from guardrail.reference.evaluation import (
    EVAL_KINDS,
    REFERENCE_VOCABULARY,
    CaptionedScene,
    caption_scenes,
)
from guardrail.reference.report import load_calibration, onnx_vision

HELD_OUT_SEED = 11_500_000
KINDS = ("language_prior", "cooccurrence")
METHODS = ("ours", *baselines.BASELINE_NAMES)


class MemoScorer:
    """A scorer that remembers what it scored: the cascade re-runs the search on words the
    audit already searched, and the baselines re-score the original and blank images; those
    masks are served from memory (the searches still count every pass they ask for)."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self.memory: dict[tuple[bytes, str, Target], float] = {}

    @property
    def name(self) -> str:
        return str(self.scorer.name)

    @property
    def max_batch_size(self) -> int:
        return int(self.scorer.max_batch_size)

    def score(self, batch: MaskedBatch, targets: Sequence[Target]) -> np.ndarray:
        keys = [(row.tobytes(), batch.fill.value) for row in batch.keep]
        missing = [
            i for i, key in enumerate(keys) if any((*key, t) not in self.memory for t in targets)
        ]
        if missing:
            sub = MaskedBatch(
                image=batch.image,
                partition=batch.partition,
                keep=batch.keep[missing],
                fill=batch.fill,
            )
            for i, row in zip(missing, self.scorer.score(sub, targets), strict=True):
                for t, p in zip(targets, row, strict=True):
                    self.memory[(*keys[i], t)] = float(p)
        return np.array([[self.memory[(*key, t)] for t in targets] for key in keys])


def audit_words(
    llava: LlavaModel,
    captioned: CaptionedScene,
    settings: AuditSettings,
    thresholds: PriorThresholds,
    vision: Any,
) -> tuple[SceneAudit, dict[str, np.ndarray], dict[str, float], tuple[str, ...]]:
    """Audit one caption (as the sidecar does), score its words with every baseline and run
    the cascade: per-method scores `(T,)`, forward passes for the whole caption, and the stage
    at which the cascade decided each word."""
    scene = captioned.scene
    scorer = MemoScorer(
        FastLlavaScorer(
            llava, scene.image, CAPTION_PROMPT, captioned.caption.token_ids, vision=vision
        )
    )
    decode = lambda ids: llava.tokenizer.decode(list(ids), skip_special_tokens=True)  # noqa: E731
    partition = slic_partition(scene.image, settings.n_regions)
    audit = audit_sample(
        scene.image,
        scorer,
        captioned.caption.token_ids,
        decode,
        settings=settings,
        vocabulary=REFERENCE_VOCABULARY,
        partition=partition,
    )
    record = SceneAudit(captioned=captioned, audit=audit)
    if audit.explanation is None:
        return record, {}, {}, ()
    targets = [m.target() for m in audit.mentions]
    ours_passes = audit.explanation.forward_passes
    found = _baselines(scorer, scene.image, partition, targets, settings, ours_passes, scene.seed)
    scores = {name: out.scores for name, out in found.items()}
    passes = {name: float(out.forward_passes) for name, out in found.items()}
    passes["ours"] = float(ours_passes)
    split = cascade(
        scene.image,
        scorer,
        targets,
        partition=partition,
        budget=settings.budget(partition.n_regions),
        fill=settings.fill,
        thresholds=thresholds,
    )
    scores["cascade"] = split.scores
    passes["cascade"] = float(split.forward_passes)
    return record, scores, passes, split.stages


def _baselines(
    scorer: Any,
    image: np.ndarray,
    partition: RegionPartition,
    targets: Sequence[Target],
    settings: AuditSettings,
    rise_masks: int,
    seed: int,
) -> dict[str, baselines.BaselineScores]:
    fill = settings.fill
    return {
        "low_confidence": baselines.low_confidence(scorer, image, partition, targets),
        "image_free_contrast": baselines.image_free_contrast(
            scorer, image, partition, targets, fill=fill
        ),
        "contrastive_decoding": baselines.contrastive_decoding(scorer, image, partition, targets),
        "occlusion": baselines.occlusion(scorer, image, partition, targets, fill=fill),
        "rise": baselines.rise(
            scorer, image, partition, targets, n_masks=max(2, rise_masks), seed=seed, fill=fill
        ),
    }


def correction_test(
    llava: LlavaModel, captioned: CaptionedScene, settings: AuditSettings, vision: Any
) -> list[dict[str, Any]]:
    """MCR of our ordering, occlusion's and RISE's for each wrong "yes" of one scene."""
    scene = captioned.scene
    ids = {w: int(llava.tokenizer.convert_tokens_to_ids(w)) for w in ("yes", "no")}
    rows = []
    for question in scene.questions:
        if question.answer != "no" or captioned.answers.get(question.name) != "yes":
            continue
        no = FastLlavaScorer(llava, scene.image, question.prompt, [ids["no"]], vision=vision)
        yes = FastLlavaScorer(llava, scene.image, question.prompt, [ids["yes"]], vision=vision)
        target = [Target(position=0, token_id=ids["no"], text="no")]
        partition = slic_partition(scene.image, settings.n_regions)
        search = EagleSearch(no, settings.budget(partition.n_regions), fill=settings.fill)
        ours = search.attribute(scene.image, partition, target)
        found = _baselines(
            no, scene.image, partition, target, settings, ours.forward_passes, scene.seed
        )
        orders = {"ours": ours.order}
        for name in ("occlusion", "rise"):
            values = found[name].region_values
            assert values is not None
            orders[name] = baselines.order_from_values(values[:, 0])
        rows.append(
            {
                "seed": scene.seed,
                "question": question.name,
                "passes": {
                    "ours": ours.forward_passes,
                    "occlusion": found["occlusion"].forward_passes,
                    "rise": found["rise"].forward_passes,
                },
                "mcr": {
                    name: _mcr(no, yes, target, ids, scene.image, partition, order, settings)
                    for name, order in orders.items()
                },
            }
        )
    return rows


def yes_answers(
    llava: LlavaModel,
    captioned: CaptionedScene,
    settings: AuditSettings,
    thresholds: PriorThresholds,
    vision: Any,
) -> list[dict[str, Any]]:
    """Every "yes" answer of one scene audited as a one-word output, with the baselines'
    scores; `kind` is `present` (a right "yes"), `unnamed_donor` (a wrong "yes" about a
    co-occurrence partner: its evidence is the trigger, which the answer does not name),
    `language_prior` (about a prior partner) or `other`."""
    scene = captioned.scene
    yes = int(llava.tokenizer.convert_tokens_to_ids("yes"))
    partners = {p.partner: p.kind.value for p in scene.traps()}
    wrong = {"cooccurrence": "unnamed_donor", "language_prior": "language_prior"}
    partition = slic_partition(scene.image, settings.n_regions)
    target = [Target(position=0, token_id=yes, text="yes")]
    rows = []
    for question in scene.questions:
        if captioned.answers.get(question.name) != "yes":
            continue
        scorer = MemoScorer(
            FastLlavaScorer(llava, scene.image, question.prompt, [yes], vision=vision)
        )
        found = explain(
            scene.image,
            scorer,
            target,
            budget=settings.budget(partition.n_regions),
            partition=partition,
            fill=settings.fill,
            thresholds=thresholds,
            tail_steps=settings.tail_steps,  # audited as the sidecar audits
        )
        verdict, spent = found.verdicts[0], found.attributions[0].forward_passes
        others = _baselines(scorer, scene.image, partition, target, settings, spent, scene.seed)
        kind = "present"
        if question.answer != "yes":
            kind = wrong.get(partners.get(question.name, ""), "other")
        rows.append(
            {
                "seed": scene.seed,
                "question": question.name,
                "kind": kind,
                "label": verdict.label.value,
                "passes": spent,
                "scores": {
                    "ours": float(verdict.hallucination_score),
                    **{name: float(out.scores[0]) for name, out in others.items()},
                },
            }
        )
    return rows


def yes_no_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """AUROC of ours and each baseline on telling wrong "yes" answers from right ones, by kind,
    and the labels ours gave the wrong ones."""
    kind = np.array([r["kind"] for r in rows])
    truth = kind != "present"
    subsets = {"all": np.ones(kind.size, dtype=np.bool_)}
    for name in ("unnamed_donor", "language_prior"):
        subsets[name] = (kind == "present") | (kind == name)
    return {
        "n_answers": len(rows),
        "n_by_kind": {k: int((kind == k).sum()) for k in ("present", *list(subsets)[1:], "other")},
        "auroc": {
            subset: {
                m: auroc(np.array([r["scores"][m] for r in rows])[mask], truth[mask])
                for m in METHODS
            }
            for subset, mask in subsets.items()
        },
        "labels": {
            k: {
                label: sum(1 for r in rows if r["kind"] == k and r["label"] == label)
                for label in sorted({r["label"] for r in rows})
            }
            for k in ("present", "unnamed_donor", "language_prior")
        },
        "passes_per_answer": float(np.mean([r["passes"] for r in rows])) if rows else None,
    }


def _mcr(
    no: FastLlavaScorer,
    yes: FastLlavaScorer,
    target: list[Target],
    ids: dict[str, int],
    image: np.ndarray,
    partition: RegionPartition,
    order: np.ndarray,
    settings: AuditSettings,
) -> float:
    """Remove the ordering's tail one region at a time; the removed area at the first point
    where the regenerated answer is "no" (P(no) > P(yes)), 1.0 if never."""
    n = partition.n_regions
    keep = np.ones((n, n), dtype=np.bool_)
    for k, region in enumerate(order[::-1]):
        keep[k:, region] = False
    yes_target = [Target(position=0, token_id=ids["yes"], text="yes")]
    p_no = baselines.score_selections(no, image, partition, keep, target, fill=settings.fill)
    p_yes = baselines.score_selections(yes, image, partition, keep, yes_target, fill=settings.fill)
    removed = np.cumsum(partition.area_fractions[order[::-1]])
    corrected = np.flatnonzero(p_no[:, 0] > p_yes[:, 0])
    return float(min(1.0, removed[corrected[0]])) if corrected.size else 1.0


def write_words(path: Path, mentions: Sequence[Any]) -> None:
    """One JSON line per audited word: its scene, ground truth, verdict and the numbers the
    verdict was decided on (for threshold studies without re-running the audits)."""
    with path.open("w") as out:
        for m in mentions:
            v = m.verdict
            row = {
                "seed": m.seed,
                "scene_kind": m.scene_kind,
                "word": v.target.text,
                "category": m.category,
                "truth": m.hallucination or "present",
                "label": v.label.value,
                "hallucination_score": v.hallucination_score,
                "p_full": v.p_full,
                "p_blank": v.p_blank,
                "insight": v.insight,
                "relative_drop": v.relative_drop,
                "prior_score": v.prior_score,
                "compact_set": [int(r) for r in v.compact_set],
                "passes": m.attribution.forward_passes,
                "stopped_by": m.attribution.stopped_by.value,
                **{k: float(x) for k, x in v.extra.items()},
            }
            out.write(json.dumps(row) + "\n")


def bootstrap(
    scenes: np.ndarray,
    truth: np.ndarray,
    scores: dict[str, np.ndarray],
    subsets: dict[str, np.ndarray],
    *,
    resamples: int,
    seed: int,
) -> dict[str, dict[str, list[float]]]:
    """AUROC draws per subset and method over `resamples` resamples of the scenes (with
    replacement; a scene's words stay together).  `scenes` `(W,)` scene index per word."""
    rng = np.random.default_rng(seed)
    unique = np.unique(scenes)
    members = {s: np.flatnonzero(scenes == s) for s in unique}
    draws: dict[str, dict[str, list[float]]] = {
        subset: {m: [] for m in scores} for subset in subsets
    }
    for _ in range(resamples):
        picked = np.concatenate([members[s] for s in rng.choice(unique, unique.size)])
        for subset, mask in subsets.items():
            words = picked[mask[picked]]
            for method, values in scores.items():
                draws[subset][method].append(auroc(values[words], truth[words]))
    return draws


def interval(values: Sequence[float]) -> list[float] | None:
    finite = np.asarray([v for v in values if np.isfinite(v)])
    if finite.size < 10:
        return None
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def matched_subset(p_full: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """`(W,)` bool: every hallucinated word and, for each (most confident first), the present
    word nearest to it in p_full not taken yet."""
    keep = truth.copy()
    free = set(np.flatnonzero(~truth).tolist())
    for i in sorted(np.flatnonzero(truth), key=lambda i: -p_full[i]):
        if not free:
            break
        j = min(free, key=lambda j: (abs(p_full[j] - p_full[i]), j))
        keep[j] = True
        free.remove(j)
    return keep


def energy_share(saliency: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Share of the map's positive mass inside `box` (x0, y0, x1, y1); NaN for an empty map."""
    positive = np.clip(saliency, 0.0, None)
    total = float(positive.sum())
    if total <= 0:
        return float("nan")
    x0, y0, x1, y1 = box
    return float(positive[y0:y1, x0:x1].sum() / total)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    llava = load_llava(MODEL_DIR)
    settings = AuditSettings()
    calibration = load_calibration(MODEL_DIR, settings)
    kinds = [SceneKind(k) for k in args.kinds.split(",")] if args.kinds else list(EVAL_KINDS)
    scenes = [generate_scene(args.seed + i, k) for k in kinds for i in range(args.scenes_per_kind)]
    captioned = caption_scenes(llava, scenes)
    records: list[SceneAudit] = []
    scores: dict[str, list[float]] = {m: [] for m in (*baselines.BASELINE_NAMES, "cascade")}
    passes: dict[str, float] = {m: 0.0 for m in (*METHODS, "cascade")}
    stages: list[str] = []
    corrections: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    with onnx_vision(llava) as vision:
        for k, item in enumerate(captioned):
            record, found, spent, decided = audit_words(
                llava, item, settings, calibration.thresholds, vision
            )
            stages += decided
            records.append(record)
            for name, values in found.items():
                scores[name] += values.tolist()
            for name, value in spent.items():
                passes[name] += value
            corrections += correction_test(llava, item, settings, vision)
            if args.yes_no:
                answers += yes_answers(llava, item, settings, calibration.thresholds, vision)
            if not args.json:
                print(f"\r{k + 1}/{len(captioned)} scenes", end="", file=sys.stderr, flush=True)
    if not args.json:
        print(file=sys.stderr)
    mentions = mentions_of(records, calibration.thresholds)
    if args.words_out is not None:
        write_words(args.words_out, mentions)
    truth = np.array([m.hallucination is not None for m in mentions])
    kind = np.array([m.hallucination or "present" for m in mentions])
    keys: dict[tuple[int, str], int] = {}
    scene_of = np.array([keys.setdefault((m.seed, m.scene_kind), len(keys)) for m in mentions])
    all_scores = {
        "ours": np.array([m.verdict.hallucination_score for m in mentions]),
        **{name: np.asarray(values) for name, values in scores.items()},
    }
    p_full = np.array([m.verdict.p_full for m in mentions])
    subsets = {"all": np.ones(truth.size, dtype=np.bool_)}
    for name in KINDS:
        subsets[name] = (kind == "present") | (kind == name)
    subsets["confidence_matched"] = matched_subset(p_full, truth)
    point = {
        subset: {m: auroc(v[mask], truth[mask]) for m, v in all_scores.items()}
        for subset, mask in subsets.items()
    }
    draws = bootstrap(
        scene_of, truth, all_scores, subsets, resamples=args.bootstrap, seed=args.seed
    )
    best = max(baselines.BASELINE_NAMES, key=lambda m: _finite(point["all"][m]))
    paired = [a - b for a, b in zip(draws["all"]["ours"], draws["all"][best], strict=True)]
    diagnosis = diagnosis_metrics(mentions)
    present = [(m.attribution.saliency(), m.box) for m in mentions if m.hallucination is None]
    # the energy of what the heatmap shows (measured regions only), and of the complete map
    # whose unmeasured tail is interpolated (every region gets a share of the mass)
    shown = [
        (measured_values(m.attribution)[m.attribution.partition.labels], m.box)
        for m in mentions
        if m.hallucination is None
    ]
    energy = [energy_share(s, box) for s, box in shown if box is not None]
    energy_all = [energy_share(s, box) for s, box in present if box is not None]
    pointing = [pointing_game(s, box=box) for s, box in present if box is not None]
    words = max(1, truth.size)
    mcrs = {name: [r["mcr"][name] for r in corrections] for name in ("ours", "occlusion", "rise")}
    report: dict[str, Any] = {
        "seed": args.seed,
        "kinds": [k.value for k in kinds],
        "scenes_per_kind": args.scenes_per_kind,
        "n_scenes": len(scenes),
        "n_words": int(truth.size),
        "n_present": int((~truth).sum()),
        "n_by_kind": {name: int((kind == name).sum()) for name in (*KINDS, "other")},
        "auroc": point["all"]["ours"],
        "auroc_interval": interval(draws["all"]["ours"]),
        "auroc_by_kind": {name: point[name]["ours"] for name in KINDS},
        "auroc_by_kind_interval": {name: interval(draws[name]["ours"]) for name in KINDS},
        "auroc_confidence_matched": point["confidence_matched"]["ours"],
        "auroc_confidence_matched_interval": interval(draws["confidence_matched"]["ours"]),
        "baseline_auroc": {m: point["all"][m] for m in baselines.BASELINE_NAMES},
        "baseline_auroc_interval": {m: interval(draws["all"][m]) for m in baselines.BASELINE_NAMES},
        "baseline_auroc_by_kind": {
            m: {name: point[name][m] for name in KINDS} for m in baselines.BASELINE_NAMES
        },
        "baseline_auroc_confidence_matched": {
            m: point["confidence_matched"][m] for m in baselines.BASELINE_NAMES
        },
        "best_baseline": best,
        "auroc_minus_best_baseline": point["all"]["ours"] - point["all"][best],
        "auroc_minus_best_baseline_interval": interval(paired),
        "passes_per_word": passes["ours"] / words,
        "baseline_passes_per_word": {m: passes[m] / words for m in baselines.BASELINE_NAMES},
        "label_precision_recall": {
            "language_prior": [
                diagnosis["prior_label_precision"],
                diagnosis["prior_label_recall"],
            ],
            "borrowed_evidence": [
                diagnosis["borrowed_label_precision"],
                diagnosis["borrowed_label_recall"],
            ],
        },
        "cascade": {
            "auroc": point["all"]["cascade"],
            "auroc_interval": interval(draws["all"]["cascade"]),
            "auroc_by_kind": {name: point[name]["cascade"] for name in KINDS},
            "auroc_confidence_matched": point["confidence_matched"]["cascade"],
            "passes_per_word": passes["cascade"] / words,
            "searched_share": float(np.mean([s == "search" for s in stages])) if stages else None,
            "stages_by_truth": {
                truth_kind: {
                    stage: int(
                        sum(
                            1
                            for s, k in zip(stages, kind, strict=True)
                            if s == stage and k == truth_kind
                        )
                    )
                    for stage in CASCADE_STAGES
                }
                for truth_kind in ("present", *KINDS, "other")
            },
        },
        "n_corrections": len(corrections),
        "amcr": amcr(mcrs["ours"]) if corrections else None,
        "csr_at_10": csr_at(mcrs["ours"]) if corrections else None,
        "baseline_amcr": {m: amcr(mcrs[m]) if corrections else None for m in ("occlusion", "rise")},
        "baseline_csr_at_10": {
            m: csr_at(mcrs[m]) if corrections else None for m in ("occlusion", "rise")
        },
        "correction_passes": (
            float(np.mean([r["passes"]["ours"] for r in corrections])) if corrections else None
        ),
        "energy_pointing_game": float(np.nanmean(energy)) if energy else None,
        "energy_pointing_game_all_regions": float(np.nanmean(energy_all)) if energy_all else None,
        "pointing_game": float(np.mean(pointing)) if pointing else None,
        "pointing_game_mask": diagnosis["pointing_game_mask"],
        "yes_no": yes_no_report(answers) if answers else None,
        "calibration": calibration.provenance(),
        "scorer": "llava-fast(reference; onnx vision)",
        "machine": {"platform": platform.platform(), "threads": args.threads},
        "seconds": round(time.perf_counter() - started, 1),
        "corrections": corrections,
        "yes_answers": answers,
    }
    if answers:
        by_kind = report["yes_no"]["auroc"]["unnamed_donor"]
        report["auroc_by_kind"]["unnamed_donor"] = by_kind["ours"]
    return report


def _finite(value: float) -> float:
    return value if np.isfinite(value) else -1.0


def _clean(value: Any) -> Any:
    """JSON has no NaN: an undefined figure (no positives, say) is null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _fmt(value: Any, width: int = 7) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width}.3f}"


def _span(values: list[float] | None) -> str:
    return "" if values is None else f"[{values[0]:.3f}, {values[1]:.3f}]"


def print_table(report: dict[str, Any]) -> None:
    n = report["n_by_kind"]
    print(
        f"detection on {report['n_scenes']} held-out scenes (seeds from {report['seed']}): "
        f"{report['n_words']} object words, {report['n_present']} present, "
        f"{n['language_prior']} language-prior, {n['cooccurrence']} co-occurrence, "
        f"{n['other']} other hallucinations"
    )
    print(
        f"{'method':<22}{'all':>7} {'95% (scenes)':<17}{'prior':>7}{'co-occ':>7}"
        f"{'matched':>8}{'passes/word':>12}"
    )
    rows = [
        (
            "ours",
            report["auroc"],
            report["auroc_interval"],
            report["auroc_by_kind"],
            report["auroc_confidence_matched"],
            report["passes_per_word"],
        )
    ]
    for m in baselines.BASELINE_NAMES:
        rows.append(
            (
                m,
                report["baseline_auroc"][m],
                report["baseline_auroc_interval"][m],
                report["baseline_auroc_by_kind"][m],
                report["baseline_auroc_confidence_matched"][m],
                report["baseline_passes_per_word"][m],
            )
        )
    split = report["cascade"]
    rows.append(
        (
            "cascade",
            split["auroc"],
            split["auroc_interval"],
            split["auroc_by_kind"],
            split["auroc_confidence_matched"],
            split["passes_per_word"],
        )
    )
    for name, value, span, by_kind, matched, passes in rows:
        print(
            f"{name:<22}{_fmt(value)} {_span(span):<17}{_fmt(by_kind['language_prior'])}"
            f"{_fmt(by_kind['cooccurrence'])}{_fmt(matched, 8)}{passes:>12.1f}"
        )
    print(
        f"ours - best baseline ({report['best_baseline']}): "
        f"{report['auroc_minus_best_baseline']:+.3f} "
        f"{_span(report['auroc_minus_best_baseline_interval'])} (paired scene bootstrap)"
    )
    print(
        "cascade split (words decided at each stage): "
        + "; ".join(
            f"{truth} " + ", ".join(f"{stage} {count}" for stage, count in counts.items() if count)
            for truth, counts in split["stages_by_truth"].items()
            if any(counts.values())
        )
    )
    for label, (precision, recall) in report["label_precision_recall"].items():
        print(f"label {label}: precision {_fmt(precision, 0)}, recall {_fmt(recall, 0)}")
    print(
        f"correction test ({report['n_corrections']} wrong yes): AMCR / CSR@10% "
        f"ours {_fmt(report['amcr'], 0)} / {_fmt(report['csr_at_10'], 0)} "
        f"({_fmt(report['correction_passes'], 0)} passes), occlusion "
        f"{_fmt(report['baseline_amcr']['occlusion'], 0)} / "
        f"{_fmt(report['baseline_csr_at_10']['occlusion'], 0)}, RISE at equal passes "
        f"{_fmt(report['baseline_amcr']['rise'], 0)} / "
        f"{_fmt(report['baseline_csr_at_10']['rise'], 0)}"
    )
    yes_no = report["yes_no"]
    if yes_no is not None:
        n = yes_no["n_by_kind"]
        print(
            f"yes/no answers: {yes_no['n_answers']} yes ({n['present']} right, "
            f"{n['unnamed_donor']} unnamed donor, {n['language_prior']} language prior, "
            f"{n['other']} other wrong), {_fmt(yes_no['passes_per_answer'], 0)} passes each; "
            "AUROC all / unnamed donor / prior:"
        )
        for m in METHODS:
            cells = " / ".join(_fmt(yes_no["auroc"][k][m], 0) for k in yes_no["auroc"])
            print(f"  {m:<22}{cells}")
        print(
            "  labels of the unnamed-donor answers: "
            + ", ".join(f"{k} {v}" for k, v in yes_no["labels"]["unnamed_donor"].items() if v)
        )
    print(
        f"pointing game (box) {_fmt(report['pointing_game'], 0)}, energy-based "
        f"{_fmt(report['energy_pointing_game'], 0)} (measured regions; all regions, the tail "
        f"interpolated: {_fmt(report['energy_pointing_game_all_regions'], 0)}); "
        f"{report['seconds']} s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="first scene seed")
    parser.add_argument("--scenes-per-kind", type=int, default=5, help="scenes of each kind")
    parser.add_argument(
        "--kinds", help="comma-separated scene kinds (default: clean, both traps, control)"
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--no-yes-no",
        dest="yes_no",
        action="store_false",
        help="skip auditing the yes/no answers (the unnamed-donor kind)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--words-out", type=Path, help="also write one JSON line per audited word here"
    )
    args = parser.parse_args(argv)
    if args.scenes_per_kind < 1:
        parser.error(f"--scenes-per-kind must be positive, got: {args.scenes_per_kind}")
    import torch

    torch.set_num_threads(args.threads)
    report = run(args)
    if args.json:
        print(json.dumps(_clean(report)))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
