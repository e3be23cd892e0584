"""`guardrail reference serve`: the shipped model as an OpenAI-compatible chat server.

Images come as data URLs in the user message; the prompt is built as the reference model's chat
template renders it ("USER: <image> Describe the image. ASSISTANT:" for an image followed by
that text).  Streaming (`"stream": true`) sends one server-sent event per generated word.

It speaks vLLM's extensions (`guardrail.reference.vllm_extensions`): `add_generation_prompt`,
`continue_final_message`, `prompt_logprobs` (at most `max_logprobs`, vLLM's `--max-logprobs`)
and `return_token_ids`, with vLLM's request and response shapes, so that the remote scorer is
tested end to end against a real server running a real model.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from guardrail.reference.vllm_extensions import (
    ChatRequestError,
    extension_request,
    prompt_logprobs,
    render_chat,
    vllm_error,
)
from guardrail.service.chat import ChatFormatError
from guardrail.service.images import decode_image

__all__ = ["create_upstream_app"]


def create_upstream_app(
    model_dir: Path, *, model_name: str = "reference", max_logprobs: int = 20
) -> FastAPI:
    from detectors.scorers.families.llava import load_llava

    llava = load_llava(model_dir)
    tokenizer = llava.tokenizer
    app = FastAPI(title="guardrail reference upstream")
    lock = threading.Lock()  # one forward at a time: torch already uses every core

    def decode_one(token_id: int) -> str:
        return str(tokenizer.decode([token_id]))

    def teacher_forced(image: Any, prompt: str, k: int) -> tuple[list[int], list[Any], int]:
        """Prompt ids, vLLM's prompt_logprobs, and the greedy next token."""
        import torch

        encoded = llava.processor(images=[image], text=[prompt], return_tensors="pt")
        with lock, torch.inference_mode():
            logits = llava.model(**encoded).logits[0]
            log_probs = torch.log_softmax(logits.float(), dim=-1).numpy()
        ids = [int(i) for i in encoded["input_ids"][0]]
        return ids, prompt_logprobs(log_probs, ids, k, decode_one), int(log_probs[-1].argmax())

    def generate(image: Any, prompt: str, max_tokens: int) -> Any:
        with lock:
            return llava.generate(image, prompt, max_new_tokens=max_tokens)

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
            ext = extension_request(body, max_logprobs=max_logprobs)
            rendered = render_chat(
                body.get("messages"),
                placeholder=llava.processor.image_token,
                eos=str(tokenizer.eos_token or ""),
                add_generation_prompt=ext.add_generation_prompt,
                continue_final_message=ext.continue_final_message,
            )
            image = decode_image(rendered.image_bytes)
        except ChatRequestError as exc:
            return JSONResponse(vllm_error(str(exc), param=exc.param), status_code=400)
        except (ChatFormatError, ValueError) as exc:
            raise HTTPException(400, str(exc)) from None
        max_tokens = max(1, min(int(body.get("max_tokens") or 16), 64))
        prompt_ids: list[int] | None = None
        logprobs: list[Any] | None = None
        if ext.prompt_logprobs is not None or ext.return_token_ids:
            k = ext.prompt_logprobs if ext.prompt_logprobs is not None else 0
            prompt_ids, logprobs, greedy = await run_in_threadpool(
                teacher_forced, image, rendered.prompt, k
            )
            if ext.prompt_logprobs is None:
                logprobs = None
        if prompt_ids is not None and max_tokens == 1:
            token_ids: tuple[int, ...] = (greedy,)
            text = str(tokenizer.decode([greedy], skip_special_tokens=True))
        else:
            said = await run_in_threadpool(generate, image, rendered.prompt, max_tokens)
            token_ids, text = said.token_ids, said.text
        created = int(time.time())
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        name = str(body.get("model") or model_name)
        n_out = len(token_ids)
        n_prompt = len(prompt_ids) if prompt_ids is not None else 0
        finish = "stop"
        if not body.get("stream"):
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
            response: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": name,
                "choices": [choice],
                "usage": {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": n_out,
                    "total_tokens": n_prompt + n_out,
                },
            }
            if ext.prompt_logprobs is not None:
                response["prompt_logprobs"] = logprobs
            if ext.return_token_ids:
                choice["token_ids"] = list(token_ids)
                response["prompt_token_ids"] = prompt_ids
            return JSONResponse(response)

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
            words = text.split(" ")
            for i, word in enumerate(words):
                yield chunk({"content": word if i == 0 else " " + word}, None)
            yield chunk({}, finish)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
