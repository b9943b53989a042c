"""Tensor building blocks shared by the selection methods (pure torch).

Every function works on a batch: a leading ``B`` dimension of images that share a
token count ``N``. Names follow docs/flashvlm.md; the diversity rules are in
:mod:`flashvlm.selection.diversity`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Added to min-max denominators, as in the authors' release, so constant rows map to 0.
MINMAX_EPS = 1e-6


def minmax(values: torch.Tensor, eps: float = MINMAX_EPS) -> torch.Tensor:
    """Rescale each row (last dim) to [0, 1]; a constant row becomes all zeros."""
    low = values.amin(dim=-1, keepdim=True)
    high = values.amax(dim=-1, keepdim=True)
    return (values - low) / (high - low + eps)


def masked_softmax_pool(similarity: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft maximum over the last dim: ``sum_j softmax_j(S_ij / T) * S_ij`` over masked-in ``j``.

    similarity: (B, N, L); mask: (B, L) bool. Rows whose mask is empty give 0.
    """
    logits = (similarity / temperature).masked_fill(~mask[:, None, :], float("-inf"))
    has_text = mask.any(dim=-1)  # (B,)
    # An all-masked row would be softmax over -inf only (NaN); give it a harmless 0 instead.
    logits = torch.where(has_text[:, None, None], logits, torch.zeros_like(logits))
    weights = torch.softmax(logits, dim=-1)
    pooled = (weights * similarity.masked_fill(~mask[:, None, :], 0.0)).sum(dim=-1)
    return pooled * has_text[:, None]


def masked_max_pool(similarity: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hard maximum over masked-in text tokens; 0 where a row has no text. (B, N, L) -> (B, N)."""
    pooled = similarity.masked_fill(~mask[:, None, :], float("-inf")).amax(dim=-1)
    return torch.where(mask.any(dim=-1)[:, None], pooled, torch.zeros_like(pooled))


def masked_mean_pool(similarity: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked-in text tokens; 0 where a row has no text. (B, N, L) -> (B, N)."""
    total = similarity.masked_fill(~mask[:, None, :], 0.0).sum(dim=-1)
    count = mask.sum(dim=-1).clamp(min=1).to(similarity.dtype)
    return total / count[:, None]


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of ``tokens`` (B, N, C) at ``indices`` (B, K) -> (B, K, C)."""
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def max_cosine_to_set(
    queries: torch.Tensor, candidates: torch.Tensor, chunk_size: int = 4096, exclude_self: bool = False
) -> torch.Tensor:
    """For unit rows ``queries`` (B, A, C) and ``candidates`` (B, M, C): max_m <q_a, c_m>, (B, A).

    With ``exclude_self`` the two are the same set and ``a`` is not compared with itself
    (its nearest *other* token). Computed over query chunks so memory stays
    O(chunk_size * M), not O(A * M).
    """
    maxima = []
    for start in range(0, queries.shape[1], chunk_size):
        similarity = queries[:, start : start + chunk_size] @ candidates.transpose(-1, -2)  # (B, c, M)
        if exclude_self:
            places = torch.arange(similarity.shape[1], device=similarity.device)
            similarity[:, places, places + start] = float("-inf")
        maxima.append(similarity.amax(dim=-1))
    return torch.cat(maxima, dim=1)


def dpp_greedy_map(
    unit_features: torch.Tensor, quality: torch.Tensor, num_keep: int, eps: float = 1e-10
) -> torch.Tensor:
    """Greedy MAP of a DPP with kernel ``L = diag(q) U U^T diag(q)`` (CDPruner's selection).

    unit_features: (B, N, C) unit rows U; quality: (B, N) q >= 0. The fast greedy of Chen
    et al. (NeurIPS 2018): an incremental Cholesky factor, so each step adds the token with
    the largest marginal gain in log det. Kernel rows are computed when needed, so the N x N
    kernel is never built: O(K * N * (C + K)) time, O(K * N) memory. Once the kernel's rank
    is exhausted (gains ~ 0), the remaining picks add nothing and follow the gains' order.
    Returns (B, K) indices in pick order.
    """
    batch, num_tokens, _ = unit_features.shape
    rows = torch.arange(batch, device=unit_features.device)
    factors = unit_features.new_zeros(num_keep, batch, num_tokens)  # (K, B, N) Cholesky rows
    gains = quality**2  # (B, N) the kernel's diagonal, as <u_i, u_i> = 1
    taken = torch.zeros(batch, num_tokens, dtype=torch.bool, device=unit_features.device)
    chosen = torch.empty(batch, num_keep, dtype=torch.long, device=unit_features.device)
    for step in range(num_keep):
        pick = gains.masked_fill(taken, float("-inf")).argmax(dim=-1)  # (B,)
        chosen[:, step] = pick
        taken[rows, pick] = True
        cosine = (unit_features @ unit_features[rows, pick].unsqueeze(-1)).squeeze(-1)  # (B, N)
        kernel_row = quality[rows, pick, None] * cosine * quality  # (B, N)
        explained = torch.einsum("sb,sbn->bn", factors[:step, rows, pick], factors[:step])  # (B, N)
        gain = gains[rows, pick]  # (B,)
        # A non-positive gain means the pick is already spanned: it contributes nothing.
        factor = (kernel_row - explained) / gain.clamp(min=eps).sqrt()[:, None] * (gain > eps)[:, None]
        factors[step] = factor
        gains = gains - factor**2
    return chosen


def unit_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Row-normalise the last dim (zero rows stay zero)."""
    return F.normalize(tensor, dim=-1)
