from __future__ import annotations

import json
from pathlib import Path

from detectors.scorers.families.llava import load_llava
from guardrail.reference.training import TrainingConfig, train


def test_training_is_deterministic_and_saves_a_loadable_checkpoint(tmp_path: Path) -> None:
    config = TrainingConfig(scenes=64, text_steps=2, steps=4, batch_size=8)
    first = train(tmp_path / "a", config, progress=False)
    second = train(tmp_path / "b", config, progress=False)
    assert first["sha256"] == second["sha256"]
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["training"]["steps"] == 4 and record["parameters"] > 1_000_000
    llava = load_llava(tmp_path / "a")
    assert llava.tokenizer.convert_tokens_to_ids("fork") != llava.tokenizer.unk_token_id
