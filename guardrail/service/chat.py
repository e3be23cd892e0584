"""OpenAI chat-completions messages: the image and the prompt a multimodal model saw."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from guardrail.errors import PermanentError

__all__ = [
    "ChatFormatError",
    "ChatInput",
    "chat_input",
    "image_messages",
    "one_per_image",
    "user_turn",
]


class ChatFormatError(PermanentError):
    """The messages cannot be audited; `reason` says why: `text_only` (no image in any turn),
    `multi_image` (several images, for a model audited on one), `too_many_images` (more than
    the sample may hold), `image_unreadable` (an image part that is neither a
    base64 data URL nor an http(s) URL) or `messages_unreadable` (not the chat shape)."""

    def __init__(self, message: str, reason: str = "messages_unreadable") -> None:
        super().__init__(message)
        self.reason = reason


ImagePart = tuple[bytes | None, str | None]  # a data URL's bytes, or an http(s) URL


@dataclass(frozen=True, slots=True)
class ChatInput:
    """The image(s) of a conversation and the prompt around them.

    `image_bytes` holds the first image of a data URL; `image_url` an http(s) URL to fetch
    instead; `images` every image in order (the first included), as such pairs."""

    image_bytes: bytes | None
    prompt: str  # the conversation with the image placeholder where each image was
    image_url: str | None = None
    images: tuple[ImagePart, ...] = ()


def _data_url(url: str) -> bytes:
    if not url.startswith("data:") or "," not in url:
        raise ChatFormatError(
            "images must be data URLs (data:image/png;base64,...)", reason="image_unreadable"
        )
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise ChatFormatError("image data URLs must be base64-encoded", reason="image_unreadable")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ChatFormatError(
            f"the image data URL is not valid base64: {exc}", reason="image_unreadable"
        ) from None


def _image(part: dict[str, Any]) -> tuple[bytes | None, str | None]:
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise ChatFormatError("an image_url part without a URL", reason="image_unreadable")
    if url.startswith("data:") and "," in url:
        return _data_url(url), None
    if url[:8].lower().startswith(("http://", "https://")):
        return None, url
    raise ChatFormatError(
        "images must be data URLs (data:image/png;base64,...) or http(s) URLs",
        reason="image_unreadable",
    )


def _turn(content: Any, placeholder: str, images: list[ImagePart]) -> list[str]:
    """A message's text parts with the placeholder where its images stand (images
    collected)."""
    if isinstance(content, str):
        return [content.strip()]
    if content is None:
        return []
    if not isinstance(content, list):
        raise ChatFormatError(
            "message content must be a string or a list of parts", reason="messages_unreadable"
        )
    pieces: list[str] = []
    for part in content:
        if not isinstance(part, dict):
            raise ChatFormatError("content parts must be objects", reason="messages_unreadable")
        if part.get("type") == "text":
            pieces.append(str(part.get("text", "")).strip())
        elif part.get("type") == "image_url":
            images.append(_image(part))
            pieces.append(placeholder)
    return pieces


def _count_images(messages: list[Any]) -> int:
    """The image parts of the turns that are audited (user and assistant; system and tool
    turns are skipped, as `chat_input` skips them), counted before any is decoded."""
    return sum(
        1
        for m in messages
        if isinstance(m, dict)
        and m.get("role") in ("user", "assistant")
        and isinstance(m.get("content"), list)
        for part in m["content"]
        if isinstance(part, dict) and part.get("type") == "image_url"
    )


def one_per_image(prompt: str, n_images: int, placeholder: str, segment: str | None) -> str:
    """A prompt rendered from a template that holds one image, with that image standing for
    `n_images`: the first `segment` (or, without one in the prompt, `placeholder`) becomes
    `segment` once per image."""
    if n_images <= 1:
        return prompt
    one = segment if segment and segment in prompt else placeholder
    return prompt.replace(one, (segment or placeholder) * n_images, 1)


def chat_input(
    body: dict[str, Any],
    placeholder: str,
    template: str | None = None,
    *,
    max_images: int = 1,
    segment: str | None = None,
) -> ChatInput:
    """The conversation's images (in any user turn) and the prompt the model saw.

    Without `template` the prompt is the user and assistant turns as "USER: ... ASSISTANT:
    ... USER: ... ASSISTANT:", the placeholder where the image stood (one user turn gives
    "USER: <image> Describe the image. ASSISTANT:").  With `template`, `{prompt}` in it is
    replaced by the text of the last user turn.  Several images (up to `max_images`) each
    stand as `segment` (the family's placeholder with its markers), in the text or, with a
    template, where the template holds its one image.

    Raises:
        ChatFormatError: no image, several images where one is audited (`multi_image`), more
            than `max_images` (`too_many_images`), an unreadable image or messages.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ChatFormatError("messages must be a list", reason="messages_unreadable")
    count = _count_images(messages)
    if count > 1 and max_images == 1:
        raise ChatFormatError(f"{count} images; one image is audited", reason="multi_image")
    if count > max_images:
        raise ChatFormatError(
            f"{count} images; at most {max_images} are audited in one sample",
            reason="too_many_images",
        )
    single = placeholder
    if count > 1 and segment:
        placeholder = segment
    images: list[ImagePart] = []
    turns: list[str] = []
    last_user: list[str] | None = None
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            continue  # system and tool turns carry no image and are not in the audit prompt
        found = len(images)
        pieces = _turn(message.get("content"), placeholder, images)
        text = " ".join(p for p in pieces if p)
        if message["role"] == "assistant" and len(images) != found:
            raise ChatFormatError("an assistant turn holds an image", reason="messages_unreadable")
        if message["role"] == "user":
            last_user = pieces
            turns.append(f"USER: {text}" if text else "USER:")
        else:
            turns.append(f"ASSISTANT: {text}" if text else "ASSISTANT:")
    if not images:
        raise ChatFormatError("no image in any turn", reason="text_only")
    if last_user is None:
        raise ChatFormatError("no user message", reason="messages_unreadable")
    image_bytes, image_url = images[0]
    if template:
        text = " ".join(p for p in last_user if p and p != placeholder)
        prompt = one_per_image(template.replace("{prompt}", text), len(images), single, segment)
        return ChatInput(image_bytes, prompt, image_url, tuple(images))
    # a conversation that ends on an assistant turn is a continuation of that turn
    ending = "" if turns[-1].startswith("ASSISTANT") else " ASSISTANT:"
    return ChatInput(image_bytes, " ".join(turns) + ending, image_url, tuple(images))


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
