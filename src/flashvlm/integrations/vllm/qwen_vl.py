"""Qwen2-VL and Qwen2.5-VL in vLLM with flashvlm: packed ViT, 2x2 merger, M-RoPE positions.

Registered under vLLM's own architecture names, ``Qwen2VLForConditionalGeneration`` and
``Qwen2_5_VLForConditionalGeneration``; without the ``flashvlm`` key in ``hf_overrides``
every override below defers to vLLM's class. The two towers differ in what the HF adapter
(``flashvlm.adapters.qwen_vl``) already handles: Qwen2.5-VL's blocks attend within windows
except its ``fullatt_block_indexes``, and it runs merge groups in window order; Qwen2-VL's
blocks all attend to the whole image, in raster order. Saliency comes from the last
full-attention block of either.

Positions, as the HF adapter (``flashvlm.adapters.qwen_vl``) has them: a kept token keeps
the (t, h, w) M-RoPE position it has in the unpruned prompt, the text after an image
continues after the *unpruned* grid, and decoding continues at the unpruned maximum + 1.
Only the kept tokens' own positions depend on the selection; everything else follows
from each image's grid, which the request carries. So:

1. ``get_mrope_input_positions`` (called when a request arrives, before the encoder runs)
   lays out the prompt with ``K`` slots per image, all at the image's first position,
   the text after it where the unpruned image would have ended, and the decode delta of
   the unpruned prompt;
2. ``embed_multimodal`` appends to each kept row its (t, h, w) offset inside the image's
   grid, extra channels that travel through vLLM's encoder cache with the row (as EVS
   carries its positions, ``SupportsMultiModalPruning``);
3. ``embed_input_ids`` strips those channels before vLLM merges the rows into the prompt,
   and ``forward`` adds them to the slots' positions.

Videos are pruned the same way, as the HF adapter prunes them: per frame (``video_budget=
"per_frame"``, the default: each temporal slice of the grid keeps K, so a video of T slices
has T * K slots) or per video (``"per_video"``: K for the whole video, its slices selected
jointly). A kept token's temporal offset is its slice's index times the video's t factor
(seconds per slice times ``tokens_per_second``), as vLLM's ``iter_mm_grid_thw`` and
transformers' ``get_rope_index`` place it.

EVS's own route (the model runner calling ``recompute_mrope_positions``) is not used: the
runner takes it only when ``video_pruning_rate`` is set, and it lets text after an image
continue from the *pruned* positions, which is not what the HF adapter does.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...errors import UnsupportedModelError
from ...pipeline import ImageSelection, TokenRegion, VisualItem, video_units
from ...saliency import segmented_received_attention
from .processing import PrunedInfoMixin, PrunedProcessorMixin
from .pruned_model import (
    PrunedModelMixin,
    QKTap,
    gather_tensor_parallel_channels,
    mean_over_tensor_parallel_heads,
    prompt_text_per_image,
    require_pixels,
)
from .settings import SERVED_REQUIREMENTS, settings_of
from .vision_cache import EncodedImage

#: What this path hands a method: Qwen's tower has no CLS token, so no CLS attention row.
QWEN_SERVED_REQUIREMENTS = SERVED_REQUIREMENTS - {"cls_attention"}

#: Extra channels on each kept row: its (t, h, w) offset inside the item's merged grid, each
#: as two base-256 digits (high, then low), so that the offsets survive rows in bfloat16
#: exactly (it holds integers exactly up to 256; a long video's temporal offsets pass that).
POSITION_CHANNELS = 6
DIGIT_BASE = 256


def offset_channels(offsets: torch.Tensor) -> torch.Tensor:
    """(K, 3) long offsets -> (K, 6) channels: the high digits, then the low ones."""
    return torch.cat([offsets // DIGIT_BASE, offsets % DIGIT_BASE], dim=1)


def channel_offsets(channels: torch.Tensor) -> torch.Tensor:
    """:func:`offset_channels` undone: (K, 6) channels of any float dtype -> (K, 3) long."""
    digits = channels.float().round().long()
    return digits[:, :3] * DIGIT_BASE + digits[:, 3:]


class PrunedQwenVLInfoMixin(PrunedInfoMixin):
    flashvlm_served = QWEN_SERVED_REQUIREMENTS

    # The engine's count, from which vLLM sizes its encoder budget (get_mm_max_tokens_per_item);
    # a prompt's placeholders are cut by the processor, with the request's own settings if any.
    def get_num_image_tokens(self, *, image_width, image_height, image_processor, mm_kwargs) -> int:
        num_tokens = super().get_num_image_tokens(
            image_width=image_width, image_height=image_height, image_processor=image_processor, mm_kwargs=mm_kwargs
        )
        return num_tokens if self.flashvlm is None else self.flashvlm.num_kept(num_tokens)


class PrunedQwenVLProcessorMixin(PrunedProcessorMixin):
    flashvlm_modalities = ("image", "video")

    def flashvlm_placeholder_ids(self) -> frozenset[int]:
        config = self.info.get_hf_config()
        return frozenset({config.image_token_id, config.video_token_id})

    def flashvlm_video_placeholders(self, settings, stock, out_mm_kwargs, item_idx: int):
        # One run for the whole video: K per temporal slice, or K in all.
        num_frames, per_frame = self.flashvlm_video_grid(out_mm_kwargs, item_idx)
        return stock[: settings.num_kept_in_video(num_frames, per_frame)]

    def flashvlm_video_grid(self, out_mm_kwargs, item_idx: int) -> tuple[int, int]:
        """Video ``item_idx``'s temporal slices and merged tokens per slice."""
        t, h, w = out_mm_kwargs["video"][item_idx]["video_grid_thw"].data.tolist()
        return t, h * w // self.info.get_hf_config().vision_config.spatial_merge_size ** 2

    def flashvlm_num_items(self, processed, modality: str) -> int:
        # The pixel values hold every item's patches in one (S, C) tensor: count the grids.
        return len(processed.get(f"{modality}_grid_thw", ()))


