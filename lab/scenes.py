"""Procedural grounded-VQA scenes: small objects on a textured background, and questions about them.

Everything is a pure function of a seed: :func:`make_example` draws one scene and one
question of a given family from a ``random.Random``; :func:`example_rng` names the
stream a split, stage or sample comes from, so a split is the same on every machine
and a resumed training run sees the same data it would have seen.

Geometry follows LLaVA-1.5 at a smaller scale (the model's constants, in
``flashvlm.demo.model``): 224 px images cut into 14 px patches, 16 x 16 = 256 visual tokens. Objects are 18-34 px, so each covers about 2-9 tokens.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from flashvlm.demo.model import IMAGE_SIZE

SHAPES = ("circle", "square", "triangle", "diamond")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
}
SIZES = {"small": (18, 22), "large": (28, 34)}
NUMBERS = ("zero", "one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")
FAMILIES = ("attribute", "existence", "counting", "relation")
SPLITS = ("train", "validation", "test")
#: Objects per scene.
MIN_OBJECTS, MAX_OBJECTS = 3, 6
#: Two centres closer than this along an axis make "left of"/"above" ambiguous: not asked.
RELATION_MARGIN = 24


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, exclusive end

    @property
    def center(self) -> tuple[float, float]:
        return (self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass
class SceneQuestion:
    """One scene with one question about it."""

    objects: list[SceneObject]
    background_seed: int
    question: str
    answer: str
    family: str
    target: int | list[int] | None  # index (or indices) of the queried object(s); None if absent

    def render(self) -> Image.Image:
        return render_scene(self.objects, self.background_seed)

    def object_dicts(self) -> list[dict]:
        return [{**asdict(obj), "bbox": list(obj.bbox)} for obj in self.objects]


def example_rng(seed: int, stream: str, index: int) -> random.Random:
    """The random stream of sample ``index`` in ``stream`` (a split or a training stage)."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


# -- scenes ------------------------------------------------------------------------------


def _place(rng: random.Random, specs: list[tuple[str, str, str]]) -> list[SceneObject] | None:
    """Non-overlapping boxes (with a gap) for (shape, color, size) specs, or None if it fails."""
    placed: list[SceneObject] = []
    for shape, color, size in specs:
        for _attempt in range(60):
            side = rng.randint(*SIZES[size])
            x0, y0 = rng.randint(4, IMAGE_SIZE - side - 4), rng.randint(4, IMAGE_SIZE - side - 4)
            box = (x0, y0, x0 + side, y0 + side)
            if all(_gap(box, other.bbox) >= 8 for other in placed):
                placed.append(SceneObject(shape, color, size, box))
                break
        else:
            return None
    return placed


