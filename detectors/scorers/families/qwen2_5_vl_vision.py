"""Qwen2.5-VL's vision tower as a batched, fixed-geometry module (and so exportable to ONNX).

Transformers' `Qwen2_5_VisionTransformerPretrainedModel` takes the patches of all images
concatenated and works out, in Python, from `grid_thw`, the rope angles, the window permutation
and the attention boundaries of every image: a traced graph would be specialised to one batch.
Every masked variant of one sample has the same geometry, so these are computed once for one
image of `(H, W)` pixels and the images are kept on a batch axis: window layers attend within
a window through a block-diagonal mask, full-attention layers within the image.  The module
maps `(B, 3, H, W)` preprocessed pixels to `(B, T, D)` features in the language model's space,
the same contract as LLaVA's (`detectors.scorers.vision`).
"""

from __future__ import annotations

from typing import Any

from detectors.errors import ImageTokenError

__all__ = ["qwen_vision_module"]


def qwen_vision_module(model: Any, input_hw: tuple[int, int]) -> Any:
    """The vision tower and merger of `model` (a `Qwen2_5_VLForConditionalGeneration`) for
    images of `input_hw` pixels (multiples of patch * merge, as the image processor makes).

    Raises:
        ImageTokenError: `input_hw` is not a whole number of merged patches.
    """
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import rotate_half
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    visual = model.model.visual
    config = visual.config
    patch, merge = int(config.patch_size), int(config.spatial_merge_size)
    h, w = input_hw
    if h % (patch * merge) or w % (patch * merge):
        raise ImageTokenError(
            f"a Qwen2.5-VL input of {h}x{w} pixels is not a multiple of patch x merge "
            f"({patch * merge})"
        )
    gh, gw = h // patch, w // patch
    unit = merge * merge
    seq = gh * gw
    grid = torch.tensor([[1, gh, gw]])
    window_index, cu_windows = get_vision_window_index(
        grid, spatial_merge_size=merge, window_size=int(config.window_size), patch_size=patch
    )
    # token order after the window permutation: merged unit `window_index[j]`, its `unit` patches
    order = (window_index[:, None] * unit + torch.arange(unit)).reshape(-1)
    with torch.no_grad():
        positions = get_vision_position_ids(grid, merge)
        cos, sin = visual.rotary_pos_emb(torch.empty(0), positions)
    cos, sin = cos[order].float(), sin[order].float()  # (S, head_dim)
    # window layers attend within each window: windows are contiguous runs of the permuted
    # sequence, gathered to `(windows, slots)` with short windows padded (keys masked out), so
    # the attention costs windows x slots^2, not seq^2 (16x less at 448 px)
    starts, sizes = cu_windows[:-1].long(), (cu_windows[1:] - cu_windows[:-1]).long()
    slots = int(sizes.max())
    valid = torch.arange(slots)[None, :] < sizes[:, None]  # (windows, slots)
    gather = torch.where(valid, starts[:, None] + torch.arange(slots), seq)  # pad -> zero row
    key_bias = torch.zeros(valid.shape).masked_fill(~valid, float("-inf"))[:, None, :]
    window_id = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    scatter = window_id * slots + (torch.arange(seq) - starts[window_id])
    uniform = bool((sizes == slots).all())
    full_layers = {int(i) for i in config.fullatt_block_indexes}
    restore = torch.argsort(window_index)

    class QwenVision(torch.nn.Module):
        kernel: torch.Tensor
        cos: torch.Tensor
        sin: torch.Tensor
        key_bias: torch.Tensor
        gather: torch.Tensor
        scatter: torch.Tensor
        window_index: torch.Tensor
        restore: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.visual = visual
            # the processor repeats a still image `temporal` times: the Conv3d over identical
            # frames is a Conv2d with the kernel summed over time (half the work, no 8-D copy)
            kernel = visual.patch_embed.proj.weight.detach().sum(dim=2)
            self.register_buffer("kernel", kernel, persistent=False)
            self.register_buffer("cos", cos[None, None], persistent=False)  # (1, 1, S, hd)
            self.register_buffer("sin", sin[None, None], persistent=False)
            self.register_buffer("key_bias", key_bias, persistent=False)  # (windows, 1, slots)
            self.register_buffer("gather", gather, persistent=False)
            self.register_buffer("scatter", scatter, persistent=False)
            self.register_buffer("window_index", window_index, persistent=False)
            self.register_buffer("restore", restore, persistent=False)

        def _rope(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = (x * self.cos + rotate_half(x) * self.sin).to(x.dtype)
            return out

        def _windowed(
            self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
        ) -> torch.Tensor:
            """Attention within windows: `(B, heads, S, hd)` in and out."""
            b, heads, _, dim = q.shape
            shape = (b * heads, -1, slots, dim)  # 4-D: what the ONNX exporter's SDPA takes
            if uniform:  # every window full: a reshape, no padding, no mask
                out = torch.nn.functional.scaled_dot_product_attention(
                    q.reshape(shape), k.reshape(shape), v.reshape(shape), scale=scale
                )
                return out.reshape(b, heads, seq, dim)
            pad = q.new_zeros(b, heads, 1, dim)
            q, k, v = (
                torch.cat([x, pad], dim=2)[:, :, self.gather].reshape(shape) for x in (q, k, v)
            )
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=self.key_bias.to(q.dtype), scale=scale
            )
            return out.reshape(b, heads, -1, dim)[:, :, self.scatter]

        def _attention(self, block: Any, x: torch.Tensor, windowed: bool) -> torch.Tensor:
            attn = block.attn
            b = x.shape[0]
            qkv = attn.qkv(x).reshape(b, seq, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # (B, heads, S, hd)
            q, k = self._rope(q.float()).to(v.dtype), self._rope(k.float()).to(v.dtype)
            if windowed:
                out = self._windowed(q, k, v, attn.scaling)
            else:
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
            out = out.transpose(1, 2).reshape(b, seq, -1)
            result: torch.Tensor = attn.proj(out)
            return result

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            b = pixel_values.shape[0]
            x = torch.nn.functional.conv2d(
                pixel_values.to(self.kernel.dtype), self.kernel, stride=patch
            )
            # to the processor's token order (merged units row-major, patches within a unit),
            # then to the window order
            x = x.reshape(b, -1, gh // merge, merge, gw // merge, merge).permute(0, 2, 4, 3, 5, 1)
            x = x.reshape(b, seq // unit, unit, -1)[:, self.window_index].reshape(b, seq, -1)
            for i, block in enumerate(self.visual.blocks):
                x = x + self._attention(block, block.norm1(x), i not in full_layers)
                x = x + block.mlp(block.norm2(x))
            merger = self.visual.merger
            y: torch.Tensor = merger.mlp(merger.ln_q(x).reshape(b, seq // unit, -1))
            return y[:, self.restore]

    return QwenVision().to(visual.patch_embed.proj.weight.device).eval()
