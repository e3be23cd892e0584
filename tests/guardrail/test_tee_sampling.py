"""The tee's sampling of image-URL exchanges: which choices it fetches the image for.

A choice the sampler will not take is not worth a fetch, so the tee decides before fetching,
on the key ingest decides on afterwards: the request id when the exchange has one (every
choice of the exchange the same way), else the URL's digest (in place of the image's, which is
not known yet), the prompt and the choice's text.  Both must agree: a choice skipped by the tee
and taken by ingest is never audited, one taken by the tee and skipped by ingest costs a fetch
for nothing.

The URL holds the loopback image host's port, picked at random, so the texts and request ids
whose side of the rate each test needs are found at run time from the same keys
(`guardrail.service.sampling`); the tee, the sampler, ingest and the metrics are the real ones.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from detectors.reference import MODEL_DIR
from guardrail.demo.background_server import BackgroundServer
from guardrail.service.auditor import image_placeholder
from guardrail.service.chat import chat_input
from guardrail.service.runtime import Runtime
from guardrail.service.sampling import Decision, Sampler, request_key
from guardrail.service.tee import TeedExchange
from tests.guardrail.test_tee_accounting import (
    DROPS,
    EXAMPLE,
    NOT_APPLICABLE,
    _answer,
    _count,
    _counts,
    _exchange,
    _fields,
    _runtime,
    _samples,
    _tee,
    _url_body,
)

IMAGE_KEY = hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()  # the fetched image's digest
CANDIDATES = [f"a knife on a board, take {i} ." for i in range(400)]


@pytest.fixture()
def image_host() -> Iterator[tuple[list[str], str]]:
    requests: list[str] = []

    async def image(request: Request) -> Response:
        requests.append(request.url.path)
        return Response(EXAMPLE.read_bytes(), media_type="image/png")

    with BackgroundServer(Starlette(routes=[Route("/knife.png", image)])) as url:
        yield requests, url


def _rated(tmp_path: Path, rate: float, **overrides: Any) -> Runtime:
    """A runtime whose reference model samples `rate` of requests, fetching from loopback."""
    return _runtime(
        tmp_path,
        models=[{"name": "reference", "path": str(MODEL_DIR), "sample_rate": rate}],
        image_url_fetch=True,
        image_url_allowed_hosts=["127.0.0.1"],
        **overrides,
    )


def _prompt(runtime: Runtime, body: dict[str, Any]) -> str:
    """The prompt the audit sees for `body` (what the sampling key holds)."""
    model = runtime.settings.model("reference")
    assert model is not None
    parsed = chat_input(body, image_placeholder(model.family), model.prompt)
    return runtime.auditors["reference"].prompt_for(parsed.prompt)


def _fraction(request_id: str | None, image_key: str, prompt: str, text: str) -> float:
    return Sampler.fraction(request_key("reference", request_id, image_key, prompt, text))


def _texts(n: int, keep: Callable[[str], bool]) -> list[str]:
    found = [t for t in CANDIDATES if keep(t)][:n]
    assert len(found) == n, "too few candidate texts on the needed side of the rate"
    return found


def _teed(runtime: Runtime, body: dict[str, Any], texts: list[str], request_id: str | None) -> None:
    exchange = _exchange(runtime, body, _answer(*texts))
    _tee(runtime)(TeedExchange(**{**_fields(exchange), "request_id": request_id}))


def _received_skipped(runtime: Runtime) -> tuple[float, float, float]:
    received = _count(runtime, "guardrail_samples_received_total", model="reference")
    skipped = _count(runtime, "guardrail_samples_skipped_total", model="reference", reason="rate")
    sampled = _count(runtime, "guardrail_samples_sampled_total", model="reference")
    return received, skipped, sampled


def test_without_a_request_id_a_url_image_is_sampled_by_the_urls_digest(
    tmp_path: Path, image_host: tuple[list[str], str]
) -> None:
    requests, host = image_host
    runtime = _rated(tmp_path, 0.5)
    url = f"{host}/knife.png"
    body = _url_body(url)
    prompt, url_key = _prompt(runtime, body), hashlib.sha256(url.encode()).hexdigest()

    # taken by the URL's key, though the image's own digest would skip them: ingest keys them
    # by the URL too, so all three are samples (with the image's digest stored)
    taken = _texts(
        3,
        lambda t: (
            _fraction(None, url_key, prompt, t) < 0.5 <= _fraction(None, IMAGE_KEY, prompt, t)
        ),
    )
    _teed(runtime, body, taken, None)
    assert requests == ["/knife.png"]
    samples = _samples(runtime)
    assert [s.generated_text for s in samples] == taken
    assert {s.image_sha256 for s in samples} == {IMAGE_KEY}
    assert _received_skipped(runtime) == (3, 0, 3)

    # skipped by the URL's key, though the image's digest would take them: not fetched
    skipped = _texts(
        3,
        lambda t: (
            _fraction(None, IMAGE_KEY, prompt, t) < 0.5 <= _fraction(None, url_key, prompt, t)
        ),
    )
    _teed(runtime, body, skipped, None)
    assert requests == ["/knife.png"] and len(_samples(runtime)) == 3
    assert _received_skipped(runtime) == (6, 3, 3)
    assert _counts(runtime, DROPS) == {} and _counts(runtime, NOT_APPLICABLE) == {}


def test_a_choice_the_sampler_skips_is_decided_on_its_prompt_and_text_before_any_fetch(
    tmp_path: Path, image_host: tuple[list[str], str]
) -> None:
    # eight exchanges, each with its own prompt and one text that the key of its URL, prompt
    # and text puts above a 0.9 rate: none is fetched (a key missing any of the three would
    # put each above the rate only by chance, 1 in 10)
    requests, host = image_host
    runtime = _rated(tmp_path, 0.9)
    url = f"{host}/knife.png"
    url_key = hashlib.sha256(url.encode()).hexdigest()
    chosen: set[str] = set()
    for k in range(8):
        body = _url_body(url)
        body["messages"][0]["content"][0]["text"] = f"Describe the image, take {k}."
        prompt = _prompt(runtime, body)
        text = next(
            t for t in CANDIDATES if t not in chosen and _fraction(None, url_key, prompt, t) >= 0.9
        )
        chosen.add(text)
        _teed(runtime, body, [text], None)
    assert requests == []
    assert _received_skipped(runtime) == (8, 8, 0) and _samples(runtime) == []


def test_a_request_id_samples_every_choice_of_its_exchange_whatever_their_content(
    tmp_path: Path, image_host: tuple[list[str], str]
) -> None:
    requests, host = image_host
    runtime = _rated(tmp_path, 0.5)
    url = f"{host}/knife.png"
    body = _url_body(url)
    prompt, url_key = _prompt(runtime, body), hashlib.sha256(url.encode()).hexdigest()
    ids = [f"req-{i}" for i in range(100)]
    taken_id = next(i for i in ids if _fraction(i, "", "", "") < 0.5)
    skipped_id = next(i for i in ids if _fraction(i, "", "", "") >= 0.5)

    # an id the sampler takes: both choices, though their content alone would be skipped
    unlikely = _texts(2, lambda t: _fraction(None, url_key, prompt, t) >= 0.5)
    _teed(runtime, body, unlikely, taken_id)
    assert requests == ["/knife.png"]
    assert [(s.generated_text, s.request_id) for s in _samples(runtime)] == [
        (unlikely[0], taken_id),
        (unlikely[1], taken_id),
    ]
    assert _received_skipped(runtime) == (2, 0, 2)

    # an id the sampler skips: neither choice, though their content alone would be taken,
    # and nothing is fetched
    likely = _texts(2, lambda t: _fraction(None, url_key, prompt, t) < 0.5)
    _teed(runtime, body, likely, skipped_id)
    assert requests == ["/knife.png"] and len(_samples(runtime)) == 2
    assert _received_skipped(runtime) == (4, 2, 2)


def test_a_choice_exactly_at_the_rate_is_skipped_and_not_fetched(
    tmp_path: Path, image_host: tuple[list[str], str]
) -> None:
    requests, host = image_host
    at = _fraction("req-1", "", "", "")  # the key of request id req-1 (the exchange's)
    runtime = _rated(tmp_path, at)
    _teed(runtime, _url_body(f"{host}/knife.png"), ["a knife ."], "req-1")
    assert requests == [] and _samples(runtime) == []
    assert _received_skipped(runtime) == (1, 1, 0)

    # the sampler itself: a fraction equal to the rate is out, the next float above it in
    model = runtime.settings.model("reference")
    assert model is not None
    key = request_key("reference", "req-1", "", "", "")
    assert Sampler({"reference": model}).decide("reference", key) == Decision(False, "rate")
    above = model.model_copy(update={"sample_rate": math.nextafter(at, 1.0)})
    assert Sampler({"reference": above}).decide("reference", key) == Decision(True, "sampled")


def test_an_image_url_that_is_not_valid_unicode_is_still_keyed_and_accounted(
    tmp_path: Path,
) -> None:
    # a lone surrogate (JSON can carry one): the URL's digest replaces it rather than failing,
    # so the exchange is counted as what it is, an image URL the operator does not fetch
    runtime = _runtime(tmp_path, image_url_fetch=False)
    body = _url_body("http://127.0.0.1:9/knife-\ud800.png")
    _tee(runtime)(_exchange(runtime, body, _answer("a knife .", "a fork .")))
    assert _counts(runtime, NOT_APPLICABLE) == {"image_url_not_allowed": 2}
    assert _counts(runtime, DROPS) == {} and _samples(runtime) == []