def _gap(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def _random_spec(rng: random.Random, shapes=SHAPES, colors=tuple(COLORS)) -> tuple[str, str, str]:
    return rng.choice(shapes), rng.choice(colors), rng.choice(tuple(SIZES))


def _layout(rng: random.Random, specs: list[tuple[str, str, str]]) -> list[SceneObject]:
    rng.shuffle(specs)
    while True:
        objects = _place(rng, specs)
        if objects is not None:
            return objects


def render_scene(objects: list[SceneObject], background_seed: int) -> Image.Image:
    """The scene as a 224 x 224 RGB image: muted textured background, saturated objects."""
    rng = np.random.default_rng(background_seed)
    base = rng.uniform(90, 160, size=3)
    tint = rng.normal(0, 18, size=(7, 7, 3))  # low-frequency colour variation
    low = np.kron(tint, np.ones((32, 32, 1)))[:IMAGE_SIZE, :IMAGE_SIZE]
    noise = 14 * rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.float32)
    noise = noise + 6 * rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    pixels = np.clip(noise + (base + low).astype(np.float32), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.8))
    draw = ImageDraw.Draw(image)
    # Faint strokes and blobs: texture the encoder must learn to ignore.
    for _ in range(int(rng.integers(6, 12))):
        shade = tuple(int(v) for v in np.clip(base + rng.normal(0, 35, size=3), 0, 255))
        x, y = rng.integers(0, IMAGE_SIZE, size=2)
        if rng.random() < 0.5:
            dx, dy = rng.integers(-60, 60, size=2)
            draw.line([(int(x), int(y)), (int(x + dx), int(y + dy))], fill=shade, width=int(rng.integers(2, 5)))
        else:
            r = int(rng.integers(6, 16))
            draw.ellipse([int(x) - r, int(y) - r, int(x) + r, int(y) + r], fill=shade)
    for obj in objects:
        color = tuple(int(c) for c in np.clip(np.array(COLORS[obj.color]) + rng.normal(0, 10, size=3), 0, 255))
        _draw_shape(draw, obj.shape, obj.bbox, color)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, bbox: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = bbox
    x1, y1 = x1 - 1, y1 - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=color)
    elif shape == "square":
        inset = (x1 - x0) * 0.08
        draw.rectangle([x0 + inset, y0 + inset, x1 - inset, y1 - inset], fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=color)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def patch_coverage(obj: SceneObject, patch: int = 14) -> np.ndarray:
    """The share of each patch that ``obj``'s shape covers: (IMAGE_SIZE // patch) ** 2 values in [0, 1], raster order."""
    cells = IMAGE_SIZE // patch
    # Drawn on the patches under the box only, shifted by whole pixels (which rasterizes the
    # same pixels): a 224 px canvas per object cost as much as rendering the scene.
    (x0, y0, x1, y1), share = obj.bbox, np.zeros((cells, cells), dtype=np.float32)
    left, top = x0 // patch, y0 // patch
    right, bottom = min(-(-x1 // patch), cells), min(-(-y1 // patch), cells)
    mask = Image.new("L", ((right - left) * patch, (bottom - top) * patch), 0)
    shifted = (x0 - left * patch, y0 - top * patch, x1 - left * patch, y1 - top * patch)
    _draw_shape(ImageDraw.Draw(mask), obj.shape, shifted, 255)
    array = np.asarray(mask, dtype=np.float32).reshape(bottom - top, patch, right - left, patch) / 255.0
    share[top:bottom, left:right] = array.mean(axis=(1, 3))
    return share.reshape(-1)


# -- language ----------------------------------------------------------------------------


def region_words(obj: SceneObject) -> str:
    """Coarse position on a 3 x 3 layout: 'top left', 'center', 'bottom', ..."""
    x, y = obj.center
    column = ("left", "", "right")[min(int(3 * x / IMAGE_SIZE), 2)]
    row = ("top", "", "bottom")[min(int(3 * y / IMAGE_SIZE), 2)]
    return " ".join(word for word in (row, column) if word) or "center"


def reading_order(objects: list[SceneObject]) -> list[int]:
    """Indices of ``objects`` top to bottom in bands of a third of the image, then left to right."""
    return sorted(range(len(objects)), key=lambda i: (int(3 * objects[i].center[1] / IMAGE_SIZE), objects[i].center[0]))


def caption(objects: list[SceneObject]) -> str:
    """'a small red circle at the top left , a large blue square at the center .'"""
    parts = [f"a {objects[i].phrase} at the {region_words(objects[i])}" for i in reading_order(objects)]
    return " , ".join(parts) + " ."


def holds(relation: str, a: SceneObject, b: SceneObject) -> bool:
    (ax, ay), (bx, by) = a.center, b.center
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]


def _clear(relation: str, a: SceneObject, b: SceneObject) -> bool:
    (ax, ay), (bx, by) = a.center, b.center
    gap = abs(ax - bx) if relation in ("left of", "right of") else abs(ay - by)
    return gap >= RELATION_MARGIN


# -- questions ---------------------------------------------------------------------------


def make_example(rng: random.Random, family: str, num_objects: int | None = None) -> SceneQuestion:
    """One scene and one question of ``family``, drawn from ``rng``.

    Scenes are built around the question so that the answers are balanced: yes/no half
    and half, counts 1-3 equally often, any colour or shape as an attribute answer.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown question family {family!r}; one of {', '.join(FAMILIES)}")
    count = num_objects or rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    builder = {"attribute": _attribute, "existence": _existence, "counting": _counting, "relation": _relation}[family]
    while True:
        example = builder(rng, count)
        if example is not None:
            return example


def _background(rng: random.Random) -> int:
    return rng.getrandbits(31)


def _attribute(rng: random.Random, count: int) -> SceneQuestion:
    ask_color = rng.random() < 0.5
    shape, color, size = _random_spec(rng)
    specs = [(shape, color, size)]
    for _ in range(count - 1):
        # The queried shape (or colour) is unique in the scene; everything else is free.
        if ask_color:
            specs.append(_random_spec(rng, shapes=tuple(s for s in SHAPES if s != shape)))
        else:
            specs.append(_random_spec(rng, colors=tuple(c for c in COLORS if c != color)))
    queried = specs[0]
    objects = _layout(rng, specs)
    target = objects.index(next(o for o in objects if (o.shape, o.color, o.size) == queried))
    if ask_color:
        question, answer = f"what color is the {shape} ?", color
    else:
        question, answer = f"what shape is the {color} object ?", shape
    return SceneQuestion(objects, _background(rng), question, answer, "attribute", target)


def _existence(rng: random.Random, count: int) -> SceneQuestion:
    present = rng.random() < 0.5
    shape, color, size = _random_spec(rng)
    if present:
        specs = [(shape, color, size)] + [_random_spec(rng) for _ in range(count - 1)]
    else:
        # Near misses: the same shape in another colour and the same colour on another shape.
        other_color = rng.choice([c for c in COLORS if c != color])
        other_shape = rng.choice([s for s in SHAPES if s != shape])
        specs = [(shape, other_color, rng.choice(tuple(SIZES))), (other_shape, color, rng.choice(tuple(SIZES)))]
        while len(specs) < count:
            spec = _random_spec(rng)
            if spec[:2] != (shape, color):
                specs.append(spec)
    objects = _layout(rng, specs)
    matches = [i for i, o in enumerate(objects) if (o.shape, o.color) == (shape, color)]
    target = (matches[0] if len(matches) == 1 else matches) if matches else None
    question = f"is there a {color} {shape} ?"
    return SceneQuestion(objects, _background(rng), question, "yes" if matches else "no", "existence", target)


def _counting(rng: random.Random, count: int) -> SceneQuestion:
    wanted = rng.randint(1, 3)
    by_color = rng.random() < 0.5
    shape, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
    specs = []
    for _ in range(wanted):
        spec = _random_spec(rng)
        specs.append((spec[0], color, spec[2]) if by_color else (shape, spec[1], spec[2]))
    while len(specs) < max(count, wanted + 1):
        if by_color:
            specs.append(_random_spec(rng, colors=tuple(c for c in COLORS if c != color)))
        else:
            specs.append(_random_spec(rng, shapes=tuple(s for s in SHAPES if s != shape)))
    objects = _layout(rng, specs)
    if by_color:
        target = [i for i, o in enumerate(objects) if o.color == color]
        question = f"how many {color} objects are there ?"
    else:
        target = [i for i, o in enumerate(objects) if o.shape == shape]
        question = f"how many {PLURALS[shape]} are there ?"
    return SceneQuestion(objects, _background(rng), question, NUMBERS[len(target)], "counting", target)


def _clear_pairs(objects: list[SceneObject], relation: str) -> list[tuple[int, int]]:
    """Ordered pairs of objects a question can name (each the only one of its colour and
    shape) whose centres are far enough apart for ``relation`` to be clear."""
    keys = [(o.color, o.shape) for o in objects]
    unique = [i for i, key in enumerate(keys) if keys.count(key) == 1]
    return [(a, b) for a in unique for b in unique if a != b and _clear(relation, objects[a], objects[b])]


def _relation(rng: random.Random, count: int) -> SceneQuestion | None:
    specs = [_random_spec(rng) for _ in range(count)]
    objects = _layout(rng, specs)
    relation = rng.choice(RELATIONS)
    pairs = _clear_pairs(objects, relation)
    if not pairs:
        return None
    truth = rng.random() < 0.5
    pairs = [(a, b) for a, b in pairs if holds(relation, objects[a], objects[b]) == truth]
    a, b = rng.choice(pairs)
    first, second = objects[a], objects[b]
    question = f"is the {first.color} {first.shape} {relation} the {second.color} {second.shape} ?"
    return SceneQuestion(objects, _background(rng), question, "yes" if truth else "no", "relation", [a, b])


def ask(rng: random.Random, objects: list[SceneObject], family: str) -> tuple[str, str] | None:
    """Another (question, answer) of ``family`` about a scene already drawn, or None if it has none.

    Training asks several questions about one image (LLaVA's multi-turn samples): the 256 image
    tokens are most of a sample's cost, so each extra turn adds an answer to learn from at a
    tenth of the price. The questions follow the benchmark's rules (a queried attribute is
    unique, counts are 1-3, relations are clear), not its balancing.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown question family {family!r}; one of {', '.join(FAMILIES)}")
    shapes = [o.shape for o in objects]
    colors = [o.color for o in objects]
    if family == "attribute":
        # Ask a unique shape's colour or a unique colour's shape.
        unique_shapes = sorted(s for s in set(shapes) if shapes.count(s) == 1)
        unique_colors = sorted(c for c in set(colors) if colors.count(c) == 1)
        modes = [mode for mode, values in (("color", unique_shapes), ("shape", unique_colors)) if values]
        if not modes:
            return None
        if rng.choice(modes) == "color":
            shape = rng.choice(unique_shapes)
            return f"what color is the {shape} ?", objects[shapes.index(shape)].color
        color = rng.choice(unique_colors)
        return f"what shape is the {color} object ?", objects[colors.index(color)].shape
    if family == "existence":
        present = {(o.color, o.shape) for o in objects}
        if rng.random() < 0.5:
            color, shape = rng.choice(sorted(present))
            return f"is there a {color} {shape} ?", "yes"
        # A near miss: an object's shape in another colour, or its colour on another shape.
        obj = rng.choice(objects)
        misses = sorted(
            {(c, obj.shape) for c in COLORS if (c, obj.shape) not in present}
            | {(obj.color, s) for s in SHAPES if (obj.color, s) not in present}
        )
        color, shape = rng.choice(misses)
        return f"is there a {color} {shape} ?", "no"
    if family == "counting":
        choices = [("color", c) for c in sorted(set(colors)) if colors.count(c) <= 3]
        choices += [("shape", s) for s in sorted(set(shapes)) if shapes.count(s) <= 3]
        if not choices:
            return None
        kind, value = rng.choice(choices)
        if kind == "color":
            return f"how many {value} objects are there ?", NUMBERS[colors.count(value)]
        return f"how many {PLURALS[value]} are there ?", NUMBERS[shapes.count(value)]
    relation = rng.choice(RELATIONS)
    pairs = _clear_pairs(objects, relation)
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    first, second = objects[a], objects[b]
    answer = "yes" if holds(relation, first, second) else "no"
    return f"is the {first.color} {first.shape} {relation} the {second.color} {second.shape} ?", answer


def split_example(seed: int, split: str, index: int) -> SceneQuestion:
    """Row ``index`` of a fixed evaluation split: the families take turns, so they are balanced."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    return make_example(example_rng(seed, split, index), FAMILIES[index % len(FAMILIES)])


def scene_signature(example: SceneQuestion) -> tuple:
    """What makes two scenes the same picture (for disjointness checks)."""
    return example.background_seed, tuple(example.objects)


def answer_words() -> list[str]:
    """Every answer the benchmark can have."""
    return [*COLORS, *SHAPES, "yes", "no", *NUMBERS]


def vocabulary_words() -> list[str]:
    """Every word a scene description, caption or question uses."""
    words = ["a", "an", "the", "at", "of", "is", "there", "what", "color", "shape", "object", "objects"]
    words += ["how", "many", "are", "left", "right", "above", "below", "top", "bottom", "center"]
    words += ["describe", "image", "scene", "this", "in", "and", ",", ".", "?", ":", "user", "assistant"]
    words += [*COLORS, *SHAPES, *PLURALS.values(), *SIZES, "yes", "no", *NUMBERS]
    return list(dict.fromkeys(words))
