"""Tensor building blocks shared by the selection methods (pure torch).

Every function works on a batch: a leading ``B`` dimension of images that share a
token count ``N``. Names follow docs/method.md.
"""

from __future__ import annotations

import math

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


def bipartite_diverse_subset(
    unit_features: torch.Tensor,
    candidates: torch.Tensor,
    num_keep: int,
    removal_step: int = 8,
    stable: bool = True,
    removal_fraction: float | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Iterative bipartite removal of redundant tokens (VisPruner / FlashVLM step 6).

    unit_features: (B, N, C) row-normalised features; candidates: (B, R) token indices,
    in priority order. While more than ``num_keep`` remain: split the list alternately
    into A (even places) and B (odd places), score each a in A by its highest cosine to
    B, drop the most redundant members of A, and continue with
    [A kept, most redundant first] ++ B. Returns (B, num_keep) indices.
    ``stable=False`` breaks exact ties in redundancy the way torch's default sort does
    on the current device (what the released code does).

    How many are dropped per round:
    - ``removal_fraction=None`` (released): ``min(removal_step, surplus)``, so about
      ``(R - num_keep) / removal_step`` rounds, each O(R^2 C): cubic in N overall;
    - ``removal_fraction=f``: ``ceil(f * surplus)``, so O(log N) rounds.
    ``block_size=None`` (released) compares every a with every b (memory O(4096 * R)
    through :func:`max_cosine_to_set`); ``block_size=s`` compares a only with the b of
    its own block of ``s`` consecutive list places (s even), so a round costs
    O(R * s * C) time and O(R * s) memory. The list is reordered after every round, so
    blocks meet different neighbours each round. Lists of at most ``s`` places are
    scored exactly as with ``block_size=None``.
    """
    if num_keep <= 0:
        return candidates[:, :0]
    while True:
        surplus = candidates.shape[1] - num_keep
        if removal_fraction is None:
            num_drop = min(removal_step, surplus)
        else:
            num_drop = min(math.ceil(removal_fraction * surplus), surplus)
        if num_drop <= 0:
            return candidates
        tokens = gather_tokens(unit_features, candidates)  # (B, R, C)
        if block_size is None or candidates.shape[1] <= block_size:
            redundancy = max_cosine_to_set(tokens[:, ::2], tokens[:, 1::2])  # (B, ceil(R/2))
        else:
            redundancy = blockwise_max_cosine(tokens[:, ::2], tokens[:, 1::2], block_size // 2)
        kept_places = redundancy.argsort(dim=-1, descending=True, stable=stable)[:, num_drop:]
        candidates = torch.cat([candidates[:, ::2].gather(1, kept_places), candidates[:, 1::2]], dim=1)


def blockwise_max_cosine(queries: torch.Tensor, candidates: torch.Tensor, block: int) -> torch.Tensor:
    """max_m <q_a, c_m> over the candidates in the query's own block, (B, A).

    queries: (B, A, C), candidates: (B, M, C) unit rows with M in {A - 1, A}; query
    ``a`` is compared with candidates ``block * (a // block)`` up to the next block.
    A query whose block has no candidate scores -inf (never the most redundant).
    Memory O(A * block).
    """
    batch, num_queries, width = queries.shape
    num_blocks = -(-num_queries // block)
    padded = num_blocks * block
    query_blocks = F.pad(queries, (0, 0, 0, padded - num_queries)).view(batch, num_blocks, block, width)
    candidate_blocks = F.pad(candidates, (0, 0, 0, padded - candidates.shape[1])).view(batch, num_blocks, block, width)
    similarity = query_blocks @ candidate_blocks.transpose(-1, -2)  # (B, blocks, block, block)
    is_padding = torch.arange(padded, device=queries.device).view(num_blocks, 1, block) >= candidates.shape[1]
    similarity = similarity.masked_fill(is_padding, float("-inf"))
    return similarity.amax(dim=-1).reshape(batch, padded)[:, :num_queries]


def max_min_diverse_subset(unit_features: torch.Tensor, candidates: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Greedy max-min (farthest point) selection among ``candidates`` (DivPrune's rule).

    Starts from the first candidate (the highest-priority one) and repeatedly adds the
    candidate whose highest cosine to the chosen set is lowest. O(num_keep * R) time and
    O(R) extra memory per image. Returns (B, num_keep) indices.
    """
    batch, num_candidates = candidates.shape
    if num_keep <= 0:
        return candidates[:, :0]
    tokens = gather_tokens(unit_features, candidates)  # (B, R, C)
    chosen_places = torch.zeros(batch, num_keep, dtype=torch.long, device=candidates.device)
    closest = torch.full((batch, num_candidates), float("-inf"), dtype=tokens.dtype, device=tokens.device)
    taken = torch.zeros(batch, num_candidates, dtype=torch.bool, device=candidates.device)
    place = torch.zeros(batch, dtype=torch.long, device=candidates.device)
    rows = torch.arange(batch, device=candidates.device)
    for step in range(num_keep):
        chosen_places[:, step] = place
        taken[rows, place] = True
        similarity = (tokens @ tokens[rows, place].unsqueeze(-1)).squeeze(-1)  # (B, R)
        closest = torch.maximum(closest, similarity)
        place = closest.masked_fill(taken, float("inf")).argmin(dim=-1)
    return candidates.gather(1, chosen_places)


def kmeans_diverse_subset(
    unit_features: torch.Tensor, candidates: torch.Tensor, num_keep: int, iterations: int = 10
) -> torch.Tensor:
    """One representative per cluster of a spherical k-means over ``candidates``.

    Centroids start at the greedy max-min picks (a deterministic k-means++-like seeding),
    then ``iterations`` Lloyd steps on cosine similarity; each cluster is represented by
    its member closest to the centroid. A cluster left empty falls back to the
    highest-priority candidate not yet taken. O(iterations * R * num_keep * C) time,
    O(R * num_keep) memory. Returns (B, num_keep) indices.
    """
    batch, num_candidates = candidates.shape
    if num_keep <= 0:
        return candidates[:, :0]
    tokens = gather_tokens(unit_features, candidates)  # (B, R, C)
    places = torch.arange(num_candidates, device=candidates.device).expand(batch, -1)
    centroids = gather_tokens(tokens, max_min_diverse_subset(tokens, places, num_keep))  # (B, k, C)
    for step in range(iterations + 1):
        similarity = tokens @ centroids.transpose(-1, -2)  # (B, R, k)
        membership = F.one_hot(similarity.argmax(dim=-1), num_keep).to(tokens.dtype)  # (B, R, k)
        sizes = membership.sum(dim=1)  # (B, k)
        if step == iterations:
            break
        centroids = torch.where(sizes[..., None] > 0, unit_rows(membership.transpose(1, 2) @ tokens), centroids)
    closest = similarity.masked_fill(membership == 0, float("-inf")).argmax(dim=1)  # (B, k) places
    chosen = torch.where(sizes > 0, closest, -1)
    for row in (sizes == 0).any(dim=1).nonzero().flatten().tolist():
        free = torch.ones(num_candidates, dtype=torch.bool, device=candidates.device)
        free[chosen[row][chosen[row] >= 0]] = False
        empty = (chosen[row] < 0).nonzero().flatten()
        chosen[row, empty] = free.nonzero().flatten()[: empty.numel()]
    return candidates.gather(1, chosen)


#: Rules for choosing a diverse subset, by name (FlashVLM's ``diversity`` option).
DIVERSITY_RULES = ("bipartite", "max_min", "kmeans")


def diverse_subset(
    rule: str, unit_features: torch.Tensor, candidates: torch.Tensor, num_keep: int, **bipartite_options
) -> torch.Tensor:
    """``num_keep`` diverse members of ``candidates`` (B, R) by one of :data:`DIVERSITY_RULES`.

    ``bipartite_options`` (removal_step, stable, removal_fraction, block_size) go to
    :func:`bipartite_diverse_subset`.
    """
    if rule == "bipartite":
        return bipartite_diverse_subset(unit_features, candidates, num_keep, **bipartite_options)
    if rule == "max_min":
        return max_min_diverse_subset(unit_features, candidates, num_keep)
    return kmeans_diverse_subset(unit_features, candidates, num_keep)


def important_and_diverse(
    ranking: torch.Tensor,
    unit_features: torch.Tensor,
    num_keep: int,
    important_ratio: float,
    rule: str = "bipartite",
    **bipartite_options,
) -> torch.Tensor:
    """The top ``floor(important_ratio * num_keep)`` of ``ranking`` (B, N), then a diverse rest.

    The split VisPruner introduced and FlashVLM reuses. Returns (B, num_keep) indices.
    """
    num_important = math.floor(important_ratio * num_keep)
    important, rest = ranking[:, :num_important], ranking[:, num_important:]
    diverse = diverse_subset(rule, unit_features, rest, num_keep - num_important, **bipartite_options)
    return torch.cat([important, diverse], dim=1)


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
