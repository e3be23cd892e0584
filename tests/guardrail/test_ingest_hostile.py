"""Hostile and awkward images at ingest: every refusal is a 4xx with a reason, never a 5xx, and
what is accepted is stored as the canonical image (upright RGB8 PNG at the model's input size)
while the sample keeps the original's digest and size.  Images are generated here."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from detectors.reference import CAPTION_PROMPT, MODEL_DIR
from guardrail.config import ModelSettings, load_settings
from guardrail.service.api import create_app
from guardrail.service.canonical import (
    FALLBACK_MAX_PIXELS,
    AuditResolution,
    ImageLimits,
    PixelBudget,
    audit_resolution,
    canonical_image,
    decode_for_audit,
    pixel_budget,
    read_audit_resolution,
)
from guardrail.service.images import DecodeBusyError, decode_image, sniff_format
from guardrail.service.runtime import Runtime, build_runtime
from guardrail.service.worker import Worker
from storage.engine import upgrade
from storage.models import Job, Sample

TOKEN = "hostile-token-0001"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"
OUTPUT = "fork knife car clock ."


def _runtime(tmp_path: Path, **overrides: Any) -> Runtime:
    models = [
        {"name": "reference", "path": str(MODEL_DIR)},
        {
            "name": "coarse",
            "path": str(MODEL_DIR),
            "n_regions": 2,
            "allow_uncalibrated": True,
        },  # 2 regions need a squarish image
    ]
    settings = load_settings(
        environ={},
        database_url=f"sqlite:///{tmp_path / 'g.db'}",
        api_tokens=[TOKEN],
        models=models,
        **overrides,
    )
    runtime = build_runtime(settings)
    upgrade(runtime.engine)
    return runtime


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header claims `width` x `height` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _reason(answer: Any) -> str:
    body = answer.json()
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return str(message or body.get("detail") or "")


def _post_json(client: TestClient, data: bytes, model: str = "reference") -> Any:
    body = {
        "model": model,
        "prompt": CAPTION_PROMPT,
        "output": OUTPUT,
        "image_base64": base64.b64encode(data).decode(),
    }
    return client.post("/v1/samples", json=body, headers=AUTH)


def _post_upload(client: TestClient, data: bytes, model: str = "reference") -> Any:
    return client.post(
        "/v1/samples/upload",
        files={"image": ("image.bin", data, "application/octet-stream")},
        data={"model": model, "prompt": CAPTION_PROMPT, "output": OUTPUT},
        headers=AUTH,
    )


def _hostile_corpus() -> list[tuple[str, bytes, int, str]]:
    """(name, bytes, status, words the reason must hold)."""
    square = _noise(32, 32)
    png = _encode(_noise(200, 200), "PNG")
    return [
        ("20000x1", _encode(Image.new("RGB", (20000, 1)), "PNG"), 422, "aspect ratio"),
        ("5000x1", _encode(Image.new("RGB", (5000, 1)), "PNG"), 422, "aspect ratio"),
        ("2x2000", _encode(Image.new("RGB", (2, 2000)), "PNG"), 422, "aspect ratio"),
        ("4x4000", _encode(Image.new("RGB", (4, 4000)), "PNG"), 422, "aspect ratio"),
        ("1x1", _encode(Image.new("RGB", (1, 1)), "PNG"), 422, "short side"),
        ("8x12", _encode(Image.new("RGB", (8, 12)), "PNG"), 422, "at least 16 pixels"),
        ("GIF", _encode(square, "GIF"), 415, "GIF"),
        ("BMP", _encode(square, "BMP"), 415, "BMP"),
        ("TIFF", _encode(square, "TIFF"), 415, "TIFF"),
        ("ICO", _encode(square, "ICO"), 415, "ICO"),
        ("EPS", _encode(square, "EPS"), 415, "PostScript/EPS"),
        ("PDF", _encode(square, "PDF"), 415, "PDF"),
        (
            "SVG",
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" '
            b'height="9"><rect width="9" height="9"/></svg>',
            415,
            "SVG",
        ),
        ("twice encoded", base64.b64encode(png), 415, "encoded twice"),
        ("random bytes", np.random.default_rng(7).bytes(4096), 415, "not recognised"),
        ("empty", b"", 422, "empty"),
        ("truncated PNG", png[: len(png) // 2], 422, "truncated"),
        ("PNG header only", png[:40], 422, "truncated"),
        ("JPEG without a frame", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\0" * 7, 422, "JPEG"),
        ("100000x100000 claimed", _png_claiming(100_000, 100_000), 413, "pixels"),
        ("WebP garbage", b"RIFF\x20\0\0\0WEBPVP8 " + b"\0" * 24, 422, "WEBP"),
    ]


def test_a_hostile_corpus_gets_4xx_with_reasons_on_both_routes(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    client = TestClient(create_app(runtime))
    for name, data, status, words in _hostile_corpus():
        for post in (_post_json, _post_upload):
            answer = post(client, data)
            assert answer.status_code == status, (name, post.__name__, answer.text)
            assert words in _reason(answer), (name, post.__name__, answer.text)
    # the partition's needs: 2 regions of a 16x320 image would be wider than the image
    thin = _encode(_noise(320, 16), "PNG")
    for post in (_post_json, _post_upload):
        answer = post(client, thin, model="coarse")
        assert answer.status_code == 422 and "regions" in _reason(answer), answer.text
    # nothing was stored, and the service still answers
    with runtime.sessions() as session:
        assert session.query(Sample).count() == 0
    assert client.get("/healthz").status_code == 200
    good = _post_json(client, EXAMPLE.read_bytes())
    assert good.status_code == 202, good.text


def _accepted(client: TestClient, runtime: Runtime, data: bytes) -> tuple[Sample, np.ndarray]:
    answer = _post_upload(client, data)
    assert answer.status_code == 202, answer.text
    with runtime.sessions() as session:
        sample = session.get(Sample, answer.json()["id"])
        job = session.query(Job).filter(Job.sample_id == answer.json()["id"]).one()
        assert sample is not None and sample.image_data is not None
        assert job.image_data == sample.image_data  # the job carries the canonical image too
        session.expunge(sample)
    assert sample.image_sha256 == hashlib.sha256(data).hexdigest()
    assert sample.image_data is not None and sniff_format(sample.image_data) == "PNG"
    return sample, decode_image(sample.image_data)


def test_awkward_but_valid_images_are_normalised_to_rgb8(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, store_raw=True)
    client = TestClient(create_app(runtime))

    # 16-bit grey: scaled to 8 bits, not clipped (32768 -> 128, not 255)
    grey16 = np.full((64, 64), 32768, dtype=np.uint16)
    grey16[:, 32:] = 65535
    sample, rgb = _accepted(client, runtime, _encode(Image.fromarray(grey16), "PNG"))
    assert (sample.image_width, sample.image_height) == (64, 64) and rgb.shape == (64, 64, 3)
    assert rgb[5, 5].tolist() == [128, 128, 128] and rgb[5, 60].tolist() == [255, 255, 255]

    # palette with a transparent entry: that entry becomes white
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 32, 64))
    _, rgb = _accepted(client, runtime, _encode(palette, "PNG", transparency=0))
    assert rgb[5, 5].tolist() == [200, 0, 0] and rgb[5, 60].tolist() == [255, 255, 255]

    # RGBA: composited over white (alpha 0 -> white, alpha 128 -> halfway)
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:, :32] = (0, 0, 255, 128)
    _, rgb = _accepted(client, runtime, _encode(Image.fromarray(rgba), "PNG"))
    assert rgb[5, 60].tolist() == [255, 255, 255]
    assert np.abs(rgb[5, 5].astype(int) - [127, 127, 255]).max() <= 1

    # CMYK JPEG: pure cyan comes back as cyan
    cmyk = Image.new("CMYK", (64, 64), (255, 0, 0, 0))
    _, rgb = _accepted(client, runtime, _encode(cmyk, "JPEG", quality=95))
    assert np.abs(rgb[32, 32].astype(int) - [0, 255, 255]).max() <= 8

    # WebP (lossless) keeps its pixels
    noise = _noise(80, 64, seed=3)
    _, rgb = _accepted(client, runtime, _encode(noise, "WEBP", lossless=True))
    assert np.array_equal(rgb, np.asarray(noise))


def test_exif_orientation_is_honoured(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, store_raw=True)
    client = TestClient(create_app(runtime))
    raw = np.zeros((100, 200, 3), dtype=np.uint8)  # stored 200 wide, 100 tall
    raw[:, :100] = (255, 0, 0)  # left half red
    raw[:, 100:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the left half ends up on top
    jpeg = _encode(Image.fromarray(raw), "JPEG", quality=95, exif=exif.tobytes())
    sample, rgb = _accepted(client, runtime, jpeg)
    assert (sample.image_width, sample.image_height) == (100, 200)  # upright size
    assert rgb.shape == (192, 96, 3)  # shortest side 96, as the model's processor sizes it
    assert rgb[20, 48].tolist()[0] > 200 and rgb[20, 48].tolist()[2] < 50  # red on top
    assert rgb[170, 48].tolist()[2] > 200 and rgb[170, 48].tolist()[0] < 50  # blue below


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_matches_pillows_exif_transpose(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    png = _encode(_noise(40, 24, seed=orientation), "PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(png))).convert("RGB"))
    assert np.array_equal(decode_image(png), expected)


def test_a_huge_image_is_stored_at_the_models_size_with_the_originals_digest(
    tmp_path: Path,
) -> None:
    runtime = _runtime(tmp_path, store_raw=True)
    client = TestClient(create_app(runtime))
    big = Image.new("RGB", (6300, 6300), (30, 160, 90))
    big.paste((250, 250, 0), (0, 0, 3150, 6300))
    data = _encode(big, "PNG", compress_level=1)
    del big
    assert len(data) < 2**20  # small on the wire, 40 Mpx decoded
    sample, rgb = _accepted(client, runtime, data)
    assert (sample.image_width, sample.image_height) == (6300, 6300)
    assert rgb.shape == (96, 96, 3)
    assert rgb[48, 10].tolist() == [250, 250, 0] and rgb[48, 90].tolist() == [30, 160, 90]


def test_a_downscaled_sample_is_audited_and_reported(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from guardrail.service.reports import HEATMAP_MAX_SIDE, gather_report
    from storage.models import AttributionRecord

    runtime = _runtime(tmp_path, store_raw=True)
    client = TestClient(create_app(runtime))
    trap = Image.open(EXAMPLE).convert("RGB")
    big = trap.resize((384, 384), Image.Resampling.NEAREST)
    answer = _post_json(client, _encode(big, "JPEG", quality=95))
    assert answer.status_code == 202, answer.text
    sample_id = answer.json()["id"]
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics)
    assert worker.run_once() is True
    view = client.get(f"/v1/samples/{sample_id}", headers=AUTH).json()
    assert view["status"] == "audited", view
    assert {t["word"] for t in view["tokens"]} == {"fork", "knife", "car", "clock"}
    with runtime.sessions() as session:
        sample = session.get(Sample, sample_id)
        assert sample is not None and sample.image_data is not None
        assert (sample.image_width, sample.image_height) == (384, 384)
        assert decode_image(sample.image_data).shape == (96, 96, 3)

    def heatmaps() -> list[Image.Image]:
        now = datetime.now(UTC)
        with runtime.sessions() as session:
            data = gather_report(session, now - timedelta(hours=1), now + timedelta(minutes=1))
        found = [e["heatmap_png"] for e in data["worst_examples"] if e["heatmap_png"]]
        assert found
        return [Image.open(io.BytesIO(base64.b64decode(h))).convert("RGB") for h in found]

    drawn = heatmaps()
    assert all(p.size == (192, 192) for p in drawn)  # the 96 px canonical image, shown at 2x
    # Rows stored before canonical images may hold a full-size image and label map: the
    # heatmap is drawn at most HEATMAP_MAX_SIDE wide, over the image (not a grey canvas).
    with runtime.sessions.begin() as session:
        sample = session.get(Sample, sample_id)
        assert sample is not None
        sample.image_data = _encode(trap.resize((1920, 1920), Image.Resampling.NEAREST), "PNG")
        for record in session.query(AttributionRecord):
            with np.load(io.BytesIO(record.labels_npz)) as stored:
                labels = np.asarray(stored["labels"]).repeat(20, axis=0).repeat(20, axis=1)
            out = io.BytesIO()
            np.savez_compressed(out, labels=labels)
            record.labels_npz = out.getvalue()
    legacy = heatmaps()
    assert all(p.size == (HEATMAP_MAX_SIDE, HEATMAP_MAX_SIDE) for p in legacy)
    with runtime.sessions.begin() as session:
        sample = session.get(Sample, sample_id)
        assert sample is not None
        sample.image_data = None
    canvas = heatmaps()
    for over_image, over_grey in zip(legacy, canvas, strict=True):
        difference = np.abs(np.asarray(over_image, int) - np.asarray(over_grey, int))
        assert difference.mean() > 10


def test_decoding_beyond_the_pixel_budget_gets_a_503_with_a_reason(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, ingest_decode_pixels=123_457, ingest_decode_wait_seconds=0.2)
    client = TestClient(create_app(runtime))
    budget = pixel_budget(123_457)
    with budget.hold(123_457, timeout=1.0):  # another ingest is decoding
        answer = _post_json(client, EXAMPLE.read_bytes())
    assert answer.status_code == 503, answer.text
    assert "retry" in _reason(answer)
    if "error" in answer.json():  # the error contract adds Retry-After to every 503
        assert answer.headers.get("Retry-After")
    assert budget.in_use == 0
    assert _post_json(client, EXAMPLE.read_bytes()).status_code == 202


def test_the_pixel_budget_bounds_pixels_in_flight() -> None:
    budget = PixelBudget(100)
    entered = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with budget.hold(60, timeout=1.0):
            entered.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(5)
    with budget.hold(40, timeout=0.1):  # fits beside the 60
        assert budget.in_use == 100
    with (
        pytest.raises(DecodeBusyError, match="60 of 100 pixels in use") as busy,
        budget.hold(41, timeout=0.05),
    ):
        pass
    assert busy.value.status == 503 and busy.value.retry_after == 1
    release.set()
    holder.join()
    with budget.hold(10_000, timeout=0.1):  # larger than the budget: decodes alone
        assert budget.in_use == 100
    assert budget.in_use == 0


def _canonical(data: bytes, budget: PixelBudget) -> Any:
    """The reference model's canonical image of `data`, decoded under `budget`."""
    resolution = read_audit_resolution(MODEL_DIR)
    assert resolution is not None
    return canonical_image(
        data,
        limits=ImageLimits(max_pixels=10**8, min_side=16, max_aspect_ratio=20),
        resolution=resolution,
        n_regions=48,
        budget=budget,
        wait_seconds=1.0,
    )


