"""Qwen2-VL and Qwen2.5-VL: saliency of the packed ViT, image by image."""

from __future__ import annotations

import torch

import flashvlm
from flashvlm.saliency import received_attention, segmented_received_attention

from . import case_named, tiny_model


def test_segmented_received_attention_matches_a_dense_block_diagonal_reference():
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 3, 5, 1, 5]
    queries, keys = torch.randn(2, sum(lengths), 8, generator=generator).unbind(0)
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    heads = queries.view(-1, 2, 4).transpose(0, 1), keys.view(-1, 2, 4).transpose(0, 1)  # (H, S, d)
    logits = heads[0] @ heads[1].transpose(-1, -2) * 0.5
    logits = logits.masked_fill(segment[:, None] != segment[None, :], float("-inf"))
    expected = torch.softmax(logits, dim=-1).sum(dim=1).mean(dim=0)
    actual = segmented_received_attention(queries, keys, 2, cu_seqlens, chunk_size=4)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(received_attention(queries[None, :5], keys[None, :5], 2)[0], expected[:5])


def test_qwen_images_never_attend_across_image_boundaries():
    model = tiny_model(case_named("qwen2_5_vl"))
    adapter = flashvlm.adapter_for(model)
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(64, 24, generator=generator), torch.randn(24, 24, generator=generator)
    with torch.no_grad():
        alone = adapter.encode(first, torch.tensor([[1, 8, 8]]), True)
        packed = adapter.encode(torch.cat([second, first]), torch.tensor([[1, 4, 6], [1, 8, 8]]), True)
    for name in ("features", "tokens", "saliency", "keys"):
        torch.testing.assert_close(getattr(packed, name)[6:], getattr(alone, name), atol=1e-5, rtol=0)
    # Features come back in the merged tokens' order (undoing the window reordering): the
    # merger on them gives the model's own merged tokens.
    with torch.no_grad():
        torch.testing.assert_close(adapter.project(packed.features), packed.tokens, atol=1e-5, rtol=0)
    assert torch.allclose(alone.saliency.sum(), torch.tensor(64.0 / 4))  # a merge group averages 4 patch scores
