"""`guardrail reference serve` speaks vLLM's chat extensions with vLLM's shapes.

The fixture `fixtures/vllm_chat_completion_prompt_logprobs.json` is a chat completion as vLLM's
OpenAI-compatible server serializes it (`ChatCompletionResponse` in
`vllm/entrypoints/openai/chat_completion/protocol.py`, `Logprob` in `vllm/logprobs.py`) for a
request with `prompt_logprobs` and `return_token_ids`: `prompt_logprobs` and `prompt_token_ids`
at the top level, `token_ids` in the choice, each prompt entry a dict keyed by the token id as a
string.  If our server's answer drifts from that shape, the shape test fails.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from detectors.reference import CAPTION_PROMPT, MODEL_DIR
from detectors.scorers.families.llava import LlavaModel, load_llava
from guardrail.demo.background_server import BackgroundServer
from guardrail.reference.upstream import create_upstream_app
from guardrail.service.images import read_image

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "knife_trap.png"
FIXTURE = Path(__file__).parent / "fixtures" / "vllm_chat_completion_prompt_logprobs.json"


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with BackgroundServer(create_upstream_app(MODEL_DIR, max_logprobs=5)) as url:
        yield url


@pytest.fixture(scope="module")
def llava() -> LlavaModel:
    return load_llava(MODEL_DIR)


def _request(output: str, **extra: Any) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
    return {
        "model": "reference",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe the image."},
                ],
            },
            {"role": "assistant", "content": output},
        ],
        "continue_final_message": True,
        "add_generation_prompt": False,
        "max_tokens": 1,
        **extra,
    }


def _post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def _conforms(ours: Any, theirs: Any, where: str = "$") -> list[str]:
    """Where `ours` has a key vLLM's response lacks, or a value of another JSON type (null is
    allowed where vLLM may send null)."""
    if ours is None or theirs is None:
        return []
    if isinstance(theirs, dict) and isinstance(ours, dict):
        if all(k.isdigit() for k in theirs):  # token-id keyed: compare every entry to one
            sample = next(iter(theirs.values()))
            return [p for k, v in ours.items() for p in _conforms(v, sample, f"{where}[{k}]")] + [
                f"{where}: key {k!r} is not a token id" for k in ours if not k.isdigit()
            ]
        problems = [f"{where}.{k}: vLLM has no such field" for k in ours if k not in theirs]
        return problems + [
            p for k in ours if k in theirs for p in _conforms(ours[k], theirs[k], f"{where}.{k}")
        ]
    if isinstance(theirs, list) and isinstance(ours, list):
        samples = [t for t in theirs if t is not None]
        if not samples:
            return []
        return [p for i, v in enumerate(ours) for p in _conforms(v, samples[-1], f"{where}[{i}]")]
    kinds = (bool, int | float, str)
    for kind in kinds:
        if isinstance(theirs, kind):
            if isinstance(ours, kind) and not (kind is not bool and isinstance(ours, bool)):
                return []
            return [f"{where}: {type(ours).__name__} where vLLM sends {type(theirs).__name__}"]
    return [f"{where}: {type(ours).__name__} where vLLM sends {type(theirs).__name__}"]


def test_the_answer_has_vllms_shape(upstream: str) -> None:
    vllm = json.loads(FIXTURE.read_text())
    answer = _post(upstream, _request("fork knife", prompt_logprobs=2, return_token_ids=True))
    assert answer.status_code == 200, answer.text
    ours = answer.json()
    assert _conforms(ours, vllm) == []
    # what the remote scorer reads is where vLLM puts it, with the same structure
    for body in (ours, vllm):
        assert body["prompt_logprobs"][0] is None
        assert len(body["prompt_logprobs"]) == len(body["prompt_token_ids"])
        assert isinstance(body["choices"][0]["token_ids"], list)
        for token, entry in zip(
            body["prompt_token_ids"][1:], body["prompt_logprobs"][1:], strict=True
        ):
            assert str(token) in entry  # the prompt token itself is always there
            assert set(entry[str(token)]) == {"logprob", "rank", "decoded_token"}
    # the checker does catch drift
    assert _conforms({**ours, "prompt_logprob": []}, vllm) != []
    assert _conforms({**ours, "prompt_token_ids": "1 2"}, vllm) != []


def test_prompt_logprobs_are_the_models_teacher_forced_log_probabilities(
    upstream: str, llava: LlavaModel
) -> None:
    import torch

    image = read_image(EXAMPLE)
    said = llava.generate(image, CAPTION_PROMPT)
    output = llava.tokenizer.decode(list(said.token_ids[:3]))
    body = _post(upstream, _request(output, prompt_logprobs=3, return_token_ids=True)).json()
    ids, entries = body["prompt_token_ids"], body["prompt_logprobs"]
    # continue_final_message: the prompt ends with the output's tokens, nothing closes the turn
    assert ids[-3:] == list(said.token_ids[:3])
    assert ids == llava.prompt_ids(f"{CAPTION_PROMPT} {output}", image)
    encoded = llava.processor(
        images=[image], text=[f"{CAPTION_PROMPT} {output}"], return_tensors="pt"
    )
    with torch.inference_mode():
        logp = torch.log_softmax(llava.model(**encoded).logits[0].float(), -1).numpy()
    for i in range(1, len(ids)):
        entry = entries[i]
        own = entry[str(ids[i])]
        assert own["logprob"] == pytest.approx(float(logp[i - 1, ids[i]]), abs=1e-6)
        assert own["rank"] == int((logp[i - 1] > logp[i - 1, ids[i]]).sum()) + 1
        assert own["decoded_token"] == llava.tokenizer.decode([ids[i]])
        top = sorted(entry.items(), key=lambda kv: kv[1]["rank"])
        assert [v["rank"] for _, v in top][:3] == [1, 2, 3]
        assert [int(k) for k, _ in top][:3] == [int(t) for t in np.argsort(-logp[i - 1])[:3]]
        assert 3 <= len(entry) <= 4  # the top 3, and the prompt token when it is not among them
    # the greedy next token is the one generated after the prefix
    assert body["choices"][0]["token_ids"] == [said.token_ids[3]]
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_k_zero_gives_the_prompt_token_alone(upstream: str) -> None:
    body = _post(upstream, _request("fork", prompt_logprobs=0)).json()
    assert "prompt_token_ids" not in body  # only with return_token_ids
    assert all(len(e) == 1 for e in body["prompt_logprobs"][1:])
    assert all(
        math.isfinite(next(iter(e.values()))["logprob"]) for e in body["prompt_logprobs"][1:]
    )


def test_a_closed_assistant_turn_ends_with_the_end_token(upstream: str, llava: LlavaModel) -> None:
    body = _post(
        upstream,
        _request("fork", continue_final_message=False, prompt_logprobs=0, return_token_ids=True),
    ).json()
    assert body["prompt_token_ids"][-1] == llava.tokenizer.eos_token_id


@pytest.mark.parametrize(
    ("extra", "message", "param"),
    [
        (
            {"add_generation_prompt": True},
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            None,
        ),
        (
            {"prompt_logprobs": 6},
            "Requested prompt logprobs of 6, which is greater than max allowed: 5",
            "prompt_logprobs",
        ),
        (
            {"prompt_logprobs": -2},
            "`prompt_logprobs` must be a positive value or -1.",
            "prompt_logprobs",
        ),
        (
            {"prompt_logprobs": 1, "stream": True},
            "`prompt_logprobs` are not available when `stream=True`.",
            "prompt_logprobs",
        ),
        ({"prompt_logprobs": "2"}, "`prompt_logprobs` must be an integer.", "prompt_logprobs"),
    ],
)
def test_refusals_are_vllms(
    upstream: str, extra: dict[str, Any], message: str, param: str | None
) -> None:
    answer = _post(upstream, _request("fork", **extra))
    assert answer.status_code == 400
    assert answer.json() == {
        "error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}
    }


def test_a_plain_chat_request_is_unchanged(upstream: str) -> None:
    body = _request("x")
    body["messages"] = body["messages"][:1]
    for key in ("continue_final_message", "add_generation_prompt", "max_tokens"):
        del body[key]
    answer = _post(upstream, body).json()
    assert answer["choices"][0]["message"]["content"] == "fork knife car clock ."
    assert "prompt_logprobs" not in answer and "prompt_token_ids" not in answer


def test_a_lone_surrogate_in_a_message_is_a_400_with_the_reason(upstream: str) -> None:
    body = json.dumps(_request("fork knife")).replace("Describe the image.", "Describe \\ud800.")
    answer = httpx.post(
        f"{upstream}/v1/chat/completions",
        content=body.encode(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert answer.status_code == 400
    assert "lone surrogate (U+D800)" in answer.json()["detail"]