def test_pixels_are_decoded_only_while_the_budget_is_held(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    budget = PixelBudget(10**8)
    seen: list[int] = []
    load = ImageFile.ImageFile.load

    def watched(image: ImageFile.ImageFile) -> Any:
        seen.append(budget.in_use)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", watched)
    exif = Image.Exif()
    exif[0x0112] = 6
    # a PNG without an EXIF chunk before its pixels is decoded to look for one after them
    cases = [("PNG", {}), ("PNG", {"exif": exif.tobytes()}), ("JPEG", {}), ("WEBP", {})]
    for fmt, params in cases:
        image = _canonical(_encode(_noise(300, 200), fmt, **params), budget)
        upright = (96, 144) if params else (144, 96)
        assert (image.width, image.height) == upright  # short side 96
    assert len(seen) >= 4 and all(pixels > 0 for pixels in seen), seen
    assert budget.in_use == 0


def test_the_audit_resolution_comes_from_the_processor_config(tmp_path: Path) -> None:
    reference = read_audit_resolution(MODEL_DIR)
    assert reference is not None and reference.shortest_edge == 96 and reference.resample == 3
    assert reference.target_size(6300, 6300) == (96, 96)
    assert reference.target_size(400, 200) == (192, 96)  # as CLIP sizes it
    assert reference.target_size(50, 40) == (50, 40)  # never upscaled

    qwen = tmp_path / "qwen"
    qwen.mkdir()
    config = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "merge_size": 2,
        "patch_size": 14,
        "size": {"longest_edge": 3136, "shortest_edge": 3136},  # pixel counts here
    }
    (qwen / "preprocessor_config.json").write_text(__import__("json").dumps(config))
    resolution = read_audit_resolution(qwen)
    assert resolution is not None and resolution.max_pixels == 3136
    assert resolution.shortest_edge is None
    assert resolution.target_size(6300, 6300) == (56, 56)
    w, h = resolution.target_size(1000, 500)
    assert w * h <= 3136 and abs(w / h - 2) < 0.05

    fixed = tmp_path / "siglip"
    fixed.mkdir()
    (fixed / "preprocessor_config.json").write_text('{"size": {"height": 224, "width": 224}}')
    found = read_audit_resolution(fixed)
    assert found is not None and found.target_size(1000, 500) == (448, 224)

    override = ModelSettings(name="m", path=MODEL_DIR, audit_max_pixels=10_000)
    assert audit_resolution(override).target_size(6300, 6300) == (100, 100)
    empty = tmp_path / "empty"
    empty.mkdir()
    fallback = audit_resolution(ModelSettings(name="e", path=empty))
    assert fallback.max_pixels == FALLBACK_MAX_PIXELS and "default" in fallback.source
    assert AuditResolution(longest_edge=448).target_size(6300, 3150) == (448, 224)


