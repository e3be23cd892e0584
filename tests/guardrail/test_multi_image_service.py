"""Several images in one chat message, served: a Qwen2.5-VL sample holds all of them and is
audited in one search over the regions of every image; a LLaVA one keeps the counted
`multi_image` skip; more images than `max_images_per_sample` are counted as
`too_many_images`."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from detectors.reference import MODEL_DIR
from guardrail.config import load_settings
from guardrail.demo.background_server import BackgroundServer
from guardrail.reference.tiny_models import save_tiny_qwen
from guardrail.service.api import create_app
from guardrail.service.images import encode_png
from guardrail.service.runtime import Runtime, build_runtime
from guardrail.service.worker import Worker
from storage.engine import upgrade
from storage.models import Sample

TOKEN = "s3cret-token-0001"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _png(seed: int, shape: tuple[int, int] = (56, 56)) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_png(rng.integers(0, 255, (*shape, 3), dtype=np.uint8))


def _part(png: bytes) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen(tmp_path_factory.mktemp("qwen"), image_size=56)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    async def chat(request: Request) -> JSONResponse:
        await request.body()
        message = {"role": "assistant", "content": "a cat on the table"}
        return JSONResponse({"id": "chatcmpl-1", "choices": [{"index": 0, "message": message}]})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    with BackgroundServer(app) as url:
        yield url


@pytest.fixture()
def sidecar(
    tmp_path: Path, qwen_dir: Path, upstream: str
) -> Iterator[Callable[..., tuple[Runtime, str]]]:
    servers: list[BackgroundServer] = []

    def start(qwen: dict[str, Any] | None = None, **overrides: Any) -> tuple[Runtime, str]:
        settings = load_settings(
            environ={},
            database_url=f"sqlite:///{tmp_path / 'g.db'}",
            upstream_url=upstream,
            api_tokens=[TOKEN],
            models=[
                {
                    "name": "qwen",
                    "path": str(qwen_dir),
                    "family": "qwen2_5_vl",
                    "n_regions": 8,
                    **(qwen or {}),
                },
                {"name": "reference", "path": str(MODEL_DIR), "family": "llava"},
            ],
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


def _chat(url: str, model: str, content: list[dict[str, Any]]) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    headers = {"x-guardrail-audit": "always"}
    got = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert got.status_code == 200, got.text


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.time() + 30
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_two_images_through_the_proxy_are_audited_in_one_search(
    sidecar: Callable[..., tuple[Runtime, str]],
) -> None:
    runtime, url = sidecar(max_images_per_sample=2)
    get = runtime.metrics.registry.get_sample_value
    text = {"type": "text", "text": "describe the image ."}
    _chat(url, "qwen", [_part(_png(1)), _part(_png(2, (28, 112))), text])

    def stored() -> Sample | None:
        with runtime.sessions() as session:
            return session.query(Sample).one_or_none()

    _wait(lambda: stored() is not None, "the sample")
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics)
    assert worker.run_once() is True and worker.run_once() is False  # one job, one search
    sample = stored()
    assert sample is not None
    view = httpx.get(f"{url}/v1/samples/{sample.id}", headers=AUTH, timeout=30).json()
    assert view["status"] == "audited", view
    assert view["image_count"] == 2
    boxes = view["image_layout"]["boxes"]
    assert len(boxes) == 2 and boxes[0][1] == 0 and boxes[1][1] == boxes[0][3]
    assert view["image_size"] == [boxes[1][1] + boxes[1][3], boxes[0][2]]  # the canvas
    assert [t["word"] for t in view["tokens"]] == ["cat", "table"]
    for token in view["tokens"]:
        attribution = token["attribution"]
        assert "2 images" in attribution["scorer"]
        assert (
            attribution["partition"].startswith("per-image(")
            and "images=2" in attribution["partition"]
        )
        # one ordering of the regions of both images, and where the compact set lies
        assert sorted(attribution["order"]) == list(range(len(attribution["order"])))
        assert attribution["compact_set_images"] and set(attribution["compact_set_images"]) <= {
            0,
            1,
        }

    # LLaVA audits one image: two are a counted skip; three images for Qwen are over the limit
    _chat(url, "reference", [_part(_png(1)), _part(_png(2)), text])
    _chat(url, "qwen", [_part(_png(1)), _part(_png(2)), _part(_png(3)), text])
    for reason in ("multi_image", "too_many_images"):
        _wait(
            lambda r=reason: get("guardrail_proxy_not_applicable_total", {"reason": r}) == 1,  # type: ignore[misc]
            reason,
        )
    with runtime.sessions() as session:
        assert session.query(Sample).count() == 1


def test_the_samples_api_takes_several_images_for_a_model_that_takes_several(
    sidecar: Callable[..., tuple[Runtime, str]],
) -> None:
    _, url = sidecar()
    one = "<|vision_start|><|image_pad|><|vision_end|>"
    body = {
        "model": "qwen",
        "prompt": f"<|im_start|> user {one} {one} describe . <|im_end|> <|im_start|> assistant",
        "output": "a cat on the table",
        "image_base64": base64.b64encode(_png(1)).decode(),
        "more_images_base64": [base64.b64encode(_png(2)).decode()],
    }
    answer = httpx.post(f"{url}/v1/samples", json=body, headers=AUTH, timeout=30)
    assert answer.status_code == 202, answer.text
    view = httpx.get(f"{url}/v1/samples/{answer.json()['id']}", headers=AUTH, timeout=30).json()
    assert view["image_count"] == 2 and view["image_size"] == [112, 56]
    # one placeholder for two images
    wrong = {**body, "prompt": f"<|im_start|> user {one} describe . <|im_end|>"}
    refused = httpx.post(f"{url}/v1/samples", json=wrong, headers=AUTH, timeout=30)
    assert refused.status_code == 422 and "1 '<|image_pad|>' placeholders for 2" in refused.text
    # LLaVA audits one image per sample
    llava = {**body, "model": "reference", "prompt": "USER: <image> <image> hi ASSISTANT:"}
    refused = httpx.post(f"{url}/v1/samples", json=llava, headers=AUTH, timeout=30)
    assert refused.status_code == 422 and "audited on one image" in refused.text


SEGMENT = "<|vision_start|><|image_pad|><|vision_end|>"
TWO_IMAGES = f"USER: {SEGMENT} {SEGMENT} describe the image . ASSISTANT:"


def _next_logp(qwen: Any, image: np.ndarray, layout: Any, ids: list[int]) -> Any:
    """Log-probabilities of `ids` after "a", for the canvas `image` of two images."""
    import torch

    a = int(qwen.tokenizer.convert_tokens_to_ids("a"))
    tokens = torch.tensor([[*qwen.prompt_ids(TWO_IMAGES, image, layout), a]])
    pixels, grid = qwen.pixel_inputs([np.ascontiguousarray(i) for i in layout.split(image)])
    with torch.inference_mode():
        logits = qwen.model(
            input_ids=tokens,
            pixel_values=pixels,
            image_grid_thw=grid,
            mm_token_type_ids=(tokens == qwen.image_token_id).int(),
        ).logits[0, -1]
    return torch.log_softmax(logits.float(), dim=-1)[ids]


def _evidence_word(runtime: Runtime, grey: np.ndarray, noise: np.ndarray) -> str:
    """The object word after "a" whose log-probability the noise image raises most over a
    grey canvas, with the noise image first and second (the same word both ways)."""
    import torch

    from detectors.layout import side_by_side

    qwen: Any = runtime.auditors["qwen"].load().local_model()
    words = ["cat", "dog", "cup", "table"]
    ids = [int(qwen.tokenizer.convert_tokens_to_ids(w)) for w in words]
    rises = []
    for images in ([grey, noise], [noise, grey]):
        canvas, layout = side_by_side(images)
        blank = np.full_like(canvas, 128)
        rises.append(_next_logp(qwen, canvas, layout, ids) - _next_logp(qwen, blank, layout, ids))
    best = int(torch.minimum(rises[0], rises[1]).argmax())
    assert float(rises[0][best]) > 0 and float(rises[1][best]) > 0
    return words[best]


def test_a_words_attribution_points_into_whichever_image_holds_the_evidence(
    sidecar: Callable[..., tuple[Runtime, str]],
) -> None:
    """One image is plain grey, the colour removed regions become (fill = grey): it carries no
    evidence, so the word's compact set lies in the other image, first or second."""
    runtime, url = sidecar(qwen={"fill": "grey"})
    grey = np.full((56, 56, 3), 128, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    word = _evidence_word(runtime, grey, noise)
    ids = {}
    for evidence, images in ((1, [grey, noise]), (0, [noise, grey])):
        b64 = [base64.b64encode(encode_png(i)).decode() for i in images]
        body = {
            "model": "qwen",
            "prompt": TWO_IMAGES,
            "output": f"a {word}",
            "image_base64": b64[0],
            "more_images_base64": b64[1:],
        }
        answer = httpx.post(f"{url}/v1/samples", json=body, headers=AUTH, timeout=30)
        assert answer.status_code == 202, answer.text
        ids[evidence] = answer.json()["id"]
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics)
    assert worker.run_once() and worker.run_once() and not worker.run_once()
    for evidence, sample_id in ids.items():
        view = httpx.get(f"{url}/v1/samples/{sample_id}", headers=AUTH, timeout=30).json()
        assert view["status"] == "audited", view
        [token] = view["tokens"]
        assert token["word"] == word
        assert token["attribution"]["compact_set_images"] == [evidence]


