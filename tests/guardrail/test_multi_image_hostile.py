"""Hostile input to samples of several images (Qwen2.5-VL): every refusal is a 4xx that names
the image or field at fault, a stored layout that does not read back fails its job once (no
retries, no allocation sized by it) and its sample's view still answers."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from guardrail.config import load_settings
from guardrail.demo.background_server import BackgroundServer
from guardrail.reference.tiny_models import save_tiny_qwen
from guardrail.service.api import create_app
from guardrail.service.images import encode_png
from guardrail.service.runtime import Runtime, build_runtime
from guardrail.service.worker import Worker
from storage.engine import upgrade
from storage.models import Job, Sample

TOKEN = "hostile-token-0001"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SEGMENT = "<|vision_start|><|image_pad|><|vision_end|>"
TEMPLATE = f"<|im_start|>user\n{SEGMENT}{{prompt}}<|im_end|>\n<|im_start|>assistant\n"


def _png(seed: int, shape: tuple[int, int] = (56, 56)) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_png(rng.integers(0, 255, (*shape, 3), dtype=np.uint8))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _body(images: list[bytes], prompt: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "model": "qwen",
        "prompt": f"{SEGMENT * len(images)} describe ." if prompt is None else prompt,
        "output": "a cat on the table",
        "image_base64": _b64(images[0]),
        "more_images_base64": [_b64(i) for i in images[1:]],
        "audit": True,
        **extra,
    }


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen(tmp_path_factory.mktemp("qwen"), image_size=56)


@contextmanager
def _served(
    tmp_path: Path, qwen_dir: Path, **overrides: Any
) -> Iterator[tuple[Runtime, TestClient]]:
    settings = load_settings(
        environ={},
        database_url=f"sqlite:///{tmp_path / 'g.db'}",
        api_tokens=[TOKEN],
        models=[
            {"name": "qwen", "path": str(qwen_dir), "family": "qwen2_5_vl", "n_regions": 8},
            {
                "name": "templated",
                "path": str(qwen_dir),
                "family": "qwen2_5_vl",
                "n_regions": 8,
                "prompt": TEMPLATE,
            },
        ],
        max_attempts=3,
        **overrides,
    )
    runtime = build_runtime(settings)
    upgrade(runtime.engine)
    with TestClient(create_app(runtime)) as client:
        yield runtime, client


@pytest.fixture()
def served(tmp_path: Path, qwen_dir: Path) -> Iterator[tuple[Runtime, TestClient]]:
    with _served(tmp_path, qwen_dir) as both:
        yield both


UNREADABLE_LAYOUTS: dict[str, Any] = {
    "not an object": [1, 2, 3],
    "not numbers": {"canvas": "ab", "boxes": 5},
    "overlapping boxes": {"canvas": [56, 112], "boxes": [[0, 0, 56, 60], [0, 56, 56, 56]]},
    # read box by box: the canvas it names is never allocated (it was, 149 GiB of it)
    "a canvas of 4*10^10 pixels": {
        "canvas": [200_000, 200_000],
        "boxes": [[0, 0, 200_000, 200_000], [0, 0, 1, 1]],
    },
    "an infinite size": {"canvas": [float("inf"), 112], "boxes": [[0, 0, 56, 56]]},
}


@pytest.mark.parametrize("name", list(UNREADABLE_LAYOUTS))
def test_a_stored_layout_that_does_not_read_back_fails_its_job_once_and_the_view_answers(
    served: tuple[Runtime, TestClient], name: str
) -> None:
    runtime, client = served
    answer = client.post("/v1/samples", json=_body([_png(1), _png(2)]), headers=AUTH)
    assert answer.status_code == 202, answer.text
    sample_id = answer.json()["id"]
    with runtime.sessions() as session:
        sample = session.get(Sample, sample_id)
        assert sample is not None and sample.image_layout is not None
        sample.image_layout = UNREADABLE_LAYOUTS[name]
        session.commit()
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics)
    assert worker.run_once() is True
    with runtime.sessions() as session:
        [job] = session.query(Job).filter_by(sample_id=sample_id).all()
        assert (job.status.value, job.attempts, job.failure_reason) == (
            "failed",
            1,
            "invalid_input",
        ), job.last_error
        assert "the stored image layout is unreadable" in (job.last_error or "")
    view = client.get(f"/v1/samples/{sample_id}", headers=AUTH)
    assert view.status_code == 200, view.text
    assert view.json()["status"] == "failed" and view.json()["image_count"] is None


def test_a_refusal_names_the_image_or_field_at_fault(served: tuple[Runtime, TestClient]) -> None:
    runtime, client = served
    good = _png(1)
    truncated = _png(2)[:300]  # a readable header, then nothing: found only when decoded
    cases = [
        (_body([good, truncated]), 422, "image 2 of 2: the image is truncated or corrupt"),
        (
            {**_body([good, good]), "more_images_base64": ["!!not base64"]},
            422,
            "more_images_base64[0] is not valid base64",
        ),
        (
            _body([good], prompt=f"{SEGMENT}{SEGMENT} describe ."),
            422,
            "prompt: holds 2 '<|image_pad|>' placeholders for 1 image (one per image",
        ),
    ]
    for body, status, reason in cases:
        answer = client.post("/v1/samples", json=body, headers=AUTH)
        assert answer.status_code == status and reason in answer.json()["error"]["message"], (
            answer.text
        )
    with runtime.sessions() as session:
        assert session.query(Sample).count() == 0  # nothing stored to fail its audit later


def test_a_model_with_a_template_takes_several_images_from_the_api_as_from_the_proxy(
    served: tuple[Runtime, TestClient],
) -> None:
    """The user text alone, as the prompt field says for a model with a template: its one
    image stands for every image, as the chat reader renders a conversation of several."""
    from guardrail.service.chat import chat_input

    runtime, client = served
    images = [_png(1), _png(2)]
    body = {**_body(images, prompt="describe ."), "model": "templated"}
    answer = client.post("/v1/samples", json=body, headers=AUTH)
    assert answer.status_code == 202, answer.text
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(i)}}
        for i in images
    ]
    chat = {
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "describe ."}]}]
    }
    proxied = chat_input(chat, "<|image_pad|>", TEMPLATE, max_images=4, segment=SEGMENT).prompt
    assert runtime.auditors["templated"].prompt_for("describe .", 2) == proxied
    assert proxied.count(SEGMENT) == 2
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics)
    assert worker.run_once() is True
    view = client.get(f"/v1/samples/{answer.json()['id']}", headers=AUTH).json()
    assert view["status"] == "audited" and view["image_count"] == 2, view


def test_the_canvas_of_several_images_holds_at_most_max_image_pixels(
    tmp_path: Path, qwen_dir: Path
) -> None:
    """Each image alone is within the bound, the four together are not: the canvas is laid
    out at a lower common height (a worker decodes it whole, under Pillow's pixel limit)."""
    with _served(tmp_path, qwen_dir, max_image_pixels=8192) as (runtime, client):
        answer = client.post("/v1/samples", json=_body([_png(n) for n in range(4)]), headers=AUTH)
        assert answer.status_code == 202, answer.text
        view = client.get(f"/v1/samples/{answer.json()['id']}", headers=AUTH).json()
        width, height = view["image_size"]
        assert view["image_count"] == 4 and width * height <= 8192 < 4 * 56 * 56
        assert [box[2] for box in view["image_layout"]["boxes"]] == [height] * 4
        assert Worker(runtime.sessions, runtime.auditors, runtime.metrics).run_once()
        view = client.get(f"/v1/samples/{answer.json()['id']}", headers=AUTH).json()
        assert view["status"] == "audited", view


def test_the_fetched_images_of_one_sample_share_one_images_bytes(
    tmp_path: Path, qwen_dir: Path
) -> None:
    """Each URL's image is within max_image_bytes, the two together are not: a counted drop
    (too large), not twice the bytes held; one of them alone is a sample."""
    noise = _png(5, (100, 100))

    async def chat(request: Request) -> JSONResponse:
        await request.body()
        message = {"role": "assistant", "content": "a cat on the table"}
        return JSONResponse({"id": "chatcmpl-1", "choices": [{"index": 0, "message": message}]})

    async def image(request: Request) -> Response:
        return Response(noise, media_type="image/png")

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]), Route("/a.png", image)]
    limit = len(noise) * 3 // 2
    with (
        BackgroundServer(Starlette(routes=routes)) as upstream,
        _served(
            tmp_path,
            qwen_dir,
            upstream_url=upstream,
            image_url_fetch=True,
            image_url_allowed_hosts=["127.0.0.1"],
            max_image_bytes=limit,
        ) as (runtime, client),
    ):
        get = runtime.metrics.registry.get_sample_value
        url = {"type": "image_url", "image_url": {"url": f"{upstream}/a.png"}}
        text = {"type": "text", "text": "describe ."}
        for content in ([url, url, text], [url, text]):
            body = {"model": "qwen", "messages": [{"role": "user", "content": content}]}
            answer = client.post(
                "/v1/chat/completions", json=body, headers={"x-guardrail-audit": "always"}
            )
            assert answer.status_code == 200, answer.text
        deadline = time.time() + 30
        while get("guardrail_samples_sampled_total", {"model": "qwen"}) != 1:
            assert time.time() < deadline, "the one-image sample was not stored"
            time.sleep(0.05)
        drops = get("guardrail_proxy_fail_open_drops_total", {"reason": "image_fetch_failed"})
        assert drops == 1
        fetches = get("guardrail_image_fetches_total", {"outcome": "too_large"})
        assert fetches == 1


