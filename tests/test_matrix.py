"""Every registered method on every tiny model family: the one contract, checked the same way.

Each (family, method) pair either runs or cannot, decided by what the method ``requires``
and what the family cannot serve (``TinyCase.lacks``: SigLIP and the Qwen ViT have no CLS
attention row, so ``visionzip`` and ``vispruner`` refuse them, while their ``:received``
variants, ranked by attention received, run on them). A pair that runs: exactly K selectable tokens per budget unit reach the
language model (LLaVA-NeXT/OneVision newline tokens travel outside the budget), generation
works, a left-padded batch row keeps the same tokens and gives the same last-position
logits as that prompt alone, and nothing is NaN. A pair that cannot run raises
:class:`MethodUnavailableError` naming what is missing and why.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from agreement import SelectionRecorder, alone_as_in_batch
from families import ADAPTER_TEST_FAMILIES, EVERY_CASE, tiny_model
from families.shared import kept_per_row, placeholder_counts, selectable_tokens_sent

import flashvlm
from flashvlm.adapters import adapter_for
from flashvlm.catalog import compared_methods
from flashvlm.errors import MethodUnavailableError
from flashvlm.selection import SelectionInputs, available_methods, get_method
from flashvlm.selection.base import REQUIREMENTS

CASES = EVERY_CASE

METHODS = available_methods()
#: Every method and the CLS-free variants, as the docs' methods x families table lists them.
MATRIX_METHODS = compared_methods()


def missing_inputs(case, method: str) -> list[str]:
    """What ``method`` needs that the family of ``case`` cannot serve."""
    return sorted(get_method(method).requires & case.lacks)


def pairs(runnable: bool) -> list:
    return [
        pytest.param(case, method, id=f"{case.name}-{method}")
        for case in CASES
        for method in MATRIX_METHODS
        if bool(missing_inputs(case, method)) != runnable
    ]


RUNNABLE, UNAVAILABLE = pairs(runnable=True), pairs(runnable=False)


def budget_for(case) -> int:
    """12 (not a square), or less where the smallest unit is smaller, so every unit is pruned."""
    return min(12, case.tokens_per_image - 1)


def test_the_matrix_exercises_every_input_and_every_family_runs_most_methods():
    # Every method, each preset too (``release_saliency`` is asked for only by release presets).
    configurations = [get_method(method) for method in METHODS]
    configurations += [get_method(f"{method}:{preset}") for method in METHODS for preset in get_method(method).presets]
    assert set().union(*(selector.requires for selector in configurations)) == REQUIREMENTS
    assert all(case.lacks <= REQUIREMENTS for case in CASES)
    assert {case.name for case, _ in (param.values for param in RUNNABLE)} == {case.name for case in CASES}


@pytest.mark.parametrize(("case", "method"), RUNNABLE)
def test_exactly_k_tokens_per_unit_reach_the_language_model(case, method):
    model = tiny_model(case)
    inputs = case.make_inputs(model, batch_size=3, seed=1)
    budget = budget_for(case)
    masks, widths = [], []
    # The 2-D mask the multimodal model gets (its language model may get a mask mapping, as
    # Gemma 3's does), and the width of every language-model call.
    hooks = [
        model.model.register_forward_pre_hook(
            lambda _m, _a, kwargs: masks.append(kwargs["attention_mask"].clone()), with_kwargs=True
        ),
        adapter_for(model).language_model.register_forward_pre_hook(
            lambda _m, _a, kwargs: widths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
        ),
    ]
    try:
        with flashvlm.prune(model, budget, method) as pruner, torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    records, pruned_kwargs = pruner.last.images, pruner.last.model_kwargs
    keeps_all = get_method(method).keeps_all
    assert min(record.num_tokens for record in records) == case.tokens_per_image
    assert [record.num_kept for record in records] == [record.num_tokens if keeps_all else budget for record in records]
    assert torch.equal(selectable_tokens_sent(model, pruned_kwargs), kept_per_row(records, 3))
    # The prefill is the last language-model call (fastv's scoring pass runs before it):
    # it sees the prompt's text and the visual tokens sent, nothing else.
    text = inputs["attention_mask"].sum(dim=1) - placeholder_counts(model, inputs["input_ids"])
    sent = placeholder_counts(model, pruned_kwargs["input_ids"])
    assert len(masks) == 1 and widths[-1] == masks[-1].shape[1]
    assert masks[-1].sum(dim=1).tolist() == (text + sent).tolist()


@pytest.mark.parametrize(("case", "method"), RUNNABLE)
def test_generation_works(case, method):
    model = tiny_model(case)
    inputs = case.make_inputs(model, batch_size=2, seed=2)
    with flashvlm.prune(model, budget_for(case), method), torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    length = inputs["input_ids"].shape[1]
    assert output.shape == (2, length + 3)
    assert torch.equal(output[:, :length], inputs["input_ids"])


@pytest.mark.parametrize(("case", "method"), RUNNABLE)
def test_batch_rows_are_independent_and_finite(case, method):
    model = tiny_model(case)
    inputs = case.make_inputs(model, batch_size=3, seed=3)
    # A batch and a single row run the tower with other shapes: their inputs agree to the last
    # bits, so kept tokens compare as tests/agreement.py says.
    with flashvlm.prune(model, budget_for(case), method) as pruner, torch.no_grad():
        pruner.selector = recorder = SelectionRecorder(pruner.selector)
        batch_logits = model(**inputs).logits
        assert torch.isfinite(batch_logits).all()
        batch_rows = recorder.rows()
        batch_kept = [(record.batch_index, record.keep_indices.tolist()) for record in pruner.last.images]
        for row in range(3):
            label = f"{case.name} {method}: row {row} alone vs in a batch"
            forward = partial(model, **case.select_row(inputs, row))
            alone = alone_as_in_batch(pruner, recorder, batch_rows, method, label, forward)
            if alone is None:  # a merging method on a near-tie
                continue
            alone_kept = [record.keep_indices.tolist() for record in pruner.last.images]
            assert alone_kept == [kept for batch_row, kept in batch_kept if batch_row == row]
            # left padding: the last position is real
            torch.testing.assert_close(alone.logits[0, -1], batch_logits[row, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("case", "method"), UNAVAILABLE)
def test_a_method_the_family_cannot_serve_says_what_is_missing(case, method):
    model = tiny_model(case)
    inputs = case.make_inputs(model, batch_size=2, seed=0)
    needs = pytest.raises(MethodUnavailableError, match=f"method '{method}' needs ")
    with flashvlm.prune(model, budget_for(case), method), torch.no_grad(), needs as error:
        model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)
    for need in missing_inputs(case, method):
        assert f"{need} (" in str(error.value)
    # Each missing input is named with why this family lacks it.
    for need, why in (("cls_attention", "no CLS token"), ("grid", "no known grid")):
        assert need not in missing_inputs(case, method) or why in str(error.value)


@pytest.mark.parametrize("case", [case for case in CASES if case.video], ids=lambda case: case.name)
def test_pool_says_a_jointly_selected_video_has_no_grid(case):
    model = tiny_model(case)
    inputs = case.make_inputs(model, batch_size=1, seed=0)
    needs_grid = pytest.raises(MethodUnavailableError, match="needs grid")
    with flashvlm.prune(model, 4, "pool", video_budget="per_video") as pruner, needs_grid:
        pruner.prune_inputs(dict(inputs))


@pytest.mark.parametrize(
    "case", [case for case in CASES if case.family not in ADAPTER_TEST_FAMILIES], ids=lambda case: case.name
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_never_gives_nan(case, dtype):
    """A half-precision model given float32 pixels (test_adapters.py runs the other families,
    their inputs cast)."""
    model = copy.deepcopy(tiny_model(case)).to(dtype)
    inputs = case.make_inputs(model, 2, 4)
    with flashvlm.prune(model, budget=6) as pruner, torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    assert all(record.num_kept == 6 for record in pruner.last.images)


@pytest.mark.parametrize("method", METHODS)
def test_missing_input_raises_method_unavailable(method):
    selector = get_method(method)
    bare = SelectionInputs(features=torch.randn(2, 16, 8))  # only what every adapter has
    if not selector.requires:
        assert selector(bare, 4).indices.shape[0] == 2
        return
    with pytest.raises(MethodUnavailableError, match=method):
        selector(bare, 4)
