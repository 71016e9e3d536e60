"""Procedural images with captions from a small grammar, every image carrying its attributes.

One caption reads ``"<size> <colour> <shape>, <position>, <texture> background, <palette>
<outline> <shading>"``, e.g. ``"small red circle, left, striped background, pastel outlined
flat"``. Every word belongs to exactly one attribute, so a caption parses back without
ambiguity. Rendering is plain torch: shapes are signed-distance functions in pixel units and
coverage is ``clamp(0.5 - d, 0, 1)``, which anti-aliases edges without supersampling.

The held-out split is a set of (shape, colour, texture) combinations that training can never
draw: the split is a property of the attributes, not of which indices a run happened to use, so
no seed or sample count can leak a held-out combination into training. Every single attribute
value still occurs in both splits; only some combinations are unseen (compositional
generalisation).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from typing import List, Sequence, Tuple

import torch

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "magenta": (0.9, 0.15, 0.8),
    "cyan": (0.1, 0.85, 0.9),
    "orange": (1.0, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
}
SIZES = {"small": 0.14, "medium": 0.2, "large": 0.27}  # radius as a fraction of the image width
POSITIONS = {"centre": (0.5, 0.5), "left": (0.32, 0.5), "right": (0.68, 0.5), "top": (0.5, 0.32), "bottom": (0.5, 0.68)}
TEXTURES = ("plain", "striped", "checkered", "dotted", "gradient")
# The "style" family: the aesthetic shards of a Diffusion Soup are split along these.
PALETTES = ("vivid", "pastel", "deep")
OUTLINES = ("outlined", "borderless")
SHADINGS = ("flat", "shaded")

SPLITS = ("train", "heldout")
_HELDOUT_MODULUS = 7  # about 1 in 7 (shape, colour, texture) combinations is never trained on


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    size: str
    position: str
    texture: str
    palette: str
    outline: str
    shading: str

    def __post_init__(self):
        for name, values in VALUES.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(values)}")

    def caption(self) -> str:
        return (
            f"{self.size} {self.colour} {self.shape}, {self.position}, {self.texture} background, "
            f"{self.palette} {self.outline} {self.shading}"
        )

    @property
    def split(self) -> str:
        return split_of(self.shape, self.colour, self.texture)


VALUES = {
    "shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS),
    "texture": TEXTURES, "palette": PALETTES, "outline": OUTLINES, "shading": SHADINGS,
}
ATTRIBUTE_NAMES = tuple(f.name for f in fields(Attributes))
_WORD_TO_ATTRIBUTE = {word: name for name, values in VALUES.items() for word in values}
# Words of the grammar that name no attribute value (structure only).
FILLER_WORDS = ("background",)


def vocabulary() -> Tuple[str, ...]:
    """Every word a caption can contain, in a fixed order (attribute by attribute)."""
    return tuple(w for name in ATTRIBUTE_NAMES for w in VALUES[name]) + FILLER_WORDS


def split_of(shape: str, colour: str, texture: str) -> str:
    code = SHAPES.index(shape) + 2 * tuple(COLOURS).index(colour) + 3 * TEXTURES.index(texture)
    return "heldout" if code % _HELDOUT_MODULUS == 0 else "train"


def combinations(split: str) -> List[Tuple[str, str, str]]:
    """The (shape, colour, texture) combinations of ``split``, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose train or heldout")
    return [(s, c, t) for s in SHAPES for c in COLOURS for t in TEXTURES if split_of(s, c, t) == split]


def parse_caption(text: str) -> Attributes:
    """The attributes a caption names; each attribute exactly once, words in any order."""
    found: dict = {}
    for word in text.replace(",", " ").split():
        if word in FILLER_WORDS:
            continue
        name = _WORD_TO_ATTRIBUTE.get(word)
        if name is None:
            raise ValueError(f"caption {text!r}: unknown word {word!r}")
        if name in found:
            raise ValueError(f"caption {text!r}: {name} given twice ({found[name]!r}, {word!r})")
        found[name] = word
    missing = [n for n in ATTRIBUTE_NAMES if n not in found]
    if missing:
        raise ValueError(f"caption {text!r}: no {', '.join(missing)}")
    return Attributes(**found)


