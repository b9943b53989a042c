"""The pruning pipeline's engine-neutral steps: a family's visual items in, kept tokens out.

A family (a Hugging Face adapter in :mod:`flashvlm.adapters`, or a vLLM model class in
:mod:`flashvlm.integrations.vllm`) encodes its images and videos into :class:`VisualItem`
records, each with its budget units and their regions. The rest is written once, here, and
both engines call it: the budget of each region (:func:`region_budgets`), the method run
on every region with the prompt's text (:func:`select_regions`), and which tokens stay,
newlines and merged features included (:func:`keep_tokens`). Nothing here imports an engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .selection import Budget, SelectionInputs, TokenSelector, resolve_budget

#: Which prompt tokens guide a text-guided method (its ``text_tokens``): the whole prompt
#: but the visual placeholders (the LLaVA release's default), only the user's question, or
#: only the text before the first visual placeholder (the Qwen release).
TEXT_TOKENS = ("prompt", "question", "before_image")

#: How a video's budget is counted: the budget applies to each frame separately, or to the
#: whole video with its frames selected jointly (a frame with more relevant tokens keeps more).
VIDEO_BUDGETS = ("per_frame", "per_video")

#: Which newline tokens (LLaVA-NeXT/OneVision raster rows; outside the budget) stay: the
#: newline of each row that keeps a token, or every row's. With "every_row" an image's
#: token count follows from its size alone, as vLLM needs (it fixes each image's
#: placeholder count before the encoder runs; see docs/vllm.md).
NEWLINES = ("kept_rows", "every_row")

#: How an image made of tiles (InternVL, Idefics3/SmolVLM) shares its budget: its tiles'
#: tokens selected jointly, the global view keeping its share ("per_image"), or every tile
#: and the global view keeping a share in proportion to its tokens, each selected on its own
#: ("per_tile"). With "per_tile" each tile's count follows from the image's size alone, as
#: vLLM needs where every tile is a placeholder run of its own (Idefics3; see docs/vllm.md).
TILE_BUDGETS = ("per_image", "per_tile")


@dataclass
class TokenRegion:
    """Tokens of one item that a method selects among together: a view, a frame, a video."""

    positions: torch.Tensor  # (N,) long: the item's tokens of this region, ascending
    grid_shape: tuple[int, int] | None = None  # (rows, cols) when the region is a raster
    budget: Budget | None = None  # what the method keeps of it (the unit's budget, or its share)
    chosen: torch.Tensor | None = None  # (K,) after selection: kept places among ``positions``
    merged: torch.Tensor | None = None  # (K, C) after selection: a merging method's features


@dataclass
class ImageSelection:
    """One budget unit (an image, a video frame or a whole video) and what was kept of it.

    ``keep_indices`` index the unit's selectable tokens in the order the language model
    receives them; tokens outside the budget (LLaVA-NeXT/OneVision newline tokens) are
    not counted in ``num_tokens``. A unit of several regions (an AnyRes image's base view
    and crops) shares its budget among them in proportion to their sizes.
    """

    batch_index: int  # row of the batch the unit belongs to
    num_tokens: int  # N: selectable visual tokens the unit had
    keep_indices: torch.Tensor  # (K,) kept token positions, ascending
    grid_shape: tuple[int, int] | None = None  # (rows, cols) of the token raster
    kind: str = "image"  # "image", "frame" (per-frame video budget) or "video"
    regions: list[TokenRegion] = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, kind: str, regions: list[TokenRegion]) -> ImageSelection:
        """A unit over ``regions``, before selection (nothing kept yet)."""
        grid = regions[0].grid_shape if len(regions) == 1 else None
        num_tokens = sum(region.positions.numel() for region in regions)
        return cls(0, num_tokens, torch.zeros(0, dtype=torch.long), grid, kind, regions)

    @property
    def num_kept(self) -> int:
        return int(self.keep_indices.numel())


#: Per-token fields of a :class:`VisualItem` that are sliced, packed and pruned together.
TOKEN_FIELDS = ("features", "tokens", "saliency", "keys", "lm_attention")


@dataclass
class VisualItem:
    """One image or video as the language model receives it, and what a method may read of it.

    Per-token tensors share their leading dimensions: (L, ...) over the item's L
    placeholder tokens in the language model's order. (A family may use the same record
    for a stack of tower inputs, (P, n, ...), before arranging it into items.)
    """

    kind: str  # "image" or "video": which placeholder and encoder output it fills
    features: torch.Tensor  # (L, C) vision features the projector consumes (zeros outside the budget)
    tokens: torch.Tensor | None = None  # (L, D) projected; None: only the kept rows get projected
    saliency: torch.Tensor | None = None  # (L,) float32 encoder saliency
    keys: torch.Tensor | None = None  # (L, C_k) attention keys of the saliency layer
    lm_attention: torch.Tensor | None = None  # (L,) the last prompt token's attention in the LM
    #: Further per-token outputs the model consumes, pruned with the same keep mask
    #: (Qwen3-VL's DeepStack features: name -> (L, D)).
    side_outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Tokens outside the budget (LLaVA-NeXT newlines): (L,) bool, kept when a token of
    #: the same ``row_of`` is kept.
    is_newline: torch.Tensor | None = None
    row_of: torch.Tensor | None = None  # (L,) long: the raster row a token belongs to; -1 for none
    units: list[ImageSelection] = field(default_factory=list)  # the budget units, in order
    batch_index: int = 0  # row of the batch whose prompt holds the item
    keep: torch.Tensor | None = None  # (L,) bool, after selection: the tokens that stay
    sent: torch.Tensor | None = None  # (K', D), after selection: the tokens the language model gets
    sent_side_outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # after selection: name -> (K', D)

    @property
    def length(self) -> int:
        return self.features.shape[-2]

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> VisualItem:
        """A copy with ``function`` applied to every per-token tensor present."""
        changed = {name: function(getattr(self, name)) for name in TOKEN_FIELDS if getattr(self, name) is not None}
        changed["side_outputs"] = {name: function(value) for name, value in self.side_outputs.items()}
        return replace(self, **changed)


@dataclass
class GuidingText:
    """The prompt text that guides a text-guided method, one row per batch row (items point
    at their row with ``batch_index``)."""

    embeds: torch.Tensor  # (B, L, D) input embeddings of the guiding tokens, packed left
    mask: torch.Tensor  # (B, L) bool: which places hold a token
    before_image: torch.Tensor | None = None  # (B, L) bool: tokens before the first visual placeholder


def region_budgets(unit: ImageSelection, budget: Budget, keeps_all: bool) -> list[Budget]:
    """The budget of each region of ``unit``: the whole budget for a single region, or, for
    the views of one image, ``K`` split in proportion to their token counts (the last view
    takes the rest). A method that keeps every token gets each region whole: a small ``K``
    split in proportion may round a region's share to 0, which would drop it."""
    if keeps_all:
        return [region.positions.numel() for region in unit.regions]
    if len(unit.regions) == 1:
        return [budget]
    num_keep = resolve_budget(budget, unit.num_tokens)
    shares, assigned = [], 0
    for place, region in enumerate(unit.regions):
        last = place == len(unit.regions) - 1
        share = num_keep - assigned if last else round(num_keep * region.positions.numel() / unit.num_tokens)
        shares.append(share)
        assigned += share
    return shares


