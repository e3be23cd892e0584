"""Building the reference model from transformers' own LLaVA classes (no download)."""

from __future__ import annotations

from typing import Any

from detectors.reference.world import CLASS_NAMES, IMAGE_SIZE

__all__ = ["PATCH_SIZE", "VOCABULARY", "build_model", "build_processor", "build_tokenizer"]

PATCH_SIZE = 16
_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
_WORDS = [
    "user",
    ":",
    "describe",
    "the",
    "image",
    ".",
    "assistant",
    "is",
    "there",
    "a",
    "in",
    "?",
    "yes",
    "no",
]
VOCABULARY: tuple[str, ...] = tuple(_SPECIAL + _WORDS + list(CLASS_NAMES))


def build_tokenizer() -> Any:
    """A word-level tokenizer (lower-cased, punctuation split off) over the world's words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(VOCABULARY)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def build_processor() -> Any:
    """A `LlavaProcessor` with a CLIP image processor configured explicitly for 96 px."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True,
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def build_model(seed: int) -> Any:
    """A ~1.1M-parameter `LlavaForConditionalGeneration`: CLIP vision tower (hidden 128, 4
    layers, 36 patches of 16 px) and a Llama language model (hidden 128, 3 layers)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vocab = {token: i for i, token in enumerate(VOCABULARY)}
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(
        vocab_size=len(VOCABULARY),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)
