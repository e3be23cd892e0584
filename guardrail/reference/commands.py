"""`guardrail reference ...`: train, evaluate and talk to the shipped reference model."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(commands: Any) -> None:
    """Add the `reference` command group to the top-level subparsers."""
    from detectors.reference import MODEL_DIR

    reference = commands.add_parser("reference", help="the shipped reference model and world")
    sub = reference.add_subparsers(dest="reference_command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve", help="serve the shipped model as an OpenAI-compatible chat-completions server"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8701)
    serve.add_argument("--model", type=Path, default=MODEL_DIR)
    serve.add_argument("--name", default="reference", help="the model name it answers to")
    serve.add_argument(
        "--max-logprobs",
        type=int,
        default=20,
        help="largest prompt_logprobs a request may ask for (as vLLM's --max-logprobs)",
    )
    serve.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log lines as text or JSON"
    )
    serve.set_defaults(handler=_serve)

    train = sub.add_parser("train", help="train the reference model (CPU, deterministic)")
    train.add_argument("--out", type=Path, default=MODEL_DIR, help="where to save the model")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--steps", type=int, default=None, help="image-text training steps")
    train.add_argument("--text-steps", type=int, default=None, help="caption-text steps first")
    train.add_argument("--scenes", type=int, default=None, help="distinct training scenes")
    train.add_argument(
        "--caption-share", type=float, default=None, help="share of caption examples (rest: Q&A)"
    )
    train.set_defaults(handler=_train)

    generate = sub.add_parser("generate", help="print what the model says about an image")
    generate.add_argument("image", type=Path)
    generate.add_argument(
        "--question", help="a class name ('fork') or a full yes/no question; default: describe"
    )
    generate.add_argument("--model", type=Path, default=MODEL_DIR)
    generate.set_defaults(handler=_generate)

    scene = sub.add_parser("scene", help="draw a scene of the reference world to a PNG")
    scene.add_argument("seed", type=int)
    scene.add_argument("--kind", default="random", help="random, clean, cooccurrence_trap, ...")
    scene.add_argument("--out", type=Path, required=True)
    scene.set_defaults(handler=_scene)

    calibrate = sub.add_parser(
        "calibrate", help="calibrate the verdict thresholds on validation scenes"
    )
    calibrate.add_argument("--start", type=int, default=0, help="first validation scene")
    calibrate.add_argument("--scenes", type=int, default=100, help="scenes of each kind")
    calibrate.add_argument("--model", type=Path, default=MODEL_DIR)
    _audit_options(calibrate)
    calibrate.set_defaults(handler=_calibrate)

    evaluate = sub.add_parser("eval", help="measure captions, traps and verdicts on test scenes")
    evaluate.add_argument("--seed", type=int, default=11_000_000, help="picks the scenes")
    evaluate.add_argument("--scenes", type=int, default=100, help="scenes of each kind")
    evaluate.add_argument("--model", type=Path, default=MODEL_DIR)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    _audit_options(evaluate)
    evaluate.set_defaults(handler=_eval)


def _audit_options(parser: argparse.ArgumentParser) -> None:
    """The audit settings that verdict thresholds are calibrated for."""
    from detectors.types import DEFAULT_BUDGET_FRACTION, DEFAULT_FILL, DEFAULT_N_REGIONS, Fill

    parser.add_argument(
        "--fill", default=DEFAULT_FILL.value, choices=[f.value for f in Fill], help="removed pixels"
    )
    parser.add_argument(
        "--regions", type=int, default=DEFAULT_N_REGIONS, help="SLICO division number"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_FRACTION,
        help="passes per word, share of the exact search",
    )
    parser.add_argument("--passes", type=int, help="a fixed pass budget per word instead")


def _audit_settings(args: argparse.Namespace) -> Any:
    from detectors.pipeline import AuditSettings
    from detectors.types import Fill

    return AuditSettings(
        n_regions=args.regions,
        budget_fraction=args.budget,
        max_forward_passes=args.passes,
        fill=Fill(args.fill),
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from guardrail.logs import configure_logging, quiet_progress_bars, uvicorn_log_config
    from guardrail.reference.upstream import create_upstream_app

    configure_logging(args.log_format)
    quiet_progress_bars()
    app = create_upstream_app(args.model, model_name=args.name, max_logprobs=args.max_logprobs)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=args.host, port=args.port, log_config=uvicorn_log_config(access_log=True)
        )
    )
    # uvicorn re-raises SIGINT/SIGTERM to the handler that was there before it once it has
    # stopped: record it, so that a stop is an exit status (0, 130 after SIGINT), as for serve
    received: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda s, _f: received.append(s))
    server.run()
    return 130 if received and received[0] == signal.SIGINT else 0


def _train(args: argparse.Namespace) -> int:
    from guardrail.reference.training import TrainingConfig, train

    overrides = {
        k: v
        for k, v in (
            ("steps", args.steps),
            ("text_steps", args.text_steps),
            ("scenes", args.scenes),
            ("caption_share", args.caption_share),
        )
        if v is not None
    }
    summary = train(args.out, TrainingConfig(seed=args.seed, **overrides))
    print(json.dumps(summary, indent=2))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from detectors.reference import CAPTION_PROMPT, question_prompt
    from detectors.scorers.families.llava import load_llava
    from guardrail.service.images import read_image

    image = read_image(args.image)
    llava = load_llava(args.model)
    prompt = CAPTION_PROMPT
    if args.question:
        q = args.question.strip()
        prompt = f"USER: {q} <image> ASSISTANT:" if " " in q else question_prompt(q)
    print(llava.generate(image, prompt).text)
    return 0


def _scene(args: argparse.Namespace) -> int:
    from detectors.reference import generate_scene
    from guardrail.service.images import write_image

    scene = generate_scene(args.seed, args.kind)
    write_image(args.out, scene.image)
    print(f"{args.out}: {scene.caption}  (kind {scene.kind.value})")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from guardrail.reference.report import calibrate_thresholds

    record = calibrate_thresholds(
        args.model, start=args.start, per_kind=args.scenes, settings=_audit_settings(args)
    )
    print(json.dumps(record))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from guardrail.reference.report import evaluate

    report = evaluate(
        args.model, seed=args.seed, per_kind=args.scenes, settings=_audit_settings(args)
    )
    if args.json:
        # JSON has no NaN: an undefined figure (no positives, say) is null
        clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in report.items()}
        print(json.dumps(clean))
    else:
        for key, value in report.items():
            print(f"{key:>34}  {value:.4f}" if isinstance(value, float) else f"{key:>34}  {value}")
    return 0
