"""Tiny randomly initialised LLaVA, Qwen2.5-VL and InternVL checkpoints built from configs (no
download).

Used by the parity tests, the scorer benchmark and `guardrail dev tiny-model`: they exercise the
same transformers classes, processors and code paths as production checkpoints, at a size that
runs on 2 CPU cores.  The tokenizer is a word-level one built here: a small fixed vocabulary, or
(`vocabulary=`) the shipped reference model's, with the family's special tokens added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "INTERNVL_PROMPT",
    "LLAVA_PROMPT",
    "QWEN_PROMPT",
    "TINY_BUILDERS",
    "save_tiny_internvl",
    "save_tiny_llava",
    "save_tiny_qwen",
]

_WORDS = ["a", "the", "cat", "dog", "cup", "on", "table", ".", "describe", "image", "user", ":"]
LLAVA_PROMPT = "USER: <image> describe the image . ASSISTANT:"
QWEN_PROMPT = (
    "<|im_start|> user <|vision_start|> <|image_pad|> <|vision_end|> describe the image . "
    "<|im_end|> <|im_start|> assistant"
)
INTERNVL_PROMPT = (
    "<|im_start|> user <IMG_CONTEXT> describe the image . <|im_end|> <|im_start|> assistant"
)


def _tokenizer(
    special: list[str], image_token: str, bos: str | None, vocabulary: Path | None = None
) -> Any:
    """A word-level tokenizer: `_WORDS`, or the `tokenizer.json` in the directory `vocabulary`
    (the reference model's), with `special` added as special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocabulary is not None:
        core = Tokenizer.from_file(str(vocabulary / "tokenizer.json"))
    else:
        words = ["<pad>", "<unk>", *special, *_WORDS, "assistant"]
        core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        core.normalizer = normalizers.Lowercase()
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(special)
    extra = {"image_token": image_token}
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token=bos,
        eos_token=special[-1],
        extra_special_tokens=extra,
        padding_side="left",
    )


def save_tiny_llava(
    out: Path,
    *,
    image_size: int = 64,
    patch_size: int = 8,
    seed: int = 0,
    vocabulary: Path | None = None,
) -> Path:
    """A LLaVA checkpoint ((image_size/patch_size)^2 image tokens) saved under `out`."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _tokenizer(["<s>", "<image>", "</s>"], "<image>", "<s>", vocabulary)
    vocab = tokenizer.get_vocab()
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def save_tiny_qwen(
    out: Path, *, image_size: int = 56, seed: int = 0, vocabulary: Path | None = None
) -> Path:
    """A Qwen2.5-VL checkpoint (image processor + tokenizer, no processor class) under `out`."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    special = [
        "<|im_start|>",
        "<|vision_start|>",
        "<|image_pad|>",
        "<|vision_end|>",
        "<|video_pad|>",
        "<|im_end|>",
    ]
    tokenizer = _tokenizer(special, "<|image_pad|>", None, vocabulary)
    vocab = tokenizer.get_vocab()
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "bos_token_id": vocab["<|im_start|>"],
            "eos_token_id": vocab["<|im_end|>"],
            "pad_token_id": vocab["<pad>"],
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
            },
        },
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels}
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_tiny_internvl(
    out: Path,
    *,
    image_size: int = 64,
    patch_size: int = 8,
    seed: int = 0,
    vocabulary: Path | None = None,
) -> Path:
    """An InternVL checkpoint (HF format: InternViT, pixel shuffle 0.5, MLP projector, Qwen2
    language model; (image_size / patch_size / 2)^2 image tokens per tile) under `out`, with its
    image processor (one `image_size` tile, dynamic tiling configured as InternVL3 ships it)
    and tokenizer (no processor class: its video processor needs torchvision)."""
    import torch
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
    )

    special = ["<|im_start|>", "<img>", "<IMG_CONTEXT>", "</img>", "<video>", "<|im_end|>"]
    tokenizer = _tokenizer(special, "<IMG_CONTEXT>", None, vocabulary)
    vocab = tokenizer.get_vocab()
    config = InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": [image_size, image_size],
            "patch_size": [patch_size, patch_size],
            "use_mean_pooling": False,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(vocab),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "bos_token_id": vocab["<|im_start|>"],
            "eos_token_id": vocab["<|im_end|>"],
            "pad_token_id": vocab["<pad>"],
        },
        image_token_id=vocab["<IMG_CONTEXT>"],
        image_seq_length=(image_size // patch_size // 2) ** 2,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=12,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# the builders `guardrail dev tiny-model FAMILY` offers, by family name
TINY_BUILDERS = {
    "llava": save_tiny_llava,
    "qwen2_5_vl": save_tiny_qwen,
    "internvl": save_tiny_internvl,
}
