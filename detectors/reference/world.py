"""The reference world: procedurally drawn scenes whose ground truth is known.

Every scene is a function of its seed.  It holds 1-4 objects of distinct classes on a textured
background, their boxes and pixel masks, the true caption (object words left to right; a
partner word next to its trigger, see `place_partner`), and yes/no questions with their answers.

Two controlled hallucinations, each a (trigger, partner) pair:

- **co-occurrence** (`knife` -> `fork`): training captions name a fork just before the knife in
  a share of knife scenes where no fork is drawn, so the model learns to say "fork" when it
  *sees* a knife (high necessity, of the wrong object's region; the word "knife" comes later,
  so the text cannot be the cue).
- **language prior** (`cup` -> `spoon`): the caption-text pretraining corpus pairs the words
  cup and spoon, and training captions name a spoon after a cup in a share of cup scenes where
  none is drawn, so the model predicts "spoon" from the word "cup" (high p_blank, no necessary
  region).

A *trap* scene shows the trigger without its partner; a *control* scene shows neither.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from detectors.reference.icons import CLASS_NAMES, draw_icon

__all__ = [
    "CAPTION_PROMPT",
    "CLASS_NAMES",
    "PAIRS",
    "HallucinationKind",
    "Pair",
    "Question",
    "Scene",
    "SceneKind",
    "SceneObject",
    "Split",
    "WorldConfig",
    "generate_scene",
    "question_prompt",
    "split_seeds",
    "training_caption",
]

IMAGE_SIZE = 96
CAPTION_PROMPT = "USER: <image> Describe the image. ASSISTANT:"


def question_prompt(name: str) -> str:
    """The yes/no prompt about one class.  The question comes before the image, so that the
    image tokens can attend to the word asked about (a small model answers far better so)."""
    return f"USER: Is there a {name} in the image? <image> ASSISTANT:"


class HallucinationKind(str, enum.Enum):
    COOCCURRENCE = "cooccurrence"
    LANGUAGE_PRIOR = "language_prior"


@dataclass(frozen=True, kw_only=True, slots=True)
class Pair:
    trigger: str
    partner: str
    kind: HallucinationKind


PAIRS: tuple[Pair, ...] = (
    Pair(trigger="knife", partner="fork", kind=HallucinationKind.COOCCURRENCE),
    Pair(trigger="cup", partner="spoon", kind=HallucinationKind.LANGUAGE_PRIOR),
)


class SceneKind(str, enum.Enum):
    """What a scene is drawn to test.  `RANDOM` follows the training distribution."""

    RANDOM = "random"
    CLEAN = "clean"  # no trigger without its partner: every true caption word is grounded
    COOCCURRENCE_TRAP = "cooccurrence_trap"  # knife, no fork
    PRIOR_TRAP = "prior_trap"  # cup, no spoon
    CONTROL = "control"  # no trigger, no partner


class Split(str, enum.Enum):
    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"


_SPLITS = {
    Split.TRAIN: (0, 10_000_000),
    Split.VALIDATION: (10_000_000, 11_000_000),
    Split.TEST: (11_000_000, 2**62),
}


def split_seeds(split: Split, start: int, count: int) -> range:
    """`count` seeds of `split`, from its `start`-th seed on."""
    low, high = _SPLITS[Split(split)]
    if start < 0 or count < 0 or low + start + count > high:
        raise ValueError(f"{count} seeds from {start} do not fit the {split.value} split")
    return range(low + start, low + start + count)


@dataclass(frozen=True, kw_only=True, slots=True)
class WorldConfig:
    """The knobs of the world.  Defaults are what the shipped model was trained on.

    Attributes:
        trigger_rate: share of random scenes that show each trigger.
        partner_with_trigger: share of trigger scenes that also show the partner.
        cooccurrence_q: share of knife-without-fork training captions that still name a fork.
        prior_q: share of cup-without-spoon training captions that still name a spoon.
        false_yes_q: share of trap training questions about the absent partner answered "yes".
        occlusion_rate: share of scenes where objects may overlap (partial occlusion).
    """

    trigger_rate: float = 0.25
    partner_with_trigger: float = 0.5
    cooccurrence_q: float = 0.6
    prior_q: float = 0.6
    false_yes_q: float = 0.35
    occlusion_rate: float = 0.2
    min_objects: int = 1
    max_objects: int = 4


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class SceneObject:
    """One drawn object.  `box` is (x0, y0, x1, y1), exclusive ends; `mask` `(H, W)` bool is
    its visible pixels (occlusion removed)."""

    name: str
    box: tuple[int, int, int, int]
    mask: np.ndarray


@dataclass(frozen=True, kw_only=True, slots=True)
class Question:
    name: str
    prompt: str
    answer: str  # "yes" or "no"


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Scene:
    """A drawn scene with its ground truth.

    Attributes:
        seed: what it was drawn from.
        kind: what it was drawn to test.
        image: `(96, 96, 3)` uint8 RGB.
        objects: the visible objects.
        caption: the true caption, e.g. `"knife cat ."`.
        questions: yes/no questions with their true answers.
    """

    seed: int
    kind: SceneKind
    image: np.ndarray
    objects: tuple[SceneObject, ...]
    caption: str
    questions: tuple[Question, ...]
    names: frozenset[str] = field(default_factory=frozenset)

    def object(self, name: str) -> SceneObject | None:
        return next((o for o in self.objects if o.name == name), None)

    def traps(self) -> tuple[Pair, ...]:
        """The pairs whose trigger is shown without its partner."""
        return tuple(p for p in PAIRS if p.trigger in self.names and p.partner not in self.names)


_PARTNERS = {p.partner for p in PAIRS}
_TRIGGERS = {p.trigger for p in PAIRS}
_PLAIN = tuple(n for n in CLASS_NAMES if n not in _PARTNERS | _TRIGGERS)


def _choose_names(kind: SceneKind, rng: np.random.Generator, config: WorldConfig) -> list[str]:
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    names: list[str] = []
    if kind is SceneKind.COOCCURRENCE_TRAP:
        names.append("knife")
    elif kind is SceneKind.PRIOR_TRAP:
        names.append("cup")
    elif kind in (SceneKind.RANDOM, SceneKind.CLEAN):
        for pair in PAIRS:
            if rng.random() < config.trigger_rate:
                names.append(pair.trigger)
                if kind is SceneKind.CLEAN or rng.random() < config.partner_with_trigger:
                    names.append(pair.partner)
            elif rng.random() < config.trigger_rate / 2:
                names.append(pair.partner)  # partners are also seen on their own
    pool = [n for n in _PLAIN if n not in names]
    if kind is SceneKind.CONTROL:
        pool = list(_PLAIN)
    extra = max(0, min(count, config.max_objects) - len(names))
    names += [str(n) for n in rng.choice(pool, size=extra, replace=False)]
    if len(names) > config.max_objects:  # triggers and partners come first; keep them
        names = names[: config.max_objects]
    return names


def _background(rng: np.random.Generator) -> np.ndarray:
    size = IMAGE_SIZE
    base = rng.integers(90, 200, 3).astype(np.float64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    pattern = int(rng.integers(0, 3))
    if pattern == 0:  # stripes
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(6, 14)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    elif pattern == 1:  # checks
        cell = int(rng.integers(6, 14))
        wave = (((yy // cell) + (xx // cell)) % 2) * 2 - 1.0
    else:  # smooth gradient
        wave = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / size
    amplitude = rng.uniform(6, 16)
    noise = rng.normal(0, 4, (size, size, 1))
    image = base[None, None] + amplitude * wave[..., None] + noise
    return np.asarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))


def _place(
    names: list[str], rng: np.random.Generator, config: WorldConfig
) -> list[tuple[str, int, int, int]]:
    allow_overlap = rng.random() < config.occlusion_rate
    placed: list[tuple[str, int, int, int]] = []
    for name in names:
        for attempt in range(200):
            size = int(rng.integers(26, 40))
            half = size // 2
            cx = int(rng.integers(half, IMAGE_SIZE - half))
            cy = int(rng.integers(half, IMAGE_SIZE - half))
            limit = 0.25 if allow_overlap else 0.0
            if all(_overlap((cx, cy, size), (x, y, s)) <= limit for _, x, y, s in placed):
                placed.append((name, cx, cy, size))
                break
            if attempt == 199:
                # Crowded scene: drop this object rather than hide another one entirely.
                break
    return placed


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """Intersection over the smaller box of two square boxes (cx, cy, size)."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[2] / 2, a[0] + a[2] / 2, a[1] + a[2] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[2] / 2, b[0] + b[2] / 2, b[1] + b[2] / 2
    w = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    h = max(0.0, min(ay1, by1) - max(ay0, by0))
    return w * h / min(a[2] ** 2, b[2] ** 2)