def test_thousands_of_image_parts_are_counted_before_any_is_decoded() -> None:
    """3000 parts that are not even base64: over the limit is known from the count alone."""
    from guardrail.service.chat import ChatFormatError, chat_input

    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}
    body = {"messages": [{"role": "user", "content": [part] * 3000}]}
    with pytest.raises(ChatFormatError) as over:
        chat_input(body, "<|image_pad|>", max_images=4, segment=SEGMENT)
    assert over.value.reason == "too_many_images" and "3000 images" in str(over.value)
    with pytest.raises(ChatFormatError) as one:
        chat_input(body, "<image>")
    assert one.value.reason == "multi_image"


def test_malformed_more_images_get_a_422_naming_the_field(
    served: tuple[Runtime, TestClient],
) -> None:
    runtime, client = served
    good = _b64(_png(1))
    cases: list[tuple[Any, str]] = [
        ("not a list", "more_images_base64: Input should be a valid list"),
        ([1, {"a": 2}], "more_images_base64.0: Input should be a valid string"),
        (None, "more_images_base64: Input should be a valid list"),
        ([good] * 16, "more_images_base64: List should have at most 15 items"),
        ([good] * 4, "5 images: at most 4 are audited in one sample of model 'qwen'"),
        ([""], "image 2 of 2: the image is empty"),
    ]
    for more, reason in cases:
        body = {**_body([_png(1)]), "more_images_base64": more}
        answer = client.post("/v1/samples", json=body, headers=AUTH)
        assert answer.status_code == 422, (more, answer.text)
        assert reason in answer.json()["error"]["message"], answer.text
    with runtime.sessions() as session:
        assert session.query(Sample).count() == 0
