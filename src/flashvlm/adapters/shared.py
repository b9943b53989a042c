"""Helpers more than one family's adapter uses: what a method's needs ask of the tower, square rasters,
images made of views, the per-frame rule."""

from __future__ import annotations

import torch

from ..errors import FlashVLMError
from ..pipeline import ImageSelection, TokenRegion, VisualItem, square_grid

#: Requirements met from one vision layer's queries and keys (a hook on that layer).
QUERY_KEY_NEEDS = frozenset({"saliency", "cls_attention", "keys"})
#: Requirements that need every projected token (FastV-style scoring builds the unpruned sequence).
PROJECTED_NEEDS = frozenset({"projected", "lm_attention"})


def needs_query_key(needs: frozenset[str]) -> bool:
    """Whether the vision layer's queries and keys must be captured for ``needs``."""
    return bool(needs & QUERY_KEY_NEEDS)


def needs_projected(needs: frozenset[str]) -> bool:
    """Whether every visual token must be projected for ``needs``."""
    return bool(needs & PROJECTED_NEEDS)


def image_of_views(stack: VisualItem, first: int, num_views: int, tile_grids: bool = False) -> VisualItem:
    """One image from ``num_views`` consecutive views of a (V, m, ...) stack, sharing one budget:
    a single view is one raster; several are the tiles, then the global view, which the
    processors put last. The tiles are selected jointly (their layout is not in the model's
    inputs, so together they form no known raster), or, with ``tile_grids`` (for a method
    that needs the grid), each tile is its own square raster with its share of the budget."""
    item = stack.map(lambda tensor: tensor[first : first + num_views].flatten(0, 1))
    per_view = stack.features.shape[1]
    grid = square_grid(per_view)
    positions = torch.arange(num_views * per_view, device=stack.features.device)
    if num_views == 1:
        regions = [TokenRegion(positions, grid)]
    elif tile_grids:
        regions = [TokenRegion(view, grid) for view in positions.split(per_view)]
    else:
        regions = [TokenRegion(positions[:-per_view]), TokenRegion(positions[-per_view:], grid)]
    item.units = [ImageSelection.of("image", regions)]
    return item


def refuse_per_video(model, video_budget: str) -> None:
    """Families whose processors send video frames as images can only budget per frame."""
    if video_budget == "per_video":
        raise FlashVLMError(
            f"video_budget='per_video' is not available for {type(model).__name__}: its processor sends video "
            "frames as separate images, so each frame gets the budget (use video_budget='per_frame')"
        )