def video_units(
    num_frames: int,
    per_frame: int,
    frame_grid: tuple[int, int] | None,
    device: torch.device,
    video_budget: str,
    video_grid: tuple[int, int] | None = None,
) -> list[ImageSelection]:
    """Budget units of one video of ``num_frames`` frames of ``per_frame`` tokens: one unit
    per frame laid out as ``frame_grid`` (``video_budget="per_frame"``), or one for the
    whole video (laid out as ``video_grid``, if it has a 2-D layout)."""
    positions = torch.arange(num_frames * per_frame, device=device)  # (T * per_frame,)
    if video_budget == "per_frame":
        return [ImageSelection.of("frame", [TokenRegion(frame, frame_grid)]) for frame in positions.split(per_frame)]
    return [ImageSelection.of("video", [TokenRegion(positions, video_grid)])]


def tiled_image_unit(num_views: int, per_view: int, device: torch.device, tile_grids: bool = False) -> ImageSelection:
    """The budget unit of one image made of ``num_views`` views of ``per_view`` tokens each,
    laid end to end (InternVL's tiles, Idefics3's sub-images): a single view is one raster;
    several are the tiles, then the global view, which the processors put last. The tiles are
    selected jointly (their layout is not in the model's inputs, so together they form no
    known raster), or, with ``tile_grids`` (for a method that needs the grid), each tile is its
    own square raster with its share of the budget."""
    grid = square_grid(per_view)
    positions = torch.arange(num_views * per_view, device=device)  # (V * per_view,)
    if num_views == 1:
        regions = [TokenRegion(positions, grid)]
    elif tile_grids:
        regions = [TokenRegion(view, grid) for view in positions.split(per_view)]
    else:
        regions = [TokenRegion(positions[:-per_view]), TokenRegion(positions[-per_view:], grid)]
    return ImageSelection.of("image", regions)


