"""FlashVLM's diversity rules (steps 5-7 of the method).

The rules choose ``num_keep`` mutually dissimilar tokens among ``candidates``:
- ``bipartite``: the released iterative bipartite removal (FlashVLM, VisPruner), with
  its coarser options ``removal_fraction`` and ``block_size``;
- ``max_min``: greedy farthest-point selection (DivPrune's rule);
- ``kmeans``: one representative per spherical k-means cluster.
:data:`DIVERSITY_RULES` holds them by name; :func:`register_diversity_rule` adds one.

Every function works on a batch: unit rows ``unit_features`` (B, N, C) and candidate
token indices (B, R) in priority order; images in a batch share R.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import FlashVLMError
from .ops import gather_tokens, max_cosine_to_set, unit_rows

#: Rounds on lists of at most this many places gather and multiply their features exactly
#: as the release does. The similarity matrix serves longer lists only: a matmul gives an
#: entry a value that may depend on the operands' sizes when they are small (torch's CPU
#: float32 matmul does below 24 rows), and the release multiplies this round's halves.
DIRECT_ROUND_PLACES = 128
#: Most similar candidates listed per candidate for the rounds' scans; a query whose list
#: holds no member of this round's other half reads its row of the matrix instead.
NEIGHBOURS_LISTED = 16
#: Whole-list bipartite removal keeps an R x R similarity matrix per image up to this many
#: candidates (600 MB in float32); longer lists re-multiply every round, in chunks.
MAX_MATRIX_CANDIDATES = 12_288


def removal_count(remaining: int, num_keep: int, removal_step: int, removal_fraction: float | None) -> int:
    """Tokens one bipartite round drops from a list of ``remaining`` down to ``num_keep``."""
    surplus = remaining - num_keep
    if removal_fraction is None:
        return min(removal_step, surplus)
    return min(math.ceil(removal_fraction * surplus), surplus)


def uses_similarity_matrix(num_candidates: int, block_size: int | None) -> bool:
    """Whether :func:`bipartite_diverse_subset` runs on one similarity matrix for these settings
    (lists short enough to be multiplied as released in every round do not need one)."""
    fits = DIRECT_ROUND_PLACES < num_candidates <= MAX_MATRIX_CANDIDATES
    return block_size is None and fits


def bipartite_diverse_subset(
    unit_features: torch.Tensor,
    candidates: torch.Tensor,
    num_keep: int,
    removal_step: int = 8,
    stable: bool = True,
    removal_fraction: float | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Iterative bipartite removal of redundant tokens (FlashVLM step 6, VisPruner).

    unit_features: (B, N, C) row-normalised features; candidates: (B, R) token indices,
    in priority order. While more than ``num_keep`` remain: split the list alternately
    into A (even places) and B (odd places), score each a in A by its highest cosine to
    B, drop the most redundant members of A, and continue with
    [A kept, most redundant first] ++ B. Returns (B, num_keep) indices.
    ``stable=False`` breaks exact ties in redundancy the way torch's default sort does
    on the current device (what the released code does).

    How many are dropped per round:
    - ``removal_fraction=None`` (released): ``min(removal_step, surplus)``, so about
      ``(R - num_keep) / removal_step`` rounds;
    - ``removal_fraction=f``: ``ceil(f * surplus)``, so O(log R) rounds.

    Cost with ``block_size=None`` (released: every a against every b): the candidates'
    cosine matrix once, O(R^2 C), and its 16 nearest neighbours per row, O(R^2); then
    each round is a short scan of those lists, O(R) per round, a row read where a list
    holds no member of B. Time O(R^2 C) overall, memory O(R^2) per image (up to
    :data:`MAX_MATRIX_CANDIDATES`; longer lists re-multiply each round as the release
    does, O(rounds R^2 C) time, O(4096 R) memory). The kept indices equal the release's,
    ties included, wherever the device's matmul gives an entry the same value for any
    operand sizes from :data:`DIRECT_ROUND_PLACES` / 2 rows up (checked for torch's
    CPU matmul in float32, float16 and bfloat16; rounds on shorter lists multiply as
    released).

    ``block_size=s`` compares a only with the b of its own block of ``s`` consecutive
    list places (s even), so a round costs O(R * s * C) time and O(R * s) memory. The
    list is reordered after every round, so blocks meet different neighbours each round.
    Lists of at most ``s`` places are scored exactly as with ``block_size=None``.
    """
    if num_keep <= 0:
        return candidates[:, :0]
    if candidates.shape[1] > num_keep and uses_similarity_matrix(candidates.shape[1], block_size):
        return _bipartite_on_similarity_matrix(
            unit_features, candidates, num_keep, removal_step, stable, removal_fraction
        )
    return bipartite_by_rounds(unit_features, candidates, num_keep, removal_step, stable, removal_fraction, block_size)


