"""InternVL: saliency against InternViT's own attention maps, tiles sharing one image budget
with the thumbnail, and the tile layout it assumes."""

from __future__ import annotations

import pytest
import torch

import flashvlm
from flashvlm import FlashVLMError
from flashvlm.adapters import adapter_for

from . import case_named, tiny_model
from .internvl import build_tiny_internvl, internvl_batch
from .shared import TOKENS_PER_TILE, reference_attention


@pytest.mark.parametrize("qk_norm", [False, True], ids=["internvit-300m", "internvit-6b-qk-norm"])
def test_internvl_saliency_is_the_cls_row_averaged_over_each_shuffle_group(qk_norm):
    model = build_tiny_internvl(use_qk_norm=qk_norm, norm_type="rms_norm" if qk_norm else "layer_norm")
    inputs = internvl_batch(model, 2, 0)
    adapter = adapter_for(model)
    stack = adapter.encode_tiles(inputs["pixel_values"], inputs, frozenset({"saliency"}))
    attention = reference_attention(model.model.vision_tower, inputs["pixel_values"], layer=-1)
    cls_row = attention[:, :, 0, 1:].mean(dim=1)  # (P, n)
    torch.testing.assert_close(stack.saliency, adapter.group_mean(cls_row[..., None]).squeeze(-1))
    assert stack.saliency.shape == (inputs["pixel_values"].shape[0], TOKENS_PER_TILE)


def test_internvl_tiles_share_the_image_budget_with_the_thumbnail():
    model = tiny_model(case_named("internvl"))
    inputs = internvl_batch(model, 1, 0)  # one image: 2 tiles + thumbnail, 48 tokens
    with flashvlm.prune(model, budget=12) as pruner:
        (record,) = pruner.prune_inputs(dict(inputs)).images
    assert (record.num_tokens, record.num_kept, record.grid_shape) == (48, 12, None)
    # The thumbnail (last 16 tokens) keeps round(12 * 16 / 48) = 4; the tiles keep 8 between them.
    assert int((record.keep_indices >= 32).sum()) == 4
    tiles, thumbnail = record.regions
    assert (tiles.positions.numel(), tiles.grid_shape, thumbnail.grid_shape) == (32, None, (4, 4))


def test_internvl_per_tile_budget_gives_each_tile_and_the_thumbnail_its_share():
    model = tiny_model(case_named("internvl"))
    inputs = internvl_batch(model, 1, 0)
    with flashvlm.prune(model, budget=12, tile_budget="per_tile") as pruner:
        (record,) = pruner.prune_inputs(dict(inputs)).images
    assert [region.grid_shape for region in record.regions] == [(4, 4)] * 3
    assert torch.bincount(record.keep_indices // 16, minlength=3).tolist() == [4, 4, 4]


def test_internvl_image_processor_puts_the_thumbnail_after_the_tiles():
    """The layout the adapter assumes: an image's tiles in order, then its thumbnail."""
    from PIL import Image
    from transformers import GotOcr2ImageProcessorPil

    processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=2)
    wide = Image.fromarray(torch.randint(0, 256, (32, 64, 3), dtype=torch.uint8).numpy())
    tiled = processor(images=[wide], return_tensors="pt")
    whole = processor(images=[wide], crop_to_patches=False, return_tensors="pt")
    assert tiled["num_patches"].tolist() == [3]
    torch.testing.assert_close(tiled["pixel_values"][-1], whole["pixel_values"][0])


def test_internvl_placeholders_that_make_no_whole_tiles_are_a_clear_error():
    model = tiny_model(case_named("internvl"))
    inputs = internvl_batch(model, 1, 0)
    inputs["pixel_values"] = inputs["pixel_values"][:2]
    with flashvlm.prune(model, budget=4), pytest.raises(FlashVLMError, match="whole tiles of 16 tokens"):
        model(**inputs)
