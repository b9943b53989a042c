"""The diversity rules: bipartite removal kept bit for bit equal to the released loop, ties
included, and the registry of rules by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flashvlm.bench.selection_cost import ROUND_BY_ROUND_RULE
from flashvlm.errors import FlashVLMError
from flashvlm.selection import diversity, get_method
from flashvlm.selection.diversity import (
    DIVERSITY_RULES,
    bipartite_by_rounds,
    bipartite_diverse_subset,
    diverse_subset,
    register_diversity_rule,
)


def released_bipartite(features_normalized, residual, num_diverse, stable, removal_step=8):
    """The diversity loop of the release's ``encode_images`` (CaiKaitong/FlashVLM,
    llava/model/llava_arch.py), statement by statement; ``stable`` is the only addition
    (the release calls argsort with torch's default, ``stable=False``)."""
    batch = features_normalized.shape[0]
    rows = torch.arange(batch).unsqueeze(-1)
    while True:
        residual_tokens = features_normalized[rows, residual]
        r = min(removal_step, residual_tokens.shape[1] - num_diverse)
        if r <= 0:
            break
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = torch.matmul(a, b.transpose(-1, -2)).max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True, stable=stable)[:, r:]
        kept_even = residual[..., ::2][rows, distinct_indices]
        residual = torch.cat([kept_even, residual[..., 1::2]], dim=-1)
    return residual


def tie_prone_features(seed, batch, tokens, width, duplicated_share, coarse, dtype):
    """Unit rows with exact ties: copies of other tokens, or entries from {-1, 0, 1} (so that
    many different pairs share one cosine)."""
    generator = torch.Generator().manual_seed(seed)
    if coarse:
        features = torch.randint(-1, 2, (batch, tokens, width), generator=generator).float()
        features[..., 0] = 1.0  # no zero rows
    else:
        features = torch.randn(batch, tokens, width, generator=generator)
    copies = int(duplicated_share * tokens)
    if copies:
        source = torch.randint(0, tokens, (copies,), generator=generator)
        target = torch.randint(0, tokens, (copies,), generator=generator)
        features[:, target] = features[:, source]
    return F.normalize(features, dim=-1).to(dtype)


def candidate_lists(seed, batch, tokens, count):
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.stack([torch.randperm(tokens, generator=generator)[:count] for _ in range(batch)])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 2),
    tokens=st.integers(2, 420),
    width=st.sampled_from([3, 16, 64]),
    dropped=st.floats(0.0, 0.2),
    keep_share=st.floats(0.0, 1.0),
    duplicated_share=st.sampled_from([0.0, 0.3, 0.9]),
    coarse=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    stable=st.booleans(),
)
def test_bipartite_keeps_the_released_loops_indices(
    seed, batch, tokens, width, dropped, keep_share, duplicated_share, coarse, dtype, stable
):
    features = tie_prone_features(seed, batch, tokens, width, duplicated_share, coarse, dtype)
    candidates = candidate_lists(seed, batch, tokens, max(1, round(tokens * (1 - dropped))))
    num_keep = max(1, round(keep_share * candidates.shape[1]))
    expected = released_bipartite(features, candidates, num_keep, stable)
    assert torch.equal(bipartite_diverse_subset(features, candidates, num_keep, stable=stable), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stable", [True, False])
def test_llava_sized_lists_with_duplicates_match_the_released_loop(dtype, stable):
    """576 tokens (CLIP-L width in float32; narrower in half precision, slow on CPU), a third
    of them copies: exact ties in every round."""
    features = tie_prone_features(7, 2, 576, 1024 if dtype == torch.float32 else 128, 0.3, False, dtype)
    candidates = candidate_lists(7, 2, 576, 544)
    for num_keep in (16, 96):
        expected = released_bipartite(features, candidates, num_keep, stable)
        assert torch.equal(bipartite_diverse_subset(features, candidates, num_keep, stable=stable), expected)


def test_unlisted_neighbours_and_long_lists_fall_back_exactly(monkeypatch):
    """With one neighbour listed, most queries read their matrix row; above the matrix limit
    every round multiplies again. Both keep the released indices."""
    features = tie_prone_features(3, 2, 700, 32, 0.3, True, torch.float32)
    candidates = candidate_lists(3, 2, 700, 650)
    expected = released_bipartite(features, candidates, 40, False)
    monkeypatch.setattr(diversity, "NEIGHBOURS_LISTED", 1)
    assert torch.equal(bipartite_diverse_subset(features, candidates, 40, stable=False), expected)
    monkeypatch.setattr(diversity, "MAX_MATRIX_CANDIDATES", 100)
    assert not diversity.uses_similarity_matrix(650, None)
    assert torch.equal(bipartite_diverse_subset(features, candidates, 40, stable=False), expected)


@pytest.mark.parametrize("fraction", [None, 0.25, 1.0])
def test_round_by_round_reference_keeps_the_same_indices(fraction, monkeypatch):
    """The bench's round-by-round rule, chosen by name as ``@rounds`` methods choose it,
    never builds the similarity matrix the bipartite rule builds, and keeps its indices."""
    features = tie_prone_features(5, 2, 400, 24, 0.2, False, torch.float32)
    candidates = candidate_lists(5, 2, 400, 380)
    matrix_runs = []
    on_matrix = diversity._bipartite_on_similarity_matrix
    monkeypatch.setattr(
        diversity, "_bipartite_on_similarity_matrix", lambda *args: matrix_runs.append(1) or on_matrix(*args)
    )
    assert diversity.uses_similarity_matrix(380, None)
    fast = diverse_subset("bipartite", features, candidates, 30, removal_fraction=fraction)
    assert len(matrix_runs) == 1
    reference = diverse_subset(ROUND_BY_ROUND_RULE, features, candidates, 30, removal_fraction=fraction)
    assert len(matrix_runs) == 1
    assert torch.equal(diverse_subset("bipartite", features, candidates, 30, removal_fraction=fraction), fast)
    assert len(matrix_runs) == 2
    assert torch.equal(fast, reference)


def test_a_registered_rule_is_a_flashvlm_diversity_choice():
    def first_candidates(unit_features, candidates, num_keep, **bipartite_options):
        return candidates[:, :num_keep]

    with pytest.raises(FlashVLMError, match="diversity must be one of"):
        get_method("flashvlm", diversity="first_candidates")
    try:
        assert register_diversity_rule("first_candidates", first_candidates) is first_candidates
        register_diversity_rule("first_candidates", first_candidates)  # the same rule again: no error
        selector = get_method("flashvlm", diversity="first_candidates")
        ranking = torch.arange(10).expand(2, -1)
        keep = diversity.important_and_diverse(ranking, torch.ones(2, 10, 4), 6, 0.5, selector.diversity)
        assert torch.equal(keep, torch.arange(6).expand(2, -1))
    finally:
        del DIVERSITY_RULES["first_candidates"]
    with pytest.raises(FlashVLMError, match="already registered"):
        register_diversity_rule("bipartite", bipartite_by_rounds)
