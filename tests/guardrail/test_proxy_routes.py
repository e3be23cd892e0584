"""The catch-all proxy beside the guardrail's own routes, the conversation reader, the answer
reader and the correlation keys, over real HTTP where a client would notice."""

from __future__ import annotations

import base64
import gzip
import json
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from guardrail.config import ConfigError, load_settings
from guardrail.demo.background_server import BackgroundServer
from guardrail.service.answers import UnreadableAnswerError, decoded_body, read_answer
from guardrail.service.api import create_app
from guardrail.service.chat import ChatFormatError, chat_input
from guardrail.service.proxy import route_label, upstream_base, valid_traceparent
from guardrail.service.runtime import Runtime, build_runtime
from storage.engine import upgrade
from storage.models import Sample

PNG = (Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png").read_bytes()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Echo:
    """An upstream that answers every path and method with what it received."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def app(self) -> Starlette:
        async def echo(request: Request) -> Response:
            body = await request.body()
            record = {
                "method": request.method,
                "path": request.scope["raw_path"].decode(),
                "query": request.scope["query_string"].decode(),
                "headers": dict(request.headers),
                "body": body.decode("latin-1"),
            }
            self.seen.append(record)
            if request.url.path == "/v1/chat/completions":
                return JSONResponse(
                    {
                        "id": "chatcmpl-echo",
                        "choices": [{"index": 0, "message": {"content": "a knife ."}}],
                    }
                )
            return JSONResponse(record, status_code=201, headers={"x-upstream": "yes"})

        return Starlette(
            routes=[Route("/{path:path}", echo, methods=["GET", "HEAD", "POST", "PUT", "DELETE"])]
        )


@pytest.fixture(scope="module")
def echo() -> Iterator[tuple[Echo, str]]:
    server = Echo()
    with BackgroundServer(server.app()) as url:
        yield server, url


@pytest.fixture()
def sidecar(tmp_path: Path, echo: tuple[Echo, str]) -> Iterator[Callable[..., tuple[Runtime, str]]]:
    servers: list[BackgroundServer] = []

    def start(upstream_url: str | None = None, **overrides: Any) -> tuple[Runtime, str]:
        settings = load_settings(
            environ={},
            database_url=f"sqlite:///{tmp_path / 'g.db'}",
            upstream_url=upstream_url or echo[1] + "/v1/",
            **overrides,
        )
        runtime = build_runtime(settings)
        upgrade(runtime.engine)
        server = BackgroundServer(create_app(runtime))
        servers.append(server)
        return runtime, server.__enter__()

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def test_any_path_under_v1_is_forwarded_and_the_guardrail_routes_come_first(
    echo: tuple[Echo, str], sidecar: Callable[..., tuple[Runtime, str]]
) -> None:
    upstream, _ = echo
    runtime, url = sidecar()
    got = httpx.put(
        f"{url}/v1/embeddings/x%2Fy?a=1&b=caf%C3%A9",
        content=b"payload",
        headers={"x-guardrail-audit": "1", "x-guardrail-anything": "no", "authorization": "k"},
    )
    assert got.status_code == 201 and got.headers["x-upstream"] == "yes"
    seen = got.json()
    assert (seen["method"], seen["path"], seen["query"]) == (
        "PUT",
        "/v1/embeddings/x%2Fy",
        "a=1&b=caf%C3%A9",
    )
    assert seen["body"] == "payload" and seen["headers"]["authorization"] == "k"
    assert not [h for h in seen["headers"] if h.startswith("x-guardrail")]
    assert seen["headers"]["accept-encoding"] == "gzip, deflate"  # as the client asked
    with httpx.Client() as bare:
        del bare.headers["accept-encoding"]
        plain = bare.get(f"{url}/v1/models").json()["headers"]
    assert plain["accept-encoding"] == "identity"  # never a compression the client did not ask
    assert httpx.get(f"{url}/v1/responses/abc").json()["path"] == "/v1/responses/abc"
    head = httpx.head(f"{url}/v1/responses/abc")
    assert head.status_code == 201 and head.content == b""
    assert int(head.headers["content-length"]) > 0  # the upstream's, not a zero of its own

    count = len(upstream.seen)
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/v1/audits").status_code == 200  # the guardrail's
    wrong = httpx.delete(f"{url}/v1/samples/{'0' * 32}")
    assert wrong.status_code == 405 and "GET" in wrong.headers["allow"]
    assert wrong.json()["error"]["type"] == "method_not_allowed"
    assert httpx.get(f"{url}/v1/samples").status_code in (404, 405)
    assert httpx.get(f"{url}/v1/reports/x/y").status_code == 404
    assert len(upstream.seen) == count  # none of those was forwarded

    get = runtime.metrics.registry.get_sample_value
    assert get("guardrail_proxy_requests_total", {"route": "embeddings", "code": "2xx"}) == 1
    assert get("guardrail_proxy_requests_total", {"route": "responses", "code": "2xx"}) == 2


def test_the_upstream_url_may_end_in_v1_or_not(
    echo: tuple[Echo, str], sidecar: Callable[..., tuple[Runtime, str]]
) -> None:
    _, base = echo
    for given in (base, base + "/", base + "/v1", base + "/v1/"):
        _, url = sidecar(given)
        assert httpx.get(f"{url}/v1/models").json()["path"] == "/v1/models"
    assert upstream_base("http://h:1/openai/v1/") == "http://h:1/openai"
    with pytest.raises(ConfigError, match="http"):
        load_settings(environ={}, upstream_url="127.0.0.1:8000")


def _chat(runtime: Runtime, url: str, messages: list[dict[str, Any]], **headers: str) -> None:
    body = {"model": "reference", "messages": messages}
    got = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=20)
    assert got.status_code == 200


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.time() + 10
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_text_only_and_multi_image_chats_are_not_applicable_not_drops(
    sidecar: Callable[..., tuple[Runtime, str]],
) -> None:
    runtime, url = sidecar()
    get = runtime.metrics.registry.get_sample_value
    image = {"type": "image_url", "image_url": {"url": DATA_URL}}
    _chat(runtime, url, [{"role": "user", "content": "Hello there."}])
    _chat(
        runtime, url, [{"role": "user", "content": [image, image, {"type": "text", "text": "?"}]}]
    )
    for reason in ("text_only", "multi_image"):
        _wait(
            lambda r=reason: get("guardrail_proxy_not_applicable_total", {"reason": r}) == 1,  # type: ignore[misc]
            reason,
        )
    drops = [s for m in runtime.metrics.registry.collect() for s in m.samples if "drops" in s.name]
    assert all(s.value == 0 for s in drops)

    # an image in an earlier turn is audited, with the correlation keys of the request
    _chat(
        runtime,
        url,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A table."},
            {"role": "user", "content": "And on it?"},
        ],
        **{"x-request-id": "r-1", "traceparent": TRACEPARENT},
    )

    def sample() -> Sample | None:
        with runtime.sessions() as session:
            row = session.query(Sample).one_or_none()
            if row is not None:
                session.expunge(row)
            return row

    _wait(lambda: sample() is not None, "the sample")
    row = sample()
    assert row is not None
    assert (row.request_id, row.traceparent, row.response_id, row.choice_index) == (
        "r-1",
        TRACEPARENT,
        "chatcmpl-echo",
        0,
    )
    assert row.generated_text == "a knife ."


def test_the_samples_api_takes_the_correlation_headers(
    sidecar: Callable[..., tuple[Runtime, str]],
) -> None:
    _, url = sidecar()
    body = {
        "model": "reference",
        "prompt": "USER: <image> Describe the image. ASSISTANT:",
        "output": "a fork and a knife .",
        "image_base64": base64.b64encode(PNG).decode(),
        "response_id": "chatcmpl-xyz",
        "choice_index": 1,
        "audit": True,
    }
    headers = {"x-request-id": "abc-1", "traceparent": TRACEPARENT}
    got = httpx.post(f"{url}/v1/samples", json=body, headers=headers, timeout=20)
    assert got.status_code == 202
    view = httpx.get(f"{url}/v1/samples/{got.json()['id']}").json()
    assert (view["request_id"], view["traceparent"], view["response_id"], view["choice_index"]) == (
        "abc-1",
        TRACEPARENT,
        "chatcmpl-xyz",
        1,
    )
    bad = httpx.post(
        f"{url}/v1/samples",
        json={**body, "output": "other"},
        headers={"x-request-id": "has a space", "traceparent": TRACEPARENT},
    )
    assert bad.status_code == 422 and "x-request-id" in json.dumps(bad.json())
    ignored = httpx.post(
        f"{url}/v1/samples", json={**body, "output": "x"}, headers={"traceparent": "00-junk"}
    )
    assert httpx.get(f"{url}/v1/samples/{ignored.json()['id']}").json()["traceparent"] is None


def test_the_conversation_reader() -> None:
    image = {"type": "image_url", "image_url": {"url": DATA_URL}}
    url_image = {"type": "image_url", "image_url": {"url": "https://cdn.example.com/a.png"}}
    one = chat_input(
        {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "Hi."}]}]},
        "<image>",
    )
    assert (one.image_bytes, one.prompt, one.image_url) == (
        PNG,
        "USER: <image> Hi. ASSISTANT:",
        None,
    )
    earlier = chat_input(
        {
            "messages": [
                {"role": "user", "content": [url_image, {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "Colour?"},
            ]
        },
        "<image>",
    )
    assert earlier.image_url == "https://cdn.example.com/a.png" and earlier.image_bytes is None
    assert earlier.prompt == "USER: <image> What? ASSISTANT: A cat. USER: Colour? ASSISTANT:"
    templated = chat_input(
        {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "Hi."}]}]},
        "<image>",
        "<s>[{prompt}]",
    )
    assert templated.prompt == "<s>[Hi.]"
    for messages, reason in (
        ([{"role": "user", "content": "text"}], "text_only"),
        (
            [{"role": "user", "content": [image]}, {"role": "user", "content": [url_image]}],
            "multi_image",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": "file:///etc/passwd"}],
                }
            ],
            "image_unreadable",
        ),
        (7, "messages_unreadable"),
    ):
        with pytest.raises(ChatFormatError) as caught:
            chat_input({"messages": messages}, "<image>")
        assert caught.value.reason == reason


def test_the_answer_reader_inflates_within_its_bound() -> None:
    answer = json.dumps(
        {
            "id": "chatcmpl-1",
            "choices": [
                {"index": 1, "message": {"content": "b"}},
                {"index": 0, "message": {"content": "a"}},
            ],
        }
    ).encode()
    assert decoded_body(gzip.compress(answer), "gzip", 10_000) == answer
    raw_deflate = zlib.compressobj(wbits=-15)
    assert (
        decoded_body(raw_deflate.compress(answer) + raw_deflate.flush(), "deflate", 10_000)
        == answer
    )
    assert decoded_body(zlib.compress(answer), "deflate", 10_000) == answer
    read = read_answer(answer, streamed=False)
    assert (read.id, read.texts) == ("chatcmpl-1", {0: "a", 1: "b"})
    bomb = gzip.compress(b" " * 50_000_000)  # 50 MB of spaces in 50 KB
    with pytest.raises(UnreadableAnswerError) as caught:
        decoded_body(bomb, "gzip", 1_000_000)
    assert caught.value.reason == "response_too_large"
    with pytest.raises(UnreadableAnswerError) as caught:
        decoded_body(answer, "br", 10_000)
    assert caught.value.reason == "response_encoding"
    tool_call = b'{"choices": [{"index": 0, "message": {"content": null, "tool_calls": []}}]}'
    assert read_answer(tool_call, streamed=False).texts == {0: None}


def test_traceparents_and_route_labels() -> None:
    assert valid_traceparent(TRACEPARENT) == TRACEPARENT
    assert valid_traceparent(f" {TRACEPARENT} ") == TRACEPARENT
    assert valid_traceparent("01" + TRACEPARENT[2:] + "-future") == "01" + TRACEPARENT[2:]
    for bad in (
        None,
        "",
        TRACEPARENT.upper(),
        TRACEPARENT + "-x",  # version 00 has exactly four fields
        "ff" + TRACEPARENT[2:],
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",
    ):
        assert valid_traceparent(bad) is None, bad
    assert route_label("/v1/chat/completions") == "chat_completions"
    assert route_label("/v1/models/org/name") == "models"
    assert route_label("/v1/whatever") == "other"


def test_model_names_as_servers_serve_them() -> None:
    from detectors.reference import MODEL_DIR
    from guardrail.config import ModelSettings

    for name in ("llava-hf/llava-1.5-7b-hf", "Qwen/Qwen2.5-VL-7B-Instruct", "org/sub/name:v1"):
        assert ModelSettings(name=name, path=MODEL_DIR).name == name
    for bad in ("../x", "a/../b", "a//b", "/a", "a/", ".", "a b", "x" * 129, "a/./b"):
        with pytest.raises(ValueError):
            ModelSettings(name=bad, path=MODEL_DIR)
