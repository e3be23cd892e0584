"""The remote scorer against `guardrail reference serve` on this machine, beside the local fast
scorer on the same masks.

It starts `guardrail reference serve` as its own process (the model server), draws one sample
of the reference world and `--variants` random masks of its SLICO regions, scores them with the
local fast scorer (ONNX-free torch vision, prefix cache, chunks of 16) and with
`RemoteScorer` at each `--concurrency`, and prints passes per second, the largest
|p_remote - p_local| (goal <= 1e-5: the same model in float32) and the request overhead per pass:
the remote scorer's milliseconds per pass at concurrency 1 minus the milliseconds of the work the
server does per request (the same processor call, forward pass and prompt-logprob building, run
in this process on the same image) and minus the PNG encoding.

    python benchmarks/remote_scorer.py            # table
    python benchmarks/remote_scorer.py --json     # one JSON object

Both processes run `--threads` torch threads (default 1: with two threads each on a loaded
2-core machine a request took 600-900 ms instead of 45-50 ms).  The server runs one forward
pass at a time (like a CPU-bound server; vLLM batches concurrent
requests on its GPU), so concurrency here overlaps only the HTTP, JSON and PNG work with the
model's: it shows the overhead, not what a GPU server gains from batching.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from detectors import Fill, Target
from detectors.reference import CAPTION_PROMPT, MODEL_DIR, SceneKind, generate_scene
from detectors.regions import slic_partition
from detectors.scorers import MaskedBatch
from detectors.scorers.families.llava import FastLlavaScorer, load_llava
from detectors.scorers.remote import RemoteClient, RemoteScorer, RemoteServer, png_bytes
from guardrail.demo.background_server import free_port, spawn_guardrail
from guardrail.reference.vllm_extensions import prompt_logprobs


def _median_seconds(fn: Any, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", type=int, default=64, help="masked images")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads here and in the server (on a loaded 2-core machine, 2 threads per "
        "process made one server request 10-20x slower than 1)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    llava = load_llava(MODEL_DIR)
    scene = generate_scene(11_000_003, SceneKind.CLEAN)
    image = scene.image
    ids = list(llava.generate(image, CAPTION_PROMPT).token_ids)
    targets = [Target(position=i, token_id=t) for i, t in enumerate(ids[:-1])]
    partition = slic_partition(image, 48)
    keep = np.random.default_rng(0).random((args.variants, partition.n_regions)) < 0.5
    batch = MaskedBatch(image=image, partition=partition, keep=keep, fill=Fill.MEAN)
    n = batch.size

    local = FastLlavaScorer(llava, image, CAPTION_PROMPT, ids, chunk_size=16)

    def score_local() -> np.ndarray:
        chunks = [
            MaskedBatch(image=image, partition=partition, keep=keep[i : i + 16], fill=Fill.MEAN)
            for i in range(0, n, 16)
        ]
        return np.concatenate([local.score(chunk, targets) for chunk in chunks])

    expected = score_local()
    local_s = _median_seconds(score_local, args.repeats)

    # the server's own work per request, done here on the same image: processor, one forward,
    # log-softmax over the vocabulary, the prompt_logprobs entries
    pixels = batch.pixels()
    prompt = f"{CAPTION_PROMPT} {llava.tokenizer.decode(ids[:-1])}"

    def server_work() -> None:
        encoded = llava.processor(images=[pixels[0]], text=[prompt], return_tensors="pt")
        with torch.inference_mode():
            logits = llava.model(**encoded).logits[0]
            logp = torch.log_softmax(logits.float(), -1).numpy()
        row_ids = [int(i) for i in encoded["input_ids"][0]]
        prompt_logprobs(logp, row_ids, 0, lambda t: llava.tokenizer.decode([t]))

    server_ms = _median_seconds(server_work, max(5, args.repeats * 5)) * 1e3
    png_ms = _median_seconds(lambda: png_bytes(pixels[0]), 20) * 1e3

    port = free_port()
    server = spawn_guardrail(
        ["reference", "serve", "--port", str(port)],
        {"OMP_NUM_THREADS": str(args.threads)},
        f"http://127.0.0.1:{port}/v1/models",
        timeout=120,
    )
    rows: list[dict[str, Any]] = []
    max_diff = 0.0
    try:
        url = f"http://127.0.0.1:{port}"
        for concurrency in args.concurrency:
            remote_server = RemoteServer(url=url, model="reference", concurrency=concurrency)
            with RemoteClient(remote_server) as client:
                scorer = RemoteScorer(
                    client, "Describe the image.", ids, lambda t: llava.tokenizer.decode(list(t))
                )
                got = scorer.score(batch, targets)
                max_diff = max(max_diff, float(np.abs(got - expected).max()))
                seconds = _median_seconds(lambda s=scorer: s.score(batch, targets), args.repeats)
                stats = client.stats
            rows.append(
                {
                    "concurrency": concurrency,
                    "passes_per_second": n / seconds,
                    "ms_per_pass": seconds / n * 1e3,
                    "requests": stats.requests,
                    "failures": stats.failures,
                }
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    serial = next((r for r in rows if r["concurrency"] == 1), rows[0])
    report: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.system()}, torch threads {args.threads}",
        "variants": n,
        "targets": len(targets),
        "local_fast_passes_per_second": n / local_s,
        "local_fast_ms_per_pass": local_s / n * 1e3,
        "remote": rows,
        "max_abs_prob_diff": max_diff,
        "server_work_ms_per_pass": server_ms,
        "png_encode_ms_per_pass": png_ms,
        "request_overhead_ms_per_pass": serial["ms_per_pass"] - server_ms - png_ms,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{n} masked images, {len(targets)} targets, reference model, {report['machine']}")
    print(f"{'scorer':<22} {'passes/s':>9} {'ms/pass':>8}")
    print(
        f"{'local fast':<22} {report['local_fast_passes_per_second']:9.1f} "
        f"{report['local_fast_ms_per_pass']:8.2f}"
    )
    for row in rows:
        label = f"remote, concurrency {row['concurrency']}"
        print(f"{label:<22} {row['passes_per_second']:9.1f} {row['ms_per_pass']:8.2f}")
    print(f"max |p_remote - p_local| = {max_diff:.1e} (goal <= 1e-5)")
    print(
        f"per pass at concurrency 1: server work {server_ms:.2f} ms, PNG {png_ms:.2f} ms, "
        f"request overhead {report['request_overhead_ms_per_pass']:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
