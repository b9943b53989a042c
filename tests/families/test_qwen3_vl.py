"""Qwen3-VL: its DeepStack features follow the keep mask."""

from __future__ import annotations

import pytest
import torch

import flashvlm

from . import case_named, tiny_model
from .shared import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID


def prefill_arguments(model, inputs: dict, budget: int) -> tuple[dict, flashvlm.Pruner]:
    """The keyword arguments the language model's prefill receives under pruning."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs), with_kwargs=True
    )
    try:
        with flashvlm.prune(model, budget) as pruner, torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen[-1], pruner


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_vl_video"])
def test_qwen3_deepstack_features_are_pruned_with_the_keep_mask(name):
    case = case_named(name)
    model = tiny_model(case)
    inputs = case.make_inputs(model, 2, 0)
    with torch.no_grad():
        full = {}
        for kind, pixels, grid in (
            ("image", "pixel_values", "image_grid_thw"),
            ("video", "pixel_values_videos", "video_grid_thw"),
        ):
            if pixels in inputs:
                output = model.model.get_image_features(inputs[pixels], inputs[grid], return_dict=True)
                full[kind] = [torch.cat(layer) for layer in output.deepstack_features]  # (T, D) per layer
    prefill, pruner = prefill_arguments(model, inputs, budget=3)
    pruned_ids = pruner.last.model_kwargs["input_ids"]
    is_visual = prefill["visual_pos_masks"]
    assert torch.equal(is_visual, torch.isin(pruned_ids, torch.tensor([IMAGE_TOKEN_ID, VIDEO_TOKEN_ID])))
    # The tokens each record keeps, in placeholder order per kind, index the unpruned features.
    kept = {kind: [] for kind in full}
    offset = {kind: 0 for kind in full}
    for record in pruner.last.images:
        kind = "image" if record.kind == "image" else "video"
        kept[kind].append(record.keep_indices + offset[kind])
        offset[kind] += record.num_tokens
    is_kind = {"image": pruned_ids == IMAGE_TOKEN_ID, "video": pruned_ids == VIDEO_TOKEN_ID}
    assert len(prefill["deepstack_visual_embeds"]) == len(model.config.vision_config.deepstack_visual_indexes) == 2
    for layer, sent in enumerate(prefill["deepstack_visual_embeds"]):  # (T', D) in sequence order
        for kind, features in full.items():
            expected = features[layer][torch.cat(kept[kind])]
            torch.testing.assert_close(sent[is_kind[kind][is_visual]], expected, atol=1e-6, rtol=0)
