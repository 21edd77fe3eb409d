"""Vocabularies and looks of the synthetic scenes (`mmpt-data synthetic --style`).

Why two styles: defaults tuned on the demo style can overfit its captions, palette and flat background.
`alt` shares only the scene logic (1-2 shapes, a size class, a spatial relation) and changes every
surface a model or a tokenizer could memorise: words, word order, colours, shapes and background, so it
is data no preset was tuned on.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Style:
    """Everything that differs between styles; the scene sampler and placement are shared."""

    name: str
    colours: dict[str, tuple[int, int, int]]
    shapes: tuple[str, ...]
    sizes: dict[str, tuple[float, float]]  # class -> nominal radius range, fraction of the side
    relations: tuple[str, str, str, str]  # words for: left of, right of, above, below (this order)
    phrase: str  # one object; fields {size} {colour} {shape}
    single: str  # a one-object caption; field {a}
    pair: str  # a two-object caption; fields {a} {relation} {b}
    unrotated: frozenset[str]  # shapes without rotation jitter (rotation-invariant ones)
    textured: bool  # False: flat grey background; True: two-tone gradient with stripes
    background_levels: tuple[int, int]  # grey level range of the background's base colour

    def caption(self, phrases: list[str], relation: str | None) -> str:
        """The caption of 1 or 2 object phrases: the whole scene up to jitter."""
        if len(phrases) == 1:
            return self.single.format(a=phrases[0])
        return self.pair.format(a=phrases[0], relation=relation, b=phrases[1])


# The original style (its output is byte-identical to before styles existed). Colours are well separated in
# RGB and in hue, and all far from the (grey) background; size classes are >= 1.48x apart.
DEMO = Style(
    name="demo",
    colours={
        "red": (215, 35, 35),
        "orange": (245, 135, 20),
        "yellow": (240, 220, 40),
        "green": (40, 170, 60),
        "blue": (40, 90, 225),
        "purple": (145, 55, 200),
    },
    shapes=("circle", "square", "triangle", "cross"),
    sizes={"small": (0.085, 0.115), "large": (0.17, 0.22)},
    relations=("to the left of", "to the right of", "above", "below"),
    phrase="a {size} {colour} {shape}",
    single="{a}",
    pair="{a} {relation} {b}",
    unrotated=frozenset({"circle"}),
    textured=False,
    background_levels=(60, 140),
)

# No word, colour or shape of DEMO; shape before colour ("a big star in pink"); a textured background.
ALT = Style(
    name="alt",
    colours={
        "pink": (250, 120, 190),
        "cyan": (40, 215, 225),
        "brown": (125, 70, 20),
        "lime": (165, 235, 40),
        "navy": (25, 30, 125),
        "white": (250, 250, 250),
    },
    shapes=("star", "hexagon", "diamond", "ring"),
    sizes={"little": (0.085, 0.115), "big": (0.17, 0.22)},
    relations=("left of", "right of", "over", "beneath"),
    phrase="a {size} {shape} in {colour}",
    single="there is {a}",
    pair="there is {a} {relation} {b}",
    unrotated=frozenset({"ring"}),
    textured=True,
    background_levels=(95, 165),
)

STYLES: dict[str, Style] = {s.name: s for s in (DEMO, ALT)}
