"""Helpers more than one family's adapter uses: what a method's needs ask of the tower,
images made of views, the per-frame rule."""

from __future__ import annotations

from ..errors import FlashVLMError
from ..pipeline import VisualItem, tiled_image_unit

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
    """One image from ``num_views`` consecutive views of a (V, m, ...) stack, sharing one budget
    (:func:`flashvlm.pipeline.tiled_image_unit`: the tiles jointly and the global view, or with
    ``tile_grids`` each tile its own raster)."""
    item = stack.map(lambda tensor: tensor[first : first + num_views].flatten(0, 1))
    item.units = [tiled_image_unit(num_views, stack.features.shape[1], stack.features.device, tile_grids)]
    return item


def refuse_per_video(model, video_budget: str) -> None:
    """Families whose processors send video frames as images can only budget per frame."""
    if video_budget == "per_video":
        raise FlashVLMError(
            f"video_budget='per_video' is not available for {type(model).__name__}: its processor sends video "
            "frames as separate images, so each frame gets the budget (use video_budget='per_frame')"
        )
