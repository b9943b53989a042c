"""Gemma 3: image tokens keep their bidirectional block (token_type_ids) after pruning,
saliency pooled like the patches, and its own processor."""

from __future__ import annotations

import torch

import flashvlm

from . import case_named, tiny_model
from .gemma3 import tiny_gemma3_processor
from .shared import IMAGE_TOKEN_ID


def test_gemma3_image_tokens_keep_their_bidirectional_block():
    case = case_named("gemma3")
    model = tiny_model(case)
    inputs = case.make_inputs(model, 3, 0)
    with flashvlm.prune(model, budget=5) as pruner:
        pruned = pruner.prune_inputs(dict(inputs)).model_kwargs
    is_image = pruned["input_ids"] == IMAGE_TOKEN_ID
    assert torch.equal(pruned["token_type_ids"].bool(), is_image)
    # Each image's kept tokens stay one contiguous run, so the model's mask makes it one block.
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    assert starts.sum(dim=1).tolist() == [1, 1, 2]
    assert is_image.sum(dim=1).tolist() == [5, 5, 10]


def test_gemma3_saliency_is_pooled_like_the_patches():
    case = case_named("gemma3")
    model = tiny_model(case)
    inputs = case.make_inputs(model, 1, 0)
    adapter = flashvlm.adapter_for(model)
    with torch.no_grad():
        items = adapter.visual_items(inputs, frozenset({"saliency", "projected"}))
        expected = model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
    assert items[0].saliency.shape == (16,)
    # Attention received sums to the patch count; pooling 2 x 2 blocks averages 4 patches.
    torch.testing.assert_close(items[0].saliency.sum(), torch.tensor(64.0 / 4))
    torch.testing.assert_close(items[0].tokens, expected[0], atol=1e-5, rtol=0)


def gemma3_chat(question: str) -> str:
    return f"<bos><start_of_turn>user\n<start_of_image> {question}<end_of_turn>\n<start_of_turn>model\n"


def test_gemma3_through_its_own_processor():
    from PIL import Image

    model, processor = tiny_model(case_named("gemma3")), tiny_gemma3_processor()
    questions = ["what is the color of the circle ?", "how many red square are there ?"]
    images = [[Image.new("RGB", (40, 36), "red")], [Image.new("RGB", (30, 30), "blue")]]
    inputs = processor(images=images, text=[gemma3_chat(q) for q in questions], return_tensors="pt", padding=True)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "token_type_ids"}
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = model(**inputs).logits
        with flashvlm.prune(model, 10_000):
            torch.testing.assert_close(model(**inputs).logits[real], expected[real], atol=1e-5, rtol=0)
        with flashvlm.prune(model, 5, "flashvlm:question", tokenizer=processor) as pruner:
            output = model.generate(**inputs, question=questions, max_new_tokens=2, do_sample=False)
    assert output.shape == (2, inputs["input_ids"].shape[1] + 2)
    pruned = pruner.last.model_kwargs
    assert torch.equal(pruned["token_type_ids"].bool(), pruned["input_ids"] == IMAGE_TOKEN_ID)
    assert [record.num_kept for record in pruner.last.images] == [5, 5]
