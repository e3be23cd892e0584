"""Flagging the object words of a model's output, aligned to generated token positions.

The vocabulary is the COCO-80 categories with common plural and synonym forms, plus the
reference world's classes.  Matching is on whole words, longest form first ("hot dog" before
"dog"), case-insensitive.  A word that the tokenizer splits into several pieces is audited at
its first piece, where the model decides to say it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from detectors.types import Target

__all__ = [
    "COCO_CATEGORIES",
    "DEFAULT_VOCABULARY",
    "ObjectMention",
    "ObjectVocabulary",
    "flag_objects",
    "token_spans",
]

COCO_CATEGORIES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("man", "woman", "men", "women", "people", "boy", "girl", "child", "children",
               "kid", "guy", "player", "lady", "persons"),
    "bicycle": ("bike",), "motorcycle": ("motorbike",), "airplane": ("plane", "aeroplane", "jet"),
    "couch": ("sofa",), "tv": ("television",), "cell phone": ("phone", "cellphone", "smartphone"),
    "dining table": ("table",), "potted plant": ("plant", "houseplant"),
    "sports ball": ("ball", "football", "soccer ball"), "donut": ("doughnut",),
    "hair drier": ("hair dryer",), "refrigerator": ("fridge",), "cup": ("mug",),
    "remote": ("remote control",), "laptop": ("notebook computer",),
}  # fmt: skip

_REFERENCE_EXTRA = ("tree", "house", "fish", "flower")
_IRREGULAR = {
    "knife": "knives", "mouse": "mice", "person": "people", "sheep": "sheep", "fish": "fish",
    "child": "children", "man": "men", "woman": "women", "skis": "skis",
}  # fmt: skip


def _plural(word: str) -> str:
    head, _, last = word.rpartition(" ")
    if last in _IRREGULAR:
        plural = _IRREGULAR[last]
    elif last.endswith(("s", "x", "ch", "sh")):
        plural = last + "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        plural = last[:-1] + "ies"
    else:
        plural = last + "s"
    return f"{head} {plural}" if head else plural


@dataclass(frozen=True, kw_only=True, slots=True)
class ObjectMention:
    """One object word in the output.

    Attributes:
        word: the surface form as written ("knives").
        category: its canonical category ("knife").
        start, end: character span in the decoded output.
        position: index of its first token among the generated tokens.
        token_id: that token's id.
        pieces: how many tokens the word spans.
    """

    word: str
    category: str
    start: int
    end: int
    position: int
    token_id: int
    pieces: int

    def target(self) -> Target:
        return Target(position=self.position, token_id=self.token_id, text=self.word)


class ObjectVocabulary:
    """Surface forms -> canonical categories."""

    def __init__(self, forms: Mapping[str, str]) -> None:
        self.forms = {k.lower(): v for k, v in forms.items()}
        ordered = sorted(self.forms, key=lambda f: (-len(f), f))
        self._pattern = re.compile(
            r"(?<![\w-])(" + "|".join(re.escape(f) for f in ordered) + r")(?![\w-])", re.IGNORECASE
        )

    @classmethod
    def from_categories(
        cls, categories: Iterable[str], synonyms: Mapping[str, Iterable[str]] | None = None
    ) -> ObjectVocabulary:
        forms: dict[str, str] = {}
        for category in categories:
            for form in (category, *(synonyms or {}).get(category, ())):
                forms.setdefault(form, category)
                forms.setdefault(_plural(form), category)
        return cls(forms)

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """`(start, end, category)` of every object word in `text`, left to right."""
        return [
            (m.start(), m.end(), self.forms[m.group(1).lower()])
            for m in self._pattern.finditer(text)
        ]


DEFAULT_VOCABULARY = ObjectVocabulary.from_categories(
    (*COCO_CATEGORIES, *_REFERENCE_EXTRA), _SYNONYMS
)


def token_spans(
    token_ids: Sequence[int], decode: Callable[[Sequence[int]], str]
) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text and each token's `(start, end)` character span in it, found by
    decoding growing prefixes (works for any tokenizer, byte-level pieces included)."""
    spans: list[tuple[int, int]] = []
    previous = ""
    for i in range(len(token_ids)):
        text = decode(token_ids[: i + 1])
        start = len(previous) if text.startswith(previous) else _common_prefix(previous, text)
        spans.append((start, len(text)))
        previous = text
    return previous, spans


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def flag_objects(
    token_ids: Sequence[int],
    decode: Callable[[Sequence[int]], str],
    vocabulary: ObjectVocabulary = DEFAULT_VOCABULARY,
) -> list[ObjectMention]:
    """Object words of a generated output, each aligned to its first token.

    Args:
        token_ids: the generated tokens.
        decode: the tokenizer's decode (ids -> text, special tokens skipped).
        vocabulary: which words are objects.
    """
    text, spans = token_spans(token_ids, decode)
    mentions = []
    for start, end, category in vocabulary.find(text):
        covering = [i for i, (s, e) in enumerate(spans) if s < end and e > start and e > s]
        if not covering:
            continue
        first = covering[0]
        mentions.append(
            ObjectMention(
                word=text[start:end],
                category=category,
                start=start,
                end=end,
                position=first,
                token_id=int(token_ids[first]),
                pieces=len(covering),
            )
        )
    return mentions
