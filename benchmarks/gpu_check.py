"""GPU check: which execution providers really run, and parity on the GPU.

Exports the reference model's vision encoder, opens it asking for ONNX Runtime's CUDA provider
and reports what `session.get_providers()` says actually runs (ONNX Runtime falls back to CPU
silently when it cannot load CUDA); moves the language model to the GPU; checks the fast
scorer (ONNX vision and torch vision) against a plain full forward per masked image on the GPU
and against the CPU.  Prints one JSON object.

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def main() -> int:
    import onnxruntime as ort
    import torch
    import transformers

    from detectors import Fill, Target
    from detectors.reference import CAPTION_PROMPT, MODEL_DIR, SceneKind, generate_scene
    from detectors.regions import slic_partition
    from detectors.scorers import MaskedBatch
    from detectors.scorers.families.llava import (
        FastLlavaScorer,
        LlavaScorer,
        llava_onnx_vision,
        load_llava,
    )
    from detectors.scorers.onnx_export import export_vision

    report: dict[str, Any] = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": ort.__version__,
        "ort_available_providers": ort.get_available_providers(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llava = load_llava(MODEL_DIR)
    scene = generate_scene(11_000_003, SceneKind.CLEAN)
    said = llava.generate(scene.image, CAPTION_PROMPT)
    ids = list(said.token_ids)
    targets = [
        Target(position=i, token_id=t, text=llava.tokenizer.decode([t]))
        for i, t in enumerate(ids[:-1])
    ]
    partition = slic_partition(scene.image, 48)
    keep = np.random.default_rng(0).random((64, partition.n_regions)) < 0.5
    batch = MaskedBatch(image=scene.image, partition=partition, keep=keep, fill=Fill.MEAN)

    def plain_probs() -> np.ndarray:
        scorer = LlavaScorer(llava, scene.image, CAPTION_PROMPT, ids, max_batch_size=1)
        rows = [
            scorer.score(
                MaskedBatch(
                    image=scene.image, partition=partition, keep=keep[i : i + 1], fill=Fill.MEAN
                ),
                targets,
            )
            for i in range(keep.shape[0])
        ]
        return np.concatenate(rows)

    cpu_plain = plain_probs()
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_vision(llava, Path(tmp) / "vision.onnx", real_images=[scene.image]).path
        llava.model.to(device)
        vision = llava_onnx_vision(llava, onnx, device=device)
        report["ort_session_providers"] = vision.session.get_providers()
        report["ort_provider_running"] = vision.provider
        gpu_plain = plain_probs()
        fast_onnx = FastLlavaScorer(llava, scene.image, CAPTION_PROMPT, ids, vision=vision)
        fast_torch = FastLlavaScorer(llava, scene.image, CAPTION_PROMPT, ids)
        got_onnx = fast_onnx.score(batch, targets)
        got_torch = fast_torch.score(batch, targets)
        report["scorer_name"] = fast_onnx.name
        report["max_abs_diff"] = {
            "fast_onnx_vs_plain_same_device": float(np.abs(got_onnx - gpu_plain).max()),
            "fast_torch_vs_plain_same_device": float(np.abs(got_torch - gpu_plain).max()),
            "plain_gpu_vs_plain_cpu": float(np.abs(gpu_plain - cpu_plain).max()),
        }
        # half precision (a model's `dtype`): how far it moves the probabilities; not parity
        report["half_precision_max_abs_diff_vs_float32"] = {}
        for dtype in ("bfloat16", "float16"):
            half = load_llava(MODEL_DIR, device=device, dtype=dtype)
            got = FastLlavaScorer(half, scene.image, CAPTION_PROMPT, ids).score(batch, targets)
            diff = float(np.abs(got - got_torch).max())
            report["half_precision_max_abs_diff_vs_float32"][dtype] = diff
        report["qwen"] = qwen_check(Path(tmp), device)
    same = [v for k, v in report["max_abs_diff"].items() if "same" in k]
    same += [v for k, v in report["qwen"]["max_abs_diff"].items() if "same" in k]
    report["parity_ok"] = all(v <= 1e-5 for v in same)
    print(json.dumps(report, indent=2))
    return 0 if report["parity_ok"] else 1


def qwen_check(tmp: Path, device: str) -> dict[str, Any]:
    """A tiny random Qwen2.5-VL (224 px): its exported tower on the GPU provider and its
    batched torch tower on the GPU, each against a plain full forward per image."""
    from detectors import Fill, Target
    from detectors.regions import slic_partition
    from detectors.scorers import MaskedBatch
    from detectors.scorers.families.qwen2_5_vl import (
        FastQwenScorer,
        QwenScorer,
        load_qwen,
        qwen_onnx_vision,
    )
    from detectors.scorers.onnx_export import export_vision
    from guardrail.reference.tiny_models import QWEN_PROMPT, save_tiny_qwen

    qwen = load_qwen(save_tiny_qwen(tmp / "qwen", image_size=224))
    image = np.random.default_rng(3).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    words = ["a", "dog", "on", "a", "table", "."]
    ids = [int(qwen.tokenizer.convert_tokens_to_ids(w)) for w in words]
    targets = [Target(position=i, token_id=ids[i], text=words[i]) for i in (1, 4)]
    partition = slic_partition(image, 48)
    keep = np.random.default_rng(0).random((32, partition.n_regions)) < 0.5
    onnx = export_vision(qwen, tmp / "qwen.onnx", real_images=[image]).path
    qwen.model.to(device)
    vision = qwen_onnx_vision(qwen, onnx, device=device)
    plain = QwenScorer(qwen, image, QWEN_PROMPT, ids)
    want = np.concatenate(
        [
            plain.score(
                MaskedBatch(image=image, partition=partition, keep=keep[i : i + 1], fill=Fill.MEAN),
                targets,
            )
            for i in range(keep.shape[0])
        ]
    )
    batch = MaskedBatch(image=image, partition=partition, keep=keep, fill=Fill.MEAN)
    fast_onnx = FastQwenScorer(qwen, image, QWEN_PROMPT, ids, vision=vision)
    fast_torch = FastQwenScorer(qwen, image, QWEN_PROMPT, ids)
    return {
        "ort_provider_running": vision.provider,
        "scorer_name": fast_onnx.name,
        "max_abs_diff": {
            "fast_onnx_vs_plain_same_device": float(
                np.abs(fast_onnx.score(batch, targets) - want).max()
            ),
            "fast_torch_vs_plain_same_device": float(
                np.abs(fast_torch.score(batch, targets) - want).max()
            ),
        },
    }


if __name__ == "__main__":
    sys.exit(main())
