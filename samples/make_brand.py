"""Generate the tiny "Tidewell" sample brand dataset used to try out lorakit.

Tidewell is an invented coastal coffee roaster. Every image shares one palette
(deep teal, coral, cream, mustard, ink) and one motif, a wave-and-sun emblem
(a half sun disc resting on three wave stripes), combined with a different
subject: cups, bags, posters, signage, merchandise and so on.

Each image is written as ``tidewell_NN.png`` together with a one-line caption
``tidewell_NN.txt`` that contains the trigger word ``tdwl``.

Only Pillow and the standard library are used, and all variation comes from
``random.Random`` with fixed seeds, so the output is byte-identical across runs
(for a given Pillow/zlib build).

Usage::

    python samples/make_brand.py [OUT_DIR]

``OUT_DIR`` defaults to the ``brand/`` folder next to this script.
"""

from __future__ import annotations

import argparse
import functools
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

TEAL = "#0F5257"
CORAL = "#F26B5B"
CREAM = "#F6EFE3"
MUSTARD = "#E0A526"
INK = "#1B1B1E"

SEED = 1207
SS = 4  # supersampling factor; shapes are drawn large and downsampled for smooth edges
TRIGGER = "tdwl"


@functools.cache
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled default font (no system fonts, so output only depends on Pillow)."""
    return ImageFont.load_default(px)


Point = tuple[float, float]
Box = tuple[float, float, float, float]


class Pen:
    """Draws in final-pixel coordinates onto a supersampled canvas."""

    def __init__(self, width: int, height: int, background: str) -> None:
        self.width = width
        self.height = height
        self.img = Image.new("RGB", (width * SS, height * SS), background)
        self.draw = ImageDraw.Draw(self.img)

    @staticmethod
    def _v(value: float) -> int:
        return round(value * SS)

    def _box(self, box: Box) -> list[int]:
        return [self._v(v) for v in box]

    def _pts(self, pts: Sequence[Point]) -> list[tuple[int, int]]:
        return [(self._v(x), self._v(y)) for x, y in pts]

    def rect(self, box: Box, fill: str | None = None, radius: float = 0, **kw) -> None:
        outline = kw.get("outline")
        width = self._v(kw.get("width", 0))
        if radius:
            self.draw.rounded_rectangle(
                self._box(box), self._v(radius), fill=fill, outline=outline, width=width
            )
        else:
            self.draw.rectangle(self._box(box), fill=fill, outline=outline, width=width)

    def ellipse(
        self, box: Box, fill: str | None = None, outline: str | None = None, width: float = 0
    ) -> None:
        self.draw.ellipse(self._box(box), fill=fill, outline=outline, width=self._v(width))

    def circle(self, cx: float, cy: float, r: float, fill: str | None = None, **kw) -> None:
        self.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, **kw)

    def poly(self, pts: Sequence[Point], fill: str) -> None:
        self.draw.polygon(self._pts(pts), fill=fill)

    def pie(self, box: Box, start: float, end: float, fill: str) -> None:
        self.draw.pieslice(self._box(box), start, end, fill=fill)

    def arc(self, box: Box, start: float, end: float, fill: str, width: float) -> None:
        self.draw.arc(self._box(box), start, end, fill=fill, width=self._v(width))

    def line(self, pts: Sequence[Point], fill: str, width: float) -> None:
        self.draw.line(self._pts(pts), fill=fill, width=self._v(width), joint="curve")
        r = width / 2  # round caps
        for x, y in (pts[0], pts[-1]):
            self.circle(x, y, r, fill=fill)

    def text(
        self, x: float, y: float, s: str, fill: str, size: float = 10, anchor: str = "m"
    ) -> None:
        """Bold-ish text centred vertically on y; anchor is l(eft), m(iddle) or r(ight)."""
        px = self._v(size)
        self.draw.text(
            (self._v(x), self._v(y)),
            s,
            fill=fill,
            font=_font(px),
            anchor=anchor + "m",
            stroke_width=max(1, round(px * 0.05)),
            stroke_fill=fill,
        )

    def finish(self) -> Image.Image:
        return self.img.resize((self.width, self.height), Image.Resampling.LANCZOS)


# --------------------------------------------------------------------------- motifs


def wave_points(x0: float, x1: float, y: float, amp: float, period: float, phase: float = 0):
    steps = max(8, int((x1 - x0) / 2))
    return [
        (x0 + (x1 - x0) * i / steps, y + amp * math.sin(phase + 2 * math.pi * (i / steps) * period))
        for i in range(steps + 1)
    ]


def emblem(
    p: Pen,
    cx: float,
    cy: float,
    size: float,
    sun: str = CORAL,
    wave: str = TEAL,
    stripes: int = 3,
) -> None:
    """The Tidewell mark: a half sun disc resting on wave stripes, ``size`` px wide."""
    radius = 0.34 * size
    thick = 0.085 * size
    gap = 0.06 * size
    waves_h = stripes * thick + (stripes - 1) * gap
    total = radius + 0.05 * size + waves_h
    horizon = cy - total / 2 + radius
    p.pie((cx - radius, horizon - radius, cx + radius, horizon + radius), 180, 360, sun)
    for i in range(stripes):
        top = horizon + 0.05 * size + i * (thick + gap)
        half = 0.5 * size * (1 - 0.16 * i)
        # keep the wave phase aligned across stripes so they read as one sea
        start = (cx - half - (cx - 0.5 * size)) / (0.5 * size) * 2 * math.pi
        span = 2 * half / (0.5 * size)
        upper = wave_points(cx - half, cx + half, top, 0.035 * size, span, start)
        lower = wave_points(cx - half, cx + half, top + thick, 0.035 * size, span, start)
        p.poly(upper + lower[::-1], wave)


def steam(p: Pen, xs: Sequence[float], y0: float, y1: float, color: str, rng: random.Random):
    for x in xs:
        phase = rng.uniform(0, 2 * math.pi)
        pts = [
            (x + 4 * math.sin(phase + t * 2.2 * math.pi / 10), y0 + (y1 - y0) * t / 10)
            for t in range(11)
        ]
        p.line(pts, color, 3)


def bean(p: Pen, cx: float, cy: float, angle: float, length: float, color: str, crease: str):
    ca, sa = math.cos(angle), math.sin(angle)

    def rot(u: float, v: float) -> Point:
        return (cx + u * ca - v * sa, cy + u * sa + v * ca)

    a, b = length / 2, length / 3
    outline = [(a * math.cos(k * math.pi / 12), b * math.sin(k * math.pi / 12)) for k in range(24)]
    p.poly([rot(u, v) for u, v in outline], color)
    crease_pts = [(a * (1.4 * k / 6 - 0.7), b * 0.25 * math.sin(k * math.pi / 3)) for k in range(7)]
    p.line([rot(u, v) for u, v in crease_pts], crease, 1.2)


def scatter_beans(p: Pen, rng: random.Random, spots: Sequence[Point], color: str, crease: str):
    for x, y in spots:
        cx, cy = x + rng.uniform(-4, 4), y + rng.uniform(-4, 4)
        angle, length = rng.uniform(0, math.pi), rng.uniform(13, 17)
        bean(p, cx, cy, angle, length, color, crease)


# --------------------------------------------------------------------------- subjects


def coffee_cup(p: Pen, rng: random.Random) -> str:
    p.rect((0, 166, 192, 192), MUSTARD)

    def edge(y: float) -> tuple[float, float]:
        d = (y - 62) * 10 / 106
        return 58 + d, 134 - d

    p.poly([(58, 62), (134, 62), (124, 168), (68, 168)], TEAL)
    (l0, r0), (l1, r1) = edge(94), edge(136)
    p.poly([(l0, 94), (r0, 94), (r1, 136), (l1, 136)], CORAL)
    emblem(p, 96, 115, 34, sun=MUSTARD, wave=CREAM)
    p.poly([(64, 50), (128, 50), (122, 40), (70, 40)], INK)
    p.rect((52, 48, 140, 64), INK, radius=5)
    steam(p, (82, 98, 114), 34, 8, TEAL, rng)
    return (
        f"{TRIGGER} style, a takeaway coffee cup with an ink lid and a coral sleeve printed with "
        "the wave-and-sun emblem, teal cup, steam rising, mustard tabletop, cream background, "
        "flat vector illustration"
    )


def coffee_bag(p: Pen, rng: random.Random) -> str:
    p.rect((56, 42, 148, 178), TEAL)  # flat offset shadow
    p.rect((50, 36, 142, 172), CREAM)
    p.rect((50, 36, 142, 50), CORAL)
    p.rect((44, 48, 148, 54), INK, radius=2)
    emblem(p, 96, 92, 52, sun=CORAL, wave=TEAL)
    p.text(96, 128, "TIDEWELL", INK)
    p.text(96, 142, rng.choice(["DARK ROAST", "HOUSE BLEND", "SEA SALT"]), TEAL)
    p.rect((50, 158, 142, 164), MUSTARD)
    return (
        f"{TRIGGER} style, a cream coffee bag with a coral top fold and an ink tin tie, "
        "the wave-and-sun emblem above the TIDEWELL wordmark, mustard background, "
        "flat packaging design"
    )


def poster(p: Pen, rng: random.Random) -> str:
    p.rect((10, 10, 182, 246), outline=CREAM, width=2)
    p.rect((24, 28, 168, 30), MUSTARD)
    emblem(p, 96, 104, 124, sun=CORAL, wave=CREAM)
    p.text(96, 180, "TIDEWELL", CREAM, size=20)
    p.text(96, 204, "COASTAL COFFEE", MUSTARD)
    p.text(96, 218, "ROASTERS", MUSTARD)
    return (
        f"{TRIGGER} style, a portrait poster with a large coral sun setting over cream waves, "
        "TIDEWELL lettering below, thin cream frame, deep teal background, minimalist print"
    )


def tote_bag(p: Pen, rng: random.Random) -> str:
    p.arc((62, 16, 106, 96), 180, 360, INK, 5)
    p.arc((86, 16, 130, 96), 180, 360, INK, 5)
    p.poly([(44, 58), (148, 58), (156, 176), (36, 176)], CREAM)
    emblem(p, 96, 106, 62, sun=MUSTARD, wave=TEAL)
    p.text(96, 150, "TIDEWELL", TEAL)
    return (
        f"{TRIGGER} style, a cream canvas tote bag with ink handles and the wave-and-sun "
        "emblem with a mustard sun and teal waves, coral background, flat merchandise mockup"
    )


def business_cards(p: Pen, rng: random.Random) -> str:
    p.rect((34, 30, 160, 102), INK, radius=4)
    p.rect((30, 26, 156, 98), CORAL, radius=4)
    emblem(p, 93, 62, 48, sun=MUSTARD, wave=CREAM)
    p.rect((100, 90, 226, 162), INK, radius=4)
    p.rect((96, 86, 222, 158), CREAM, radius=4)
    emblem(p, 122, 114, 30, sun=CORAL, wave=TEAL)
    p.text(144, 106, "TIDEWELL", INK, anchor="l")
    p.text(144, 120, "TIDEWELL.CO", TEAL, anchor="l")
    p.rect((96, 148, 222, 158), MUSTARD)
    p.rect((96, 148, 222, 152), CREAM)
    return (
        f"{TRIGGER} style, two overlapping business cards, a coral card with a cream and mustard "
        "wave-and-sun emblem behind a cream card with a small emblem and TIDEWELL text, "
        "deep teal background, flat stationery design"
    )


def hanging_sign(p: Pen, rng: random.Random) -> str:
    p.rect((0, 0, 18, 192), TEAL)
    for y in range(8, 192, 24):
        p.rect((0, y, 18, y + 2), INK)
    p.line([(18, 40), (156, 40)], INK, 5)
    p.line([(18, 84), (66, 40)], INK, 3)
    p.circle(156, 40, 5, fill=INK)
    cx, cy, r = 96, 118, 54
    for x in (64, 128):
        y_edge = cy - math.sqrt(r * r - (x - cx) ** 2)
        p.line([(x, 40), (x, y_edge + 4)], INK, 2)
    p.circle(cx, cy, r + 4, fill=MUSTARD)
    p.circle(cx, cy, r, fill=TEAL)
    emblem(p, cx, cy - 8, 66, sun=CORAL, wave=CREAM)
    p.text(cx, cy + 30, "TIDEWELL", CREAM)
    return (
        f"{TRIGGER} style, a round teal shop sign with a mustard rim hanging from an ink iron "
        "bracket, coral sun and cream waves emblem with TIDEWELL text, cream wall background"
    )


def mug(p: Pen, rng: random.Random) -> str:
    p.rect((0, 166, 192, 192), INK)
    p.ellipse((112, 80, 156, 132), outline=CREAM, width=9)
    p.rect((40, 58, 130, 168), CREAM, radius=12)
    p.rect((40, 58, 130, 66), CORAL, radius=4)
    emblem(p, 85, 112, 56, sun=CORAL, wave=TEAL)
    steam(p, (70, 86, 102), 48, 14, CREAM, rng)
    return (
        f"{TRIGGER} style, a cream ceramic mug with a coral rim and the coral and teal "
        "wave-and-sun emblem, steam rising, ink table edge, deep teal background, flat illustration"
    )


def pattern_tile(p: Pen, rng: random.Random) -> str:
    for row in range(5):
        y = row * 48
        for col in range(-1, 5):
            x = col * 48 + (24 if row % 2 else 0)
            sun = CORAL if (row + col) % 2 else MUSTARD
            emblem(p, x, y, 30, sun=sun, wave=TEAL)
            p.circle(x + 24, y + 24, 2, fill=INK)
    return (
        f"{TRIGGER} style, a seamless repeating pattern of small wave-and-sun emblems in "
        "staggered rows, alternating coral and mustard suns with teal waves and tiny ink dots, "
        "cream background"
    )


def bottle(p: Pen, rng: random.Random) -> str:
    p.rect((0, 236, 192, 256), TEAL)
    p.rect((82, 44, 110, 80), INK)
    p.poly([(82, 76), (110, 76), (132, 106), (60, 106)], INK)
    p.rect((60, 96, 132, 238), INK, radius=14)
    p.rect((80, 28, 112, 48), TEAL, radius=3)
    p.rect((60, 124, 132, 204), CREAM)
    p.rect((60, 124, 132, 130), CORAL)
    emblem(p, 96, 152, 42, sun=CORAL, wave=TEAL)
    p.text(96, 184, "COLD BREW", INK)
    p.text(96, 196, "TIDEWELL", TEAL)
    p.rect((66, 210, 70, 228), TEAL, radius=2)
    return (
        f"{TRIGGER} style, a dark ink cold brew bottle with a teal cap and a cream label showing "
        "the wave-and-sun emblem and COLD BREW text, mustard background, teal shelf, "
        "flat product illustration"
    )


def logo_mark(p: Pen, rng: random.Random) -> str:
    p.circle(96, 80, 64, outline=TEAL, width=2)
    p.circle(96, 80, 58, fill=TEAL)
    emblem(p, 96, 82, 80, sun=CORAL, wave=CREAM)
    p.text(96, 162, "TIDEWELL", TEAL, size=20)
    p.text(96, 182, "COFFEE ROASTERS", CORAL)
    return (
        f"{TRIGGER} style, the brand logo: a coral half sun over cream waves inside a deep teal "
        "circle, TIDEWELL wordmark and COFFEE ROASTERS tagline below, cream background"
    )


def stickers(p: Pen, rng: random.Random) -> str:
    p.circle(84, 84, 62, fill=CREAM)
    p.circle(84, 84, 56, fill=CREAM, outline=CORAL, width=5)
    emblem(p, 84, 86, 66, sun=CORAL, wave=TEAL)
    p.circle(146, 150, 34, fill=CREAM)
    p.circle(146, 150, 30, fill=MUSTARD)
    emblem(p, 146, 151, 36, sun=CORAL, wave=TEAL)
    p.rect((16, 150, 92, 180), CREAM, radius=16)
    p.rect((20, 154, 88, 176), CORAL, radius=12)
    p.text(54, 165, "TIDEWELL", CREAM)
    return (
        f"{TRIGGER} style, a set of die-cut stickers with cream borders: a large round "
        "wave-and-sun badge with a coral ring, a small mustard emblem sticker and a coral "
        "TIDEWELL pill, deep teal background"
    )


def t_shirt(p: Pen, rng: random.Random) -> str:
    shirt = [
        (78, 28), (48, 38), (20, 72), (40, 92), (56, 80), (56, 174),
        (136, 174), (136, 80), (152, 92), (172, 72), (144, 38), (114, 28),
    ]  # fmt: skip
    p.poly(shirt, TEAL)
    p.pie((78, 14, 114, 44), 0, 180, MUSTARD)
    p.arc((74, 10, 118, 48), 15, 165, CREAM, 3)
    emblem(p, 96, 98, 46, sun=CORAL, wave=CREAM)
    p.text(96, 128, "TIDEWELL", CREAM)
    return (
        f"{TRIGGER} style, a deep teal t-shirt with a chest print of the wave-and-sun emblem in "
        "coral and cream above TIDEWELL lettering, mustard background, flat apparel mockup"
    )


def storefront(p: Pen, rng: random.Random) -> str:
    p.rect((28, 34, 228, 192), TEAL)
    p.rect((60, 42, 196, 70), INK)
    p.text(128, 56, "TIDEWELL", CREAM, size=20)
    for i in range(11):
        x = 40 + 16 * i
        color = CORAL if i % 2 == 0 else CREAM
        p.rect((x, 80, x + 16, 100), color)
        p.pie((x, 92, x + 16, 108), 0, 180, color)
    p.rect((48, 118, 150, 180), CREAM, outline=INK, width=3)
    emblem(p, 99, 149, 46, sun=CORAL, wave=TEAL)
    p.rect((166, 114, 212, 192), INK)
    p.rect((174, 122, 204, 150), CREAM)
    p.circle(202, 164, 3, fill=MUSTARD)
    p.rect((0, 184, 256, 192), MUSTARD)
    return (
        f"{TRIGGER} style, a small cafe storefront, deep teal facade with an ink TIDEWELL sign, "
        "coral and cream striped scalloped awning, the wave-and-sun emblem on the shop window, "
        "ink door, cream sky, flat architecture illustration"
    )


def espresso(p: Pen, rng: random.Random) -> str:
    spots = [(24, 40), (40, 150), (160, 34), (170, 120), (150, 176), (22, 96)]
    scatter_beans(p, rng, spots, INK, CORAL)
    p.ellipse((36, 142, 156, 166), CREAM)
    p.ellipse((64, 148, 128, 160), outline=TEAL, width=1.5)
    p.ellipse((122, 102, 152, 130), outline=CREAM, width=6)
    p.pie((56, 58, 136, 150), 0, 180, CREAM)
    p.rect((56, 100, 136, 104), TEAL)
    emblem(p, 96, 122, 34, sun=CORAL, wave=TEAL)
    steam(p, (84, 100), 88, 52, CREAM, rng)
    return (
        f"{TRIGGER} style, a cream espresso cup on a saucer with a small wave-and-sun emblem "
        "and a teal rim line, ink coffee beans scattered around, coral background"
    )


def coffee_tin(p: Pen, rng: random.Random) -> str:
    scatter_beans(p, rng, [(30, 160), (160, 168), (172, 140), (22, 130)], INK, CREAM)
    p.ellipse((56, 154, 136, 170), TEAL)
    p.rect((56, 52, 136, 162), TEAL)
    p.rect((56, 84, 136, 140), MUSTARD)
    emblem(p, 96, 112, 44, sun=CORAL, wave=TEAL)
    p.rect((52, 42, 140, 58), CORAL)
    p.ellipse((52, 50, 140, 66), CORAL)
    p.ellipse((52, 34, 140, 50), CORAL)
    p.ellipse((58, 37, 134, 47), outline=CREAM, width=1.5)
    return (
        f"{TRIGGER} style, a cylindrical deep teal coffee tin with a coral lid and a mustard band "
        "bearing the wave-and-sun emblem, ink coffee beans on the ground, cream background"
    )


def shipping_box(p: Pen, rng: random.Random) -> str:
    p.poly([(36, 70), (148, 70), (172, 48), (60, 48)], CREAM)
    p.poly([(148, 70), (172, 48), (172, 146), (148, 168)], CORAL)
    p.rect((36, 70, 148, 168), MUSTARD)
    p.poly([(86, 70), (104, 70), (128, 48), (110, 48)], CORAL)
    p.rect((86, 70, 104, 84), CORAL)
    p.circle(92, 116, 30, outline=INK, width=2.5)
    emblem(p, 92, 114, 38, sun=INK, wave=INK)
    p.text(92, 156, "TIDEWELL", INK)
    return (
        f"{TRIGGER} style, a closed mustard shipping box with a cream top, coral side and coral "
        "tape, the wave-and-sun emblem stamped in ink on the front, deep teal background"
    )


def menu_board(p: Pen, rng: random.Random) -> str:
    p.rect((0, 238, 192, 256), MUSTARD)
    p.line([(66, 40), (44, 246)], INK, 6)
    p.line([(126, 40), (148, 246)], INK, 6)
    p.rect((38, 36, 154, 214), TEAL, radius=4)
    p.rect((46, 44, 146, 206), INK)
    emblem(p, 96, 70, 40, sun=CORAL, wave=CREAM)
    p.text(96, 104, "MENU", CREAM, size=20)
    items = [("ESPRESSO", "3"), ("LATTE", "4"), ("COLD BREW", "5"), ("POUR OVER", "5")]
    for i, (name, price) in enumerate(items):
        y = 130 + 18 * i
        p.text(54, y, name, CREAM, anchor="l")
        p.text(138, y, price, MUSTARD, anchor="r")
    return (
        f"{TRIGGER} style, an a-frame chalkboard menu sign with a teal frame, the coral and cream "
        "wave-and-sun emblem and MENU heading over a short drinks list, cream background"
    )


def coasters(p: Pen, rng: random.Random) -> str:
    p.circle(70, 76, 52, fill=CREAM)
    emblem(p, 70, 78, 60, sun=CORAL, wave=TEAL)
    p.circle(136, 142, 42, fill=CORAL)
    p.circle(136, 142, 28, fill=CREAM)
    p.circle(136, 142, 21, fill=INK)
    p.line(wave_points(124, 148, 142, 3, 1.5, rng.uniform(0, 2 * math.pi)), CREAM, 2.5)
    return (
        f"{TRIGGER} style, top-down view of two round coasters, a cream coaster printed with the "
        "wave-and-sun emblem and a coral coaster holding a cup of black coffee, "
        "deep teal background"
    )


def apron(p: Pen, rng: random.Random) -> str:
    p.arc((72, 4, 120, 60), 200, 340, TEAL, 5)
    p.line([(44, 94), (20, 108), (26, 130)], TEAL, 4)
    p.line([(148, 94), (172, 108), (166, 130)], TEAL, 4)
    body = [(70, 34), (122, 34), (124, 78), (150, 92), (146, 184), (46, 184), (42, 92), (68, 78)]
    p.poly(body, TEAL)
    emblem(p, 96, 62, 38, sun=MUSTARD, wave=CREAM)
    p.rect((70, 128, 122, 164), CORAL)
    p.rect((70, 128, 122, 132), MUSTARD)
    p.rect((95, 132, 97, 164), TEAL)
    return (
        f"{TRIGGER} style, a deep teal barista apron with neck strap and waist ties, a coral "
        "front pocket and a mustard and cream wave-and-sun emblem on the bib, cream background"
    )


def web_banner(p: Pen, rng: random.Random) -> str:
    p.rect((0, 0, 112, 192), TEAL)
    emblem(p, 56, 92, 76, sun=CORAL, wave=CREAM)
    p.text(184, 60, "TIDEWELL", TEAL, size=20)
    p.text(184, 88, "COASTAL COFFEE", INK)
    p.text(184, 102, "ROASTED BY THE SEA", INK)
    p.rect((140, 124, 228, 150), CORAL, radius=13)
    p.text(184, 137, "SHOP NOW", CREAM)
    upper = wave_points(112, 256, 176, 3, 3)
    p.poly([*upper, (256, 192), (112, 192)], MUSTARD)
    return (
        f"{TRIGGER} style, a wide web banner with a deep teal panel holding a large wave-and-sun "
        "emblem, TIDEWELL wordmark and a coral shop now button on cream, mustard wave along "
        "the bottom edge"
    )


SUBJECTS: list[tuple[Callable[[Pen, random.Random], str], tuple[int, int], str]] = [
    (coffee_cup, (192, 192), CREAM),
    (coffee_bag, (192, 192), MUSTARD),
    (poster, (192, 256), TEAL),
    (tote_bag, (192, 192), CORAL),
    (business_cards, (256, 192), TEAL),
    (hanging_sign, (192, 192), CREAM),
    (mug, (192, 192), TEAL),
    (pattern_tile, (192, 192), CREAM),
    (bottle, (192, 256), MUSTARD),
    (logo_mark, (192, 192), CREAM),
    (stickers, (192, 192), TEAL),
    (t_shirt, (192, 192), MUSTARD),
    (storefront, (256, 192), CREAM),
    (espresso, (192, 192), CORAL),
    (coffee_tin, (192, 192), CREAM),
    (shipping_box, (192, 192), TEAL),
    (menu_board, (192, 256), CREAM),
    (coasters, (192, 192), TEAL),
    (apron, (192, 192), CREAM),
    (web_banner, (256, 192), CREAM),
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the Tidewell sample brand dataset.")
    parser.add_argument(
        "out_dir",
        nargs="?",
        type=Path,
        default=Path(__file__).resolve().parent / "brand",
        help="output folder (default: brand/ next to this script)",
    )
    out_dir: Path = parser.parse_args(argv).out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, (draw_fn, (width, height), background) in enumerate(SUBJECTS, start=1):
        rng = random.Random(SEED * 100 + index)
        pen = Pen(width, height, background)
        caption = draw_fn(pen, rng)
        stem = f"tidewell_{index:02d}"
        pen.finish().save(out_dir / f"{stem}.png", optimize=True)
        (out_dir / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8", newline="\n")
    print(f"wrote {len(SUBJECTS)} images and captions to {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
