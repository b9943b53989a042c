"""FlashVLM's bipartite diversity step with the near-N-log-N options (removal_fraction, diversity_block).

The default path is checked bit for bit against the release in test_release_parity.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashvlm import FlashVLM, get_method
from flashvlm.errors import FlashVLMError
from flashvlm.selection.diversity import bipartite_diverse_subset, blockwise_max_cosine


def unit_features(batch: int, tokens: int, width: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, tokens, width, generator=generator), dim=-1)


def test_blockwise_max_cosine_equals_brute_force_per_block():
    queries, candidates = unit_features(2, 23, seed=1), unit_features(2, 22, seed=2)
    block = 4
    result = blockwise_max_cosine(queries, candidates, block)
    for a in range(23):
        start = block * (a // block)
        members = candidates[:, start : start + block]
        expected = (queries[:, a : a + 1] @ members.transpose(-1, -2)).amax(dim=-1).squeeze(-1)
        if members.shape[1] == 0:
            expected = torch.full((2,), float("-inf"))
        torch.testing.assert_close(result[:, a], expected)


@pytest.mark.parametrize("fraction,block", [(0.25, None), (None, 64), (0.25, 64), (1.0, 8), (0.5, 2)])
def test_fast_options_keep_a_subset_of_the_candidates(fraction, block):
    features = unit_features(2, 500)
    candidates = torch.stack([torch.randperm(500, generator=torch.Generator().manual_seed(b))[:400] for b in range(2)])
    kept = bipartite_diverse_subset(features, candidates, 37, removal_fraction=fraction, block_size=block)
    assert kept.shape == (2, 37)
    for row in range(2):
        assert len(set(kept[row].tolist())) == 37
        assert set(kept[row].tolist()) <= set(candidates[row].tolist())


def test_a_block_larger_than_the_list_changes_nothing():
    features = unit_features(1, 300)
    candidates = torch.arange(300).flip(0).unsqueeze(0)
    released = bipartite_diverse_subset(features, candidates, 40)
    assert torch.equal(bipartite_diverse_subset(features, candidates, 40, block_size=1024), released)


@pytest.mark.parametrize("step,fraction,block", [(10, None, None), (8, 1.0, 4), (8, 1.0, 64)])
def test_a_round_drops_the_tokens_that_have_a_duplicate(step, fraction, block):
    """Tokens 2j (j < 10) are copies of 2j + 1: one round removing 10 drops exactly them."""
    features = unit_features(1, 100, width=32, seed=3)
    copies = torch.arange(0, 20, 2)
    features[:, copies] = features[:, copies + 1]
    candidates = torch.arange(100).unsqueeze(0)
    kept = bipartite_diverse_subset(
        features, candidates, 90, removal_step=step, removal_fraction=fraction, block_size=block
    )
    assert set(range(100)) - set(kept[0].tolist()) == set(copies.tolist())


def test_fast_diversity_preset_and_validation():
    selector = get_method("flashvlm:fast_diversity")
    assert selector.removal_fraction == 0.25 and selector.diversity_block == 1024
    assert FlashVLM().removal_fraction is None and FlashVLM().diversity_block is None
    for bad in ({"removal_fraction": 0.0}, {"removal_fraction": 1.5}, {"diversity_block": 3}, {"diversity_block": 0}):
        with pytest.raises(FlashVLMError):
            FlashVLM(**bad)
