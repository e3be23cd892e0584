"""The API's error contract: hostile input gets a 4xx in one JSON shape, a database outage a
503 with Retry-After, bodies are bounded while they are read, and the connection survives."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from detectors.reference import CAPTION_PROMPT
from guardrail.config import load_settings
from guardrail.demo.background_server import BackgroundServer
from guardrail.service.api import create_app, request_body_limit
from guardrail.service.http_errors import error_response
from guardrail.service.runtime import Runtime, build_runtime
from storage.engine import upgrade
from storage.models import Sample
from tests.postgres import schema_url

TOKEN = "s3cret-token-0002"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"
PNG = EXAMPLE.read_bytes()
OUTPUT = "fork knife car clock ."
SMALL_LIMIT = 64 * 1024


def _runtime(database_url: str, *, migrate: bool = True, **overrides: object) -> Runtime:
    settings = load_settings(environ={}, database_url=database_url, api_tokens=[TOKEN], **overrides)
    runtime = build_runtime(settings)
    if migrate:
        upgrade(runtime.engine)
    return runtime


def _body(**extra: object) -> dict[str, object]:
    return {
        "model": "reference",
        "prompt": CAPTION_PROMPT,
        "output": OUTPUT,
        "image_base64": base64.b64encode(PNG).decode(),
        **extra,
    }


def _post_json(client: TestClient | httpx.Client, body: dict[str, Any]) -> httpx.Response:
    """`body` as JSON text: NUL and lone surrogates travel as `\\u` escapes, as a client
    would send them."""
    return client.post(
        "/v1/samples",
        content=json.dumps(body),
        headers={**AUTH, "Content-Type": "application/json"},
    )


def _error(response: httpx.Response, status: int, kind: str, *words: str) -> dict[str, Any]:
    """The contract's shape, with the status, the type and `words` in the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) <= {"type", "message", "details"}, error
    assert error["type"] == kind, error
    assert isinstance(error["message"], str) and error["message"], error
    for word in words:
        assert word in error["message"], (word, error["message"])
    if "details" in error:
        assert all(set(d) == {"loc", "msg", "type"} for d in error["details"]), error
    return dict(error)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    """One SQLite runtime for the tests that must store nothing."""
    tmp = tmp_path_factory.mktemp("api-errors")
    return _runtime(f"sqlite:///{tmp / 'g.db'}", max_request_bytes=SMALL_LIMIT * 16)


@pytest.fixture(scope="module")
def client(runtime: Runtime) -> TestClient:
    return TestClient(create_app(runtime))


def _stored(runtime: Runtime) -> int:
    with runtime.sessions() as session:
        return session.query(Sample).count()