def bipartite_by_rounds(
    unit_features: torch.Tensor,
    candidates: torch.Tensor,
    num_keep: int,
    removal_step: int = 8,
    stable: bool = True,
    removal_fraction: float | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """:func:`bipartite_diverse_subset` with no similarity matrix: every round multiplies the
    features it compares, as the release does (O(rounds R^2 C) time for whole lists).
    The same arguments, and the same kept indices.
    """
    if num_keep <= 0:
        return candidates[:, :0]
    while True:
        num_drop = removal_count(candidates.shape[1], num_keep, removal_step, removal_fraction)
        if num_drop <= 0:
            return candidates
        tokens = gather_tokens(unit_features, candidates)  # (B, R, C)
        if block_size is None or candidates.shape[1] <= block_size:
            redundancy = max_cosine_to_set(tokens[:, ::2], tokens[:, 1::2])  # (B, ceil(R/2))
        else:
            redundancy = blockwise_max_cosine(tokens[:, ::2], tokens[:, 1::2], block_size // 2)
        kept_places = redundancy.argsort(dim=-1, descending=True, stable=stable)[:, num_drop:]
        candidates = torch.cat([candidates[:, ::2].gather(1, kept_places), candidates[:, 1::2]], dim=1)


def _bipartite_on_similarity_matrix(
    unit_features: torch.Tensor,
    candidates: torch.Tensor,
    num_keep: int,
    removal_step: int,
    stable: bool,
    removal_fraction: float | None,
) -> torch.Tensor:
    """:func:`bipartite_diverse_subset` with ``block_size=None``, every round read off one matrix.

    A round needs, for each a in A, the largest cosine to any member of B. Each token's
    neighbours are listed once, most similar first; the first listed member of B gives
    that maximum (a larger one would be listed before it). Only the values the release
    would compute are compared, so the redundancy scores are the same numbers and the
    same sort orders them.
    """
    batch, num_candidates = candidates.shape
    device = candidates.device
    tokens = gather_tokens(unit_features, candidates)  # (B, R, C)
    similarity = tokens @ tokens.transpose(-1, -2)  # (B, R, R)
    listed = min(NEIGHBOURS_LISTED, num_candidates)
    # Places are flattened over the batch (image b's place p is b * R + p), so that every
    # lookup of a round is one indexing of a flat tensor.
    offsets = torch.arange(batch, device=device)[:, None] * num_candidates  # (B, 1)
    neighbours = similarity.topk(listed, dim=-1).indices  # (B, R, T) places, most similar first
    neighbours = (neighbours + offsets[..., None]).view(batch * num_candidates, listed)  # (B R, T)
    similarity_rows = similarity.view(batch * num_candidates, num_candidates)  # (B R, R)
    order = torch.arange(num_candidates, device=device) + offsets  # (B, M) flat places, in list order
    while True:
        remaining = order.shape[1]
        num_drop = removal_count(remaining, num_keep, removal_step, removal_fraction)
        if num_drop <= 0:
            return candidates.reshape(-1)[order]
        queries, partners = order[:, ::2], order[:, 1::2]  # (B, ceil(M/2)), (B, floor(M/2))
        if remaining <= DIRECT_ROUND_PLACES:
            listed_tokens = tokens.view(batch * num_candidates, -1)[order]  # (B, M, C)
            redundancy = max_cosine_to_set(listed_tokens[:, ::2], listed_tokens[:, 1::2])
        else:
            in_partners = torch.zeros(batch * num_candidates, dtype=torch.bool, device=device)
            in_partners[partners] = True
            nearest = neighbours[queries]  # (B, A, T)
            is_partner = in_partners[nearest]  # (B, A, T)
            first = is_partner.to(torch.uint8).argmax(dim=-1, keepdim=True)  # (B, A, 1): first listed partner
            closest = nearest.gather(2, first).squeeze(-1) - offsets  # (B, A) places
            redundancy = similarity_rows.view(-1)[queries * num_candidates + closest]  # (B, A)
            unlisted = (~is_partner.gather(2, first).squeeze(-1)).nonzero()  # (E, 2): (image, place in A)
            if unlisted.numel():
                image, place = unlisted.unbind(1)
                rows = similarity_rows[queries[image, place]]  # (E, R)
                redundancy[image, place] = rows.gather(1, partners[image] - offsets[image]).amax(dim=-1)
        kept_places = redundancy.argsort(dim=-1, descending=True, stable=stable)[:, num_drop:]
        order = torch.cat([queries.gather(1, kept_places), partners], dim=1)


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


#: A diversity rule: ``rule(unit_features, candidates, num_keep, **bipartite_options)`` ->
#: (B, num_keep) indices; the options are FlashVLM's (removal_step, stable, removal_fraction,
#: block_size), and a rule takes those it uses.
DiversityRule = Callable[..., torch.Tensor]


def _without_bipartite_options(rule: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]) -> DiversityRule:
    def call(unit_features: torch.Tensor, candidates: torch.Tensor, num_keep: int, **_bipartite_options):
        return rule(unit_features, candidates, num_keep)

    return call


#: Rules for choosing a diverse subset, by name (FlashVLM's ``diversity`` option).
DIVERSITY_RULES: dict[str, DiversityRule] = {
    "bipartite": bipartite_diverse_subset,
    "max_min": _without_bipartite_options(max_min_diverse_subset),
    "kmeans": _without_bipartite_options(kmeans_diverse_subset),
}


def register_diversity_rule(name: str, rule: DiversityRule) -> DiversityRule:
    """Make ``rule`` a choice of FlashVLM's ``diversity`` option, by ``name``. A name another
    rule holds raises :class:`FlashVLMError`."""
    if DIVERSITY_RULES.setdefault(name, rule) is not rule:
        raise FlashVLMError(f"diversity rule {name!r} is already registered")
    return rule


def diverse_subset(
    rule: str, unit_features: torch.Tensor, candidates: torch.Tensor, num_keep: int, **bipartite_options
) -> torch.Tensor:
    """``num_keep`` diverse members of ``candidates`` (B, R) by the rule of that name in
    :data:`DIVERSITY_RULES`."""
    return DIVERSITY_RULES[rule](unit_features, candidates, num_keep, **bipartite_options)


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
