"""InternVL3/3.5 in the Hugging Face format in vLLM with flashvlm: InternViT on dynamic tiles
plus a thumbnail, a 2 x 2 pixel shuffle, an MLP projector, contiguous positions.

vLLM serves ``InternVLForConditionalGeneration`` with its InternS1 class; the plug-in registers
its own under that name only (InternS1 checkpoints stay stock). Without the ``flashvlm`` key in
``hf_overrides`` every override below defers to vLLM's class. As in the HF adapter
(``flashvlm.adapters.internvl``):

- an image is one run, ``<img>``, tiles x 256 placeholders, ``</img>``: the plug-in cuts the
  run to the image's K, the markers stay (they are text, and guide the selection as in the
  prompt transformers expands);
- saliency is the CLS attention row of InternViT's last layer (vLLM's tower always runs every
  layer, so the plug-in refuses another ``vision_feature_layer``), averaged over each pixel-shuffle
  group; the tiles share the budget, selected jointly, and the thumbnail keeps its share
  (:func:`flashvlm.pipeline.tiled_image_unit`; each tile its own raster for pool);
- a video is one run per frame (``Frame1: <img>...</img>``), each frame one tile: K per frame;
  ``video_budget="per_video"`` is refused, as in transformers.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...errors import UnsupportedModelError
from ...pipeline import VisualItem, items_of_views, tiled_image_unit
from ...saliency import query_row_attention
from .processing import PrunedInfoMixin, PrunedProcessorMixin, cut_embedding_runs
from .pruned_model import PrunedModelMixin, prompt_text_per_image, require_pixels, tap_query_key
from .settings import SERVED_REQUIREMENTS, settings_of
from .vision_cache import EncodedImage

#: A video is one placeholder run per frame: its budget counts per frame only.
PER_FRAME_ONLY = ("per_frame",)


class PrunedInternVLProcessingInfo(PrunedInfoMixin, InternS1ProcessingInfo):
    flashvlm_video_budgets = PER_FRAME_ONLY


class PrunedInternVLMultiModalProcessor(PrunedProcessorMixin, InternS1MultiModalProcessor):
    flashvlm_modalities = ("image", "video")

    def flashvlm_token_ids(self) -> tuple[int, int]:
        """The image and video placeholder ids (vLLM's: a video's frames hold the video token)."""
        processor = self.info.get_hf_processor()
        return processor.image_token_id, self.info.get_tokenizer().convert_tokens_to_ids(processor.video_token)

    def flashvlm_placeholder_ids(self) -> frozenset[int]:
        return frozenset(self.flashvlm_token_ids())

    def flashvlm_image_placeholders(self, settings, stock, mm_items, item_idx: int):
        num_tokens = int(stock.is_embed(stock.full).sum())
        return cut_embedding_runs(stock, [settings.num_kept(num_tokens)])

    def flashvlm_video_placeholders(self, settings, stock, out_mm_kwargs, item_idx: int):
        num_frames = int(out_mm_kwargs["video"][item_idx]["video_num_patches"].data)
        per_frame = int(stock.is_embed(stock.full).sum()) // num_frames
        return cut_embedding_runs(stock, settings.num_kept_per_frame(num_frames, per_frame))

    def flashvlm_num_items(self, processed, modality: str) -> int:
        # Tiles and frames come flat: each item's count says how many are its.
        return len(processed.get("image_num_patches" if modality == "image" else "video_num_patches", ()))

    def flashvlm_guiding_prompt(self, prompt: list[int], processed, mm_items) -> list[int]:
        """The prompt with ``<img>``/``</img>`` around each image placeholder and each video laid
        out frame by frame (``Frame1: <img>`` ... ``</img>``, one placeholder per run), as in the
        prompt transformers expands. Needs every video of the prompt in ``processed``; where
        vLLM's processor cache held some, their frames' text is left out (docs/vllm.md)."""
        processor = self.info.get_hf_processor()
        image_token, video_token = self.flashvlm_token_ids()
        frames = iter(processed.get("video_num_patches", torch.empty(0)).tolist())
        tokenizer = self.info.get_tokenizer()
        expanded = []
        for token in prompt:
            if token == image_token:
                expanded += [processor.start_image_token_id, token, processor.end_image_token_id]
            elif token == video_token and (num_frames := next(frames, None)) is not None:
                run = f"{processor.start_image_token}{processor.video_token}{processor.end_image_token}"
                text = "\n".join(f"Frame{frame + 1}: {run}" for frame in range(num_frames))
                expanded += tokenizer.encode(text, add_special_tokens=False)
            else:
                expanded.append(token)
        return expanded


@MULTIMODAL_REGISTRY.register_processor(
    PrunedInternVLMultiModalProcessor, info=PrunedInternVLProcessingInfo, dummy_inputs=InternS1DummyInputsBuilder
)
class PrunedInternVL(PrunedModelMixin, InternS1ForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = settings_of(self.config, SERVED_REQUIREMENTS)
        if settings is not None and self.config.vision_feature_layer != -1:
            raise UnsupportedModelError(
                f"vision_feature_layer={self.config.vision_feature_layer!r}: vLLM's InternVL reads the tower's last "
                "layer; flashvlm serves InternVL with vision_feature_layer=-1 (InternVL3/3.5's)"
            )
        self.init_flashvlm(settings, SERVED_REQUIREMENTS, vllm_config)

    def embed_multimodal(self, **kwargs: object):
        if self.flashvlm is None:
            return super().embed_multimodal(**kwargs)
        embeddings: tuple[torch.Tensor, ...] = ()
        for modality, item_input in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if item_input is None:
                continue
            require_pixels(item_input)
            # Each item's tiles (an image's, thumbnail last) or frames: (T_i, 3, H, W) each.
            counts = torch.as_tensor(item_input["num_patches"]).tolist()
            items = list(item_input["pixel_values"].split(counts))
            if modality == "images":
                embeddings += self.keep_tiled_image_tokens(items, kwargs)
            else:
                embeddings += self.keep_video_tokens(items, kwargs, self.encode_tiles, self.multi_modal_projector)
        return embeddings

    def keep_tiled_image_tokens(self, images: list[torch.Tensor], kwargs: dict) -> tuple[torch.Tensor, ...]:
        """What the language model receives for each image of (T, 3, H, W) tiles: (K, D) each."""
        texts = prompt_text_per_image(kwargs, len(images))
        settings = self.settings_per_image(kwargs, len(images))
        encoded = self.encode_images(
            images,
            [None] * len(images),
            settings,
            lambda chosen: self.encode_tiles(
                [images[image] for image in chosen], {settings[image].selector.requires for image in chosen}
            ),
        )
        kept = []
        for one, text, own, tiles in zip(encoded, texts, settings, images):
            item = one.item
            tile_grids = "grid" in own.selector.requires
            item.units = [tiled_image_unit(len(tiles), item.length // len(tiles), item.features.device, tile_grids)]
            kept.append(
                self.keep_image_tokens(item, text, own, one.saliency_kind, one.key_heads, self.multi_modal_projector)
            )
        return tuple(kept)

    def shuffle(self, per_patch: torch.Tensor) -> torch.Tensor:
        """vLLM's pixel shuffle on (T, n, X) patch values -> (T, m, g * X), one row per LM token."""
        tiles, num_patches, width = per_patch.shape
        side = int(round(num_patches**0.5))
        shuffled = self.pixel_shuffle(per_patch.reshape(tiles, side, side, width), scale_factor=self.downsample_ratio)
        return shuffled.reshape(tiles, -1, shuffled.shape[-1])

    def group_mean(self, per_patch: torch.Tensor) -> torch.Tensor:
        """(T, n, X) -> (T, m, X): the mean over each pixel-shuffle group."""
        shuffled = self.shuffle(per_patch)
        return shuffled.view(*shuffled.shape[:2], -1, per_patch.shape[-1]).mean(dim=2)

    def encode_tiles(self, groups: list[torch.Tensor], requirements: set[frozenset[str]]) -> list[EncodedImage]:
        """Each item of (T_i, 3, H, W) tiles or frames before selection, one tower pass over all
        of them: shuffled features (T_i * m, g * C), CLS saliency (T_i * m,) and, for methods that
        read them, keys (T_i * m, C) and projected tokens (T_i * m, D), tile after tile."""
        needs = frozenset().union(*requirements)
        attention = self.vision_tower.encoder.layer[-1].attention
        # The q/k norms' outputs are the vectors the layer attends with.
        query, key = (
            (attention.q_norm, attention.k_norm) if attention.qk_normalization else (attention.q_proj, attention.k_proj)
        )
        with tap_query_key(query, key) as tap:
            hidden = self.vision_tower(pixel_values=torch.cat(groups))  # (T, 1 + n, C)
        features = self.shuffle(hidden[:, 1:])  # (T, m, g * C)
        cls_row = query_row_attention(tap.queries, tap.keys, attention.num_heads, 0, attention.scale)  # (T, 1 + n)
        saliency = self.group_mean(cls_row[:, 1:, None]).squeeze(-1)  # (T, m)
        keys = self.group_mean(tap.keys[:, 1:]) if "keys" in needs else None  # (T, m, C)
        tokens = self.multi_modal_projector(features) if "projected" in needs else None  # (T, m, D)
        stack = VisualItem("image", features, tokens=tokens, saliency=saliency, keys=keys)
        return [
            EncodedImage(item, "cls", attention.num_heads)
            for item in items_of_views(stack, [len(group) for group in groups])
        ]
