"""The selection algorithm on its own: contract, properties, edge cases, validation."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashvlm
from flashvlm import FlashVLM, SelectionInputs
from flashvlm.errors import BudgetError, FlashVLMError, MethodUnavailableError
from flashvlm.selection import get_method, parse_budget, resolve_budget, validate_budget
from flashvlm.selection.flashvlm import sharpen


def random_inputs(seed: int, batch: int = 2, tokens: int = 36, text: int = 5, dim: int = 16, width: int = 12):
    generator = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(batch, text, dtype=torch.bool)
    if batch > 1:
        text_mask[-1, text - 2 :] = False  # rows have different text lengths
    return SelectionInputs(
        features=torch.randn(batch, tokens, width, generator=generator),
        saliency=torch.softmax(torch.randn(batch, tokens, generator=generator) * 3, dim=-1),
        saliency_kind="cls",
        projected=torch.randn(batch, tokens, dim, generator=generator),
        text_embeds=torch.randn(batch, text, dim, generator=generator),
        text_mask=text_mask,
    )


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), tokens=st.integers(1, 80), budget=st.integers(1, 100), text=st.integers(1, 6))
def test_keeps_exactly_k_unique_sorted_in_range(seed, tokens, budget, text):
    inputs = random_inputs(seed, tokens=tokens, text=text)
    indices = FlashVLM()(inputs, budget).indices
    expected = min(budget, tokens)
    assert indices.shape == (2, expected)
    for row in indices:
        assert row.unique().numel() == expected
        assert bool((row[1:] > row[:-1]).all())
        assert 0 <= int(row.min()) and int(row.max()) < tokens


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.integers(1, 40))
def test_permuting_text_tokens_keeps_the_same_tokens(seed, budget):
    inputs = random_inputs(seed, batch=1, text=6)
    permutation = torch.randperm(6, generator=torch.Generator().manual_seed(seed + 1))
    shuffled = SelectionInputs(**{**vars(inputs), "text_embeds": inputs.text_embeds[:, permutation]})
    assert torch.equal(FlashVLM()(inputs, budget).indices, FlashVLM()(shuffled, budget).indices)


def test_batched_equals_one_image_at_a_time():
    inputs = random_inputs(3, batch=3)
    batched = FlashVLM()(inputs, 10).indices
    for row in range(3):
        single = SelectionInputs(
            **{k: v[row : row + 1] if isinstance(v, torch.Tensor) else v for k, v in vars(inputs).items()}
        )
        single.text_embeds = single.text_embeds[:, : int(single.text_mask.sum())]
        single.text_mask = single.text_mask[:, : int(single.text_mask.sum())]
        assert torch.equal(FlashVLM()(single, 10).indices[0], batched[row])


def test_deterministic():
    inputs = random_inputs(7)
    assert torch.equal(FlashVLM()(inputs, 9).indices, FlashVLM()(inputs, 9).indices)


@pytest.mark.parametrize("preset", sorted(FlashVLM.presets))
def test_degenerate_inputs_give_no_nan(preset):
    method = get_method(f"flashvlm:{preset}")
    constant = SelectionInputs(
        features=torch.ones(2, 16, 8),
        saliency=torch.full((2, 16), 1 / 16),
        saliency_kind="cls",
        projected=torch.ones(2, 16, 4),
        text_embeds=torch.ones(2, 1, 4),  # a single text token
        text_mask=torch.tensor([[True], [False]]),  # and a row with no text at all
        text_before_image=torch.tensor([[True], [True]]),
    )
    assert not torch.isnan(method.scores(constant)).any()
    for budget in (1, 2, 7, 15):
        indices = method(constant, budget).indices
        assert indices.shape == (2, budget)
        assert all(row.unique().numel() == budget for row in indices)


def test_half_precision_inputs_are_scored_in_float32():
    inputs = random_inputs(5)
    half = SelectionInputs(
        **{k: v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in vars(inputs).items()}
    )
    scores = FlashVLM().scores(half)
    assert scores.dtype == torch.float32 and not torch.isnan(scores).any()
    # In fp16 the sharpened relevance (t ** 2.5 of a softmax over tokens) underflows for
    # most tokens; in float32 it does not. This is why float32 is the default.
    relevance = torch.randn(1, 576) * 0.05
    assert int((sharpen(relevance.half()) > 0).sum()) < int((sharpen(relevance) > 0).sum())


def test_budget_at_least_n_keeps_everything_without_needing_inputs():
    features = torch.randn(2, 10, 4)
    indices = FlashVLM()(SelectionInputs(features=features), 10).indices
    assert torch.equal(indices, torch.arange(10).expand(2, 10))
    assert torch.equal(FlashVLM()(SelectionInputs(features=features), 1.0).indices, indices)


def test_missing_input_is_reported_by_name():
    with pytest.raises(MethodUnavailableError, match="saliency"):
        FlashVLM()(SelectionInputs(features=torch.randn(1, 10, 4)), 3)


def test_ratio_budget():
    assert resolve_budget(0.25, 576) == 144
    assert resolve_budget(1e-9, 576) == 1
    assert resolve_budget(1.0, 576) == 576
    assert resolve_budget(1000, 576) == 576
    assert FlashVLM()(random_inputs(0, tokens=40), 0.25).indices.shape == (2, 10)


@pytest.mark.parametrize("bad", [0, -3, 1.5, 0.0, -0.2, float("nan"), float("inf"), "64", None, True])
def test_bad_budget_is_rejected_with_the_value(bad):
    with pytest.raises(BudgetError, match=re.escape(repr(bad))):
        validate_budget(bad)


@pytest.mark.parametrize("text,expected", [("64", 64), ("0.25", 0.25), ("25%", 0.25), (" 7 ", 7)])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["0", "-4", "1.5", "abc", "", "150%"])
def test_parse_budget_rejects(text):
    with pytest.raises(BudgetError):
        parse_budget(text)


@pytest.mark.parametrize(
    "field,value",
    [
        ("text_weight", 1.5),
        ("important_ratio", -0.1),
        ("sharpening_temperature", 0.0),
        ("top_fraction", 0.0),
        ("removal_step", 0),
        ("aggregation", "median"),
        ("score_dtype", "float64"),
        ("eps", math.nan),
    ],
)
def test_bad_parameters_are_rejected_by_name(field, value):
    with pytest.raises(FlashVLMError, match=field):
        FlashVLM(**{field: value})


def test_registry_and_presets():
    assert "flashvlm" in flashvlm.available_methods()
    assert get_method("flashvlm:text_only").text_weight == 1.0
    assert get_method("flashvlm", text_weight=0.3).text_weight == 0.3
    with pytest.raises(FlashVLMError, match="unknown method"):
        get_method("nope")
    with pytest.raises(FlashVLMError, match="no preset"):
        get_method("flashvlm:nope")
    with pytest.raises(FlashVLMError, match="no parameter"):
        get_method("flashvlm", temperature=1.0)


def test_the_selection_code_and_the_shared_pipeline_import_no_engine():
    # Both engines drive them (the HF adapters and the vLLM classes), so neither may depend on one.
    import ast
    from pathlib import Path

    import flashvlm

    package = Path(flashvlm.__file__).parent
    imported = {}
    for path in [*sorted((package / "selection").glob("*.py")), package / "pipeline.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            imported[path.name] = imported.get(path.name, set()) | {name.split(".")[0] for name in names}
    assert "pipeline.py" in imported
    assert {
        name: found & {"transformers", "vllm"} for name, found in imported.items() if found & {"transformers", "vllm"}
    } == {}
