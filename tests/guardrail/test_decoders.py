"""The decoder pool (`guardrail.service.decoders`): sampled images are decoded in child
processes; a crash or a hang there fails only that image, and the serving process lives on."""

from __future__ import annotations

import base64
import io
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from detectors.reference import MODEL_DIR
from guardrail.config import load_settings
from guardrail.service.api import create_app
from guardrail.service.canonical import ImageLimits, PixelBudget, read_audit_resolution
from guardrail.service.decoders import DecoderFailedError, DecoderPool, decode_pixels
from guardrail.service.images import CorruptImageError, DecodeBusyError
from guardrail.service.runtime import build_runtime
from storage.engine import upgrade

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"


def _png(width: int, height: int) -> bytes:
    image = Image.new("RGB", (width, height), (30, 160, 90))
    image.paste((250, 250, 0), (0, 0, width // 2, height))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# a 40 Mpx PNG of 160 KB: decoding it takes long enough (about 0.5 s here) to act on a busy child
SLOW = _png(6300, 6300)


def _canonical(pool: DecoderPool, data: bytes, *, wait: float = 10.0) -> Any:
    resolution = read_audit_resolution(MODEL_DIR)
    assert resolution is not None
    return pool.canonical(
        data,
        limits=ImageLimits(max_pixels=10**8, min_side=16, max_aspect_ratio=20),
        resolution=resolution,
        n_regions=48,
        budget=PixelBudget(10**9),
        wait_seconds=wait,
    )


@pytest.fixture()
def pool() -> Any:
    pool = DecoderPool(1, timeout_seconds=30)
    yield pool
    pool.close()


def test_an_image_is_made_canonical_in_a_child_process(pool: DecoderPool) -> None:
    image = _canonical(pool, EXAMPLE.read_bytes())
    assert image.png.startswith(b"\x89PNG") and image.original_format == "PNG"
    assert (image.original_width, image.original_height) == Image.open(EXAMPLE).size
    (pid,) = pool.pids
    assert pid != os.getpid()
    _canonical(pool, EXAMPLE.read_bytes())
    assert pool.pids == [pid]  # the same child takes the next image


def test_a_rejection_comes_back_as_the_same_error(pool: DecoderPool) -> None:
    truncated = EXAMPLE.read_bytes()[:400]
    with pytest.raises(CorruptImageError, match="truncated or corrupt") as rejected:
        _canonical(pool, truncated)
    assert rejected.value.status == 422
    assert pool.crashes == 0 and len(pool.pids) == 1  # a refusal is not a crash


def test_a_child_killed_mid_decode_fails_only_that_image(pool: DecoderPool) -> None:
    _canonical(pool, EXAMPLE.read_bytes())
    (first,) = pool.pids
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            _canonical(pool, SLOW)
        except BaseException as exc:
            errors.append(exc)

    os.kill(first, signal.SIGSTOP)  # stopped, it takes the image and never answers
    thread = threading.Thread(target=slow)
    thread.start()
    _wait_until_taken(pool)
    os.kill(first, signal.SIGKILL)
    thread.join(30)
    (error,) = errors
    assert isinstance(error, DecoderFailedError)
    assert "killed by SIGKILL" in str(error) and error.status == 422
    assert pool.crashes == 1
    image = _canonical(pool, EXAMPLE.read_bytes())  # a new child takes over
    assert image.png.startswith(b"\x89PNG")
    assert first not in pool.pids and len(pool.pids) == 1


def test_a_decode_past_the_timeout_is_stopped_and_refused() -> None:
    pool = DecoderPool(1, timeout_seconds=30)
    try:
        _canonical(pool, EXAMPLE.read_bytes())  # the child is up
        (child,) = pool.pids
        pool.timeout_seconds = 0.05
        os.kill(child, signal.SIGSTOP)  # a hang, however fast this machine decodes
        with pytest.raises(DecoderFailedError, match=r"more than 0\.05 s to decode"):
            _canonical(pool, SLOW)
        assert child not in pool.pids
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _alive(child)
    finally:
        pool.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def test_no_free_child_in_time_is_a_503_not_a_queue(pool: DecoderPool) -> None:
    _canonical(pool, EXAMPLE.read_bytes())
    (child,) = pool.pids
    os.kill(child, signal.SIGSTOP)  # busy until continued
    thread = threading.Thread(target=_canonical, args=(pool, SLOW))
    thread.start()
    _wait_until_taken(pool)
    try:
        with pytest.raises(DecodeBusyError, match="decoders are busy") as busy:
            _canonical(pool, EXAMPLE.read_bytes(), wait=0.01)
    finally:
        os.kill(child, signal.SIGCONT)
    assert busy.value.status == 503 and busy.value.retry_after == 1
    thread.join(30)


def _wait_until_taken(pool: DecoderPool) -> None:
    """Until a child has taken a job (the image is on its way to it, or with it)."""
    deadline = time.monotonic() + 30
    while pool.busy == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.busy == 1
    time.sleep(0.1)  # past `busy`, the job is being sent to the child


def test_close_stops_every_child() -> None:
    pool = DecoderPool(2)
    threads = [threading.Thread(target=_canonical, args=(pool, EXAMPLE.read_bytes())) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    pids = pool.pids
    assert len(pids) >= 1
    pool.close()
    assert pool.pids == [] and not any(_alive(p) for p in pids)
    with pytest.raises(RuntimeError, match="closed"):
        _canonical(pool, EXAMPLE.read_bytes())


def test_decode_pixels_counts_a_progressive_jpeg_twice() -> None:
    image = Image.new("RGB", (640, 480), (10, 20, 30))
    baseline, progressive = io.BytesIO(), io.BytesIO()
    image.save(baseline, format="JPEG")
    image.save(progressive, format="JPEG", progressive=True)
    assert decode_pixels(baseline.getvalue()) == 640 * 480
    assert decode_pixels(progressive.getvalue()) == 2 * 640 * 480
    assert decode_pixels(EXAMPLE.read_bytes()) == Image.open(EXAMPLE).size[0] ** 2


def test_the_api_answers_422_when_an_image_kills_its_decoder_and_serves_on(
    tmp_path: Path,
) -> None:
    settings = load_settings(environ={}, database_url=f"sqlite:///{tmp_path / 'g.db'}")
    runtime = build_runtime(settings)
    upgrade(runtime.engine)
    client = TestClient(create_app(runtime))

    def post(data: bytes) -> Any:
        body = {
            "model": "reference",
            "prompt": "USER: <image> Describe the image. ASSISTANT:",
            "output": "fork knife .",
            "image_base64": base64.b64encode(data).decode(),
            "audit": True,
        }
        return client.post("/v1/samples", json=body)

    try:
        assert post(EXAMPLE.read_bytes()).status_code == 202
        doomed = runtime.decoders.pids
        for pid in doomed:  # stopped, a child takes the next image and never answers
            os.kill(pid, signal.SIGSTOP)
        answers: list[Any] = []
        thread = threading.Thread(target=lambda: answers.append(post(SLOW)))
        thread.start()
        _wait_until_taken(runtime.decoders)
        for pid in doomed:
            os.kill(pid, signal.SIGKILL)
        thread.join(60)
        (answer,) = answers
        assert answer.status_code == 422, answer.text
        assert "crashed the decoder (killed by SIGKILL)" in answer.json()["error"]["message"]
        assert post(EXAMPLE.read_bytes()).status_code == 202  # serving on, with a new child
        crashes = runtime.metrics.registry.get_sample_value("guardrail_image_decoder_crashes_total")
        assert crashes == 1
        assert set(runtime.decoders.pids).isdisjoint(doomed)
    finally:
        runtime.decoders.close()


def test_start_readies_every_child_before_the_first_image() -> None:
    pool = DecoderPool(2)
    try:
        pool.start()
        started = pool.pids
        assert len(started) == 2 and os.getpid() not in started
        _canonical(pool, EXAMPLE.read_bytes())
        assert sorted(pool.pids) == sorted(started)  # the image went to a started child
    finally:
        pool.close()
