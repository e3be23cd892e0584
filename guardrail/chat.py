"""OpenAI chat-completions messages: the image and the prompt a multimodal model saw."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

__all__ = ["ChatFormatError", "ChatInput", "chat_input", "image_messages", "user_turn"]


class ChatFormatError(ValueError):
    """The messages hold no image, several images, or an image that is not a data URL."""


@dataclass(frozen=True, slots=True)
class ChatInput:
    image_bytes: bytes
    prompt: str  # the user turn with the image placeholder where the image was


def _data_url(url: str) -> bytes:
    if not url.startswith("data:") or "," not in url:
        raise ChatFormatError("images must be data URLs (data:image/png;base64,...)")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise ChatFormatError("image data URLs must be base64-encoded")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ChatFormatError(f"the image data URL is not valid base64: {exc}") from None


def chat_input(body: dict[str, Any], placeholder: str, template: str | None = None) -> ChatInput:
    """The last user message's image and text.  The prompt is `template` with `{prompt}`
    replaced by the text when given, else "USER: ... ASSISTANT:" with the placeholder where
    the image part stands among the text parts."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ChatFormatError("messages must be a list")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ChatFormatError("no user message")
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise ChatFormatError("message content must be a string or a list of parts")
    pieces: list[str] = []
    images: list[bytes] = []
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
    if len(images) != 1:
        raise ChatFormatError(f"exactly one image is needed, found {len(images)}")
    if template:
        text = " ".join(p for p in pieces if p and p != placeholder)
        return ChatInput(images[0], template.replace("{prompt}", text))
    return ChatInput(images[0], "USER: " + " ".join(p for p in pieces if p) + " ASSISTANT:")


def image_messages(
    image_png: bytes, text: str, *, media_type: str = "image/png"
) -> list[dict[str, Any]]:
    """One user turn with an image (as a data URL) followed by `text`, as OpenAI clients send."""
    url = f"data:{media_type};base64," + base64.b64encode(image_png).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": text},
            ],
        }
    ]


DEFAULT_TEMPLATE = "USER: {prompt} ASSISTANT:"


def user_turn(prompt: str, placeholder: str, template: str | None = None) -> tuple[str, bool]:
    """The user turn's text inside a rendered `prompt`, and whether the image came before it:
    the inverse of `chat_input`, for sending the conversation again to the model's server.

    The prompt is matched against `template` (the model's `prompt` setting, `{prompt}` standing
    for the text) or LLaVA's `USER: {prompt} ASSISTANT:`; the image placeholder may sit in the
    template or in the text.  A prompt that matches neither is taken whole, placeholder removed.
    """
    pattern = template if template and "{prompt}" in template else DEFAULT_TEMPLATE
    head, _, tail = pattern.partition("{prompt}")
    if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) >= len(head + tail):
        inner = prompt[len(head) : len(prompt) - len(tail)]
        if placeholder in head:
            image_first = True
        elif placeholder in tail:
            image_first = False
        else:
            before, found, _ = inner.partition(placeholder)
            image_first = not found or not before.strip()
    else:
        inner = prompt
        image_first = not prompt.partition(placeholder)[0].strip()
    return " ".join(inner.replace(placeholder, " ").split()), image_first
