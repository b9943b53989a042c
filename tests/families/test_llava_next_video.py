"""LLaVA-NeXT-Video: per-frame and per-video budgets, and frame saliency pooled like the frames."""

from __future__ import annotations

import torch

import flashvlm
from flashvlm.adapters import adapter_for

from . import case_named, tiny_model
from .shared import reference_attention


def test_llava_next_video_budget_per_frame_or_per_video():
    case = case_named("llava_next_video")
    model = tiny_model(case)
    inputs = case.make_inputs(model, 2, 0)
    with flashvlm.prune(model, budget=5, video_budget="per_frame") as pruner:
        per_frame = [record for record in pruner.prune_inputs(dict(inputs)).images if record.kind == "frame"]
    with flashvlm.prune(model, budget=0.5, video_budget="per_video") as pruner:
        per_video = [record for record in pruner.prune_inputs(dict(inputs)).images if record.kind == "video"]
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert [record.num_kept for record in per_frame] == [5] * 6 and {r.grid_shape for r in per_frame} == {(3, 3)}
    assert [(record.num_tokens, record.num_kept, record.grid_shape) for record in per_video] == [(27, 14, None)] * 2
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2


def test_llava_next_video_frame_saliency_is_the_cls_row_averaged_over_the_pooling_windows():
    case = case_named("llava_next_video")
    model = tiny_model(case)
    inputs = case.make_inputs(model, 1, 0)
    (video,) = adapter_for(model).video_items(inputs, frozenset({"saliency"}))
    frames = inputs["pixel_values_videos"][0]  # (F, 3, H, W)
    attention = reference_attention(model.model.vision_tower, frames, layer=-2)  # the feature layer
    cls_row = attention[:, :, 0, 1:].mean(dim=1).view(-1, 1, 6, 6)  # (F, 1, 6, 6) patch raster
    pooled = torch.nn.functional.avg_pool2d(cls_row, kernel_size=2).flatten(1)  # (F, 9)
    torch.testing.assert_close(video.saliency, pooled.flatten())
