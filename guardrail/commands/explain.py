"""`guardrail explain IMAGE --prompt TEXT`: audit one output of a LLaVA, Qwen2.5-VL or InternVL
model, with pictures."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(commands: Any) -> None:
    from detectors.reference import MODEL_DIR
    from detectors.types import DEFAULT_BUDGET_FRACTION, DEFAULT_FILL, DEFAULT_N_REGIONS, Fill

    explain = commands.add_parser(
        "explain", help="flag the object words of an output and explain each with EAGLE"
    )
    explain.add_argument(
        "image",
        type=Path,
        nargs="+",
        help="the image; several for a family that takes several in one prompt (Qwen2.5-VL): "
        "one search over the regions of all of them (needs --output)",
    )
    explain.add_argument(
        "--prompt",
        help="the prompt with its image placeholder (<image> for LLaVA, <|image_pad|> for "
        "Qwen2.5-VL, <IMG_CONTEXT> for InternVL); default: a caption request in the model's "
        "format",
    )
    explain.add_argument(
        "--output", help="the model's output to audit (teacher-forced); default: generate it"
    )
    explain.add_argument(
        "--model",
        type=Path,
        default=MODEL_DIR,
        help="a LLaVA, Qwen2.5-VL or InternVL checkpoint dir",
    )
    explain.add_argument("--out", type=Path, required=True, help="directory for PNGs and JSON")
    explain.add_argument(
        "--regions", type=int, default=DEFAULT_N_REGIONS, help="SLICO division number"
    )
    explain.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_FRACTION,
        help="passes per word, share of the exact search",
    )
    explain.add_argument(
        "--fill",
        default=DEFAULT_FILL.value,
        choices=[f.value for f in Fill],
        help="what removed regions become (default: %(default)s; the verdict thresholds are "
        "calibrated per fill)",
    )
    explain.add_argument(
        "--allow-uncalibrated",
        action="store_true",
        help="audit with regions/budget/fill the thresholds were not calibrated for (the "
        "nearest calibration's thresholds are used; verdicts are less reliable)",
    )
    explain.add_argument(
        "--onnx", type=Path, help="vision encoder from `guardrail export-vision` (default: torch)"
    )
    explain.add_argument("--device", default="cpu", help="cpu or cuda")
    explain.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (half precision: for GPUs; loses the 1e-5 parity)",
    )
    explain.add_argument(
        "--remote",
        metavar="URL",
        help="score with the model's own server (vLLM's prompt_logprobs) at this base URL; "
        "--model then only gives the tokenizer and processor files",
    )
    explain.add_argument(
        "--remote-model", metavar="NAME", help="the served model name (default: reference)"
    )
    explain.add_argument(
        "--remote-api-key-env", metavar="VAR", help="environment variable holding the API key"
    )
    explain.add_argument("--remote-concurrency", type=int, default=4, help="requests in flight")
    explain.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from detectors.heatmap import overlay, panel
    from detectors.pipeline import AuditSettings, audit_sample
    from detectors.scorers.families import family_of_checkpoint
    from detectors.search.budgeted import TAIL_STEPS
    from detectors.serialization import attribution_to_dict, verdict_to_dict
    from detectors.types import Fill
    from guardrail.config import ConfigError, ModelSettings
    from guardrail.logs import quiet_progress_bars
    from guardrail.reference.report import load_calibration
    from guardrail.service.auditor import ModelAuditor
    from guardrail.service.images import read_image, write_image

    # an explanation for a person: the end of each ordering measured too (what a correction
    # removes first), which the sidecar's audits skip
    settings = AuditSettings(
        n_regions=args.regions,
        budget_fraction=args.budget,
        fill=Fill(args.fill),
        tail_steps=TAIL_STEPS,
    )
    # before loading anything: refuse settings the thresholds were not calibrated for
    calibration = load_calibration(args.model, settings, strict=not args.allow_uncalibrated)
    family = family_of_checkpoint(args.model)
    image, layout = _images(args, family, read_image)
    # the sidecar's own loading: ONNX vision where it fits the image, the torch tower otherwise
    model = {"name": "explain", "path": args.model, "family": family.name, "onnx": args.onnx}
    model.update(device=args.device, dtype=args.dtype)
    if args.remote:
        model.update(
            scorer="remote",
            remote_url=args.remote,
            remote_model=args.remote_model or "reference",
            remote_api_key_env=args.remote_api_key_env,
            remote_concurrency=args.remote_concurrency,
        )
    model_settings = ModelSettings.model_validate(model)
    if args.remote_api_key_env:  # the CLI reads the environment, the library never does
        key = os.environ.get(args.remote_api_key_env)
        if not key:
            raise ConfigError(f"the environment variable {args.remote_api_key_env} is not set")
        model_settings._remote_api_key = key
    auditor = ModelAuditor(model_settings)
    quiet_progress_bars()  # no loading bars when stderr is not a terminal
    loaded = auditor.load()
    tokenizer = loaded.tokenizer
    if args.prompt is None:
        args.prompt = family.caption_prompt
        if layout is not None:  # one image segment per image
            segment = family.image_segment
            args.prompt = args.prompt.replace(segment, segment * layout.n_images, 1)
    if args.output is None and args.remote:
        token_ids = _remote_generation(
            loaded.remote_client(), image, auditor, args.prompt, tokenizer
        )
    elif args.output is None:
        generation = loaded.local_model().generate(image, args.prompt)
        token_ids = list(generation.token_ids)
    else:
        token_ids = tokenizer(args.output, add_special_tokens=False).input_ids
    decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)  # noqa: E731
    output_text = decode(token_ids)
    scorer = auditor.scorer(image, args.prompt, token_ids, layout)
    audit = audit_sample(
        image,
        scorer,
        token_ids,
        decode,
        settings=settings,
        thresholds=calibration.thresholds,
        progress=sys.stderr.isatty(),  # a bar on a terminal, never in a log file
        layout=layout,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    write_image(args.out / "image.png", _upscale(image))
    words: list[dict[str, Any]] = []
    tiles: list[tuple[str, Any]] = [("image", image)]
    rows = []
    if audit.explanation is not None:
        pairs = zip(
            audit.mentions, audit.explanation.attributions, audit.explanation.verdicts, strict=True
        )
        for i, (mention, attribution, verdict) in enumerate(pairs):
            name = f"{i:02d}-{re.sub(r'[^a-z0-9]+', '-', mention.word.lower())}.png"
            picture = overlay(image, attribution)
            tiles.append((f"{mention.word}: {verdict.label.value}", picture))
            write_image(args.out / name, _upscale(picture))
            words.append(
                {
                    "word": mention.word,
                    "category": mention.category,
                    "heatmap": name,
                    "verdict": verdict_to_dict(verdict),
                    "attribution": attribution_to_dict(attribution),
                }
            )
            if layout is not None:
                labels = attribution.partition.labels
                words[-1]["compact_set_images"] = layout.images_of(labels, attribution.compact_set)
            rows.append((mention.word, verdict, attribution.forward_passes))
    report = {
        "image": str(args.image[0]) if layout is None else [str(p) for p in args.image],
        "image_layout": None if layout is None else layout.as_dict(),
        "prompt": args.prompt,
        "output": output_text,
        "token_ids": [int(t) for t in token_ids],
        "model": str(args.model),
        "scorer": scorer.name,
        "calibration": calibration.provenance(),
        "words": words,
    }
    client = loaded.client
    if client is not None:
        report["remote"] = client.stats.as_dict()
        client.close()
    (args.out / "explanation.json").write_text(json.dumps(report, indent=2) + "\n")
    write_image(args.out / "summary.png", panel(tiles))
    print(f"output: {output_text}")
    print(
        f"{'word':>10} {'verdict':>18} {'prior':>6} {'halluc':>6} {'p_full':>7} "
        f"{'p_blank':>7} {'necessity':>9} {'passes':>6}"
    )
    for word, v, passes in rows:
        print(
            f"{word:>10} {v.label.value:>18} {v.prior_score:6.2f} {v.hallucination_score:6.2f} "
            f"{v.p_full:7.3f} {v.p_blank:7.3f} {v.necessity:9.3f} {passes:6d}"
        )
    if not rows:
        print("no object words in the output")
    print(f"wrote {args.out / 'explanation.json'}, summary.png and {len(rows)} heatmap(s)")
    return 0


def _images(args: argparse.Namespace, family: Any, read_image: Any) -> tuple[Any, Any]:
    """The image to audit, and its layout when several images are laid out on one canvas
    (`detectors.layout`; None for one image)."""
    from detectors.layout import side_by_side
    from guardrail.config import ConfigError

    images = [read_image(path) for path in args.image]
    if len(images) == 1:
        return images[0], None
    if len(images) > family.max_images:
        raise ConfigError(
            f"the {family.name} family is audited on at most {family.max_images} image(s) per "
            f"prompt, got {len(images)}"
        )
    if args.output is None:
        raise ConfigError("several images need --output (generation takes one image)")
    if args.remote:
        raise ConfigError("a remote model is audited on one image per sample")
    total = sum(int(i.shape[0]) * int(i.shape[1]) for i in images)
    return side_by_side(images, max_pixels=total)


def _remote_generation(client: Any, image: Any, auditor: Any, prompt: str, tokenizer: Any) -> Any:
    """What the served model says about `image`: a plain chat request (greedy), its token ids
    as the server returns them (`return_token_ids`) or, without them, the text re-tokenized."""
    from detectors.scorers.remote import png_bytes
    from guardrail.service.auditor import image_placeholder
    from guardrail.service.chat import image_messages, user_turn

    text, _ = user_turn(prompt, image_placeholder(auditor.settings.family), auditor.settings.prompt)
    answer = client.post(
        {
            "model": client.server.model,
            "messages": image_messages(png_bytes(image), text),
            "max_tokens": 32,
            "temperature": 0.0,
            "return_token_ids": True,
        }
    )
    choice = answer["choices"][0]
    if isinstance(choice.get("token_ids"), list):
        return [int(t) for t in choice["token_ids"]]
    return tokenizer(choice["message"]["content"], add_special_tokens=False).input_ids


def _upscale(rgb: Any, factor: int = 4) -> Any:
    import numpy as np

    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
