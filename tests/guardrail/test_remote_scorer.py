"""`RemoteScorer` against real loopback servers: the reference upstream (parity with the local
fast scorer), and servers in front of it that throttle, drop vLLM's extensions or refuse them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request, Response

from detectors.errors import (
    DetectorError,
    RemoteRequestError,
    RemoteTokenMismatchError,
    RemoteUnavailableError,
    RemoteUnsupportedError,
)
from detectors.reference import CAPTION_PROMPT, MODEL_DIR
from detectors.regions import slic_partition
from detectors.scorers.families.llava import FastLlavaScorer, LlavaModel, load_llava
from detectors.scorers.masked import MaskedBatch
from detectors.scorers.remote import (
    RemoteClient,
    RemoteScorer,
    RemoteServer,
    TokenBucket,
    masked_server_url,
)
from detectors.types import Fill, Target
from guardrail.demo.background_server import BackgroundServer
from guardrail.reference.upstream import create_upstream_app
from guardrail.service.images import read_image

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with BackgroundServer(create_upstream_app(MODEL_DIR, max_logprobs=4)) as url:
        yield url


@pytest.fixture(scope="module")
def llava() -> LlavaModel:
    return load_llava(MODEL_DIR)


@pytest.fixture(scope="module")
def sample(llava: LlavaModel) -> dict[str, Any]:
    image = read_image(EXAMPLE)
    ids = list(llava.generate(image, CAPTION_PROMPT).token_ids)
    partition = slic_partition(image, 24)
    keep = np.random.default_rng(0).random((6, partition.n_regions)) < 0.5
    keep[0] = True
    keep[1] = False
    batch = MaskedBatch(image=image, partition=partition, keep=keep, fill=Fill.MEAN)
    targets = [Target(position=0, token_id=ids[0]), Target(position=2, token_id=ids[2])]
    return {"image": image, "ids": ids, "batch": batch, "targets": targets}


def _scorer(client: RemoteClient, llava: LlavaModel, ids: list[int]) -> RemoteScorer:
    return RemoteScorer(
        client, "Describe the image.", ids, lambda t: str(llava.tokenizer.decode(list(t)))
    )


class Front:
    """A loopback server in front of the reference upstream: `rule(body, n)` returns a
    `Response` to answer the n-th request itself, or a (possibly changed) body to forward."""

    def __init__(self, upstream: str, rule: Callable[[dict[str, Any], int], Any]) -> None:
        self.seen: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        lock = threading.Lock()
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            with lock:
                self.seen.append(body)
                self.headers.append(dict(request.headers))
                n = len(self.seen)
            out = rule(body, n)
            if isinstance(out, Response):
                return out
            async with httpx.AsyncClient(timeout=60) as http:
                answer = await http.post(f"{upstream}/v1/chat/completions", json=out)
            return Response(answer.content, answer.status_code, media_type="application/json")

        self.server = BackgroundServer(app)

    def __enter__(self) -> str:
        return self.server.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)


def test_remote_probabilities_equal_the_local_fast_scorer(
    upstream: str, llava: LlavaModel, sample: dict[str, Any]
) -> None:
    local = FastLlavaScorer(llava, sample["image"], CAPTION_PROMPT, sample["ids"])
    expected = local.score(sample["batch"], sample["targets"])
    for concurrency in (1, 4):
        server = RemoteServer(url=upstream, model="reference", concurrency=concurrency)
        with RemoteClient(server) as client:
            scorer = _scorer(client, llava, sample["ids"])
            got = scorer.score(sample["batch"], sample["targets"])
            stats = client.stats
        assert np.abs(got - expected).max() <= 1e-5
        # one request per masked image: one forward pass of the search's budget each
        assert stats.requests == stats.rows == sample["batch"].size
        assert stats.failures == stats.retries == 0 and stats.seconds > 0
    assert scorer.name == f"remote({upstream}; model=reference; image=png)"


def test_requests_carry_the_key_and_the_name_hides_credentials(
    upstream: str, llava: LlavaModel, sample: dict[str, Any]
) -> None:
    front = Front(upstream, lambda body, n: body)
    with front as url:
        server = RemoteServer(url=url + "/v1", model="reference", api_key="sk-secret-123")
        with RemoteClient(server) as client:
            scorer = _scorer(client, llava, sample["ids"])
            scorer.score(sample["batch"], sample["targets"][:1])
    body = front.seen[0]
    assert front.headers[0]["authorization"] == "Bearer sk-secret-123"
    assert "sk-secret" not in scorer.name and "sk-secret" not in repr(server)
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["max_tokens"] == 1 and body["prompt_logprobs"] == 0
    user, assistant = body["messages"]
    assert [p["type"] for p in user["content"]] == ["image_url", "text"]
    assert user["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert user["content"][1]["text"] == "Describe the image."
    # the output up to and including the last target, as the model produced it
    assert assistant == {"role": "assistant", "content": "fork"}
    assert (
        masked_server_url("https://user:pw@vllm:8000/v1?key=abc")
        == "https://****@vllm:8000/v1?****"
    )


def test_429_and_503_are_retried_honouring_retry_after(
    upstream: str, llava: LlavaModel, sample: dict[str, Any]
) -> None:
    def throttle(body: dict[str, Any], n: int) -> Any:
        if n == 1:
            return Response("busy", 429, headers={"Retry-After": "2"})
        if n == 2:
            return Response('{"error": {"message": "overloaded"}}', 503)  # no Retry-After
        if n == 3:
            return Response("", 503, headers={"Retry-After": "3600"})  # capped
        return body

    waits: list[float] = []
    with Front(upstream, throttle) as url:
        server = RemoteServer(url=url, model="reference", concurrency=1, max_retry_wait=5)
        with RemoteClient(server, sleep=waits.append) as client:
            batch = sample["batch"]
            one = MaskedBatch(
                image=batch.image, partition=batch.partition, keep=batch.keep[:1], fill=batch.fill
            )
            got = _scorer(client, llava, sample["ids"]).score(one, sample["targets"])
            stats = client.stats
    assert waits == [2.0, 0.5, 5.0]  # Retry-After, exponential backoff, Retry-After capped
    assert stats.requests == 4 and stats.retries == 3 and stats.failures == 3
    assert got.shape == (1, 2) and got[0, 0] > 0


def test_retries_are_bounded(upstream: str, llava: LlavaModel, sample: dict[str, Any]) -> None:
    waits: list[float] = []
    with Front(upstream, lambda body, n: Response("", 503, headers={"Retry-After": "0"})) as url:
        server = RemoteServer(url=url, model="reference", concurrency=1, max_retries=2)
        with RemoteClient(server, sleep=waits.append) as client:
            # one masked image: with several, the pool's thread may start the next request
            # before the failed one cancels the rest, so the count would depend on timing
            batch = sample["batch"]
            one = MaskedBatch(
                image=batch.image, partition=batch.partition, keep=batch.keep[:1], fill=batch.fill
            )
            with pytest.raises(RemoteUnavailableError, match=r"3 attempts failed.*HTTP 503"):
                _scorer(client, llava, sample["ids"]).score(one, sample["targets"])
            assert client.stats.failures == 3 and client.stats.requests == 3
    # transient: not a DetectorError, so a worker retries the job later
    assert not issubclass(RemoteUnavailableError, DetectorError)


def test_a_server_that_ignores_continue_final_message_is_a_token_mismatch(
    upstream: str, llava: LlavaModel, sample: dict[str, Any]
) -> None:
    def drop(body: dict[str, Any], n: int) -> dict[str, Any]:
        return {k: v for k, v in body.items() if k != "continue_final_message"}

    with (
        Front(upstream, drop) as url,
        RemoteClient(RemoteServer(url=url, model="m")) as client,
        pytest.raises(RemoteTokenMismatchError, match="continue_final_message ignored"),
    ):
        _scorer(client, llava, sample["ids"]).score(sample["batch"], sample["targets"])


def test_another_tokenizer_is_a_token_mismatch(
    upstream: str, llava: LlavaModel, sample: dict[str, Any]
) -> None:
    with RemoteClient(RemoteServer(url=upstream, model="reference")) as client:
        # the output as another model's tokenizer would spell it: the ids do not come back
        scorer = RemoteScorer(client, "Describe the image.", sample["ids"], lambda t: "fork  car")
        with pytest.raises(RemoteTokenMismatchError, match="the prompt ends with tokens"):
            scorer.score(sample["batch"], sample["targets"])


def _openai_refusal(field: str) -> Callable[[dict[str, Any], int], Any]:
    def refuse(body: dict[str, Any], n: int) -> Any:
        if field in body:
            message = f"Unrecognized request argument supplied: {field}"
            error = {"message": message, "type": "invalid_request_error", "param": None}
            return Response(json.dumps({"error": error}), 400, media_type="application/json")
        return body

    return refuse


@pytest.mark.parametrize("field", ["prompt_logprobs", "continue_final_message"])
def test_a_server_that_refuses_an_extension_is_named(
    upstream: str, llava: LlavaModel, sample: dict[str, Any], field: str
) -> None:
    with (
        Front(upstream, _openai_refusal(field)) as url,
        RemoteClient(RemoteServer(url=url, model="m")) as client,
    ):
        with pytest.raises(RemoteUnsupportedError, match=f"refused {field}"):
            _scorer(client, llava, sample["ids"]).score(sample["batch"], sample["targets"])
        assert client.stats.retries == 0  # a refusal is not retried


def test_a_server_that_ignores_prompt_logprobs_is_named(
    upstream: str, llava: LlavaModel, sample: dict[str, Any]
) -> None:
    def drop(body: dict[str, Any], n: int) -> dict[str, Any]:
        return {k: v for k, v in body.items() if k != "prompt_logprobs"}

    with (
        Front(upstream, drop) as url,
        RemoteClient(RemoteServer(url=url, model="m")) as client,
        pytest.raises(RemoteUnsupportedError, match="without prompt_logprobs"),
    ):
        _scorer(client, llava, sample["ids"]).score(sample["batch"], sample["targets"])


def test_k_above_the_servers_max_logprobs_names_the_flag(
    upstream: str, llava: LlavaModel, sample: dict[str, Any]
) -> None:
    server = RemoteServer(url=upstream, model="reference", prompt_logprobs=5)
    with (
        RemoteClient(server) as client,
        pytest.raises(RemoteUnsupportedError, match="--max-logprobs >= 5"),
    ):
        _scorer(client, llava, sample["ids"]).score(sample["batch"], sample["targets"])
    server = RemoteServer(url=upstream, model="reference", prompt_logprobs=4)
    with RemoteClient(server) as client:  # top-k beside the prompt token: the same answer
        got = _scorer(client, llava, sample["ids"]).score(sample["batch"], sample["targets"])
    with RemoteClient(RemoteServer(url=upstream, model="reference")) as client:
        plain = _scorer(client, llava, sample["ids"]).score(sample["batch"], sample["targets"])
    assert np.array_equal(got, plain)


def test_without_prompt_token_ids_k_zero_still_verifies(
    upstream: str, llava: LlavaModel, sample: dict[str, Any]
) -> None:
    """vLLM < 0.10.2 ignores return_token_ids: with k = 0 each entry names its token."""

    def old(body: dict[str, Any], n: int) -> dict[str, Any]:
        return {k: v for k, v in body.items() if k != "return_token_ids"}

    with Front(upstream, old) as url, RemoteClient(RemoteServer(url=url, model="m")) as client:
        got = _scorer(client, llava, sample["ids"]).score(sample["batch"], sample["targets"])
    with RemoteClient(RemoteServer(url=upstream, model="reference")) as client:
        plain = _scorer(client, llava, sample["ids"]).score(sample["batch"], sample["targets"])
    assert np.array_equal(got, plain)


def test_other_refusals_and_an_unreachable_server(
    upstream: str, llava: LlavaModel, sample: dict[str, Any]
) -> None:
    with (
        Front(upstream, lambda body, n: Response('{"detail": "bad key"}', 401)) as url,
        RemoteClient(RemoteServer(url=url, model="m")) as client,
        pytest.raises(RemoteRequestError, match="HTTP 401: bad key"),
    ):
        _scorer(client, llava, sample["ids"]).score(sample["batch"], sample["targets"])
    from guardrail.demo.background_server import closed_port

    with (
        closed_port() as port,
        RemoteClient(
            RemoteServer(url=f"http://127.0.0.1:{port}", model="m", max_retries=1),
            sleep=lambda s: None,
        ) as client,
        pytest.raises(RemoteUnavailableError, match="ConnectError"),
    ):
        _scorer(client, llava, sample["ids"]).score(sample["batch"], sample["targets"])


def test_the_request_rate_is_capped(
    upstream: str, llava: LlavaModel, sample: dict[str, Any]
) -> None:
    server = RemoteServer(url=upstream, model="reference", concurrency=4, max_requests_per_second=8)
    with RemoteClient(server) as client:
        started = time.monotonic()
        _scorer(client, llava, sample["ids"]).score(sample["batch"], sample["targets"])
        _scorer(client, llava, sample["ids"]).score(sample["batch"], sample["targets"])
        elapsed = time.monotonic() - started
        stats = client.stats
    # 12 requests, a burst of 8, then 8 per second: at least 0.5 s whatever the machine
    assert stats.requests == 12 and elapsed >= 0.45 and stats.rate_wait_seconds > 0
    bucket = TokenBucket(100.0, burst=1)
    assert bucket.acquire() == 0.0 and bucket.acquire() > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "vllm:8000"}, "http"),
        ({"concurrency": 0}, "concurrency must be positive"),
        ({"max_requests_per_second": 0}, "max_requests_per_second must be positive"),
        ({"prompt_logprobs": -1}, "prompt_logprobs must be >= 0"),
        ({"model": ""}, "model"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RemoteServer(**{"url": "http://vllm:8000", "model": "m", **kwargs})


def test_masked_images_cross_the_wire_losslessly(sample: dict[str, Any]) -> None:
    from detectors.scorers.remote import png_bytes
    from guardrail.service.images import decode_image

    pixels = sample["batch"].pixels()
    for image in pixels:
        assert np.array_equal(decode_image(png_bytes(image)), image)