def _sample_seed(seed: int, split: str, index: int) -> int:
    # Each sample has its own generator, so sample i is the same whatever n a caller asks for.
    digest = hashlib.sha256(f"toy-data/{seed}/{split}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _pick(gen: torch.Generator, values: Sequence):
    return values[int(torch.randint(len(values), (), generator=gen))]


def sample_attributes(gen: torch.Generator, split: str) -> Attributes:
    shape, colour, texture = _pick(gen, combinations(split))
    return Attributes(
        shape=shape, colour=colour, texture=texture,
        size=_pick(gen, tuple(SIZES)), position=_pick(gen, tuple(POSITIONS)),
        palette=_pick(gen, PALETTES), outline=_pick(gen, OUTLINES), shading=_pick(gen, SHADINGS),
    )


def _shape_distance(shape: str, x: torch.Tensor, y: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance (negative inside) from the shape of radius ``r`` centred at the origin."""
    if shape == "circle":
        return torch.sqrt(x * x + y * y) - r
    if shape == "square":
        return torch.maximum(x.abs(), y.abs()) - 0.85 * r
    if shape == "diamond":
        return (x.abs() + y.abs() - 1.15 * r) / math.sqrt(2.0)
    if shape == "triangle":
        # Intersection of three half-planes; outward normals at 90°, 210° and 330° (y points down).
        d = None
        for angle in (-90.0, 30.0, 150.0):
            a = math.radians(angle)
            side = x * math.cos(a) + y * math.sin(a) - 0.55 * r
            d = side if d is None else torch.maximum(d, side)
        return d
    if shape == "cross":
        bar = 0.33 * r
        horizontal = torch.maximum(x.abs() - r, y.abs() - bar)
        vertical = torch.maximum(x.abs() - bar, y.abs() - r)
        return torch.minimum(horizontal, vertical)
    if shape == "ring":
        return (torch.sqrt(x * x + y * y) - 0.68 * r).abs() - 0.32 * r
    raise ValueError(f"shape={shape!r}")


def _background(texture: str, xs: torch.Tensor, ys: torch.Tensor, phase: float, res: int) -> torch.Tensor:
    """Two-tone neutral background in [0, 1], (H, W); neutral so no shape colour can vanish in it."""
    low, high = 0.22, 0.42
    period = max(res / 4.0, 3.0)
    if texture == "plain":
        t = torch.zeros_like(xs)
    elif texture == "striped":
        t = ((xs + ys + phase * period) / (period / 2)).floor().remainder(2)
    elif texture == "checkered":
        t = (((xs + phase * period) / (period / 2)).floor() + (ys / (period / 2)).floor()).remainder(2)
    elif texture == "dotted":
        cx = (xs + phase * period).remainder(period) - period / 2
        cy = ys.remainder(period) - period / 2
        t = (0.5 - (torch.sqrt(cx * cx + cy * cy) - period / 5)).clamp(0, 1)
    elif texture == "gradient":
        t = ys / (res - 1)
    else:
        raise ValueError(f"texture={texture!r}")
    return low + (high - low) * t


def render(attrs: Attributes, resolution: int = 32, *, jitter: Tuple[float, float, float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """The image of ``attrs`` as float32 RGB in [0, 1], shape (3, R, R).

    ``jitter`` = (dx, dy, phase): a shift of the shape in fractions of the width and a texture
    phase in [0, 1), so two images with one caption differ the way two photos would.
    """
    res = int(resolution)
    if res < 8:
        raise ValueError(f"resolution={resolution}: at least 8 pixels")
    coords = torch.arange(res, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy, phase = jitter
    cx, cy = POSITIONS[attrs.position]
    r = SIZES[attrs.size] * res
    d = _shape_distance(attrs.shape, xs - (cx + dx) * res, ys - (cy + dy) * res, r)

    colour = torch.tensor(COLOURS[attrs.colour])
    if attrs.palette == "pastel":
        colour = 0.5 * colour + 0.5
    elif attrs.palette == "deep":
        colour = 0.6 * colour
    fill = colour[:, None, None].expand(3, res, res)
    if attrs.shading == "shaded":
        # Light from the top: the shape runs from 115% of its colour at its top to 65% at its bottom.
        top, bottom = (cy + dy) * res - r, (cy + dy) * res + r
        light = 1.15 - 0.5 * ((ys - top) / (bottom - top)).clamp(0, 1)
        fill = (fill * light).clamp(0, 1)

    bg = _background(attrs.texture, xs, ys, phase, res).expand(3, res, res)
    inside = (0.5 - d).clamp(0, 1)
    image = bg * (1 - inside) + fill * inside
    if attrs.outline == "outlined":
        width = max(res / 32.0, 0.75)
        band = (0.5 - (d.abs() - width / 2)).clamp(0, 1)
        image = image * (1 - band)  # black edge
    return image.clamp(0, 1)


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # uint8 (N, 3, R, R): exact bytes, so determinism is checkable
    attributes: Tuple[Attributes, ...]

    @property
    def captions(self) -> List[str]:
        return [a.caption() for a in self.attributes]

    def floats(self) -> torch.Tensor:
        """Images as float32 in [-1, 1], the range the diffusion model works in."""
        return self.images.float().div(127.5).sub(1.0)


def make_batch(n: int, *, seed: int, split: str = "train", resolution: int = 32, start: int = 0) -> Batch:
    """Samples ``start .. start+n-1`` of the stream (``seed``, ``split``): same arguments, same bytes."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose train or heldout")

    def draw(index: int):
        gen = torch.Generator().manual_seed(_sample_seed(seed, split, index))
        return gen, sample_attributes(gen, split)

    return render_stream(range(start, start + n), draw, resolution)


def render_stream(indices, draw, resolution: int) -> Batch:
    """A batch of the samples ``indices`` of a stream: ``draw(i)`` gives sample i's generator and
    attributes; the position/rotation jitter then comes from that same generator."""
    images, attrs = [], []
    for index in indices:
        gen, a = draw(index)
        jitter = tuple((torch.rand(3, generator=gen) * torch.tensor([0.08, 0.08, 1.0]) - torch.tensor([0.04, 0.04, 0.0])).tolist())
        images.append(render(a, resolution, jitter=jitter))
        attrs.append(a)
    stacked = torch.stack(images) if images else torch.zeros(0, 3, resolution, resolution)
    return Batch(images=(stacked * 255).round().to(torch.uint8), attributes=tuple(attrs))
