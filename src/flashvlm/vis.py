"""Draw which visual tokens a selection kept: dropped patches dimmed, kept ones outlined.

Pure PIL, no model code: give it the image as the model saw it (see :func:`model_view`),
the kept raster indices and the token grid.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageEnhance, ImageOps

KEPT_OUTLINE = (255, 230, 0)
LABEL_BAR = (24, 24, 24)


def model_view(image: Image.Image, size: int) -> Image.Image:
    """The square the vision tower sees: shortest edge resized to ``size``, centre-cropped (CLIP)."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.convert("RGB").resize(
        (max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC
    )
    return ImageOps.fit(resized, (size, size), centering=(0.5, 0.5)) if resized.size != (size, size) else resized


def draw_kept_tokens(
    image: Image.Image,
    keep_indices: Sequence[int],
    grid_shape: tuple[int, int],
    scale: int = 2,
    dim: float = 0.3,
) -> Image.Image:
    """``image`` enlarged ``scale`` times, dropped patches darkened to ``dim``, kept ones outlined.

    keep_indices are raster positions (row-major) on a ``grid_shape`` = (rows, cols) grid
    covering the whole image.
    """
    rows, columns = grid_shape
    width, height = image.size[0] * scale, image.size[1] * scale
    bright = image.convert("RGB").resize((width, height), Image.NEAREST)
    dark = ImageEnhance.Brightness(ImageEnhance.Color(bright).enhance(0.4)).enhance(dim)
    mask = Image.new("L", (width, height), 0)
    draw_mask = ImageDraw.Draw(mask)
    cells = [_cell(int(index), rows, columns, width, height) for index in keep_indices]
    for box in cells:
        draw_mask.rectangle(box, fill=255)
    out = Image.composite(bright, dark, mask)
    draw = ImageDraw.Draw(out)
    line = max(1, scale)
    for x0, y0, x1, y1 in cells:
        draw.rectangle((x0, y0, x1, y1), outline=KEPT_OUTLINE, width=line)
    return out


def _cell(index: int, rows: int, columns: int, width: int, height: int) -> tuple[int, int, int, int]:
    row, column = divmod(index, columns)
    if not 0 <= row < rows:
        raise ValueError(f"token index {index} is outside a {rows}x{columns} grid")
    return (
        round(column * width / columns),
        round(row * height / rows),
        round((column + 1) * width / columns) - 1,
        round((row + 1) * height / rows) - 1,
    )


def side_by_side(panels: Sequence[tuple[Image.Image, str]], bar: int = 22) -> Image.Image:
    """Panels left to right, each with a one-line label on a dark bar above it."""
    width = sum(panel.size[0] for panel, _ in panels) + 8 * (len(panels) - 1)
    height = max(panel.size[1] for panel, _ in panels) + bar
    figure = Image.new("RGB", (width, height), LABEL_BAR)
    draw = ImageDraw.Draw(figure)
    x = 0
    for panel, label in panels:
        figure.paste(panel, (x, bar))
        draw.text((x + 6, 5), label, fill=(240, 240, 240))
        x += panel.size[0] + 8
    return figure


def stacked(rows: Sequence[tuple[Image.Image, str]], bar: int = 22) -> Image.Image:
    """Figures top to bottom, each under a one-line title on a dark bar (left-aligned, padded to the widest)."""
    width = max(row.size[0] for row, _ in rows)
    height = sum(row.size[1] + bar for row, _ in rows) + 8 * (len(rows) - 1)
    figure = Image.new("RGB", (width, height), LABEL_BAR)
    draw = ImageDraw.Draw(figure)
    y = 0
    for row, title in rows:
        draw.text((6, y + 5), title, fill=(255, 230, 0))
        figure.paste(row, (0, y + bar))
        y += row.size[1] + bar + 8
    return figure
