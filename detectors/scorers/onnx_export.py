"""`guardrail export-vision`: a model's vision encoder (what its family's `vision_spec` gives:
tower and projector, merger or pixel shuffle, at one input size) exported to ONNX, verified
against torch before the file is written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detectors.errors import DetectorError
from detectors.scorers.families.base import LoadedModel
from detectors.scorers.families.registry import family_named
from detectors.scorers.vision import FINGERPRINT_KEY, VisionSpec

__all__ = ["ExportMismatchError", "ExportReport", "export_vision", "fuse_for_ort", "vision_spec"]

TOLERANCE = 1e-4


class ExportMismatchError(DetectorError):
    """The exported ONNX graph does not reproduce the torch features: nothing was written."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ExportReport:
    path: Path
    fingerprint: str
    max_abs_diff_random: float
    max_abs_diff_real: float
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    bytes: int
    files: tuple[Path, ...] = ()  # the graph and, for models over 2 GB, its weights file
    # ONNX Runtime's fused kernels substituted into the graph, by kind (`fuse_for_ort`)
    fusions: dict[str, int] = field(default_factory=dict)


def _max_diff(session: Any, module: Any, pixels: Any) -> float:
    import torch

    with torch.inference_mode():
        want = module(pixels).numpy()
    (got,) = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got - want).max())


def fuse_for_ort(model: Any) -> dict[str, int]:
    """Rewrite `model` (an `onnx_ir.Model`, in place) with ONNX Runtime's fused kernels:
    attention (MatMul, scale, Softmax, MatMul over the heads) becomes one
    `com.microsoft.MultiHeadAttention`, LayerNorm after a residual add
    `SkipLayerNormalization`, bias and GELU `BiasGelu`.  Returns how many of each kind
    (only those found).

    The exported attention materialises the whole score matrix of every head (1025 x 1025 on
    InternVL's 448 px tile) and reads it three times; the fused kernel does not keep it, which
    took the tiny InternVL tower from 5.2 to 3.1 ms per image on 2 CPU cores.  The graph then
    runs on ONNX Runtime only, the only runtime the scorers use (`benchmarks/gpu_check.py`
    checks its CUDA provider against torch where a GPU is lent; `fuse=False` in
    `export_vision` keeps the plain graph for other runtimes)."""
    from onnxscript.rewriter import ort_fusions

    _, counts = ort_fusions.optimize_for_ort(model)
    return {kind: int(n) for kind, n in counts.items() if n}


def vision_spec(
    model: LoadedModel | VisionSpec,
    *,
    input_hw: tuple[int, int] | None = None,
    real_images: Sequence[np.ndarray] = (),
) -> VisionSpec:
    """The vision encoder to export for `model`, from its family.  A graph serves one input
    size: `input_hw` (pixels after the image processor) where the family's size varies
    (Qwen2.5-VL), or the size the first real image gets."""
    if isinstance(model, VisionSpec):
        return model
    family = family_named(model.family)
    return family.vision_spec(model, input_hw=input_hw, real_images=real_images)


def export_vision(
    model: LoadedModel | VisionSpec,
    out: str | Path,
    *,
    real_images: Sequence[np.ndarray] = (),
    input_hw: tuple[int, int] | None = None,
    tolerance: float = TOLERANCE,
    seed: int = 0,
    external_data: bool | None = None,
    fuse: bool = True,
) -> ExportReport:
    """Export `model`'s vision encoder (see `vision_spec`) to `out` with a dynamic batch axis.

    The graph is checked against torch on random pixels (batches of 1, 2 and 3) and on
    `real_images` (run through the model's own image processor) before `out` is written.
    Weights go to a `<out name>.data` file beside `out` when they pass 2 GB, or when
    `external_data` is true.  With `fuse` (the default) attention and normalisation are
    rewritten to ONNX Runtime's fused kernels first (`fuse_for_ort`); the check runs on the
    graph as written.

    Raises:
        ExportMismatchError: the ONNX features differ from torch by more than `tolerance`.
        ValueError: the model is not in float32 (load it with the default dtype).
    """
    import onnxruntime as ort
    import torch

    spec = vision_spec(model, input_hw=input_hw, real_images=real_images)
    module = spec.module
    dtypes = {p.dtype for p in module.parameters()}
    if dtypes != {torch.float32}:
        held = ", ".join(sorted(map(str, dtypes)))
        raise ValueError(f"export the vision encoder from a float32 model (this one holds {held})")
    height, width = spec.input_hw
    fingerprint = spec.fingerprint
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(2, 3, height, width, generator=generator)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        batch = torch.export.Dim("batch", min=1, max=4096)
        with torch.inference_mode():
            program = torch.onnx.export(
                module,
                (example,),
                dynamic_shapes={"pixel_values": {0: batch}},
                input_names=["pixel_values"],
                output_names=["image_features"],
                dynamo=True,
                verbose=False,
            )
        assert program is not None
        fusions = fuse_for_ort(program.model) if fuse else {}
        for key, value in (
            (FINGERPRINT_KEY, fingerprint),
            ("guardrail.source", str(spec.source)),
            ("guardrail.architecture", spec.architecture),
            ("guardrail.fusions", ",".join(f"{k}={n}" for k, n in sorted(fusions.items()))),
        ):
            program.model.metadata_props[key] = value
        # over 2 GB (Qwen2.5-VL-7B's tower in float32) the weights go to `<name>.data` beside it
        staged = Path(tmp) / out.name
        program.save(str(staged), external_data=external_data)
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        session = ort.InferenceSession(
            str(staged), sess_options=options, providers=["CPUExecutionProvider"]
        )
        random_diff = max(
            _max_diff(session, module, torch.randn(b, 3, height, width, generator=generator))
            for b in (1, 2, 3)
        )
        real_diff = 0.0
        if real_images:
            real = spec.pixels(list(real_images)).to(torch.float32)
            real_diff = _max_diff(session, module, real)
        worst = max(random_diff, real_diff)
        if not worst <= tolerance:
            raise ExportMismatchError(
                f"the ONNX vision encoder differs from torch by {worst:.3g} (max abs; allowed "
                f"{tolerance:g}): {str(out)!r} was not written"
            )
        input_shape = tuple(session.get_inputs()[0].shape)
        output_shape = tuple(session.get_outputs()[0].shape)
        del session
        written = sorted(Path(tmp).iterdir())  # the graph, and its weights file if external
        for file in written:
            if file != staged:
                os.replace(file, out.parent / file.name)
        os.replace(staged, out)
    return ExportReport(
        path=out,
        fingerprint=fingerprint,
        max_abs_diff_random=random_diff,
        max_abs_diff_real=real_diff,
        input_shape=input_shape,
        output_shape=output_shape,
        bytes=sum((out.parent / f.name).stat().st_size for f in written),
        files=tuple(out.parent / f.name for f in written),
        fusions=fusions,
    )
