"""Adapter for Qwen2-VL and Qwen2.5-VL: packed variable-size ViT, 2x2 merge, M-RoPE language model.

Images and videos of any size are packed into one ViT sequence; ``cu_seqlens`` keeps
every image (and every frame) from attending to another. Saliency is the attention each
patch receives in the last full-attention block (Qwen2.5-VL alternates window and full
attention; Qwen2-VL attends fully in every block), averaged over each 2x2 merge group,
so there is one score per language-model token.

Positions: the (t, h, w) M-RoPE positions are computed by the model's own
``get_rope_index`` on the *unpruned* prompt and sliced with the keep mask, so a kept
token keeps exactly the position it would have had; text after an image continues from
the unpruned positions, and decoding continues at the unpruned maximum + 1 (the
``rope_deltas`` the model caches are set to match the shortened prompt). FastV's scoring
pass (``lm_attention``) runs on the unpruned prompt at those same unpruned positions.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..pipeline import ImageSelection, TokenRegion, VisualItem
from ..saliency import segmented_received_attention
from .base import FamilySupport, ModelAdapter
from .sequence import compact_sequences, prompt_tensors, require_argument
from .shared import needs_query_key
from .taps import capture


class QwenVLAdapter(ModelAdapter):
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    support = FamilySupport(
        "Qwen2-VL / Qwen2.5-VL",
        saliency="attention received in the last full-attention block, per image (packed images never mix), "
        "averaged over each 2×2 merge group",
        budget_unit="image, or video frame / whole video",
        positions="the unpruned M-RoPE (t, h, w) ids, sliced: kept tokens keep their positions and decoding "
        "continues at the unpruned max + 1",
        lacks=frozenset({"cls_attention"}),
    )
    pixel_arguments = ("pixel_values", "pixel_values_videos")
    vision_only_kwargs = (
        "pixel_values",
        "pixel_values_videos",
        "image_grid_thw",
        "video_grid_thw",
        "second_per_grid_ts",
        "position_ids",  # recomputed: the kept tokens' unpruned positions
    )
    saliency_kind = "received"  # no CLS token: saliency is the attention each token receives

    def __init__(self, model, **settings) -> None:
        super().__init__(model, **settings)
        self.tower = self.core.visual
        self.merge_size = self.tower.spatial_merge_size
        full_attention_blocks = getattr(self.tower, "fullatt_block_indexes", None)
        last_full = max(full_attention_blocks) if full_attention_blocks else len(self.tower.blocks) - 1
        self.saliency_attention = self.tower.blocks[last_full].attn
        self.key_heads = self.saliency_attention.num_heads

    @property
    def vision_tower(self):
        return self.tower

    # -- vision side --------------------------------------------------------------------------
    def _window_index(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Qwen2.5-VL reorders merge groups window by window inside the tower: (M,) original
        group of each slot in the tower's order. None for Qwen2-VL (no reordering)."""
        if not hasattr(self.tower, "window_size"):
            return None
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid_thw, self.merge_size, self.tower.window_size, self.tower.patch_size
        )
        return window_index.to(grid_thw.device)

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, need_saliency: bool, kind: str = "image"):
        """Run the tower once, as the model does, capturing the saliency block's q/k.

        Returns a :class:`VisualItem` over all M merged tokens in the model's order:
        features (M, m*m*C) (each merge group's patches side by side, what the merger
        consumes), tokens (M, D), and saliency (M,) float32 and keys (M, C) (mean over the
        group) when asked for; with the tower's other per-token outputs in ``side_outputs``.
        """
        attention = self.saliency_attention
        qkv = {"qkv": attention.qkv} if need_saliency else {}
        with capture(qkv, keyword_inputs_of=attention if need_saliency else None) as captured:
            output = self.tower(pixel_values.type(self.tower.dtype), grid_thw=grid_thw)
        hidden = output.last_hidden_state  # (S, C), merge groups in the tower's (window) order
        group = self.merge_size**2
        num_merged = hidden.shape[0] // group
        window_index = self._window_index(grid_thw)

        def model_order(per_group: torch.Tensor) -> torch.Tensor:
            """(M, ...) in the tower's order -> the order of the merged tokens (raster per image)."""
            if window_index is None:
                return per_group
            restored = torch.empty_like(per_group)
            restored[window_index] = per_group
            return restored

        features = model_order(hidden.view(num_merged, group * hidden.shape[-1]))
        stack = VisualItem(kind, features, output.pooler_output, side_outputs=self.tower_side_outputs(output))
        if not need_saliency:
            return stack
        length = captured["qkv"].shape[0]
        queries, keys, _ = captured["qkv"].reshape(length, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = captured["position_embeddings"]
        rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision
        queries, keys = rotate(queries, keys, cos, sin)  # (S, H, d): the vectors the block attends with
        queries, keys = queries.reshape(length, -1), keys.reshape(length, -1)
        received = segmented_received_attention(
            queries, keys, attention.num_heads, captured["cu_seqlens"], attention.scaling
        )
        stack.saliency = model_order(received.view(num_merged, group).mean(dim=1))  # (M,)
        stack.keys = model_order(keys.view(num_merged, group, -1).mean(dim=1))  # (M, C)
        return stack

    def tower_side_outputs(self, output) -> dict[str, torch.Tensor]:
        """Per-merged-token outputs of the tower besides the merged tokens (none here)."""
        return {}

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The merger applied to (K, m*m*C) merge groups -> (K, D)."""
        return self.tower.merger(features.reshape(-1, features.shape[-1] // self.merge_size**2))

    def visual_items(self, model_kwargs: dict[str, Any], needs: frozenset[str]) -> list[VisualItem]:
        """Every image, then every video: one unit per image; per video one unit per temporal
        slice ("per_frame") or one for all of it ("per_video")."""
        need_saliency = needs_query_key(needs)
        items = []
        for kind, pixels_name, grid_name in (
            ("image", "pixel_values", "image_grid_thw"),
            ("video", "pixel_values_videos", "video_grid_thw"),
        ):
            pixel_values = model_kwargs.get(pixels_name)
            if pixel_values is None:
                continue
            grid_thw = require_argument(model_kwargs, grid_name, pixels_name)
            stack = self.encode(pixel_values, grid_thw, need_saliency, kind)
            grids = [(t, h // self.merge_size, w // self.merge_size) for t, h, w in grid_thw.tolist()]
            start = 0
            for t, h, w in grids:
                item = stack.map(lambda tensor, span=slice(start, start + t * h * w): tensor[span])
                if kind == "video":
                    item.units = self.video_units(t, h * w, (h, w), item.features.device, (h, w) if t == 1 else None)
                else:
                    positions = torch.arange(t * h * w, device=item.features.device)
                    item.units = [ImageSelection.of(kind, [TokenRegion(positions, (h, w) if t == 1 else None)])]
                items.append(item)
                start += t * h * w
        return items

    # -- positions -----------------------------------------------------------------------------
    def scoring_positions(self, model_kwargs: dict[str, Any]) -> torch.Tensor:
        """The unpruned prompt's (t, h, w) M-RoPE positions (3, B, L), 0 at padding, as the model computes them."""
        input_ids, attention_mask = prompt_tensors(model_kwargs)
        token_types = model_kwargs.get("mm_token_type_ids")
        if token_types is None:
            image, video = self.token_ids["image"], self.token_ids["video"]
            token_types = (input_ids == image).int() + 2 * (input_ids == video).int()
        extra = {}
        if model_kwargs.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = model_kwargs["second_per_grid_ts"]
        positions, _ = self.core.get_rope_index(
            input_ids,
            token_types,
            image_grid_thw=model_kwargs.get("image_grid_thw"),
            video_grid_thw=model_kwargs.get("video_grid_thw"),
            attention_mask=attention_mask,
            **extra,
        )
        return positions

    def pruned_position_ids(
        self, model_kwargs: dict[str, Any], keep: torch.Tensor, new_mask: torch.Tensor
    ) -> torch.Tensor:
        """Position ids (4, B, L') for the pruned prompt: the sequence positions it has, then
        the unpruned prompt's (t, h, w) M-RoPE positions at the kept tokens."""
        attention_mask = prompt_tensors(model_kwargs)[1]
        positions = self.scoring_positions(model_kwargs)  # (3, B, L)
        _, compacted = compact_sequences(keep, attention_mask, {"positions": (positions.permute(1, 2, 0), 0)})
        kept_positions = compacted["positions"].permute(2, 0, 1)  # (3, B, L')
        sequence_positions = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 0)  # (B, L')
        # Decoding without explicit positions adds rope_deltas to the count of real tokens:
        # make it land on the unpruned maximum + 1.
        next_position = positions.amax(dim=(0, 2)) + 1  # (B,)
        self.core.rope_deltas = (next_position - new_mask.sum(dim=-1))[:, None]
        return torch.cat([sequence_positions[None], kept_positions], dim=0)
