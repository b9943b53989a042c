"""FlashVLM on the stock LlavaForConditionalGeneration: equivalence, lengths, batching, restoration."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from agreement import SelectionRecorder, alone_as_in_batch

import flashvlm
from flashvlm.adapters.llava import LlavaAdapter
from flashvlm.errors import FlashVLMError, UnsupportedModelError
from flashvlm.saliency import query_row_attention
from flashvlm.timing import PrefillTimer

from .llava import NUM_PATCHES, build_tiny_llava, llava_batch, llava_prompt
from .shared import IMAGE_TOKEN_ID, left_pad, random_pixels


def test_budget_at_least_n_gives_the_unpatched_logits(tiny_llava):
    inputs = llava_batch(tiny_llava, batch_size=3, seed=1)
    with torch.no_grad():
        reference = tiny_llava(**inputs).logits
        for budget in (NUM_PATCHES, 10_000, 1.0):
            with flashvlm.prune(tiny_llava, budget=budget):
                pruned = tiny_llava(**inputs).logits
            torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget", [1, 8, 0.25])
def test_prefill_holds_text_plus_k_per_image(tiny_llava, budget):
    inputs = llava_batch(tiny_llava, batch_size=3, seed=2)
    keep = flashvlm.selection.resolve_budget(budget, NUM_PATCHES)
    is_image = inputs["input_ids"] == IMAGE_TOKEN_ID
    text_lengths = (inputs["attention_mask"].bool() & ~is_image).sum(dim=1)
    images_per_row = is_image.sum(dim=1) // NUM_PATCHES
    expected_lengths = text_lengths + keep * images_per_row
    with flashvlm.prune(tiny_llava, budget=budget) as pruner, torch.no_grad():
        with PrefillTimer(tiny_llava.model.language_model) as timer:
            output = tiny_llava(**inputs, use_cache=True)
    assert timer.prefill_length == int(expected_lengths.max())
    assert output.past_key_values.get_seq_length() == int(expected_lengths.max())
    assert [image.num_kept for image in pruner.last.images] == [keep] * int(images_per_row.sum())
    assert pruner.last.model_kwargs["attention_mask"].sum(dim=1).tolist() == expected_lengths.tolist()


def test_generate_keeps_only_k_visual_tokens_in_the_cache(tiny_llava):
    inputs = llava_batch(tiny_llava, batch_size=2, seed=3)
    lengths = []
    hook = tiny_llava.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        with flashvlm.prune(tiny_llava, budget=4) as pruner, torch.no_grad():
            output = tiny_llava.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert lengths[0] == pruner.last.pruned_length < inputs["input_ids"].shape[1]
    assert lengths[1:] == [1, 1]
    # The caller gets its own prompt back, followed by the new tokens.
    assert torch.equal(output[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


def test_padded_batch_rows_generate_what_each_prompt_generates_alone():
    model = build_tiny_llava(seed=4)
    rows = [
        llava_prompt([5, 6, 7], image_at=1),
        llava_prompt([8, 9, 10, 11, 12, 13, 14, 15], image_at=5),
        llava_prompt([16, 17, 18, 19, 20], images=2, image_at=2),
    ]
    pixels = random_pixels(4, seed=4)
    image_slices = [slice(0, 1), slice(1, 2), slice(2, 4)]
    input_ids, attention_mask = left_pad(rows)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with flashvlm.prune(model, budget=8) as pruner, torch.no_grad():
        pruner.selector = recorder = SelectionRecorder(pruner.selector)
        batched = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, **settings)
        batch_rows = recorder.rows()
        for row, (prompt, images) in enumerate(zip(rows, image_slices)):
            # Selections compare as tests/agreement.py says (a near-tie: the row on the batch's choice).
            generate = partial(
                model.generate, input_ids=torch.tensor([prompt]), pixel_values=pixels[images], **settings
            )
            label = f"tiny LLaVA: row {row} alone vs padded"
            alone = alone_as_in_batch(pruner, recorder, batch_rows, "flashvlm", label, generate)
            assert batched[row, input_ids.shape[1] :].tolist() == alone[0, len(prompt) :].tolist()


def test_each_image_of_a_prompt_gets_the_budget(tiny_llava):
    input_ids = torch.tensor([llava_prompt([5, 6, 7, 8], images=3, image_at=2)])
    with flashvlm.prune(tiny_llava, budget=5) as pruner, torch.no_grad():
        tiny_llava(input_ids=input_ids, pixel_values=random_pixels(3))
    assert [(image.batch_index, image.num_kept) for image in pruner.last.images] == [(0, 5)] * 3
    assert pruner.last.pruned_length == input_ids.shape[1] - 3 * (NUM_PATCHES - 5)


def test_selection_uses_the_prompt_text(tiny_llava):
    pixels = random_pixels(1, seed=9)
    kept = []
    for text in ([5, 6, 7, 8], [40, 41, 42, 43, 44, 45]):
        with flashvlm.prune(tiny_llava, budget=4, method="flashvlm:text_only") as pruner, torch.no_grad():
            tiny_llava(input_ids=torch.tensor([llava_prompt(text)]), pixel_values=pixels)
        kept.append(pruner.last.images[0].keep_indices.tolist())
    assert kept[0] != kept[1]


def test_model_is_restored_exactly():
    model = build_tiny_llava(seed=5)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    instance_attributes = set(vars(model))
    hooks_before = [(m._forward_pre_hooks.copy(), m._forward_hooks.copy()) for m in model.modules()]
    with flashvlm.prune(model, budget=4), torch.no_grad():
        assert "generate" in vars(model)
        model(**llava_batch(model, 2))
        model.generate(**llava_batch(model, 2), max_new_tokens=2)
    assert set(vars(model)) == instance_attributes
    assert model.generate.__func__ is type(model).generate
    assert [(m._forward_pre_hooks, m._forward_hooks) for m in model.modules()] == hooks_before
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    assert model.model.vision_tower.config._attn_implementation == "sdpa"


def test_apply_and_remove_and_no_double_attach(tiny_llava):
    pruner = flashvlm.apply(tiny_llava, budget=4)
    try:
        with pytest.raises(FlashVLMError, match="already"):
            flashvlm.apply(tiny_llava, budget=8)
    finally:
        flashvlm.remove(tiny_llava)
    assert pruner.adapter is not None and not hasattr(tiny_llava, "_flashvlm_pruner")
    flashvlm.remove(tiny_llava)  # removing twice is harmless


def test_text_only_calls_are_untouched(tiny_llava):
    input_ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        reference = tiny_llava(input_ids=input_ids).logits
        with flashvlm.prune(tiny_llava, budget=4) as pruner:
            assert torch.equal(tiny_llava(input_ids=input_ids).logits, reference)
    assert pruner.last is None


def test_cls_attention_equals_eager_attention_probabilities():
    sdpa_model = build_tiny_llava(seed=6)
    eager_model = build_tiny_llava(seed=6, attn_implementation="eager")
    pixels = random_pixels(3, seed=6)
    adapter = LlavaAdapter(sdpa_model)
    layer = -2
    with torch.no_grad():
        features, queries, keys = adapter.encode_images(pixels, layer, "default", need_qk=True)
        heads = sdpa_model.model.vision_tower.config.num_attention_heads
        ours = query_row_attention(queries, keys, heads)[:, 1:]
        eager = eager_model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
    # The features come from hidden_states[-2], the output of layer L-2, whose attention is attentions[-2].
    reference = eager.attentions[layer][:, :, 0, 1:].mean(dim=1)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(features, eager.hidden_states[layer][:, 1:], atol=1e-5, rtol=0)


def test_half_precision_model_runs_without_nan():
    model = build_tiny_llava(seed=7).to(torch.bfloat16)
    inputs = llava_batch(model, 2)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with flashvlm.prune(model, budget=6) as pruner, torch.no_grad():
        logits = model(**inputs).logits
    assert not torch.isnan(logits).any()
    assert all(image.num_kept == 6 for image in pruner.last.images)


def test_unsupported_models_are_named():
    from transformers import LlamaConfig, LlamaForCausalLM

    text_model = LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    )
    with pytest.raises(UnsupportedModelError, match="no vision tower.*LlavaForConditionalGeneration"):
        flashvlm.prune(text_model, budget=4).__enter__()


def test_placeholder_mismatch_is_a_clear_error(tiny_llava):
    input_ids = torch.tensor([llava_prompt([5, 6], images=1)])
    with flashvlm.prune(tiny_llava, budget=4), pytest.raises(FlashVLMError, match="placeholder"):
        tiny_llava(input_ids=input_ids, pixel_values=random_pixels(2))


def test_inputs_embeds_only_is_a_clear_error(tiny_llava):
    embeds = tiny_llava.get_input_embeddings()(torch.tensor([llava_prompt([5, 6])]))
    with flashvlm.prune(tiny_llava, budget=4), pytest.raises(FlashVLMError, match="input_ids"):
        tiny_llava(inputs_embeds=embeds, pixel_values=random_pixels(1))


def test_beam_search_and_dict_outputs_get_the_callers_prompt_back(tiny_llava):
    inputs = llava_batch(tiny_llava, batch_size=2, seed=8)
    length = inputs["input_ids"].shape[1]
    settings = dict(max_new_tokens=3, min_new_tokens=3)
    with flashvlm.prune(tiny_llava, budget=8), torch.no_grad():
        beams = tiny_llava.generate(**inputs, num_beams=2, num_return_sequences=2, **settings)
        as_dict = tiny_llava.generate(**inputs, return_dict_in_generate=True, output_scores=True, **settings)
    assert beams.shape == (4, length + 3)
    assert torch.equal(beams[:, :length], inputs["input_ids"].repeat_interleave(2, dim=0))
    assert as_dict.sequences.shape == (2, length + 3) and len(as_dict.scores) == 3
