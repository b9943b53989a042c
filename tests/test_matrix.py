"""Every registered method on every tiny model family: the one contract, checked the same way.

For each (method, family): exactly K visual tokens per image reach the language model,
generation works, a left-padded batch row gives the same logits and the same kept tokens
as that prompt alone, nothing is NaN, and a method missing an input says so.
"""

from __future__ import annotations

import pytest
import torch

import flashvlm
from flashvlm.adapters import adapter_for
from flashvlm.errors import MethodUnavailableError
from flashvlm.selection import SelectionInputs, available_methods, get_method

METHODS = available_methods()
BUDGET = 12  # not a square, and well under the 64 tokens a tiny image has
_MODELS: dict[str, torch.nn.Module] = {}


def model_for(case) -> torch.nn.Module:
    if case.name not in _MODELS:
        _MODELS[case.name] = case.build()
    return _MODELS[case.name]


def expected_kept(method: str, case) -> int:
    return case.tokens_per_image if get_method(method).keeps_all else min(BUDGET, case.tokens_per_image)


@pytest.mark.parametrize("method", METHODS)
def test_exactly_k_tokens_reach_the_language_model(method, tiny_case):
    model = model_for(tiny_case)
    inputs = tiny_case.make_inputs(model, batch_size=3, seed=1)
    adapter = adapter_for(model)
    calls = []
    hook = adapter.language_model.register_forward_pre_hook(
        lambda _m, _a, kwargs: calls.append(kwargs["attention_mask"].clone()), with_kwargs=True
    )
    try:
        with flashvlm.prune(model, BUDGET, method) as pruner, torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    keep = expected_kept(method, tiny_case)
    is_placeholder = inputs["input_ids"] == model.config.image_token_id
    images_per_row = is_placeholder.sum(dim=1) // tiny_case.tokens_per_image
    text_per_row = (inputs["attention_mask"].bool() & ~is_placeholder).sum(dim=1)
    prefill_mask = calls[-1]  # a scoring pass (fastv) runs before the prefill
    assert prefill_mask.sum(dim=1).tolist() == (text_per_row + images_per_row * keep).tolist()
    assert [image.num_kept for image in pruner.last.images] == [keep] * int(images_per_row.sum())


@pytest.mark.parametrize("method", METHODS)
def test_generation_works(method, tiny_case):
    model = model_for(tiny_case)
    inputs = tiny_case.make_inputs(model, batch_size=2, seed=2)
    with flashvlm.prune(model, BUDGET, method), torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    length = inputs["input_ids"].shape[1]
    assert output.shape == (2, length + 3)
    assert torch.equal(output[:, :length], inputs["input_ids"])


@pytest.mark.parametrize("method", METHODS)
def test_batch_rows_are_independent_and_finite(method, tiny_case):
    model = model_for(tiny_case)
    inputs = tiny_case.make_inputs(model, batch_size=3, seed=3)
    with flashvlm.prune(model, BUDGET, method) as pruner, torch.no_grad():
        batch_logits = model(**inputs).logits[:, -1]  # (B, V); left padding: the last position is real
        batch_kept = [(image.batch_index, image.keep_indices.tolist()) for image in pruner.last.images]
        assert torch.isfinite(batch_logits).all()
        for row in range(3):
            alone_logits = model(**tiny_case.select_row(inputs, row)).logits[:, -1]
            alone_kept = [image.keep_indices.tolist() for image in pruner.last.images]
            assert alone_kept == [kept for batch_row, kept in batch_kept if batch_row == row]
            torch.testing.assert_close(alone_logits[0], batch_logits[row], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_missing_input_raises_method_unavailable(method):
    selector = get_method(method)
    bare = SelectionInputs(features=torch.randn(2, 16, 8))  # only what every adapter has
    if not selector.requires:
        assert selector(bare, 4).indices.shape[0] == 2
        return
    with pytest.raises(MethodUnavailableError, match=method):
        selector(bare, 4)
