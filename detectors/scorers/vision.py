"""Vision encoders: the vision tower and projector, run in torch or by ONNX Runtime.

A `VisionRunner` maps a `(B, 3, H, W)` float32 pixel batch to `(B, T, D)` image features in the
language model's embedding space.  `OnnxVision` runs a file written by `export_vision` (see
`detectors.scorers.onnx_export`) and checks, when it opens it, that the file was exported from
the model it is asked to serve.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from detectors.errors import DetectorError, MissingDependencyError

__all__ = [
    "OnnxMismatchError",
    "OnnxVision",
    "TorchVision",
    "VisionRunner",
    "VisionSpec",
    "ort_providers",
    "vision_config_dict",
    "weights_fingerprint",
]

FINGERPRINT_KEY = "guardrail.vision_fingerprint"


class OnnxMismatchError(DetectorError, ValueError):
    """An ONNX vision file does not belong to the model it is asked to serve."""


class VisionRunner(Protocol):
    @property
    def name(self) -> str: ...

    def __call__(self, pixels: Any) -> Any: ...


def weights_fingerprint(parts: dict[str, Any], modules: Sequence[tuple[str, Any]]) -> str:
    """SHA-256 of `parts` (the config that shapes the features) and a cheap signature of every
    weight of `modules` (shape, sum, sum of squares)."""
    import torch

    weights = []
    with torch.no_grad():
        for prefix, module in modules:
            for name, tensor in sorted(module.state_dict().items()):
                t = tensor.detach().double()
                weights.append(
                    [
                        f"{prefix}.{name}",
                        list(t.shape),
                        f"{float(t.sum()):.6e}",
                        f"{float((t * t).sum()):.6e}",
                    ]
                )
    blob = json.dumps({**parts, "weights": weights}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def vision_config_dict(config: Any) -> dict[str, Any]:
    """A vision config as a dict, without the keys that do not change the features."""
    out: dict[str, Any] = config.to_dict()
    for key in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        out.pop(key, None)
    return out


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class VisionSpec:
    """What exporting and serving a vision encoder needs to know about one model.

    `module` maps `(B, 3, *input_hw)` preprocessed pixels to `(B, tokens, dim)` features;
    `pixels` preprocesses real images to such a batch (for the export's check)."""

    module: Any
    input_hw: tuple[int, int]
    tokens: int
    dim: int
    fingerprint: str
    architecture: str
    source: Path
    pixels: Callable[[Sequence[np.ndarray]], Any]


class TorchVision:
    """The vision tower and projector in torch (parity tests, machines without the ONNX file)."""

    def __init__(self, module: Any) -> None:
        self.module = module

    @property
    def name(self) -> str:
        return "vision=torch"

    def __call__(self, pixels: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.module(pixels)


def ort_providers(device: str) -> list[Any]:
    """Execution providers to pass explicitly: CUDA first when asked for and available."""
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxVision:
    """The vision tower and projector run by ONNX Runtime.

    Args:
        path: the `.onnx` file written by `export_vision`.
        fingerprint: the serving model's vision fingerprint (`VisionSpec.fingerprint`); a file
            exported from another model is refused.
        input_hw: the model's input grid `(H, W)`; tokens, dim: its image tokens and text width.
        device: "cpu" or "cuda[:i]"; what actually runs is read back from the session.
        threads: ONNX Runtime intra-op threads (0 = its default).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        fingerprint: str,
        input_hw: tuple[int, int],
        tokens: int,
        dim: int,
        device: str = "cpu",
        threads: int = 0,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise MissingDependencyError("ONNX vision needs onnxruntime-gpu") from exc
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxMismatchError(f"ONNX vision file {str(self.path)!r} does not exist")
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=ort_providers(device)
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise OnnxMismatchError(
                f"{str(self.path)!r} is not a loadable ONNX model: {exc}"
            ) from exc
        self._check(fingerprint, input_hw, tokens, dim)
        self.input_hw = input_hw
        self.provider = str(self.session.get_providers()[0])
        self.input_name = self.session.get_inputs()[0].name
        self.on_cuda = self.provider == "CUDAExecutionProvider"

    def _check(self, fingerprint: str, input_hw: tuple[int, int], tokens: int, dim: int) -> None:
        meta = self.session.get_modelmeta().custom_metadata_map
        where = str(self.path)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise OnnxMismatchError(f"{where!r} must have one input and one output")
        shape_in, shape_out = list(inputs[0].shape), list(outputs[0].shape)
        if len(shape_in) != 4 or shape_in[1:] != [3, *input_hw]:
            raise OnnxMismatchError(
                f"{where!r} takes pixels of shape {shape_in}; the model needs [batch, 3, "
                f"{input_hw[0]}, {input_hw[1]}]"
            )
        if len(shape_out) != 3 or shape_out[1:] != [tokens, dim]:
            raise OnnxMismatchError(
                f"{where!r} gives features of shape {shape_out}; the model needs "
                f"[batch, {tokens}, {dim}]"
            )
        if isinstance(shape_in[0], int) or isinstance(shape_out[0], int):
            raise OnnxMismatchError(f"{where!r} has a fixed batch size: re-export it")
        found = meta.get(FINGERPRINT_KEY)
        if found != fingerprint:
            raise OnnxMismatchError(
                f"{where!r} was exported from another model (fingerprint "
                f"{(found or 'missing')[:12]}, this model {fingerprint[:12]}): run "
                "`guardrail export-vision MODEL_DIR --out FILE.onnx` again"
            )

    @classmethod
    def for_spec(
        cls, path: str | Path, spec: VisionSpec, *, device: str = "cpu", threads: int = 0
    ) -> OnnxVision:
        """Open `path` to serve the model `spec` describes (refused if exported from another)."""
        return cls(
            path,
            fingerprint=spec.fingerprint,
            input_hw=spec.input_hw,
            tokens=spec.tokens,
            dim=spec.dim,
            device=device,
            threads=threads,
        )

    @property
    def name(self) -> str:
        return f"vision=onnx:{self.provider}"

    def __call__(self, pixels: Any) -> Any:
        import torch

        array = pixels.detach().to("cpu", torch.float32).numpy()
        (features,) = self.session.run(None, {self.input_name: np.ascontiguousarray(array)})
        return torch.from_numpy(features).to(pixels.device)