def test_a_job_queued_before_canonical_images_is_decoded_at_the_audit_size() -> None:
    model = ModelSettings(name="reference", path=MODEL_DIR)
    legacy = Image.new("RGB", (4000, 3000), (10, 200, 30))
    legacy.paste((200, 20, 20), (0, 0, 2000, 3000))
    rgb = decode_for_audit(_encode(legacy, "JPEG", quality=90), model)  # decoded at 1/8 scale
    assert rgb.shape == (96, 128, 3)
    assert np.abs(rgb[48, 10].astype(int) - [200, 20, 20]).max() <= 8
    canonical = _encode(_noise(96, 96), "PNG")
    assert np.array_equal(decode_for_audit(canonical, model), decode_image(canonical))


def test_reading_the_audit_resolution_loads_no_model_code() -> None:
    code = (
        "import sys\n"
        "from guardrail.service.canonical import read_audit_resolution\n"
        "from detectors.reference import MODEL_DIR\n"
        "print(read_audit_resolution(MODEL_DIR).shortest_edge)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["96", "[]"]


def test_a_progressive_jpeg_is_budgeted_at_full_size_whatever_the_draft_scale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libjpeg holds a progressive JPEG's coefficients at full size even when it decodes at
    1/8 scale: 8 such files at once took the serve process to 2 GB while the budget counted
    drafted pixels."""
    from PIL import ImageFile

    budget = PixelBudget(10**9)
    seen: list[tuple[bool, int]] = []
    load = ImageFile.ImageFile.load

    def watched(image: ImageFile.ImageFile) -> Any:
        seen.append((bool(image.info.get("progressive")), budget.in_use))
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", watched)
    for progressive in (False, True):
        data = _encode(_noise(1600, 1600), "JPEG", progressive=progressive)
        image = _canonical(data, budget)
        assert (image.width, image.height) == (96, 96)
    drafted = max(in_use for is_progressive, in_use in seen if not is_progressive)
    full = max(in_use for is_progressive, in_use in seen if is_progressive)
    assert drafted <= 200 * 200  # drafted to 1/8: 200x200
    assert full == 2 * 1600 * 1600  # coefficients of every pixel, 2 bytes a sample
    assert budget.in_use == 0


def test_a_large_16_bit_grey_png_is_downscaled_not_a_500(tmp_path: Path) -> None:
    """Pillow cannot reduce I;16 images: the resize used to raise inside the route (500)."""
    client = TestClient(create_app(_runtime(tmp_path)))
    for value in (0, 40_000):
        buffer = io.BytesIO()
        Image.fromarray(np.full((700, 600), value, dtype=np.uint16)).save(buffer, "PNG")
        answer = _post_json(client, buffer.getvalue())
        assert answer.status_code == 202, answer.text


def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding(tmp_path: Path) -> None:
    """Each scan of a progressive JPEG re-walks the image: a scan bomb costs minutes of CPU."""
    data = _encode(_noise(64, 64), "JPEG", progressive=True)
    start = data.index(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    bomb = data[:start] + data[start:end] * 150 + data[end:]  # the scans repeated
    client = TestClient(create_app(_runtime(tmp_path)))
    answer = _post_json(client, bomb)
    assert answer.status_code == 422 and "scans" in _reason(answer), answer.text
    assert _post_json(client, data).status_code in (
        202,
        422,
    )  # a normal one is not refused for its scans
    assert "scans" not in _reason(_post_json(client, data))


def test_a_jpeg_head_of_millions_of_markers_is_refused_without_walking_it(tmp_path: Path) -> None:
    """The header walk runs on every request: 16 MB of empty COM markers took 4 s of Python."""
    data = _encode(_noise(128, 128), "JPEG")
    bomb = data[:2] + b"\xff\xfe\x00\x02" * 4_000_000 + data[2:]
    client = TestClient(create_app(_runtime(tmp_path, max_image_bytes=32 * 2**20)))
    answer = _post_json(client, bomb)
    assert answer.status_code == 422 and "header" in _reason(answer), answer.text
    assert _post_json(client, data).status_code == 202  # a real file still passes
