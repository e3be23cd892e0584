from __future__ import annotations

import pytest

from detectors.objects import DEFAULT_VOCABULARY, ObjectVocabulary, flag_objects, token_spans


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A cat and two dogs.", ["cat", "dog"]),
        ("knives, forks and a spoon", ["knife", "fork", "spoon"]),
        ("a hot dog beside a dog", ["hot dog", "dog"]),
        ("People on a sofa watching television", ["person", "couch", "tv"]),
        ("a catalogue of dogma", []),
        ("The Traffic Lights are red", ["traffic light"]),
    ],
)
def test_vocabulary_finds_whole_words_longest_first(text: str, expected: list[str]) -> None:
    assert [c for _, _, c in DEFAULT_VOCABULARY.find(text)] == expected


def _subword_decoder(pieces: list[str]):  # type: ignore[no-untyped-def]
    return lambda ids: "".join(pieces[i] for i in ids)


def test_multi_piece_words_are_audited_at_their_first_piece() -> None:
    pieces = ["A", " kn", "ives", " and", " a", " hot", " dog", "."]
    mentions = flag_objects(list(range(len(pieces))), _subword_decoder(pieces))
    assert [(m.category, m.word, m.position, m.pieces) for m in mentions] == [
        ("knife", "knives", 1, 2),
        ("hot dog", "hot dog", 5, 2),
    ]
    target = mentions[0].target()
    assert target.position == 1 and target.text == "knives"


def test_token_spans_cover_the_text() -> None:
    pieces = ["he", "llo", " ", "cat"]
    text, spans = token_spans(list(range(4)), _subword_decoder(pieces))
    assert text == "hello cat"
    assert spans == [(0, 2), (2, 5), (5, 6), (6, 9)]


def test_word_level_tokens_align_one_to_one() -> None:
    words = ["knife", "fork", "cat", "."]
    decode = lambda ids: " ".join(words[i] for i in ids)  # noqa: E731
    vocabulary = ObjectVocabulary({"knife": "knife", "fork": "fork", "cat": "cat"})
    mentions = flag_objects([0, 1, 2, 3], decode, vocabulary)
    assert [(m.word, m.position) for m in mentions] == [("knife", 0), ("fork", 1), ("cat", 2)]
