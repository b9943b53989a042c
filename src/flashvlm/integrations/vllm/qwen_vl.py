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
   grid, three extra channels that travel through vLLM's encoder cache with the row (as
   EVS carries its positions, ``SupportsMultiModalPruning``);
3. ``embed_input_ids`` strips those channels before vLLM merges the rows into the prompt,
   and ``forward`` adds them to the slots' positions.

EVS's own route (the model runner calling ``recompute_mrope_positions``) is not used: the
runner takes it only when ``video_pruning_rate`` is set, and it lets text after an image
continue from the *pruned* positions, which is not what the HF adapter does.

Videos are not pruned: with the switch on they are served as stock vLLM serves them.
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

from ...errors import FlashVLMError, UnsupportedModelError
from ...pipeline import ImageSelection, TokenRegion, VisualItem
from ...saliency import segmented_received_attention
from .processing import PrunedInfoMixin, PrunedProcessorMixin
from .pruned_model import (
    PrunedModelMixin,
    QKTap,
    gather_tensor_parallel_channels,
    mean_over_tensor_parallel_heads,
    prompt_text_per_image,
)
from .settings import SERVED_REQUIREMENTS, settings_of
from .vision_cache import EncodedImage

#: What this path hands a method: Qwen's tower has no CLS token, so no CLS attention row.
QWEN_SERVED_REQUIREMENTS = SERVED_REQUIREMENTS - {"cls_attention"}

#: Extra channels on each kept row: its (t, h, w) offset inside the image's merged grid.
POSITION_CHANNELS = 3


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
    def flashvlm_placeholder_ids(self) -> frozenset[int]:
        config = self.info.get_hf_config()
        return frozenset({config.image_token_id, config.video_token_id})

    def flashvlm_num_images(self, processed) -> int:
        # pixel_values holds every image's patches in one (S, C) tensor: count the grids.
        return len(processed.get("image_grid_thw", ()))


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
                    "other (with flashvlm on, videos are served unpruned)"
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

        Each image's ``K`` slots sit at the image's first position here; ``forward`` adds each
        kept token's (t, h, w) offset once the selection is known.
        """
        if self.flashvlm is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        pieces = []
        next_position = 0  # the position the next text token takes
        text_start = 0  # index in the prompt of the first token after the last visual run
        for offset, length, modality, grid in self.visual_runs(input_tokens, mm_features):
            text_length = offset - text_start
            pieces.append(np.broadcast_to(np.arange(text_length), (3, text_length)) + next_position)
            first = next_position + text_length
            if modality == "image":
                pieces.append(np.full((3, length), first))
            else:  # videos are not pruned
                pieces.append(grid + first)
            next_position = first + int(grid.max()) + 1  # after the unpruned item
            text_start = offset + length
        tail = len(input_tokens) - text_start
        pieces.append(np.broadcast_to(np.arange(tail), (3, tail)) + next_position)
        positions = np.concatenate(pieces, axis=1).astype(np.int64)  # (3, L)
        end = next_position + tail
        return torch.from_numpy(positions), end - len(input_tokens)

    def visual_runs(self, input_tokens, mm_features):
        """The prompt's visual placeholder runs in order, each (offset, length, modality, grid):
        ``grid`` (3, n) holds the run's unpruned (t, h, w) positions from its first."""
        features = sorted(mm_features, key=lambda feature: feature.mm_position.offset)
        for feature, (offset, grid_t, grid_h, grid_w, t_factor) in zip(features, self.iter_mm_grid_thw(features)):
            grid = np.indices((grid_t, grid_h, grid_w)).reshape(3, -1)  # (3, t*h*w)
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).astype(np.int64)
            yield offset, feature.mm_position.length, feature.modality, grid

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
        for item in multimodal_embeddings:
            if item.shape[-1] == width + POSITION_CHANNELS:  # a pruned image's kept rows
                rows.append(copy_mm_embedding_modality(item, item[:, :width]))
                offsets.append(item[:, width:].round().long())
            else:  # a video's rows, at the positions vLLM gave them
                rows.append(item)
                offsets.append(torch.zeros(item.shape[0], POSITION_CHANNELS, dtype=torch.long, device=item.device))
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
            if item_input is None:
                continue
            if modality in ("image", "images"):  # Qwen2.5-VL's key, Qwen2-VL's
                embeddings += self.select_images(item_input, kwargs)
            else:
                embeddings += tuple(self._process_video_input(item_input))
        return embeddings

    def select_images(self, image_input, kwargs) -> tuple[torch.Tensor, ...]:
        """Each image's kept rows (K, width + 3): the merged tokens (and their side outputs), then
        their (t, h, w) grid offsets."""
        if image_input["type"] != "pixel_values":
            raise FlashVLMError("flashvlm selects from pixels; precomputed image_embeds carry no encoder saliency")
        grid_thw = image_input["image_grid_thw"].tolist()
        texts = prompt_text_per_image(kwargs, len(grid_thw))
        settings = self.settings_per_image(kwargs, len(grid_thw))
        pixel_values = image_input["pixel_values"]  # (S, C): every image's patches
        patches = pixel_values.split([t * h * w for t, h, w in grid_thw])  # (t*h*w, C) each

        def run_tower(chosen: list[int]) -> list[EncodedImage]:
            pixels = pixel_values if len(chosen) == len(patches) else torch.cat([patches[i] for i in chosen])
            requirements = {settings[image].selector.requires for image in chosen}
            return self.encode_patches(pixels, [grid_thw[image] for image in chosen], requirements)

        images = self.encode_images(patches, [tuple(grid) for grid in grid_thw], settings, run_tower)
        tower = self.visual

        def merge(features: torch.Tensor) -> torch.Tensor:
            """The merger on (K, m*m*C) merge groups -> (K, D): a merging method's tokens."""
            return tower.merger(features.reshape(-1, features.shape[-1] // tower.spatial_merge_size**2))

        kept_rows = []
        for image, text, own, (_, h, w) in zip(images, texts, settings, grid_thw):
            rows, cols = h // tower.spatial_merge_size, w // tower.spatial_merge_size
            tokens = self.keep_image_tokens(image.item, text, own, image.saliency_kind, image.key_heads, merge)
            indices = image.item.keep.nonzero().squeeze(-1)
            offsets = torch.stack([indices // (rows * cols), indices % (rows * cols) // cols, indices % cols], dim=1)
            side_outputs = list(image.item.sent_side_outputs.values())  # Qwen3-VL's DeepStack, (K, D) each
            kept_rows.append(torch.cat([tokens, *side_outputs, offsets.to(tokens.dtype)], dim=1))  # (K, width + 3)
        return tuple(kept_rows)

    def encode_patches(
        self, pixel_values: torch.Tensor, grid_thw: list[list[int]], requirements: set[frozenset[str]]
    ) -> list[EncodedImage]:
        """Each image before selection, from the images' pixel patches (S, C) and their (t, h, w)
        grids, for methods of these ``requirements``: one tower pass."""
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
        patches_per_image = [t * h * w for t, h, w in grid_thw]
        cu_seqlens = torch.tensor([0, *np.cumsum(patches_per_image)], device=tap.queries.device)
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
                "image",
                features[one],
                tokens=projected[one],  # the tower merges every group before any selection
                side_outputs={name: value[one] for name, value in side_outputs.items()},
                saliency=saliency[one],
                keys=None if keys is None else keys[one],
                units=[ImageSelection.of("image", [TokenRegion(positions, (rows, cols) if t == 1 else None)])],
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
