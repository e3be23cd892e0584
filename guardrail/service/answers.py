"""Reading a chat-completions answer for the tee: its id and the text of every choice.

Answers come from an upstream the guardrail does not control, so reading is bounded: a JSON
document with more than `MAX_TEE_JSON_VALUES` values is not parsed, a compressed body is
inflated to at most the answer copy bound, and a streamed answer's text is assembled per
choice index (an SSE event carries `choices[i].index`; `n > 1` interleaves them).
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

from guardrail.errors import PermanentError

__all__ = [
    "MAX_CHOICES",
    "MAX_TEE_JSON_VALUES",
    "Answer",
    "UnreadableAnswerError",
    "decoded_body",
    "json_values",
    "read_answer",
    "response_id",
]

# A JSON document of N bytes can hold about N/2 values, and parsing it can take 50 times its
# size in Python objects: documents with more values than this are not parsed for the tee.
MAX_TEE_JSON_VALUES = 200_000
# choices of one answer that are audited (each its own sample); the rest are counted drops
MAX_CHOICES = 16
_SSE_LINE = re.compile(r"\r\n|\r|\n")  # SSE line ends only (not str.splitlines's U+2028 etc.)
_RESPONSE_ID = re.compile(r"[!-~]{1,128}")  # visible ASCII, as request ids


class UnreadableAnswerError(PermanentError):
    """An answer whose text cannot be read (not the chat-completions shape); `reason` is the
    drop reason."""

    def __init__(self, message: str, reason: str = "response_unreadable") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Answer:
    """What the tee keeps of an answer: the upstream's id (None when absent or not a short
    visible-ASCII string), each choice's text by index (None: the choice has no text, e.g. a
    tool call) and the number of choices beyond `MAX_CHOICES`."""

    id: str | None
    texts: dict[int, str | None]
    extra_choices: int = 0


def json_values(raw: bytes | str) -> int:
    """An upper bound on the number of values in a JSON document (every value but the first
    in a container follows a comma, every key a colon; the same characters in strings only
    make the bound looser)."""
    if isinstance(raw, str):
        return raw.count(",") + raw.count(":") + raw.count("[") + raw.count("{") + 1
    return raw.count(b",") + raw.count(b":") + raw.count(b"[") + raw.count(b"{") + 1


def _json(raw: bytes | str) -> Any:
    if json_values(raw) > MAX_TEE_JSON_VALUES:
        raise UnreadableAnswerError(f"more than {MAX_TEE_JSON_VALUES} JSON values")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep
        raise UnreadableAnswerError(f"not JSON: {exc}") from None


def decoded_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """`raw` without its Content-Encoding (identity, gzip, x-gzip, deflate), at most `limit`
    bytes once inflated.

    Raises:
        UnreadableAnswerError: another encoding (`response_encoding`), corrupt data, or more
            than `limit` bytes inflated (`response_too_large`).
    """
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
    data = raw
    for coding in reversed(codings):  # applied in order, so undone last first
        if coding == "identity":
            continue
        if coding not in ("gzip", "x-gzip", "deflate"):
            raise UnreadableAnswerError(
                f"content-encoding {coding!r} is not read by the tee", "response_encoding"
            )
        if coding == "deflate" and data[:1] and (data[0] & 0x0F) != 8:
            wbits = -zlib.MAX_WBITS  # raw deflate, as some servers send it
        else:
            wbits = zlib.MAX_WBITS | (16 if coding != "deflate" else 0)
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(data, limit + 1)
        except zlib.error as exc:
            raise UnreadableAnswerError(f"corrupt {coding} data: {exc}") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise UnreadableAnswerError(f"over {limit} bytes once inflated", "response_too_large")
        data = out
    return data


def response_id(value: Any) -> str | None:
    """The upstream's answer id when it is a short visible-ASCII string, else None."""
    if isinstance(value, str) and _RESPONSE_ID.fullmatch(value):
        return value
    return None


def _index(choice: Any) -> int:
    if not isinstance(choice, dict):
        raise UnreadableAnswerError("a choice is not a JSON object")
    index = choice.get("index", 0)
    if type(index) is not int or index < 0:
        raise UnreadableAnswerError("a choice's index is not a non-negative integer")
    return index


def _completion(raw: bytes) -> Answer:
    data = _json(raw)
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list):
        raise UnreadableAnswerError("the answer is not an object with a list of choices")
    texts: dict[int, str | None] = {}
    extra = 0
    for choice in choices:
        index = _index(choice)
        if index in texts:
            raise UnreadableAnswerError(f"two choices have index {index}")
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if content is not None and not isinstance(content, str):
            raise UnreadableAnswerError(f"choice {index}'s message content is not text")
        if index >= MAX_CHOICES:
            extra += 1
            continue
        texts[index] = content
    if not texts and not extra:
        raise UnreadableAnswerError("the answer has no choice")
    return Answer(id=response_id(data.get("id")), texts=texts, extra_choices=extra)


def _stream(raw: bytes) -> Answer:
    pieces: dict[int, list[str] | None] = {}
    extra: set[int] = set()
    ids: list[str | None] = []
    data: list[str] = []
    for line in [*_SSE_LINE.split(raw.decode("utf-8", errors="replace")), ""]:
        if not line:  # a blank line ends an event
            if data:
                _event("\n".join(data), pieces, extra, ids)
                data = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if not pieces and not extra:
        raise UnreadableAnswerError("the stream has no choice")
    texts = {i: None if p is None else "".join(p) for i, p in pieces.items()}
    return Answer(id=ids[0] if ids else None, texts=texts, extra_choices=len(extra))


def _event(
    data: str,
    pieces: dict[int, list[str] | None],
    extra: set[int],
    ids: list[str | None],
) -> None:
    if data.strip() == "[DONE]":
        return
    event = _json(data)
    if not isinstance(event, dict):
        raise UnreadableAnswerError("an event is not a JSON object")
    if not ids:
        ids.append(response_id(event.get("id")))
    choices = event.get("choices") or []
    if not isinstance(choices, list):
        raise UnreadableAnswerError("an event's choices are not a list")
    for choice in choices:
        index = _index(choice)
        if index >= MAX_CHOICES:
            extra.add(index)
            continue
        delta = choice.get("delta")
        text = pieces.setdefault(index, None)
        if delta is None:
            continue
        if not isinstance(delta, dict):
            raise UnreadableAnswerError("a choice's delta is not a JSON object")
        content = delta.get("content")
        if content is None:
            continue
        if not isinstance(content, str):
            raise UnreadableAnswerError("a delta's content is not text")
        if text is None:
            pieces[index] = text = []
        text.append(content)


def read_answer(raw: bytes, *, streamed: bool) -> Answer:
    """The id and choice texts of a chat completion (`streamed`: its SSE events).

    Raises:
        UnreadableAnswerError: not the chat-completions shape.
    """
    return _stream(raw) if streamed else _completion(raw)
