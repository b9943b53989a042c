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
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..saliency import segmented_received_attention
from ..selection import Budget, TokenSelector
from .base import (
    ImageSelection,
    ModelAdapter,
    PrunedInputs,
    VisualUnit,
    compact_sequences,
    pad_token_id,
    placeholder_rows,
    prompt_tensors,
    prompt_text,
    rebuild_model_kwargs,
    require_argument,
    select_units,
)

#: Arguments that only feed the vision side (or the positions we recompute) and are consumed here.
_VISION_ONLY_KWARGS = (
    "pixel_values",
    "pixel_values_videos",
    "image_grid_thw",
    "video_grid_thw",
    "second_per_grid_ts",
    "position_ids",
)


class QwenVLAdapter(ModelAdapter):
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")

    def __init__(self, model, video_budget: str = "per_frame") -> None:
        super().__init__(model, video_budget)
        self.core = model.model  # visual, language_model, get_rope_index
        self.tower = self.core.visual
        self.image_token_id = model.config.image_token_id
        self.video_token_id = model.config.video_token_id
        self.pad_token_id = pad_token_id(model)
        self.merge_size = self.tower.spatial_merge_size
        full_attention_blocks = getattr(self.tower, "fullatt_block_indexes", None)
        last_full = max(full_attention_blocks) if full_attention_blocks else len(self.tower.blocks) - 1
        self.saliency_attention = self.tower.blocks[last_full].attn
        self.key_heads = self.saliency_attention.num_heads
        # No CLS token: saliency is the attention each token receives.
        self.saliency_kind = "received"

    def has_visual_input(self, model_kwargs: dict[str, Any]) -> bool:
        return model_kwargs.get("pixel_values") is not None or model_kwargs.get("pixel_values_videos") is not None

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

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, need_saliency: bool):
        """Run the tower once, as the model does, capturing the saliency block's q/k.

        Returns, with M merged tokens in the model's order: features (M, m*m*C) (each merge
        group's patches side by side, what the merger consumes), projected (M, D), and
        saliency (M,) float32 and keys (M, C) (mean over the group), or None.
        """
        attention = self.saliency_attention
        captured: dict[str, Any] = {}
        handles = []
        if need_saliency:
            handles.append(
                attention.register_forward_pre_hook(lambda _m, _args, kwargs: captured.update(kwargs), with_kwargs=True)
            )
            handles.append(attention.qkv.register_forward_hook(lambda _m, _a, out: captured.update(qkv=out)))
        try:
            output = self.tower(pixel_values.type(self.tower.dtype), grid_thw=grid_thw)
        finally:
            for handle in handles:
                handle.remove()
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
        if not need_saliency:
            return features, output.pooler_output, None, None
        length = captured["qkv"].shape[0]
        queries, keys, _ = captured["qkv"].reshape(length, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = captured["position_embeddings"]
        rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision
        queries, keys = rotate(queries, keys, cos, sin)  # (S, H, d): the vectors the block attends with
        queries, keys = queries.reshape(length, -1), keys.reshape(length, -1)
        received = segmented_received_attention(
            queries, keys, attention.num_heads, captured["cu_seqlens"], attention.scaling
        )
        saliency = model_order(received.view(num_merged, group).mean(dim=1))  # (M,)
        group_keys = model_order(keys.view(num_merged, group, -1).mean(dim=1))  # (M, C)
        return features, output.pooler_output, saliency, group_keys

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The merger applied to (K, m*m*C) merge groups -> (K, D)."""
        return self.tower.merger(features.reshape(-1, self.tower.merger.ln_q.weight.shape[0]))

    # -- selection -----------------------------------------------------------------------------
    def prune_inputs(self, model_kwargs: dict[str, Any], selector: TokenSelector, budget: Budget) -> PrunedInputs:
        input_ids, attention_mask = prompt_tensors(model_kwargs)
        needs = selector.requires
        need_saliency = bool(needs & {"saliency", "cls_attention", "keys"})
        placeholder_ids = [self.image_token_id, self.video_token_id]
        # Existing padding goes too: rows are re-padded to the longest pruned row.
        keep = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(placeholder_ids, device=input_ids.device))
        outputs: dict[str, BaseModelOutputWithPooling] = {}
        records: list[ImageSelection] = []

        # In training, gradients reach the tower and projector through the kept tokens.
        with torch.set_grad_enabled(self.model.training and torch.is_grad_enabled()):
            text = prompt_text(self.model, input_ids, attention_mask, placeholder_ids, needs)
            # kind -> (placeholder id, features, projected, saliency, keys, units) of every image or video
            encoded: dict[str, tuple] = {}
            for kind, pixels_name, grid_name, token_id in (
                ("image", "pixel_values", "image_grid_thw", self.image_token_id),
                ("video", "pixel_values_videos", "video_grid_thw", self.video_token_id),
            ):
                pixel_values = model_kwargs.get(pixels_name)
                if pixel_values is None:
                    continue
                grid_thw = require_argument(model_kwargs, grid_name, pixels_name)
                item_units = self._units(kind, grid_thw, input_ids, token_id, budget)
                encoded[kind] = (token_id, *self.encode(pixel_values, grid_thw, need_saliency), item_units)
            scores = {}
            if "lm_attention" in needs:
                # Scored on the unpruned prompt, at the (t, h, w) positions its tokens really have.
                sent = {token_id: projected for token_id, _, projected, *_ in encoded.values()}
                positions = self._rope_positions(model_kwargs)
                scores = self.visual_token_attention(
                    input_ids, attention_mask, sent, selector.lm_attention_layer, positions
                )

            for kind, (token_id, features, projected, saliency, keys, item_units) in encoded.items():
                lm_attention = scores.get(token_id)
                units = [
                    VisualUnit(
                        row,
                        unit_budget,
                        features[span],
                        projected[span],
                        None if saliency is None else saliency[span],
                        None if keys is None else keys[span],
                        grid,
                        None if lm_attention is None else lm_attention[span],
                    )
                    for _, span, row, unit_budget, grid, _ in item_units
                ]
                choices = select_units(units, selector, self.saliency_kind, *text, key_heads=self.key_heads)

                kept_per_item: dict[int, list[torch.Tensor]] = {}
                keep_per_item: dict[int, list[torch.Tensor]] = {}
                for (item, _span, row, _, grid, unit_kind), unit, choice in zip(item_units, units, choices):
                    tokens = (
                        self.project(choice.features) if choice.features is not None else unit.projected[choice.indices]
                    )
                    kept_per_item.setdefault(item, []).append(tokens)
                    unit_keep = torch.zeros(unit.num_tokens, dtype=torch.bool, device=input_ids.device)
                    unit_keep[choice.indices.to(input_ids.device)] = True
                    keep_per_item.setdefault(item, []).append(unit_keep)
                    records.append(ImageSelection(row, unit.num_tokens, choice.indices.cpu(), grid, unit_kind))
                outputs[kind] = BaseModelOutputWithPooling(
                    pooler_output=[torch.cat(kept_per_item[item]) for item in sorted(kept_per_item)]
                )
                is_placeholder = input_ids == token_id
                keep[is_placeholder] = torch.cat([torch.cat(keep_per_item[item]) for item in sorted(keep_per_item)])

        pruned_kwargs, new_mask = rebuild_model_kwargs(
            model_kwargs, keep, _VISION_ONLY_KWARGS, self.pad_token_id, outputs
        )
        pruned_kwargs["position_ids"] = self._kept_positions(model_kwargs, keep, new_mask)
        return PrunedInputs(pruned_kwargs, records, input_ids.shape[1], new_mask.shape[1])

    def _units(self, kind: str, grid_thw: torch.Tensor, input_ids: torch.Tensor, token_id: int, budget: Budget):
        """The budget units of every image or video: (item, token span, row, budget, grid, kind) each.

        An image is one unit; a video is one unit per temporal slice ("per_frame") or one
        unit for all of it ("per_video").
        """
        grids = [(t, h // self.merge_size, w // self.merge_size) for t, h, w in grid_thw.tolist()]
        lengths = [t * h * w for t, h, w in grids]
        rows = placeholder_rows(input_ids, token_id, lengths, kind)
        units = []
        start = 0
        for item, ((t, h, w), row) in enumerate(zip(grids, rows)):
            if kind == "video" and self.video_budget == "per_frame":
                for frame in range(t):
                    first = start + frame * h * w
                    units.append((item, slice(first, first + h * w), row, budget, (h, w), "frame"))
            else:
                grid = (h, w) if t == 1 else None
                units.append((item, slice(start, start + t * h * w), row, budget, grid, kind))
            start += t * h * w
        return units

    def _rope_positions(self, model_kwargs: dict[str, Any]) -> torch.Tensor:
        """The unpruned prompt's (t, h, w) M-RoPE positions (3, B, L), 0 at padding, as the model computes them."""
        input_ids, attention_mask = prompt_tensors(model_kwargs)
        token_types = model_kwargs.get("mm_token_type_ids")
        if token_types is None:
            token_types = (input_ids == self.image_token_id).int() + 2 * (input_ids == self.video_token_id).int()
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

    def _kept_positions(self, model_kwargs: dict[str, Any], keep: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        """Position ids (4, B, L') for the pruned prompt: the sequence positions it has, then
        the unpruned prompt's (t, h, w) M-RoPE positions at the kept tokens."""
        attention_mask = prompt_tensors(model_kwargs)[1]
        positions = self._rope_positions(model_kwargs)  # (3, B, L)
        _, compacted = compact_sequences(keep, attention_mask, {"positions": (positions.permute(1, 2, 0), 0)})
        kept_positions = compacted["positions"].permute(2, 0, 1)  # (3, B, L')
        sequence_positions = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 0)  # (B, L')
        # Decoding without explicit positions adds rope_deltas to the count of real tokens:
        # make it land on the unpruned maximum + 1.
        next_position = positions.amax(dim=(0, 2)) + 1  # (B,)
        self.core.rope_deltas = (next_position - new_mask.sum(dim=-1))[:, None]
        return torch.cat([sequence_positions[None], kept_positions], dim=0)
