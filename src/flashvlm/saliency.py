"""Encoder saliency from one layer's queries and keys (pure torch).

The released code asks the vision tower for ``output_attentions=True``, which forces
eager attention in every layer and materialises B x H x S x S maps. Saliency needs one
row (CLS attention) or one column sum (attention received), so we compute exactly that
from the query/key projections of the one layer, while the tower itself keeps
SDPA/FlashAttention.
"""

from __future__ import annotations

import torch


def _split_heads(projection: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S, H*d) -> (B, H, S, d)."""
    batch, length, width = projection.shape
    return projection.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def query_row_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    num_heads: int,
    query_index: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Post-softmax attention of one query position to every key, mean over heads.

    queries, keys: (B, S, H*d), the outputs of the layer's q/k projections.
    Returns (B, S) float32; row ``b`` sums to 1. For CLIP, ``query_index=0`` is the CLS row.
    """
    head_dim = queries.shape[-1] // num_heads
    scale = head_dim**-0.5 if scale is None else scale
    query = _split_heads(queries[:, query_index : query_index + 1].float(), num_heads)  # (B, H, 1, d)
    key = _split_heads(keys.float(), num_heads)  # (B, H, S, d)
    logits = (query @ key.transpose(-1, -2)).squeeze(-2) * scale  # (B, H, S)
    return torch.softmax(logits, dim=-1).mean(dim=1)


def release_cls_attention(
    queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float, first_key: int = 0
) -> torch.Tensor:
    """The CLS row as the LLaVA releases read it: every step in the projections' dtype.

    The releases ask transformers 4.37.2 (the version LLaVA pins) for ``output_attentions``
    and average the heads of the feature layer's map (``attentions[:, :, 0, 1:].mean(dim=1)``).
    Its eager ``CLIPAttention`` scales q *before* the product (``q_proj(h) * scale``), takes
    ``torch.bmm`` and a softmax without upcasting, all in the tower's dtype. This repeats those
    operations on the hooked projections, so the row is the release's bit for bit. The
    product runs over every query, as there: a one-query product is not always bit-equal
    to the first row of the full one (float32 differs on CPU and on an H200, float16 at
    times on the H200), so this costs one layer's O(H S^2 d) product and O(B H S^2)
    memory, the map the release keeps for every layer. Only the CLS row goes through the
    softmax (row by row, it is bit-equal to the full softmax's first row there).

    queries, keys: (B, S, H*d) q/k projection outputs (unscaled). Returns (B, S - first_key)
    in their dtype: the mean over heads of the CLS row, keys from ``first_key`` on (1 drops
    the CLS column, as the "default" feature strategy does).
    """
    batch, length, width = queries.shape
    head_dim = width // num_heads

    def per_head(projection: torch.Tensor) -> torch.Tensor:  # (B, S, H*d) -> (B*H, S, d), as 4.37's _shape
        return (
            projection.view(batch, length, num_heads, head_dim).transpose(1, 2).contiguous().view(-1, length, head_dim)
        )

    logits = torch.bmm(per_head(queries * scale), per_head(keys).transpose(1, 2))  # (B*H, S, S)
    cls_row = torch.softmax(logits[:, :1], dim=-1).view(batch, num_heads, length)  # (B, H, S)
    return cls_row[:, :, first_key:].mean(dim=1)


def received_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    num_heads: int,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Attention each token receives, summed over queries, mean over heads.

    queries, keys: (B, S, H*d); key_mask: optional (B, S) bool of real tokens (padding
    neither sends nor receives attention). Queries are processed ``chunk_size`` at a
    time, so memory is O(H * chunk_size * S) rather than O(H * S^2). Returns (B, S) float32.
    """
    head_dim = queries.shape[-1] // num_heads
    scale = head_dim**-0.5 if scale is None else scale
    key = _split_heads(keys.float(), num_heads)  # (B, H, S, d)
    received = torch.zeros(keys.shape[0], keys.shape[1], dtype=torch.float32, device=keys.device)
    for start in range(0, queries.shape[1], chunk_size):
        query = _split_heads(queries[:, start : start + chunk_size].float(), num_heads)  # (B, H, c, d)
        logits = (query @ key.transpose(-1, -2)) * scale  # (B, H, c, S)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        probabilities = torch.softmax(logits, dim=-1)
        if key_mask is not None:
            query_is_real = key_mask[:, start : start + chunk_size]  # (B, c)
            probabilities = probabilities * query_is_real[:, None, :, None]
        received += probabilities.sum(dim=2).mean(dim=1)
    return received


def segmented_received_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    num_heads: int,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """:func:`received_attention` for a packed sequence whose segments never attend to each other.

    queries, keys: (S, H*d), the tokens of several images (or frames) one after another;
    cu_seqlens: (n + 1,) segment boundaries, as the packed vision towers use. Segments of
    equal length are stacked into one batch, at most ``chunk_size`` tokens in all, so memory
    stays O(H * chunk_size * max(chunk_size, longest segment)). Returns (S,) float32.
    """
    boundaries = cu_seqlens.tolist()
    starts_by_length: dict[int, list[int]] = {}
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        if end > start:
            starts_by_length.setdefault(end - start, []).append(start)
    received = torch.zeros(queries.shape[0], dtype=torch.float32, device=queries.device)
    for length, starts in starts_by_length.items():
        per_batch = max(1, chunk_size // length)
        for first in range(0, len(starts), per_batch):
            batch_starts = torch.tensor(starts[first : first + per_batch], device=queries.device)
            positions = batch_starts[:, None] + torch.arange(length, device=queries.device)  # (G, length)
            received[positions] = received_attention(
                queries[positions], keys[positions], num_heads, scale, chunk_size=chunk_size
            )
    return received
