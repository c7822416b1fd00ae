"""A generated, visually grounded instruction dataset: rendered shapes + multi-turn questions.

Each sample is one 36x36 picture (a 3x3 grid of 12-pixel cells; 1-4 cells hold a shape of some
colour, kind and size) and a conversation of several question/answer turns about it, in the
style of LLaVA's instruction data: a short user question, then an assistant answer that restates
the question in full before giving what only the picture can tell. Every answer word is tagged:

- ``IMAGE`` words can only come from the picture (a colour, a shape, a size, a count, a position,
  yes/no);
- ``TEXT`` words follow from the text (function words, the template, words copied from the
  question, and words fixed by an earlier answer word, e.g. "is" after "yes , there").

The picture's cells line up with the vision tower's patches (patch 12), so one visual token
describes one cell. Splits are seeded and disjoint by construction (separate generator streams).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230),
    "yellow": (235, 210, 40), "purple": (150, 60, 200), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
NUMBERS = ("zero", "one", "two", "three", "four")
CELL = 12
GRID = 3
IMAGE_SIZE = CELL * GRID

TEXT, IMAGE = 1, 2  # answer-word tags (0 = not an answer word)

SPECIAL = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "<image>", "<user>", "<assistant>"]


@dataclass
class Obj:
    cell: int  # 0..8, row-major
    colour: str
    shape: str
    size: str

    @property
    def where(self) -> tuple[str, str]:
        return ROWS[self.cell // GRID], COLS[self.cell % GRID]


@dataclass
class Sample:
    objects: list[Obj]
    pixels: np.ndarray  # (3, 36, 36) float32 in [-1, 1]
    turns: list[tuple[list[str], list[tuple[str, int]]]] = field(default_factory=list)


# --------------------------------------------------------------------------- rendering
def render(objects: list[Obj], rng: random.Random) -> np.ndarray:
    """Draw the objects with Pillow on a light, slightly noisy background; (3, H, W) in [-1, 1]."""
    from PIL import Image, ImageDraw

    bg = tuple(235 + rng.randint(-10, 10) for _ in range(3))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    d = ImageDraw.Draw(img)
    for o in objects:
        r, c = divmod(o.cell, GRID)
        half = 5.5 if o.size == "large" else 3.0
        cx = c * CELL + CELL / 2 + rng.uniform(-0.6, 0.6)
        cy = r * CELL + CELL / 2 + rng.uniform(-0.6, 0.6)
        col = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLOURS[o.colour])
        box = (cx - half, cy - half, cx + half, cy + half)
        if o.shape == "circle":
            d.ellipse(box, fill=col)
        elif o.shape == "square":
            d.rectangle(box, fill=col)
        elif o.shape == "triangle":
            d.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=col)
        else:  # diamond
            d.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=col)
    a = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 0.03, a.shape)
    return (a + noise).astype(np.float32)


# --------------------------------------------------------------------------- conversations
def _t(words: str) -> list[tuple[str, int]]:
    return [(w, TEXT) for w in words.split()]


def _i(words: str) -> list[tuple[str, int]]:
    return [(w, IMAGE) for w in words.split()]


def _unique(objects: list[Obj], key) -> list[Obj]:
    vals = [key(o) for o in objects]
    return [o for o, v in zip(objects, vals) if vals.count(v) == 1]


def turn_colour(objs, rng):
    cands = _unique(objs, lambda o: (o.size, o.shape))
    if not cands:
        return None
    o = rng.choice(cands)
    q = f"what colour is the {o.size} {o.shape} ?".split()
    a = (_t(f"looking at the picture , the {o.size} {o.shape} is") + _i(o.colour)
         + _t(f". so the colour of the {o.shape} is {o.colour} ."))
    return q, a


def turn_shape(objs, rng):
    cands = _unique(objs, lambda o: o.colour)
    if not cands:
        return None
    o = rng.choice(cands)
    q = f"what is the {o.colour} object ?".split()
    a = (_t(f"the {o.colour} object in the picture is a") + _i(f"{o.size} {o.shape}")
         + _t(f". so the {o.colour} object is a {o.shape} ."))
    return q, a


def turn_where(objs, rng):
    cands = _unique(objs, lambda o: (o.colour, o.shape))
    if not cands:
        return None
    o = rng.choice(cands)
    row, col = o.where
    q = f"where is the {o.colour} {o.shape} ?".split()
    a = (_t(f"the {o.colour} {o.shape} is in the") + _i(f"{row} {col}")
         + _t(f"part of the picture . so it is at the {row} {col} ."))
    return q, a


def turn_count(objs, rng):
    q = "how many shapes are there ?".split()
    n = NUMBERS[len(objs)]
    noun = "shape" if len(objs) == 1 else "shapes"
    verb = "is" if len(objs) == 1 else "are"
    a = (_t("i count the shapes . there") + _i(verb) + _i(n)
         + _t(f"{noun} in the picture . so the answer is {n} ."))
    return q, a


def turn_exists(objs, rng):
    present = {(o.colour, o.shape) for o in objs}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
    else:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    q = f"is there a {colour} {shape} ?".split()
    if (colour, shape) in present:
        a = _i("yes") + _t(f", there is a {colour} {shape} in the picture . so the answer is yes .")
    else:
        a = _i("no") + _t(f", there is no {colour} {shape} in the picture . so the answer is no .")
    return q, a


TURNS = (turn_colour, turn_shape, turn_where, turn_count, turn_exists)


def make_sample(rng: random.Random, turns: int, max_objects: int = 3) -> Sample:
    n = rng.randint(1, max_objects)
    cells = rng.sample(range(GRID * GRID), n)
    objects = [Obj(c, rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES)) for c in cells]
    s = Sample(objects, render(objects, rng))
    kinds = list(TURNS)
    rng.shuffle(kinds)
    for f in kinds:
        if len(s.turns) == turns:
            break
        t = f(objects, rng)
        if t is not None:
            s.turns.append(t)
    return s


def vocabulary() -> list[str]:
    """Every word the generator can write (the tokenizer's vocabulary, after the special tokens)."""
    words = set()
    for f in TURNS:
        for seed in range(400):
            rng = random.Random(seed)
            n = rng.randint(1, 4)
            objs = [Obj(c, rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES))
                    for c in rng.sample(range(9), n)]
            t = f(objs, rng)
            if t:
                words.update(t[0])
                words.update(w for w, _ in t[1])
    words.update(COLOURS)
    words.update(SHAPES)
    words.update(SIZES)
    words.update(ROWS)
    words.update(COLS)
    words.update(NUMBERS)
    words.update(["is", "are", "shape", "shapes", "yes", "no"])
    return sorted(words)


def generate(n: int, seed: int, split: str, turns: int = 3) -> list[Sample]:
    """``n`` samples of ``split`` ("train", "val", "test"); each split has its own stream."""
    rng = random.Random(f"{seed}/{split}")
    return [make_sample(rng, turns) for _ in range(n)]