def _deep(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    for _ in range(levels - 1):
        node = {"a": node}
    return node


HOSTILE_FIELDS = [
    ("output", "fork \x00 knife .", "NUL"),
    ("output", "fork \ud800 knife .", "surrogate"),
    ("output", "x" * 100_001, "100000"),
    ("prompt", CAPTION_PROMPT + "\x00", "NUL"),
    ("prompt", "\udfff" + CAPTION_PROMPT, "surrogate"),
    ("request_id", "r-\x00", "NUL"),
    ("request_id", "r-\ud83d", "surrogate"),
    ("request_id", "two words", "pattern"),
    ("request_id", "x" * 129, "pattern"),
    ("model", "\x00", "NUL"),
    ("metadata", {"k\x00": 1}, "key"),
    ("metadata", {"k": "v\ud800"}, "surrogate"),
    ("metadata", {"a": [{"b": ["\x00"]}]}, "metadata.a[0].b[0]"),
    ("metadata", _deep(9), "deeper than 8"),
    ("metadata", {"x": float("nan")}, "not finite"),
    ("metadata", {f"k{i}": i for i in range(257)}, "256 keys"),
    ("metadata", {"big": "x" * 17_000}, "over the limit"),
    ("metadata", [1, 2], "dictionary"),
    ("token_ids", [-1], "greater than or equal to 0"),
    ("token_ids", [2**31], "less than 2147483648"),
    ("token_ids", [0] * 32_769, "32768"),
]


@pytest.mark.parametrize(("field", "value", "words"), HOSTILE_FIELDS)
def test_hostile_fields_get_a_422_that_names_them(
    client: TestClient, runtime: Runtime, field: str, value: object, words: str
) -> None:
    error = _error(_post_json(client, _body(**{field: value})), 422, "invalid_request", field)
    assert any(d["loc"][:2] == ["body", field] for d in error["details"]), error
    assert words in json.dumps(error["details"]) or words in error["message"], error
    assert _stored(runtime) == 0


def test_a_json_body_50000_levels_deep_gets_a_4xx(client: TestClient) -> None:
    deep = '{"metadata": ' + "[" * 50_000 + "]" * 50_000 + "}"
    answer = client.post(
        "/v1/samples", content=deep, headers={**AUTH, "Content-Type": "application/json"}
    )
    _error(answer, 400, "invalid_request", "nested too deeply")


def _upload(client: TestClient | httpx.Client, **fields: str) -> httpx.Response:
    data = {"model": "reference", "prompt": CAPTION_PROMPT, "output": OUTPUT, **fields}
    return client.post(
        "/v1/samples/upload",
        files={"image": ("trap.png", PNG, "image/png")},
        data=data,
        headers=AUTH,
    )


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"metadata": "[" * 50_000 + "]" * 50_000}, "metadata", "nested too deeply"),
        ({"metadata": "{not json"}, "metadata", "a JSON object"),
        ({"metadata": "[1]"}, "metadata", "dictionary"),
        ({"metadata": json.dumps(_deep(9))}, "metadata", "deeper than 8"),
        ({"metadata": '{"x": NaN}'}, "metadata", "not finite"),
        ({"token_ids": "[1, 2"}, "token_ids", "JSON list of integers"),
        ({"token_ids": "[-5]"}, "token_ids", "greater than or equal to 0"),
        ({"prompt": CAPTION_PROMPT + "\x00"}, "prompt", "NUL"),
        ({"request_id": "r\x00"}, "request_id", "NUL"),
    ],
)
def test_the_upload_route_checks_its_form_fields_the_same_way(
    client: TestClient, runtime: Runtime, fields: dict[str, str], field: str, words: str
) -> None:
    error = _error(_upload(client, **fields), 422, "invalid_request", field)
    assert words in error["message"], error
    assert _stored(runtime) == 0


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("/v1/samples/%00", "path contains a control character"),
        ("/v1/samples/%ed%a0%80", "path does not decode to UTF-8"),
        ("/v1/reports/a%0Ab", "path contains a control character"),
        ("/v1/audits?model=%00", "query string contains a control character"),
        ("/v1/audits?verdict=%ff", "query string does not decode to UTF-8"),
        ("/v1/audits?model=%1b%5b31m", "query string contains a control character"),
        ("/healthz?x=%00", "query string"),
    ],
)
def test_control_characters_in_the_url_get_a_400_before_routing(
    client: TestClient, url: str, words: str
) -> None:
    _error(client.get(url, headers=AUTH), 400, "invalid_request", words)