def test_the_conversation_reader_gives_every_image_its_own_segment() -> None:
    from guardrail.service.chat import ChatFormatError, chat_input

    segment = "<|vision_start|><|image_pad|><|vision_end|>"
    url = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    earlier = {"role": "user", "content": [_part(b"first"), {"type": "text", "text": "this?"}]}
    body = {
        "messages": [
            earlier,
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": [url, {"type": "text", "text": "and this?"}]},
        ]
    }
    parsed = chat_input(body, "<|image_pad|>", max_images=4, segment=segment)
    assert parsed.images == ((b"first", None), (None, "https://example.com/a.png"))
    assert parsed.prompt == (
        f"USER: {segment} this? ASSISTANT: A cat. USER: {segment} and this? ASSISTANT:"
    )
    template = f"<|im_start|>user\n{segment}{{prompt}}<|im_end|>\n<|im_start|>assistant\n"
    parsed = chat_input(body, "<|image_pad|>", template, max_images=4, segment=segment)
    assert parsed.prompt == (
        f"<|im_start|>user\n{segment}{segment}and this?<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ChatFormatError) as one:
        chat_input(body, "<image>")
    assert one.value.reason == "multi_image"
    with pytest.raises(ChatFormatError) as over:
        chat_input({"messages": [{"role": "user", "content": [url] * 3}]}, "x", max_images=2)
    assert over.value.reason == "too_many_images"
    # an image in a system turn is not in the audited conversation, nor in the count
    system = {"role": "system", "content": [url]}
    parsed = chat_input({"messages": [system, earlier]}, "<image>")
    assert parsed.images == ((b"first", None),)


def test_an_image_too_small_beside_the_others_is_refused() -> None:
    from guardrail.service.canonical import CanonicalImage, canonical_canvas
    from guardrail.service.images import DegenerateImageError

    def canonical(h: int, w: int) -> CanonicalImage:
        png = _png(h, (h, w))
        return CanonicalImage(
            png=png, width=w, height=h, original_width=w, original_height=h, original_format="PNG"
        )

    canvas, layout = canonical_canvas(
        [canonical(60, 60), canonical(40, 90)], min_side=16, n_regions=8
    )
    assert (canvas.height, canvas.width) == layout.canvas_hw
    assert canvas.width * canvas.height <= 60 * 60 + 40 * 90
    # a tall narrow image beside a wide one: side by side at a common height, it gets 6 px wide
    with pytest.raises(DegenerateImageError, match="image 1 of 2 is 6x56 pixels"):
        canonical_canvas([canonical(400, 40), canonical(40, 400)], min_side=16, n_regions=8)


def test_the_auditor_encodes_two_images_with_the_vision_file_of_their_size(
    qwen_dir: Path, tmp_path: Path
) -> None:
    from detectors.layout import side_by_side
    from guardrail.cli import main
    from guardrail.config import ModelSettings
    from guardrail.service.auditor import AuditInputError, ModelAuditor

    onnx = tmp_path / "q.onnx"
    assert main(["export-vision", str(qwen_dir), "--out", str(onnx), "--input-size", "56x56"]) == 0
    auditor = ModelAuditor(
        ModelSettings(name="q", path=qwen_dir, family="qwen2_5_vl", onnx=onnx, n_regions=8)
    )
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(2)]
    canvas, layout = side_by_side(images)
    result = auditor.audit(canvas, TWO_IMAGES, None, "a cat on the table", layout)
    assert [w.word for w in result.words] == ["cat", "table"]
    for attribution in result.attributions:
        assert "2 images; vision=onnx:CPUExecutionProvider" in attribution.scorer_name
        method = attribution.partition.method
        assert method.startswith("per-image(") and "images=2" in method
    with pytest.raises(AuditInputError, match="2 image placeholders, one per image"):
        auditor.audit(canvas, TWO_IMAGES.replace(f"{SEGMENT} ", "", 1), None, "a cat", layout)