@contextmanager
def tap_rotated_queries_and_keys(attention):
    """Capture the queries and keys a vLLM Qwen-VL vision attention attends with.

    Its ``apply_rotary_emb`` rotates q and k stacked as (2 * b, s, heads, d); with b = 1
    (the packed tower) its output is this rank's rotated q and k, each (s, heads * d).
    """
    tap = QKTap()

    def keep_queries_and_keys(_module, _args, output):
        rotated = output.reshape(2, output.shape[-3], -1)
        tap.queries, tap.keys = rotated.unbind(0)

    handle = attention.apply_rotary_emb.register_forward_hook(keep_queries_and_keys)
    try:
        yield tap
    finally:
        handle.remove()


@contextmanager
def tap_merger_input(norm):
    """Capture the tower's last hidden states (S, 1, C), as the merger receives them.

    The hook sits on the merger's first norm (``norm``): the merger's own ``__call__`` is
    vLLM's compile wrapper, which calls ``forward`` directly and so runs no module hooks.
    """
    captured = {}
    handle = norm.register_forward_pre_hook(lambda _module, args: captured.update(hidden=args[0]))
    try:
        yield captured
    finally:
        handle.remove()


class PrunedQwenVLMixin(PrunedModelMixin):
    """The selection, the M-RoPE positions and the start-up checks the Qwen towers share.

    A family sets what differs: the merger's first norm (:meth:`merger_norm`), the tower's
    output split into tokens and side outputs (:meth:`split_tower_output`, Qwen3-VL's
    DeepStack) and the prompt's visual runs (:meth:`visual_runs`, Qwen3-VL's frames).
    """

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = settings_of(self.config, QWEN_SERVED_REQUIREMENTS)
        if settings is not None:
            if self.use_data_parallel:
                raise UnsupportedModelError(
                    'mm_encoder_tp_mode="data": flashvlm reads saliency inside the tower, which that mode splits '
                    "across ranks by image; use the default tensor-parallel tower"
                )
            compilation = vllm_config.compilation_config
            for option in ("compile_mm_encoder", "cudagraph_mm_encoder"):
                if getattr(compilation, option, False):
                    raise UnsupportedModelError(
                        f"{option}=True: flashvlm reads q/k inside the vision tower with hooks, which a compiled "
                        "or graph-captured tower does not run; leave the encoder eager (vLLM's default)"
                    )
            evs_rate = vllm_config.model_config.multimodal_config.video_pruning_rate
            if evs_rate:
                raise UnsupportedModelError(
                    f"video_pruning_rate={evs_rate}: vLLM's EVS prunes videos and lays out their M-RoPE positions "
                    "its own way, which flashvlm's position layout does not compose with; serve with one or the "
                    "other (flashvlm prunes videos too: per frame, or per video with video_budget)"
                )
            if vllm_config.parallel_config.pipeline_parallel_size > 1:
                raise UnsupportedModelError(
                    f"pipeline_parallel_size={vllm_config.parallel_config.pipeline_parallel_size}: flashvlm corrects "
                    "the kept tokens' M-RoPE positions on the first stage only; Qwen-VL is served with 1"
                )
        self.init_flashvlm(settings, QWEN_SERVED_REQUIREMENTS, vllm_config)
        full_attention_blocks = getattr(self.visual, "fullatt_block_indexes", None)  # Qwen2.5-VL's only
        last_full = max(full_attention_blocks) if full_attention_blocks else len(self.visual.blocks) - 1
        #: Saliency comes from the last full-attention block, as in the HF adapter (window
        #: blocks see only their window).
        self.saliency_attention = self.visual.blocks[last_full].attn
        #: (slots (n,), offsets (3, n)) for the next ``forward``, from ``embed_input_ids``.
        self.pending_position_offsets: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- positions -------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens, mm_features):
        """(3, L) positions of the pruned prompt and the decode delta, as the HF adapter has them.

        Each image's (or video's, or Qwen3-VL frame's) ``K`` slots sit at its first position
        here; ``forward`` adds each kept token's (t, h, w) offset once the selection is known.
        """
        if self.flashvlm is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        pieces = []
        next_position = 0  # the position the next text token takes
        text_start = 0  # index in the prompt of the first token after the last visual run
        for offset, length, grid in self.visual_runs(input_tokens, mm_features):
            text_length = offset - text_start
            pieces.append(np.broadcast_to(np.arange(text_length), (3, text_length)) + next_position)
            first = next_position + text_length
            pieces.append(np.full((3, length), first))
            next_position = first + int(grid.max()) + 1  # after the unpruned item
            text_start = offset + length
        tail = len(input_tokens) - text_start
        pieces.append(np.broadcast_to(np.arange(tail), (3, tail)) + next_position)
        positions = np.concatenate(pieces, axis=1).astype(np.int64)  # (3, L)
        end = next_position + tail
        return torch.from_numpy(positions), end - len(input_tokens)

    def visual_runs(self, input_tokens, mm_features):
        """The prompt's visual placeholder runs in order, each (offset, slots, grid): ``grid``
        (3, n) holds the run's unpruned (t, h, w) positions from its first."""
        features = sorted(mm_features, key=lambda feature: feature.mm_position.offset)
        for feature, (offset, grid_t, grid_h, grid_w, t_factor) in zip(features, self.iter_mm_grid_thw(features)):
            grid = np.indices((grid_t, grid_h, grid_w)).reshape(3, -1)  # (3, t*h*w)
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).astype(np.int64)
            yield offset, feature.mm_position.length, grid

    def embedding_width(self) -> int:
        """Channels of one visual row as vLLM's class hands it on (Qwen3-VL: with its DeepStack features)."""
        return self.config.text_config.hidden_size

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if self.flashvlm is None:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        self.pending_position_offsets = None
        if not multimodal_embeddings:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        from vllm.multimodal.utils import copy_mm_embedding_modality

        width = self.embedding_width()
        rows, offsets = [], []
        for item in multimodal_embeddings:  # an image's or a video's kept rows
            rows.append(copy_mm_embedding_modality(item, item[:, :width]))
            offsets.append(channel_offsets(item[:, width:]))
        slots = is_multimodal.nonzero().squeeze(1)  # (n,): the rows' places among the scheduled tokens
        self.pending_position_offsets = (slots, torch.cat(offsets).T)
        return super().embed_input_ids(input_ids, rows, is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        pending, self.pending_position_offsets = self.pending_position_offsets, None
        if pending is not None:
            slots, offsets = pending
            positions = positions.clone()
            positions[:, slots] += offsets.to(positions.device)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    # -- selection -------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        if self.flashvlm is None:
            return super().embed_multimodal(**kwargs)
        inputs_by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        embeddings: tuple[torch.Tensor, ...] = ()
        for modality, item_input in inputs_by_modality.items():
            if item_input is not None:  # "images" / "videos" (Qwen2.5-VL's keys) or "image" / "video"
                embeddings += self.select_items(
                    "image" if modality.startswith("image") else "video", item_input, kwargs
                )
        return embeddings

    def select_items(self, kind: str, visual_input, kwargs) -> tuple[torch.Tensor, ...]:
        """Each image's (``kind`` "image") or video's kept rows (K, width + 6): the merged tokens
        (and their side outputs), then their (t, h, w) grid offsets (:func:`offset_channels`)."""
        pixels_name = "pixel_values" if kind == "image" else "pixel_values_videos"
        require_pixels(visual_input)
        grid_thw = visual_input[f"{kind}_grid_thw"].tolist()
        texts = prompt_text_per_image(kwargs, len(grid_thw), kind)
        settings = self.settings_per_image(kwargs, len(grid_thw), kind)
        pixel_values = visual_input[pixels_name]  # (S, C): every item's patches
        patches = pixel_values.split([t * h * w for t, h, w in grid_thw])  # (t*h*w, C) each

        def run_tower(chosen: list[int]) -> list[EncodedImage]:
            pixels = pixel_values if len(chosen) == len(patches) else torch.cat([patches[i] for i in chosen])
            requirements = {settings[item].selector.requires for item in chosen}
            return self.encode_patches(pixels, [grid_thw[item] for item in chosen], requirements, kind)

        encoded = self.encode_images(patches, [(kind, *grid) for grid in grid_thw], settings, run_tower)
        t_factors = self.temporal_factors(visual_input, len(grid_thw)) if kind == "video" else [1.0] * len(grid_thw)
        tower = self.visual

        def merge(features: torch.Tensor) -> torch.Tensor:
            """The merger on (K, m*m*C) merge groups -> (K, D): a merging method's tokens."""
            return tower.merger(features.reshape(-1, features.shape[-1] // tower.spatial_merge_size**2))

        kept_rows = []
        for one, text, own, (t, h, w), t_factor in zip(encoded, texts, settings, grid_thw, t_factors):
            rows, cols = h // tower.spatial_merge_size, w // tower.spatial_merge_size
            item = one.item
            if kind == "video":  # the budget units of the request's video budget, as the HF adapter makes them
                item.units = video_units(
                    t,
                    rows * cols,
                    (rows, cols),
                    item.features.device,
                    own.video_budget,
                    (rows, cols) if t == 1 else None,
                )
            tokens = self.keep_image_tokens(item, text, own, one.saliency_kind, one.key_heads, merge)
            offsets = self.kept_offsets(item.keep.nonzero().squeeze(-1), rows, cols, t_factor)  # (K, 3)
            side_outputs = list(item.sent_side_outputs.values())  # Qwen3-VL's DeepStack, (K, D) each
            kept_rows.append(torch.cat([tokens, *side_outputs, offset_channels(offsets).to(tokens.dtype)], dim=1))
        return tuple(kept_rows)

    def temporal_factors(self, video_input, num_videos: int) -> list[float]:
        """Each video's t factor: the M-RoPE temporal step of one grid slice, as vLLM's
        ``iter_mm_grid_thw`` takes it (seconds per slice, 1 when absent, times ``tokens_per_second``)."""
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        seconds = video_input.get("second_per_grid_ts")
        per_video = [1.0] * num_videos if seconds is None else [float(value) for value in seconds.reshape(-1)]
        return [second * tokens_per_second for second in per_video]

    def kept_offsets(self, indices: torch.Tensor, rows: int, cols: int, t_factor: float) -> torch.Tensor:
        """(K, 3) long: the kept tokens' (t, h, w) offsets from their run's first position; the
        temporal one is the slice's index times the t factor, truncated as vLLM does."""
        slices = indices // (rows * cols)
        temporal = (slices.double() * t_factor).long()
        return torch.stack([temporal, indices % (rows * cols) // cols, indices % cols], dim=1)

    def encode_patches(
        self, pixel_values: torch.Tensor, grid_thw: list[list[int]], requirements: set[frozenset[str]], kind: str
    ) -> list[EncodedImage]:
        """Each image (or video) before selection, from the items' pixel patches (S, C) and
        their (t, h, w) grids, for methods of these ``requirements``: one tower pass."""
        tower = self.visual
        attention = self.saliency_attention
        metadata = tower.prepare_encoder_metadata(grid_thw)
        with tap_rotated_queries_and_keys(attention) as tap, tap_merger_input(self.merger_norm()) as merger_input:
            output = tower(pixel_values, grid_thw=grid_thw, encoder_metadata=metadata)  # (M, width)
        projected, side_outputs = self.split_tower_output(output)  # (M, D), name -> (M, D)
        group = tower.spatial_merge_size**2
        hidden = merger_input["hidden"]  # (S, 1, C), in the tower's order
        num_merged = hidden.shape[0] // group
        # Qwen2.5-VL runs merge groups window by window, and reverse_indices restores each
        # image's raster; Qwen2-VL runs them in raster order.
        reverse_indices = metadata.get("reverse_indices")
        model_order = (
            torch.arange(num_merged, device=projected.device)
            if reverse_indices is None
            else reverse_indices.to(projected.device)
        )
        features = hidden.reshape(num_merged, group * hidden.shape[-1])[model_order]  # (M, m*m*C)
        # The tower attends within each temporal slice (an image is one), as its own cu_seqlens do.
        patches_per_slice = [h * w for t, h, w in grid_thw for _ in range(t)]
        cu_seqlens = torch.tensor([0, *np.cumsum(patches_per_slice)], device=tap.queries.device)
        heads = attention.num_attention_heads_per_partition
        scale = attention.hidden_size_per_attention_head**-0.5
        received = segmented_received_attention(tap.queries, tap.keys, heads, cu_seqlens, scale)  # (S,)
        received = mean_over_tensor_parallel_heads(received, attention)
        saliency = received.view(num_merged, group).mean(dim=1)[model_order]  # (M,)
        keys = None
        if any("keys" in need for need in requirements):
            keys = gather_tensor_parallel_channels(tap.keys, attention)  # (S, C_k)
            keys = keys.view(num_merged, group, -1).mean(dim=1)[model_order]  # (M, C_k)

        images = []
        start = 0
        for t, h, w in grid_thw:
            rows, cols = h // tower.spatial_merge_size, w // tower.spatial_merge_size
            one = slice(start, start + t * rows * cols)
            start = one.stop
            positions = torch.arange(one.stop - one.start, device=features.device)
            item = VisualItem(
                kind,
                features[one],
                tokens=projected[one],  # the tower merges every group before any selection
                side_outputs={name: value[one] for name, value in side_outputs.items()},
                saliency=saliency[one],
                keys=None if keys is None else keys[one],
                # A video's units follow its request's video budget: select_items sets them.
                units=[ImageSelection.of(kind, [TokenRegion(positions, (rows, cols) if t == 1 else None)])],
            )
            images.append(EncodedImage(item, "received", tower.num_heads))
        return images

    def merger_norm(self):
        """The merger's first norm, whose input is the tower's last hidden states."""
        return self.visual.merger.ln_q

    def split_tower_output(self, output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The tower's output (M, width) as the tokens (M, D) and the side outputs pruned with them."""
        return output, {}


class PrunedQwen2_5_VLProcessingInfo(PrunedQwenVLInfoMixin, Qwen2_5_VLProcessingInfo):
    pass


class PrunedQwen2_5_VLMultiModalProcessor(PrunedQwenVLProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2_5_VLMultiModalProcessor, info=PrunedQwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class PrunedQwen2_5_VL(PrunedQwenVLMixin, Qwen2_5_VLForConditionalGeneration):
    pass


class PrunedQwen2VLProcessingInfo(PrunedQwenVLInfoMixin, Qwen2VLProcessingInfo):
    pass


class PrunedQwen2VLMultiModalProcessor(PrunedQwenVLProcessorMixin, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2VLMultiModalProcessor, info=PrunedQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class PrunedQwen2VL(PrunedQwenVLMixin, Qwen2VLForConditionalGeneration):
    pass