def test_malformed_percent_encoding_gets_a_400(runtime: Runtime) -> None:
    with (
        BackgroundServer(create_app(runtime)) as url,
        socket.create_connection(
            (url.split("//")[1].split(":")[0], int(url.rsplit(":", 1)[1])), timeout=5
        ) as sock,
    ):  # httpx would re-encode '%zz'; send it raw
        sock.sendall(b"GET /v1/audits?model=%zz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = _read_all(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), raw[:200]
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request" and "'%'" in error["message"]


def test_ids_that_cannot_exist_get_a_404_without_a_query(client: TestClient) -> None:
    for path in ("/v1/samples/nope", "/v1/reports/NOPE", "/reports/" + "g" * 32):
        _error(client.get(path, headers=AUTH), 404, "not_found", "32 lowercase hexadecimal")
    _error(client.get("/v1/samples/" + "ab" * 16, headers=AUTH), 404, "not_found", "no sample")
    _error(client.get("/reports/" + "cd" * 16, headers=AUTH), 404, "not_found", "no report")


def test_auth_errors_and_unknown_routes_share_the_shape(client: TestClient) -> None:
    missing = client.get("/v1/audits")
    _error(missing, 401, "unauthorized", "missing bearer token")
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    _error(client.get("/v1/audits", headers={"Authorization": "Basic abc"}), 401, "unauthorized")
    bad = {"Authorization": "Bearer not-the-token"}
    _error(client.get("/v1/audits", headers=bad), 403, "forbidden", "not allowed")
    _error(client.get("/v2/nothing"), 404, "not_found", "no endpoint")
    wrong = client.delete("/v1/audits", headers=AUTH)
    _error(wrong, 405, "method_not_allowed", "allowed: GET")
    query = client.get("/v1/audits", params={"limit": "0"}, headers=AUTH)
    error = _error(query, 422, "invalid_request", "limit")
    assert error["details"][0]["loc"] == ["query", "limit"]


def test_a_database_outage_gets_a_503_with_retry_after() -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:1/x?connect_timeout=2"
    client = TestClient(create_app(_runtime(url, migrate=False)))
    started = time.monotonic()
    answer = _post_json(client, _body())
    assert time.monotonic() - started < 10
    _error(answer, 503, "database_unavailable", "database is unavailable")
    assert int(answer.headers["Retry-After"]) > 0
    for path in ("/v1/samples/" + "ab" * 16, "/v1/audits", "/v1/reports"):
        outage = client.get(path, headers=AUTH)
        _error(outage, 503, "database_unavailable")
        assert "Retry-After" in outage.headers


def test_nul_is_refused_before_postgresql_sees_it() -> None:
    with schema_url("gr_api_errors") as url:
        runtime = _runtime(url)
        client = TestClient(create_app(runtime))
        for field, value in [
            ("output", "a\x00b"),
            ("prompt", CAPTION_PROMPT + "\x00"),
            ("request_id", "id\x00"),
            ("metadata", {"note": "\x00"}),
            ("metadata", {"\x00": "x"}),
            ("output", "\ud800"),
        ]:
            _error(_post_json(client, _body(**{field: value})), 422, "invalid_request", field)
        assert _stored(runtime) == 0
        accepted = _post_json(client, _body(request_id="r-1", metadata={"note": "fine ü"}))
        assert accepted.status_code == 202, accepted.text
        assert _stored(runtime) == 1
        runtime.engine.dispose()


def _with_query_route(runtime: Runtime, sql: str) -> TestClient:
    app = create_app(runtime)

    @app.get("/query")
    def query() -> None:  # a route whose query the database refuses
        with runtime.sessions() as session:
            session.execute(text(sql))

    return TestClient(app)


def test_database_errors_that_are_not_outages_get_their_own_answers(tmp_path: Path) -> None:
    with schema_url("gr_api_errors") as url:
        migrated = _runtime(url)
        refused = _with_query_route(migrated, "select cast('x' as integer)").get("/query")
        _error(refused, 422, "invalid_request", "refused a value")
        migrated.engine.dispose()
        bare = _runtime(url.replace("gr_api_errors", "gr_absent"), migrate=False)
        answer = _post_json(TestClient(create_app(bare)), _body())
        _error(answer, 503, "database_unavailable", "guardrail db upgrade")
        assert "Retry-After" in answer.headers
        bare.engine.dispose()
    sqlite = _runtime(f"sqlite:///{tmp_path / 'empty.db'}", migrate=False)
    answer = _post_json(TestClient(create_app(sqlite)), _body())
    _error(answer, 503, "database_unavailable", "guardrail db upgrade")
    bug = _with_query_route(sqlite, "select * from")  # a syntax error is a bug: 500
    _error(bug.get("/query"), 500, "internal_error", "OperationalError")


def test_a_declared_content_length_over_the_limit_gets_a_413_at_once(
    tmp_path: Path,
) -> None:
    runtime = _runtime(f"sqlite:///{tmp_path / 'g.db'}", max_request_bytes=SMALL_LIMIT)
    assert request_body_limit(runtime.settings) == SMALL_LIMIT
    client = TestClient(create_app(runtime))
    too_big = _post_json(client, _body(metadata={"pad": "x" * SMALL_LIMIT}))
    _error(too_big, 413, "payload_too_large", str(SMALL_LIMIT))
    assert too_big.headers["Connection"] == "close"
    with BackgroundServer(create_app(runtime)) as url:
        host, port = url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            # a 1 GB body is announced and never sent: the answer must not wait for it
            sock.sendall(
                b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000000000\r\n\r\n"
            )
            raw = _read_all(sock)
    assert raw.startswith(b"HTTP/1.1 413"), raw[:200]
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["type"] == "payload_too_large"


def test_a_chunked_body_is_stopped_at_the_limit(tmp_path: Path) -> None:
    runtime = _runtime(f"sqlite:///{tmp_path / 'g.db'}", max_request_bytes=SMALL_LIMIT)
    sent = []

    def chunks() -> Iterator[bytes]:
        for _ in range(5):  # 80 KiB, no Content-Length
            sent.append(16 * 1024)
            yield b" " * (16 * 1024)

    with BackgroundServer(create_app(runtime)) as url, httpx.Client(base_url=url) as http:
        answer = http.post(
            "/v1/samples", content=chunks(), headers={**AUTH, "Content-Type": "application/json"}
        )
        assert "content-length" not in answer.request.headers
        _error(answer, 413, "payload_too_large", f"limit of {SMALL_LIMIT} bytes")
        upload = http.post(
            "/v1/samples/upload",
            files={"image": ("big.png", b"\x89PNG" + b"\0" * SMALL_LIMIT, "image/png")},
            data={"model": "reference", "prompt": CAPTION_PROMPT, "output": OUTPUT},
            headers=AUTH,
        )
        _error(upload, 413, "payload_too_large")
        ok = http.post("/v1/samples", json=_body(), headers=AUTH)  # 22 KB: under the limit
        assert ok.status_code == 202, ok.text
    assert sum(sent) > SMALL_LIMIT


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def test_the_keep_alive_connection_survives_every_error(runtime: Runtime) -> None:
    app = create_app(runtime)

    @app.get("/boom")
    def boom() -> None:  # a bug in a route: the contract's 500, the connection kept
        raise RuntimeError("a bug")

    def local_port(response: httpx.Response) -> int:
        return int(response.extensions["network_stream"].get_extra_info("client_addr")[1])

    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        answers = [
            (_post_json(http, _body(output="a\x00b")), 422),
            (_post_json(http, _body(prompt="\ud800")), 422),
            (http.get("/v1/samples/%00", headers=AUTH), 400),
            (http.get("/v1/audits?model=%00", headers=AUTH), 400),
            (_upload(http, metadata="[" * 50_000 + "]" * 50_000), 422),
            (http.get("/v1/samples/" + "ef" * 16, headers=AUTH), 404),
            (http.get("/boom"), 500),
            (http.get("/v1/audits", headers=AUTH), 200),
        ]
        ports = {local_port(response) for response, _ in answers}
    for response, status in answers:
        assert response.status_code == status, response.text
        assert response.headers.get("connection", "").lower() != "close"
    _error(answers[6][0], 500, "internal_error", "RuntimeError")
    assert "a bug" not in answers[6][0].text  # the log has it, the client does not
    assert len(ports) == 1  # one connection served them all


ERROR_ROUTES = {
    ("/v1/samples", "post"): {400, 401, 403, 404, 413, 415, 422, 500, 503},
    ("/v1/samples/upload", "post"): {400, 401, 403, 404, 413, 415, 422, 500, 503},
    ("/v1/samples/{sample_id}", "get"): {400, 401, 403, 404, 422, 500, 503},
    ("/v1/audits", "get"): {400, 401, 403, 422, 500, 503},
    ("/v1/reports", "get"): {400, 401, 403, 422, 500, 503},
    ("/v1/reports/{report_id}", "get"): {400, 401, 403, 404, 422, 500, 503},
    ("/reports/{report_id}", "get"): {400, 401, 403, 404, 422, 500, 503},
}


def test_openapi_declares_bearer_auth_and_the_error_body(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["BearerToken"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    error_body = spec["components"]["schemas"]["ErrorBody"]
    assert error_body["required"] == ["error"]
    for (path, method), statuses in ERROR_ROUTES.items():
        operation = spec["paths"][path][method]
        assert operation["security"] == [{"BearerToken": []}], path
        documented = {int(s) for s in operation["responses"] if int(s) >= 400}
        assert documented == statuses, (path, documented)
        for status in statuses:
            content = operation["responses"][str(status)]["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/ErrorBody"}


def test_the_default_body_limit_follows_max_image_bytes() -> None:
    settings = load_settings(environ={}, max_image_bytes=3 * 2**20)
    assert request_body_limit(settings) == 4 * 2**20 + 4 * 2**20


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request"),
        (401, "unauthorized"),
        (403, "forbidden"),
        (404, "not_found"),
        (413, "payload_too_large"),
        (415, "unsupported_media_type"),
        (422, "invalid_request"),
        (418, "invalid_request"),
        (500, "internal_error"),
        (599, "internal_error"),
    ],
)
def test_each_status_has_its_error_type(status: int, kind: str) -> None:
    answer = error_response(status, "bad \ud800 text\x00")
    body = json.loads(answer.body)
    assert body == {"error": {"type": kind, "message": "bad \\ud800 text\\u0000"}}
    assert ("retry-after" in answer.headers) is (status == 503)
    assert error_response(503, "down").headers["Retry-After"] == "5"


def test_what_counts_as_a_database_outage() -> None:
    from sqlalchemy import create_engine
    from sqlalchemy import exc as sa_exc

    from guardrail.service.http_errors import is_database_outage

    assert is_database_outage(sa_exc.TimeoutError("QueuePool limit of size 5 reached"))
    engine = create_engine("sqlite://")
    with pytest.raises(sa_exc.OperationalError) as syntax, engine.connect() as connection:
        connection.execute(text("select * from"))
    assert not is_database_outage(syntax.value)  # SQLite's word for a syntax error
    closed = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/x?connect_timeout=2")
    with pytest.raises(sa_exc.OperationalError) as refused:
        closed.connect()
    assert is_database_outage(refused.value)


def test_ingest_errors_keep_their_own_type(client: TestClient, runtime: Runtime) -> None:
    for data, status, kind in [
        (PNG[: len(PNG) // 2], 422, "invalid_image"),
        (b"GIF89a" + b"\0" * 64, 415, "unsupported_media_type"),
    ]:
        answer = _post_json(client, _body(image_base64=base64.b64encode(data).decode()))
        _error(answer, status, kind, "image")
    assert _stored(runtime) == 0


def test_a_body_of_millions_of_json_values_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    """30 MB of `0,` is under the byte limit but parses into 15 M objects: it took the
    process to 2.6 GB before the value count was bounded."""
    client = TestClient(create_app(_runtime(f"sqlite:///{tmp_path / 'g.db'}")))
    values = ",".join(["0"] * 1_200_000)
    body = '{"model":"reference","prompt":"p","output":"x","image_base64":"","metadata":{"a":[%s]}}'
    answer = client.post(
        "/v1/samples",
        content=(body % values).encode(),
        headers={**AUTH, "content-type": "application/json"},
    )
    assert answer.status_code == 413, answer.text
    assert "more than 1000000 values" in answer.json()["error"]["message"]
    few = ",".join(["0"] * 300)  # a list that fits in bytes but not in the metadata rules
    answer = client.post(
        "/v1/samples",
        content=(body % few).encode(),
        headers={**AUTH, "content-type": "application/json"},
    )
    assert answer.status_code == 422 and "list items" in answer.text
