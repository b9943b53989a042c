"""Qwen3-VL and Gemma 3: what each family adds to the shared adapter contract.

Qwen3-VL's DeepStack features follow the keep mask; Gemma 3's image tokens keep their
bidirectional block (token_type_ids) after pruning; every family runs in half precision.
"""

from __future__ import annotations

import copy

import pytest
import torch
from families import ADAPTER_TEST_CASES, case_named, tiny_model
from families.gemma3 import tiny_gemma3_processor
from families.shared import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID

import flashvlm


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ADAPTER_TEST_CASES, ids=lambda case: case.name)
def test_half_precision_never_gives_nan(case, dtype):
    model = copy.deepcopy(tiny_model(case)).to(dtype)
    inputs = case.make_inputs(model, 2, 0)
    inputs = {
        name: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        for name, value in inputs.items()
    }
    budget = max(1, case.tokens_per_image // 2)
    with flashvlm.prune(model, budget) as pruner, torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    assert all(record.num_kept == budget for record in pruner.last.images)


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