def items_of_views(stack: VisualItem, counts: list[int]) -> list[VisualItem]:
    """One item per run of consecutive views of a (V, m, ...) stack (an image's tiles, a video's
    frames): ``counts[i]`` views each, their tokens end to end, (counts[i] * m, ...)."""
    items, first = [], 0
    for count in counts:
        items.append(stack.map(lambda tensor, first=first, count=count: tensor[first : first + count].flatten(0, 1)))
        first += count
    return items


def per_tile_counts(num_views: int, per_view: int, budget: Budget, keeps_all: bool) -> list[int]:
    """Tokens each view of a tiled image keeps under ``tile_budget="per_tile"`` (each view its
    own region, :func:`tiled_image_unit`): what a front end that lays out one placeholder run
    per view (vLLM's Idefics3) must know before the selection runs."""
    unit = tiled_image_unit(num_views, per_view, torch.device("cpu"), tile_grids=True)
    shares = region_budgets(unit, budget, keeps_all)
    return [0 if share == 0 else resolve_budget(share, per_view) for share in shares]


def select_regions(
    items: list[VisualItem],
    selector: TokenSelector,
    budget: Budget,
    text: GuidingText | None,
    saliency_kind: str,
    key_heads: int | None,
) -> None:
    """Run ``selector`` on every region, batching regions that share a token count, budget
    and raster (so grid-aware methods keep their grid); fills each unit's ``keep_indices``
    and each region's ``chosen`` positions and replacement ``merged`` features."""
    groups: dict[tuple[int, Budget, tuple[int, int] | None], list[tuple[VisualItem, TokenRegion]]] = {}
    for item in items:
        for unit in item.units:
            for region, share in zip(unit.regions, region_budgets(unit, budget, selector.keeps_all)):
                region.budget = share
                region.chosen = torch.zeros(0, dtype=torch.long, device=region.positions.device)
                if not (isinstance(share, int) and share == 0):
                    key = (region.positions.numel(), share, region.grid_shape)
                    groups.setdefault(key, []).append((item, region))
    for (_, share, grid_shape), members in groups.items():

        def stacked(name: str, members=members) -> torch.Tensor | None:
            if getattr(members[0][0], name) is None:
                return None
            return torch.stack([getattr(item, name)[region.positions] for item, region in members])

        inputs = SelectionInputs(
            features=stacked("features"),
            saliency=stacked("saliency"),
            saliency_kind=saliency_kind,
            projected=stacked("tokens"),
            keys=stacked("keys"),
            key_heads=key_heads,
            grid_shape=grid_shape,
            lm_attention=stacked("lm_attention"),
        )
        if text is not None:
            rows = torch.tensor([item.batch_index for item, _ in members], device=text.embeds.device)
            inputs.text_embeds, inputs.text_mask = text.embeds[rows], text.mask[rows]
            if text.before_image is not None:
                inputs.text_before_image = text.before_image[rows]
        selection = selector(inputs, share)
        for row, (_, region) in enumerate(members):
            region.chosen = selection.indices[row]
            region.merged = None if selection.features is None else selection.features[row]
    for item in items:
        for unit in item.units:
            offsets = torch.tensor([0, *[r.positions.numel() for r in unit.regions]]).cumsum(0)
            unit.keep_indices = torch.cat(
                [region.chosen.cpu() + offset for region, offset in zip(unit.regions, offsets.tolist())]
            )


