"""`guardrail reference serve`: the shipped model as an OpenAI-compatible chat server.

Images come as data URLs in the user message; the prompt is built as in `guardrail.chat`
("USER: <image> Describe the image. ASSISTANT:" for an image followed by that text).
Streaming (`"stream": true`) sends one server-sent event per generated word.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from guardrail.chat import chat_input
from guardrail.images import decode_image

__all__ = ["create_upstream_app"]


def create_upstream_app(model_dir: Path, *, model_name: str = "reference") -> FastAPI:
    from detectors.scorers.llava import load_llava

    llava = load_llava(model_dir)
    app = FastAPI(title="guardrail reference upstream")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> JSONResponse | StreamingResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            raise HTTPException(400, f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "the body must be a JSON object")
        try:
            parsed = chat_input(body, "<image>")
            if parsed.image_bytes is None:
                raise ValueError("the reference upstream takes images as data URLs only")
            image = decode_image(parsed.image_bytes)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        max_tokens = int(body.get("max_tokens") or 16)
        said = llava.generate(image, parsed.prompt, max_new_tokens=max(1, min(max_tokens, 64)))
        created = int(time.time())
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        name = str(body.get("model") or model_name)
        n_out = len(said.token_ids)
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": said.text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": 0,
                        "completion_tokens": n_out,
                        "total_tokens": n_out,
                    },
                }
            )

        def events() -> Iterator[str]:
            def chunk(delta: dict[str, Any], finish: str | None) -> str:
                payload = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
                return f"data: {json.dumps(payload)}\n\n"

            yield chunk({"role": "assistant", "content": ""}, None)
            words = said.text.split(" ")
            for i, word in enumerate(words):
                yield chunk({"content": word if i == 0 else " " + word}, None)
            yield chunk({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