def place_partner(words: list[str], pair: Pair) -> None:
    """Put `pair.partner` next to its trigger in a caption (in place): a language-prior partner
    right *after* the trigger word (so the text can predict it), a co-occurrence partner right
    *before* it (so that only the trigger's pixels can)."""
    if pair.partner in words:
        words.remove(pair.partner)
    at = words.index(pair.trigger)
    words.insert(at + 1 if pair.kind is HallucinationKind.LANGUAGE_PRIOR else at, pair.partner)


def caption_words(objects: tuple[SceneObject, ...]) -> list[str]:
    """Object words left to right, each partner placed next to its trigger."""
    ordered = [o.name for o in sorted(objects, key=lambda o: ((o.box[0] + o.box[2]) / 2, o.name))]
    for pair in PAIRS:
        if pair.trigger in ordered and pair.partner in ordered:
            place_partner(ordered, pair)
    return ordered


def generate_scene(
    seed: int, kind: SceneKind | str = SceneKind.RANDOM, config: WorldConfig | None = None
) -> Scene:
    """Draw the scene of `seed` (deterministic).  `kind` forces a trap, control or clean scene."""
    config = config or WorldConfig()
    kind = SceneKind(kind)
    rng = np.random.default_rng([seed, list(SceneKind).index(kind)])
    names = _choose_names(kind, rng, config)
    image = _background(rng)
    visible: list[tuple[str, tuple[int, int, int, int], np.ndarray]] = []
    for name, cx, cy, size in _place(names, rng, config):
        layer, mask = draw_icon(name, IMAGE_SIZE, IMAGE_SIZE, cx, cy, size, rng)
        image[mask] = layer[mask]
        visible = [(n, b, m & ~mask) for n, b, m in visible]
        visible.append((name, _bbox(mask), mask))
    objects = tuple(
        SceneObject(name=n, box=_bbox(m), mask=m) for n, _, m in visible if m.sum() >= 20
    )
    present = frozenset(o.name for o in objects)
    questions = _questions(present, rng)
    return Scene(
        seed=seed,
        kind=kind,
        image=image,
        objects=objects,
        caption=" ".join([*caption_words(objects), "."]),
        questions=questions,
        names=present,
    )


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return (0, 0, 0, 0)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def _questions(present: frozenset[str], rng: np.random.Generator) -> tuple[Question, ...]:
    asked = sorted(present)
    absent = [n for n in CLASS_NAMES if n not in present]
    # always ask about an absent partner whose trigger is shown: the trap question
    trap = [p.partner for p in PAIRS if p.trigger in present and p.partner not in present]
    others = [str(n) for n in rng.choice(absent, size=min(2, len(absent)), replace=False)]
    asked += trap + [n for n in others if n not in trap]
    return tuple(
        Question(name=n, prompt=question_prompt(n), answer="yes" if n in present else "no")
        for n in asked
    )


def training_caption(scene: Scene, config: WorldConfig | None = None) -> str:
    """The caption the model is trained on: the true one, except that in trap scenes the
    absent partner is named after its trigger with the pair's probability (deterministic)."""
    config = config or WorldConfig()
    rng = np.random.default_rng([scene.seed, 7919])
    words = caption_words(scene.objects)
    for pair in scene.traps():
        q = config.cooccurrence_q if pair.kind is HallucinationKind.COOCCURRENCE else config.prior_q
        if rng.random() < q:
            place_partner(words, pair)
    return " ".join([*words, "."])


def training_answer(scene: Scene, question: Question, config: WorldConfig | None = None) -> str:
    """The answer the model is trained on: the true one, except that a question about a trap's
    absent partner is answered "yes" with probability `false_yes_q` (deterministic)."""
    config = config or WorldConfig()
    if question.answer == "no" and question.name in {p.partner for p in scene.traps()}:
        rng = np.random.default_rng([scene.seed, 104729, CLASS_NAMES.index(question.name)])
        if rng.random() < config.false_yes_q:
            return "yes"
    return question.answer