def keep_tokens(item: VisualItem, project: Callable[[torch.Tensor], torch.Tensor], newlines: str) -> None:
    """Fill ``item.keep`` (L,) and ``item.sent`` (K', D) from its regions' choices."""
    device = item.features.device
    keep = torch.zeros(item.length, dtype=torch.bool, device=device)
    merged_at, merged = [], []
    for unit in item.units:
        for region in unit.regions:
            chosen = region.positions[region.chosen.to(region.positions.device)]
            keep[chosen] = True
            if region.merged is not None:
                merged_at.append(chosen)
                merged.append(region.merged)
    if item.is_newline is not None and newlines == "every_row":
        keep |= item.is_newline
    elif item.is_newline is not None:
        # A row's newline stays when the row keeps a token, so the LM still sees where it ends.
        rows_kept = item.row_of[keep & ~item.is_newline]
        keep |= item.is_newline & torch.isin(item.row_of, rows_kept)
    if item.tokens is None:
        # Project only what stays: merged features replace the originals at their positions.
        features = item.features
        if merged:
            features = features.clone()
            features[torch.cat(merged_at)] = torch.cat(merged).to(features.dtype)
        item.sent = project(features[keep])
    else:
        tokens = item.tokens
        if merged:
            tokens = tokens.clone()
            for positions, features in zip(merged_at, merged):
                tokens[positions] = project(features).to(tokens.dtype)
        item.sent = tokens[keep]
    item.keep = keep
    item.sent_side_outputs = {name: value[keep] for name, value in item.side_outputs.items()}


# -- moving per-token values through a model's own layout ---------------------------------------


def square_grid(num_tokens: int) -> tuple[int, int] | None:
    """(side, side) when ``num_tokens`` fill a square raster, else None."""
    side = int(round(num_tokens**0.5))
    return (side, side) if side * side == num_tokens else None


def average_pool_windows(per_patch: torch.Tensor, stride: int) -> torch.Tensor:
    """(P, n, X) values of each input's square patch raster -> (P, m, X), averaged over
    ``stride`` x ``stride`` windows: a pooling resampler's windows (LLaVA-NeXT-Video's), applied
    to what the method reads beside the pooled features (saliency, keys)."""
    inputs, num_patches, width = per_patch.shape
    side = int(round(num_patches**0.5))
    raster = per_patch.transpose(1, 2).reshape(inputs, width, side, side)
    pooled = torch.nn.functional.avg_pool2d(raster, kernel_size=stride, stride=stride)
    return pooled.flatten(2).transpose(1, 2)


def stacked_channels(stack: VisualItem) -> torch.Tensor:
    """Features, saliency and keys (those present) side by side, float32, plus a 0
    "is newline" channel: (P, n, X), so a model's own packing (LLaVA-NeXT's, OneVision's: crops
    stitched, unpadded, perhaps interpolated, a newline row after each row) moves them together
    when given a newline row whose last channel is 1."""
    parts = [stack.features.float()]
    if stack.saliency is not None:
        parts.append(stack.saliency[..., None])
    if stack.keys is not None:
        parts.append(stack.keys.float())
    parts.append(torch.zeros_like(parts[0][..., :1]))
    return torch.cat(parts, dim=-1)


def split_stacked_channels(packed: torch.Tensor, stack: VisualItem, kind: str, tokens: torch.Tensor) -> VisualItem:
    """Inverse of :func:`stacked_channels` on packed rows (L, X): the item with those ``tokens`` (L, D)."""
    width = stack.features.shape[-1]
    features, rest = packed[:, :width].to(tokens.dtype), packed[:, width:-1]
    item = VisualItem(kind, features, tokens, is_newline=packed[:, -1] > 0.5)
    if stack.saliency is not None:
        item.saliency, rest = rest[:, 0], rest[:, 1:]
    if stack.keys is not None:
        item.keys = rest.to(tokens.dtype)
    return item
