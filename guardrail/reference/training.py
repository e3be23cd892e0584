"""`guardrail reference train`: train the reference model on the reference world (CPU)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detectors.reference.world import (
    CAPTION_PROMPT,
    PAIRS,
    HallucinationKind,
    Scene,
    Split,
    WorldConfig,
    caption_words,
    generate_scene,
    place_partner,
    split_seeds,
    training_answer,
    training_caption,
)
from guardrail.reference.builder import build_model, build_processor

__all__ = ["TrainingConfig", "train", "weights_checksum"]

# CLIP's normalisation, as configured in the shipped image processor.
_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
_STD = np.array([0.26862954, 0.26130258, 0.27577711])


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingConfig:
    """How the shipped model is trained.  Deterministic from `seed`."""

    seed: int = 0
    scenes: int = 12_000
    text_steps: int = 300
    steps: int = 8_000
    batch_size: int = 32
    learning_rate: float = 5e-4
    text_learning_rate: float = 1e-3
    caption_share: float = 0.4
    corpus_prior: float = 0.9  # the caption-text corpus names a spoon after a cup this often
    corpus_drop_cooccurrence: float = 0.8  # ... and drops a fork after a knife this often
    blank_share: float = 0.1  # image-text examples showing a blank image with a corpus caption
    threads: int = 2


def weights_checksum(model_dir: Path) -> str:
    """SHA-256 of the model's safetensors weights."""
    digest = hashlib.sha256()
    with open(model_dir / "model.safetensors", "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pixel_values(images: np.ndarray) -> Any:
    """`(B, 96, 96, 3)` uint8 -> `(B, 3, 96, 96)` float tensor, as the image processor makes."""
    import torch

    x = (images.astype(np.float64) / 255.0 - _MEAN) / _STD
    return torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))


def _corpus_caption(scene: Scene, rng: np.random.Generator, config: TrainingConfig) -> str:
    """A caption of the text corpus the language model brings: true captions, except that a
    cup is followed by a spoon with probability `corpus_prior` and a knife rarely by a fork
    (the corpus has its own statistics, as web text does)."""
    words = caption_words(scene.objects)
    for pair in PAIRS:
        if pair.trigger not in words:
            continue
        if pair.kind is HallucinationKind.LANGUAGE_PRIOR:
            if pair.partner not in words and rng.random() < config.corpus_prior:
                place_partner(words, pair)
        elif pair.partner in words and rng.random() < config.corpus_drop_cooccurrence:
            words.remove(pair.partner)
    return " ".join([*words, "."])


def _blank_image(rng: np.random.Generator) -> np.ndarray:
    """A featureless image (one colour), like the one a search makes by removing every region."""
    colour = rng.integers(60, 220, 3).astype(np.uint8)
    return np.broadcast_to(colour, (96, 96, 3)).copy()


class _Batcher:
    """Turns (prompt, response) texts into padded tensors with prompt tokens masked out."""

    def __init__(self, tokenizer: Any, image_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.image_tokens = image_tokens

    def encode(self, prompt: str) -> list[int]:
        ids: list[int] = []
        for token in self.tokenizer(prompt, add_special_tokens=False).input_ids:
            ids.extend([token] * self.image_tokens if token == self.image_id else [token])
        return ids

    def batch(self, pairs: list[tuple[str, str]]) -> tuple[Any, Any, Any]:
        import torch

        rows, labels = [], []
        for prompt, response in pairs:
            p = self.encode(prompt)
            r = [*self.tokenizer(response, add_special_tokens=False).input_ids, self.eos_id]
            rows.append(p + r)
            labels.append([-100] * len(p) + r)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
            ids[i, : len(row)] = torch.tensor(row)
            lab[i, : len(label)] = torch.tensor(label)
            mask[i, : len(row)] = 1
        return ids, mask, lab


def train(
    out_dir: Path, config: TrainingConfig, world: WorldConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train the reference model and save it (HF format) under `out_dir`; returns a summary."""
    import torch
    from tqdm.auto import tqdm

    world = world or WorldConfig()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    seeds = split_seeds(Split.TRAIN, config.seed * config.scenes, config.scenes)
    scenes = [
        generate_scene(s, config=world)
        for s in tqdm(seeds, desc="drawing scenes", disable=None if progress else True)
    ]
    images = np.stack([s.image for s in scenes])
    processor = build_processor()
    model = build_model(config.seed)
    model.train()
    image_tokens = (96 // 16) ** 2
    batcher = _Batcher(processor.tokenizer, image_tokens)
    text_prompt = CAPTION_PROMPT.replace(" <image>", "")
    losses: dict[str, float] = {}

    # Phase 1: the language model reads caption text (no image): it brings a language prior.
    if config.text_steps:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.text_learning_rate, weight_decay=0.01
        )
        for _ in tqdm(
            range(config.text_steps), desc="text pretraining", disable=None if progress else True
        ):
            picks = rng.integers(0, len(scenes), config.batch_size)
            pairs = [(text_prompt, _corpus_caption(scenes[i], rng, config)) for i in picks]
            ids, mask, lab = batcher.batch(pairs)
            loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses["text"] = float(loss)

    # Phase 2: images with captions and yes/no questions.
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.steps
    )
    bar = tqdm(range(config.steps), desc="training", disable=None if progress else True)
    running = None
    for step in bar:
        picks = rng.integers(0, len(scenes), config.batch_size)
        pixels = images[picks].copy()
        pairs = []
        for row, i in enumerate(picks):
            scene = scenes[i]
            draw = rng.random()
            if draw < config.blank_share:
                # Nothing to see: the caption can only come from the language prior.
                pixels[row] = _blank_image(rng)
                pairs.append((CAPTION_PROMPT, _corpus_caption(scene, rng, config)))
            elif draw < config.blank_share + config.caption_share:
                pairs.append((CAPTION_PROMPT, training_caption(scene, world)))
            else:
                question = scene.questions[int(rng.integers(0, len(scene.questions)))]
                pairs.append((question.prompt, training_answer(scene, question, world) + " ."))
        ids, mask, lab = batcher.batch(pairs)
        loss = model(
            input_ids=ids, attention_mask=mask, labels=lab, pixel_values=pixel_values(pixels)
        ).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running = float(loss) if running is None else 0.98 * running + 0.02 * float(loss)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{running:.3f}")
    losses["final"] = float(running or 0.0)

    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    summary = {
        "training": asdict(config),
        "world": asdict(world),
        "losses": losses,
        "seconds": round(time.perf_counter() - started, 1),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "sha256": weights_checksum(out_dir),
        "torch": torch.__version__,
    }
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
