"""The tee's accounting, exactly: where each choice of a teed answer ends (a sample, a
`not_applicable` reason or a drop reason, counted per choice), the backlog's bounds in count
and in bytes at their edges, what a kept request costs against those bytes, and the answer
copy's bound.

The tee is called as the proxy's tee executor calls it, with a real runtime (SQLite, the real
ingest and sampler) and, for image URLs, a real fetcher against a loopback image host; the
backlog and the request bookkeeping are the proxy's own objects.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from detectors.reference import MODEL_DIR
from guardrail.config import load_settings
from guardrail.demo.background_server import BackgroundServer
from guardrail.service.answers import MAX_CHOICES, MAX_TEE_JSON_VALUES, json_values
from guardrail.service.canonical import pixel_budget
from guardrail.service.chat import image_messages
from guardrail.service.image_fetch import ImageFetcher
from guardrail.service.proxy import TeeBacklog, _chat_request, _Exchange
from guardrail.service.runtime import Runtime, build_runtime
from guardrail.service.tee import Tee, TeedExchange
from storage.engine import upgrade
from storage.models import Sample

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"
DROPS = "guardrail_proxy_fail_open_drops_total"
NOT_APPLICABLE = "guardrail_proxy_not_applicable_total"


def _runtime(tmp_path: Path, **overrides: Any) -> Runtime:
    settings = load_settings(environ={}, database_url=f"sqlite:///{tmp_path / 'g.db'}", **overrides)
    runtime = build_runtime(settings)
    upgrade(runtime.engine)
    return runtime


def _tee(runtime: Runtime, **fetch: Any) -> Tee:
    s = runtime.settings
    fetcher = ImageFetcher(
        enabled=s.image_url_fetch,
        allowed_hosts=s.image_url_allowed_hosts,
        max_bytes=s.max_image_bytes,
        timeout_seconds=s.image_url_timeout_seconds,
        max_redirects=s.image_url_max_redirects,
        **fetch,
    )
    return Tee(runtime, fetcher)


def _answer(*texts: str | None) -> bytes:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
        for i, t in enumerate(texts)
    ]
    return json.dumps(
        {"id": "chatcmpl-7", "object": "chat.completion", "choices": choices}
    ).encode()


def _exchange(
    runtime: Runtime, body: dict[str, Any], answer: bytes, *, force: bool = False
) -> TeedExchange:
    model = runtime.settings.model("reference")
    assert model is not None
    return TeedExchange(
        body=body,
        model=model,
        answer=answer,
        content_encoding="",
        streamed=False,
        request_id="req-1",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        force=force,
    )


def _body(messages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "model": "reference",
        "messages": messages or image_messages(EXAMPLE.read_bytes(), "Describe the image."),
    }


def _count(runtime: Runtime, name: str, **labels: str) -> float:
    return runtime.metrics.registry.get_sample_value(name, labels) or 0.0


def _counts(runtime: Runtime, name: str) -> dict[str, float]:
    """Every labelled value of a counter that is not zero."""
    out = {}
    for family in runtime.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and sample.value:
                out[sample.labels["reason"]] = sample.value
    return out


def _samples(runtime: Runtime) -> list[Sample]:
    with runtime.sessions() as session:
        rows = session.query(Sample).order_by(Sample.choice_index).all()
        session.expunge_all()
        return rows


# -- every choice ends in exactly one place ----------------------------------------------------


def test_each_choice_with_text_is_a_sample_with_the_exchanges_keys(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    _tee(runtime)(_exchange(runtime, _body(), _answer("a knife .", None, "a fork .")))
    samples = _samples(runtime)
    assert [(s.choice_index, s.generated_text) for s in samples] == [
        (0, "a knife ."),
        (2, "a fork ."),
    ]
    for s in samples:
        assert (s.request_id, s.response_id, s.traceparent) == (
            "req-1",
            "chatcmpl-7",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        assert s.extra == {"source": "proxy"}
    assert _counts(runtime, NOT_APPLICABLE) == {"no_text": 1}  # the choice without text
    assert _counts(runtime, DROPS) == {}


def test_a_models_prompt_template_frames_the_last_user_turn_of_a_teed_conversation(
    tmp_path: Path,
) -> None:
    template = "<image>\nQuestion: {prompt}\nAnswer:"
    models = [{"name": "reference", "path": str(MODEL_DIR), "prompt": template}]
    runtime = _runtime(tmp_path, models=models, store_raw=True)
    messages = [
        *image_messages(EXAMPLE.read_bytes(), "Describe the image."),
        {"role": "assistant", "content": "A kitchen."},
        {"role": "user", "content": "What is on the board?"},
    ]
    _tee(runtime)(_exchange(runtime, _body(messages), _answer("a knife .")))
    (sample,) = _samples(runtime)
    assert sample.prompt == "<image>\nQuestion: What is on the board?\nAnswer:"


def test_choices_beyond_the_cap_are_dropped_and_counted_each(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    texts = [f"a knife {i} ." for i in range(MAX_CHOICES + 2)]
    _tee(runtime)(_exchange(runtime, _body(), _answer(*texts)))
    assert len(_samples(runtime)) == MAX_CHOICES
    assert _counts(runtime, DROPS) == {"too_many_choices": 2}


def test_an_answer_without_any_text_is_not_applicable_and_its_request_not_read(
    tmp_path: Path,
) -> None:
    runtime = _runtime(tmp_path)
    broken = {"model": "reference", "messages": 7}  # would be request_unreadable if read
    _tee(runtime)(_exchange(runtime, broken, _answer(None, None)))
    assert _counts(runtime, NOT_APPLICABLE) == {"no_text": 2}
    assert _counts(runtime, DROPS) == {} and _samples(runtime) == []


@pytest.mark.parametrize(
    ("messages", "where", "reason"),
    [
        ([{"role": "user", "content": "no image here"}], NOT_APPLICABLE, "text_only"),
        (
            [
                *image_messages(EXAMPLE.read_bytes(), "one"),
                *image_messages(EXAMPLE.read_bytes(), "two"),
            ],
            NOT_APPLICABLE,
            "multi_image",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": "data:,%%"}]}],
            DROPS,
            "image_unreadable",
        ),
        ([{"role": "user", "content": [7]}], DROPS, "request_unreadable"),
    ],
)
def test_a_request_the_audit_cannot_use_is_counted_once_per_choice(
    tmp_path: Path, messages: list[dict[str, Any]], where: str, reason: str
) -> None:
    runtime = _runtime(tmp_path)
    _tee(runtime)(_exchange(runtime, _body(messages), _answer("a knife .", "a fork .", None)))
    assert _counts(runtime, where)[reason] == 2  # the two choices with text
    other = DROPS if where == NOT_APPLICABLE else NOT_APPLICABLE
    assert _counts(runtime, other) == ({} if other == DROPS else {"no_text": 1})
    assert _samples(runtime) == []


@pytest.mark.parametrize(
    ("answer", "encoding", "reason"),
    [
        (b"not json", "", "response_unreadable"),
        (b"\x1f\x8b not gzip", "gzip", "response_unreadable"),
    ],
)
def test_an_unreadable_answer_is_one_drop_with_its_reason(
    tmp_path: Path, answer: bytes, encoding: str, reason: str
) -> None:
    runtime = _runtime(tmp_path)
    exchange = _exchange(runtime, _body(), answer)
    exchange = TeedExchange(**{**_fields(exchange), "content_encoding": encoding})
    _tee(runtime)(exchange)
    assert _counts(runtime, DROPS) == {reason: 1}


def test_an_answer_inflating_past_the_copy_bound_is_response_too_large(tmp_path: Path) -> None:
    padded = {**json.loads(_answer("a knife .")), "system_fingerprint": "x" * 2000}
    answer = json.dumps(padded).encode()
    runtime = _runtime(tmp_path, proxy_max_response_bytes=len(answer) - 1)
    exchange = _exchange(runtime, _body(), gzip.compress(answer))
    _tee(runtime)(TeedExchange(**{**_fields(exchange), "content_encoding": "gzip"}))
    assert _counts(runtime, DROPS) == {"response_too_large": 1}
    (tmp_path / "exact").mkdir()
    runtime = _runtime(tmp_path / "exact", proxy_max_response_bytes=len(answer))
    exchange = _exchange(runtime, _body(), gzip.compress(answer))
    _tee(runtime)(TeedExchange(**{**_fields(exchange), "content_encoding": "gzip"}))
    assert _counts(runtime, DROPS) == {} and len(_samples(runtime)) == 1


def _fields(exchange: TeedExchange) -> dict[str, Any]:
    return {name: getattr(exchange, name) for name in TeedExchange.__slots__}


def test_samples_ingest_refuses_are_rejected_and_a_broken_database_an_ingest_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "b").mkdir()
    runtime = _runtime(tmp_path, max_image_pixels=64 * 64)  # the example is larger: a 413
    tee = _tee(runtime)
    tee(_exchange(runtime, _body(), _answer("a knife .", "a fork .")))
    assert _counts(runtime, DROPS) == {"rejected": 2}  # ingest's IngestError, per choice
    runtime = _runtime(tmp_path / "b")
    tee = _tee(runtime)
    tee(_exchange(runtime, _body(), _answer("a knife \ud800 .")))  # ingest refuses it (422)
    assert _counts(runtime, DROPS) == {"rejected": 1}
    runtime.engine.dispose()
    Path(str(runtime.engine.url.database)).unlink()  # recreated empty: no tables
    tee(_exchange(runtime, _body(), _answer("a knife .")))
    assert _counts(runtime, DROPS) == {"rejected": 1, "ingest_error": 1}


def test_a_sample_ingest_cannot_encode_is_rejected_not_an_ingest_error(tmp_path: Path) -> None:
    # the proxy passes on only visible-ASCII request ids; an exchange handed to the tee with
    # one that is not valid Unicode fails in ingest with a ValueError (its sampling key cannot
    # be encoded), which is the sample's fault, not the database's
    runtime = _runtime(tmp_path)
    exchange = _exchange(runtime, _body(), _answer("a knife .", "a fork ."))
    _tee(runtime)(TeedExchange(**{**_fields(exchange), "request_id": "req-\ud800"}))
    assert _counts(runtime, DROPS) == {"rejected": 2}
    assert _samples(runtime) == []


def test_a_busy_ingest_is_counted_ingest_busy_per_choice(tmp_path: Path) -> None:
    # every decode slot of the pixel budget is taken (by this thread, as another ingest
    # would): ingest answers 503 after its wait, and the tee counts each choice as busy
    runtime = _runtime(tmp_path, ingest_decode_pixels=98_765, ingest_decode_wait_seconds=0.05)
    tee = _tee(runtime)
    exchange = _exchange(runtime, _body(), _answer("a knife .", "a fork ."))
    with pixel_budget(98_765).hold(98_765, timeout=1.0):
        tee(exchange)
    assert _counts(runtime, DROPS) == {"ingest_busy": 2} and _samples(runtime) == []
    tee(exchange)  # the budget is free again: both are samples
    assert _counts(runtime, DROPS) == {"ingest_busy": 2} and len(_samples(runtime)) == 2


def test_a_forced_exchange_is_audited_whatever_the_models_rate(tmp_path: Path) -> None:
    models = [{"name": "reference", "path": str(MODEL_DIR), "sample_rate": 0.0}]
    runtime = _runtime(tmp_path, models=models)
    tee = _tee(runtime)
    tee(_exchange(runtime, _body(), _answer("a knife .", "a fork .")))
    assert _samples(runtime) == []
    skipped = _count(runtime, "guardrail_samples_skipped_total", model="reference", reason="rate")
    assert skipped == 2  # by ingest: an inline image is not sampled before ingest
    tee(_exchange(runtime, _body(), _answer("a knife .", "a fork ."), force=True))
    assert [s.generated_text for s in _samples(runtime)] == ["a knife .", "a fork ."]
    assert _count(runtime, "guardrail_samples_sampled_total", model="reference") == 2


def test_anything_unforeseen_is_one_ingest_error_and_never_raises(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    exchange = _exchange(runtime, _body(), _answer("a knife .", "a fork ."))
    runtime.auditors.clear()  # the model vanished from the runtime: a KeyError in the tee
    _tee(runtime)(exchange)
    assert _counts(runtime, DROPS) == {"ingest_error": 1}


# -- image URLs: sampled before fetching, fetched only when allowed ---------------------------


@pytest.fixture()
def image_host() -> Iterator[tuple[list[str], str]]:
    requests: list[str] = []

    async def image(request: Request) -> Response:
        requests.append(request.url.path)
        return Response(EXAMPLE.read_bytes(), media_type="image/png")

    with BackgroundServer(Starlette(routes=[Route("/knife.png", image)])) as url:
        yield requests, url


def _url_body(url: str) -> dict[str, Any]:
    content = [
        {"type": "text", "text": "Describe the image."},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    return _body([{"role": "user", "content": content}])


def test_an_allowed_image_url_is_fetched_once_and_keyed_by_its_url(
    tmp_path: Path, image_host: tuple[list[str], str]
) -> None:
    requests, host = image_host
    runtime = _runtime(tmp_path, image_url_fetch=True, image_url_allowed_hosts=["127.0.0.1"])
    url = f"{host}/knife.png"
    _tee(runtime)(_exchange(runtime, _url_body(url), _answer("a knife .", "a fork .")))
    assert requests == ["/knife.png"]  # one fetch for both choices
    samples = _samples(runtime)
    assert [s.choice_index for s in samples] == [0, 1]
    digest = hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()
    assert {s.image_sha256 for s in samples} == {digest}
    assert _counts(runtime, DROPS) == {} and _counts(runtime, NOT_APPLICABLE) == {}
    # the sampling key is the URL's digest, not the image's: the same URL samples the same
    assert hashlib.sha256(url.encode()).hexdigest() != digest


def test_image_urls_not_allowed_or_not_fetched_are_counted_per_choice(
    tmp_path: Path, image_host: tuple[list[str], str]
) -> None:
    requests, host = image_host
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    refused = _runtime(tmp_path / "a", image_url_fetch=False)
    _tee(refused)(_exchange(refused, _url_body(f"{host}/knife.png"), _answer("a", "b", "c")))
    assert _counts(refused, NOT_APPLICABLE) == {"image_url_not_allowed": 3}
    assert _counts(refused, DROPS) == {} and requests == []
    failing = _runtime(tmp_path / "b", image_url_fetch=True, image_url_allowed_hosts=["127.0.0.1"])
    _tee(failing)(_exchange(failing, _url_body(f"{host}/gone.png"), _answer("a", "b")))
    assert _counts(failing, DROPS) == {"image_fetch_failed": 2}
    assert _counts(failing, NOT_APPLICABLE) == {} and _samples(failing) == []


def test_choices_the_sampler_skips_are_counted_and_not_fetched_unless_forced(
    tmp_path: Path, image_host: tuple[list[str], str]
) -> None:
    requests, host = image_host
    runtime = _runtime(tmp_path, image_url_fetch=True, image_url_allowed_hosts=["127.0.0.1"])
    model = runtime.settings.model("reference")
    assert model is not None
    skipping = model.model_copy(update={"sample_rate": 0.0})
    url = f"{host}/knife.png"
    exchange = _exchange(runtime, _url_body(url), _answer("a knife .", "a fork ."))
    _tee(runtime)(TeedExchange(**{**_fields(exchange), "model": skipping}))
    assert requests == []  # nothing worth a fetch
    assert _count(runtime, "guardrail_samples_received_total", model="reference") == 2
    assert _count(runtime, "guardrail_samples_skipped_total", model="reference", reason="rate") == 2
    assert _samples(runtime) == []
    _tee(runtime)(TeedExchange(**{**_fields(exchange), "model": skipping, "force": True}))
    assert requests == ["/knife.png"] and len(_samples(runtime)) == 2  # forced: audited


# -- the backlog's bounds and what an exchange costs -------------------------------------------


def test_the_backlog_holds_up_to_both_bounds_inclusive_and_releases_what_it_held() -> None:
    backlog = TeeBacklog(max_count=3, max_bytes=100)
    assert backlog.reserve(60)
    assert not backlog.reserve(41)  # 101 bytes: one over
    assert (backlog.pending_count, backlog.pending_bytes) == (1, 60)  # a refusal holds nothing
    assert backlog.reserve(40)  # exactly 100
    assert not backlog.reserve(1)
    assert backlog.reserve(0)  # a third exchange of no bytes: exactly the count
    assert not backlog.reserve(0)  # a fourth: one over the count
    assert (backlog.pending_count, backlog.pending_bytes) == (3, 100)
    backlog.release(60)
    assert (backlog.pending_count, backlog.pending_bytes) == (2, 40)
    assert backlog.reserve(60) and not backlog.reserve(0)
    for size in (60, 40, 0):
        backlog.release(size)
    assert (backlog.pending_count, backlog.pending_bytes) == (0, 0)


def test_a_kept_request_costs_its_bytes_and_a_fixed_amount_per_json_value(tmp_path: Path) -> None:
    settings = load_settings(environ={}, database_url=f"sqlite:///{tmp_path / 'g.db'}")
    raw = json.dumps(_body()).encode()
    request = _chat_request(raw, settings)
    assert request.problem is None and request.body == _body()
    assert request.model is not None and request.label == "reference"
    assert request.held_bytes == len(raw) + 64 * json_values(raw)
    # at the bound on JSON values it is still read; one more and it is not
    empty = b'{"model": "reference", "messages": [0]}'
    filler = MAX_TEE_JSON_VALUES - json_values(empty)
    at_bound = empty.replace(b"[0]", b"[0" + b",0" * filler + b"]")
    assert json_values(at_bound) == MAX_TEE_JSON_VALUES
    assert _chat_request(at_bound, settings).problem is None
    over = at_bound.replace(b"[0", b"[0,0", 1)
    refused = _chat_request(over, settings)
    assert (refused.problem, refused.body, refused.held_bytes) == ("request_unreadable", None, 0)
    for raw_body, problem in (
        (b"not json", "request_unreadable"),
        (b'["reference"]', "request_unreadable"),
        (b'{"model": "gpt-9"}', "unknown_model"),
        (b'{"model": ["reference"]}', "unknown_model"),
    ):
        request = _chat_request(raw_body, settings)
        assert (request.problem, request.body, request.model, request.held_bytes) == (
            problem,
            None,
            None,
            0,
        )
        assert request.label == "other"


def test_the_answer_copy_keeps_up_to_its_limit_and_no_more() -> None:
    settings = load_settings(environ={})
    readable = _chat_request(json.dumps(_body()).encode(), settings)
    unknown = _chat_request(b'{"model": "gpt-9"}', settings)
    kept, refused = (
        _Exchange(
            request,
            10,
            streamed=False,
            content_encoding="",
            request_id=None,
            traceparent=None,
            force=False,
        )
        for request in (readable, unknown)
    )
    kept.keep(b"0123")
    kept.keep(b"456789")  # exactly the limit
    assert (kept.problem, kept.answer(), kept.size) == (None, b"0123456789", 10)
    kept.keep(b"x")  # one byte over: the copy is given up
    assert (kept.problem, kept.answer(), kept.size) == ("response_too_large", b"", 11)
    kept.keep(b"more")  # and nothing more is kept or counted
    assert (kept.problem, kept.answer(), kept.size) == ("response_too_large", b"", 11)
    refused.keep(b"abc")  # a request already known unreadable keeps nothing
    assert (refused.problem, refused.answer(), refused.size) == ("unknown_model", b"", 0)
