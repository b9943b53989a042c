"""LLaVA-OneVision: several images in one prompt get their base view only."""

from __future__ import annotations

import torch

import flashvlm

from . import case_named, tiny_model
from .shared import IMAGE_TOKEN_ID, anyres_batch, placeholder_counts


def test_onevision_multi_image_prompt():
    model = tiny_model(case_named("llava_onevision"))
    inputs = anyres_batch(model, batch_size=2, seed=0)
    # Both images in row 0's prompt: the model then encodes their base views only.
    both = dict(inputs, batch_num_images=torch.tensor([2]))
    base_tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    ids = [1, 5] + [IMAGE_TOKEN_ID] * (base_tokens + 1) * 2 + [6, 7, 8]
    both["input_ids"] = torch.tensor([ids])
    both["attention_mask"] = torch.ones_like(both["input_ids"])
    with torch.no_grad():
        expected = model(**both).logits
        with flashvlm.prune(model, budget=10_000):
            torch.testing.assert_close(model(**both).logits, expected, atol=1e-5, rtol=0)
        with flashvlm.prune(model, budget=7) as pruner:
            pruned = pruner.prune_inputs(dict(both))
    assert [record.num_tokens for record in pruned.images] == [base_tokens, base_tokens]
    assert int(placeholder_counts(model, pruned.model_kwargs["input_ids"])[0]) == 2 * (7 + 1)
