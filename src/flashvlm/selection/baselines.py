"""Reference points every comparison needs: the full model, random tokens and spatial pooling.

None of them looks at the prompt or at attention; they tell how much a clever method
gains over keeping everything, keeping anything, or simply seeing a coarser image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Selection, SelectionInputs, TokenSelector, check_integer, register


@register
@dataclass
class KeepAll(TokenSelector):
    """The unpruned model: keeps every visual token whatever the budget (``keeps_all``).

    Runs through the same adapter path as every other method, so its prefill time is
    measured the same way. Needs nothing. Cost: none beyond the unpruned model.
    """

    name: ClassVar[str] = "none"
    keeps_all: ClassVar[bool] = True


@register
@dataclass
class RandomTokens(TokenSelector):
    """K tokens drawn uniformly at random, without replacement; deterministic per ``seed``.

    Every image of N tokens gets the same K positions for a given seed, so a row's
    selection never depends on the rest of its batch; average over several seeds for a
    random baseline with variance. Needs nothing. Cost: O(N) time and memory.
    """

    name: ClassVar[str] = "random"

    #: Seed of the generator that draws the positions.
    seed: int = 0

    def __post_init__(self) -> None:
        check_integer("seed", self.seed, 0)

    def select(self, inputs: SelectionInputs, num_keep: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        positions = torch.randperm(inputs.num_tokens, generator=generator)[:num_keep]  # (K,)
        return positions.to(inputs.features.device).expand(inputs.batch_size, num_keep)


def pooled_grid(rows: int, cols: int, num_keep: int, max_stretch: float = 2.0) -> tuple[int, int]:
    """The (r, c) grid of cells to average a rows x cols token grid into, for ``num_keep`` tokens.

    An exact factorisation ``r * c == num_keep`` (r <= rows, c <= cols) whose aspect ratio
    is closest to the grid's is used when its cells are at most ``max_stretch`` times more
    elongated than the grid's own aspect (e.g. 24x24 -> 12x16 for 192, 8x16 for 128).
    Otherwise the smallest near-square grid with ``r * c >= num_keep`` cells of the grid's
    aspect, of which :func:`pool_tokens` keeps ``num_keep`` spread evenly.
    """
    grid_aspect = math.log(rows / cols)
    exact = [
        (abs(math.log(r / (num_keep // r)) - grid_aspect), r, num_keep // r)
        for r in range(1, min(rows, num_keep) + 1)
        if num_keep % r == 0 and num_keep // r <= cols
    ]
    if exact:
        stretch, r, c = min(exact)
        if stretch <= math.log(max_stretch) + 1e-9:
            return r, c
    r = min(rows, math.ceil(math.sqrt(num_keep * rows / cols)))
    c = min(cols, math.ceil(num_keep / r))
    return r, c


def cell_centres(size: int, cells: int) -> torch.Tensor:
    """Centre token of each of ``cells`` adaptive-pooling windows over ``size`` tokens. (cells,) long."""
    starts = torch.arange(cells) * size // cells
    ends = -((-(torch.arange(cells) + 1) * size) // cells)  # ceil((i + 1) * size / cells)
    return (starts + ends - 1) // 2


@register
@dataclass
class SpatialPool(TokenSelector):
    """Average pooling of the token grid down to the budget: a coarser image, no selection.

    The grid is average-pooled (adaptive windows, as ``adaptive_avg_pool2d``) to the cells
    of :func:`pooled_grid`; each cell becomes one token placed at its centre position. When
    K has no factorisation close to the grid's aspect (a prime K, say), the grid is pooled
    to the smallest near-square grid with at least K cells and K of them, evenly spread in
    raster order, are kept, so exactly K tokens always reach the language model. Features
    are pooled before the projector (returned as merged ``features``), like VisionZip's
    contextual tokens. Needs ``grid``: tokens without a known 2-D layout (a CLS token kept
    by the "full" feature strategy, say) cannot be pooled spatially, and the method says so.
    Cost: O(N * C) time, O(K * C) extra memory.
    """

    name: ClassVar[str] = "pool"
    requires: ClassVar[frozenset[str]] = frozenset({"grid"})

    def select(self, inputs: SelectionInputs, num_keep: int) -> Selection:
        rows, cols = inputs.grid_shape
        features = inputs.features  # (B, N, C)
        pooled_rows, pooled_cols = pooled_grid(rows, cols, num_keep)
        grid = features.transpose(1, 2).reshape(inputs.batch_size, -1, rows, cols)  # (B, C, rows, cols)
        pooled = F.adaptive_avg_pool2d(grid.float(), (pooled_rows, pooled_cols)).to(features.dtype)
        pooled = pooled.flatten(2).transpose(1, 2)  # (B, r * c, C)
        centres = cell_centres(rows, pooled_rows)[:, None] * cols + cell_centres(cols, pooled_cols)[None, :]
        num_cells = pooled_rows * pooled_cols
        # Evenly spaced cells (all of them when the grid is exact); floor(x + 0.5) keeps them distinct.
        cells = torch.floor(torch.arange(num_keep) * ((num_cells - 1) / max(num_keep - 1, 1)) + 0.5).long()
        indices = centres.flatten()[cells].to(features.device)  # (K,)
        kept = pooled[:, cells.to(features.device)]  # (B, K, C)
        return Selection(indices.expand(inputs.batch_size, num_keep), kept)
