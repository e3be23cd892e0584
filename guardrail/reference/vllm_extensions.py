"""vLLM's extensions of the chat-completions API, as the reference upstream speaks them.

vLLM (`vllm.entrypoints.openai.chat_completion.protocol`) accepts, beside OpenAI's fields:
`add_generation_prompt` (default true), `continue_final_message` (default false; both true is a
400), `prompt_logprobs` (int: -1 for the whole vocabulary, else k >= 0, at most the server's
`--max-logprobs`, 20 by default; refused with `stream`) and `return_token_ids`.  It answers with
`prompt_logprobs` at the top level of the chat completion: one entry per prompt token, the first
`null`, each a dict `token_id (str) -> {"logprob", "rank", "decoded_token"}` holding the prompt
token itself plus the top k (rank is 1-based over the vocabulary, -inf logprobs are sent as
-9999.0); `return_token_ids` adds `prompt_token_ids` at the top level and `token_ids` per choice.
Errors are `{"error": {"message", "type", "param", "code"}}` with the HTTP status as `code`.

This module renders the reference model's conversation the way a Hugging Face chat template
would (`continue_final_message` cuts the rendered text right after the final message's
content, as transformers' `apply_chat_template` does) and computes prompt log-probabilities with
one teacher-forced forward pass in float32.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from guardrail.errors import PermanentError
from guardrail.service.chat import ChatFormatError, _data_url

__all__ = [
    "ChatRequestError",
    "ExtensionRequest",
    "RenderedChat",
    "extension_request",
    "prompt_logprobs",
    "render_chat",
    "vllm_error",
]

# what vLLM sends for a logprob of -inf (`clamp_prompt_logprobs`)
_NEG_INF_LOGPROB = -9999.0


class ChatRequestError(PermanentError):
    """A request vLLM would refuse with a 400; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def vllm_error(message: str, *, status: int = 400, param: str | None = None) -> dict[str, Any]:
    """vLLM's error body (`ErrorResponse`): the HTTP status is repeated as `code`."""
    kinds = {400: "BadRequestError", 404: "NotFoundError", 422: "UnprocessableEntityError"}
    return {
        "error": {
            "message": message,
            "type": kinds.get(status, "InternalServerError"),
            "param": param,
            "code": status,
        }
    }


@dataclass(frozen=True, kw_only=True, slots=True)
class ExtensionRequest:
    """The vLLM fields of one chat request, validated as vLLM validates them."""

    add_generation_prompt: bool
    continue_final_message: bool
    prompt_logprobs: int | None
    return_token_ids: bool


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ChatRequestError(f"`{name}` must be a boolean, got {value!r}", name)
    return value


def extension_request(body: dict[str, Any], *, max_logprobs: int) -> ExtensionRequest:
    """The vLLM extension fields of `body`.

    Raises:
        ChatRequestError: a value vLLM refuses (with vLLM's message where it has one).
    """
    add = _flag(body, "add_generation_prompt", True)
    cont = _flag(body, "continue_final_message", False)
    if add and cont:
        raise ChatRequestError(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )
    k = body.get("prompt_logprobs")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int | float) or int(k) != k:
            raise ChatRequestError("`prompt_logprobs` must be an integer.", "prompt_logprobs")
        k = int(k)
        if body.get("stream") and (k > 0 or k == -1):
            raise ChatRequestError(
                "`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs"
            )
        if k < 0 and k != -1:
            raise ChatRequestError(
                "`prompt_logprobs` must be a positive value or -1.", "prompt_logprobs"
            )
        if k > max_logprobs:
            raise ChatRequestError(
                f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                f"{max_logprobs}",
                "prompt_logprobs",
            )
    return ExtensionRequest(
        add_generation_prompt=add,
        continue_final_message=cont,
        prompt_logprobs=k,
        return_token_ids=_flag(body, "return_token_ids", False),
    )


@dataclass(frozen=True, slots=True)
class RenderedChat:
    prompt: str  # the model's text, with the image placeholder where the image goes
    image_bytes: bytes


def _content_text(content: Any, placeholder: str, images: list[bytes]) -> str:
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise ChatFormatError("message content must be a string or a list of parts")
    pieces: list[str] = []
    for part in parts:
        if not isinstance(part, dict):
            raise ChatFormatError("content parts must be objects")
        if part.get("type") == "text":
            pieces.append(str(part.get("text", "")).strip())
        elif part.get("type") == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(_data_url(str(url)))
            pieces.append(placeholder)
    return " ".join(p for p in pieces if p)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def render_chat(
    messages: Any,
    *,
    placeholder: str,
    eos: str,
    add_generation_prompt: bool,
    continue_final_message: bool,
) -> RenderedChat:
    """The reference model's chat template: `USER: <turn> ASSISTANT: <turn></s> ...`, system
    messages dropped, ` ASSISTANT:` appended with `add_generation_prompt`; with
    `continue_final_message` the text ends right after the final message's content.

    Raises:
        ChatFormatError: no user message, not exactly one image, malformed content.
        ChatRequestError: `continue_final_message` without a final message to continue.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    turns: list[str] = []
    images: list[bytes] = []
    final_content = ""
    for message in messages:
        if not isinstance(message, dict):
            raise ChatFormatError("messages must be objects")
        role = message.get("role")
        if role == "system":
            continue
        if role not in ("user", "assistant"):
            raise ChatFormatError(f"unsupported message role {role!r}")
        text = _content_text(message.get("content"), placeholder, images)
        if (lone := _LONE_SURROGATE.search(text)) is not None:
            raise ChatFormatError(
                f"message text holds a lone surrogate (U+{ord(lone.group()):04X}) at position "
                f"{lone.start()}: not valid Unicode"
            )
        final_content = text
        turns.append(f"USER: {text}" if role == "user" else f"ASSISTANT: {text}{eos}")
    if not any(m.get("role") == "user" for m in messages if isinstance(m, dict)):
        raise ChatFormatError("no user message")
    if len(images) != 1:
        raise ChatFormatError(f"exactly one image is needed, found {len(images)}")
    rendered = " ".join(turns)
    if add_generation_prompt:
        rendered += " ASSISTANT:"
    if continue_final_message:
        if not final_content:
            raise ChatRequestError("continue_final_message needs a final message with content")
        # transformers: cut after the last occurrence of the final message's content
        rendered = rendered[: rendered.rindex(final_content) + len(final_content)]
    return RenderedChat(rendered, images[0])


def prompt_logprobs(
    log_probs: np.ndarray, prompt_ids: list[int], k: int, decode: Any
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs` from `(L, V)` next-token log-probabilities (row i predicts
    token i + 1): entry 0 is None; entry i holds token i and the top `k` (`-1`: all) of row
    i - 1, each with its 1-based rank over the vocabulary."""
    vocab = log_probs.shape[1]
    top = vocab if k == -1 else k
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for i in range(1, len(prompt_ids)):
        row = log_probs[i - 1]
        order = np.argsort(-row, kind="stable")[:top] if top else np.empty(0, dtype=np.int64)
        entry: dict[str, dict[str, Any]] = {}
        token = int(prompt_ids[i])
        for token_id, rank in [(token, int((row > row[token]).sum()) + 1)] + [
            (int(t), r + 1) for r, t in enumerate(order)
        ]:
            if str(token_id) in entry:
                continue
            value = float(row[token_id])
            entry[str(token_id)] = {
                "logprob": value if math.isfinite(value) else _NEG_INF_LOGPROB,
                "rank": rank,
                "decoded_token": decode(token_id),
            }
        out.append(entry)
    return out
