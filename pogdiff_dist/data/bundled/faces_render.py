"""Faces-IT2I's drawing: identities as trait vectors, per-image variations, the renderer.

Every identity is a vector of traits (face and jaw shape, skin tone, hair style and colour,
eye spacing and size, eyebrows, nose, mouth, glasses, facial hair) drawn once from
``IDENTITY_SEED``; every image varies the nuisances (pose, expression, lighting,
background). :mod:`pogdiff_dist.data.bundled.faces` turns them into the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
from PIL import Image

RENDER_VERSION = 1  # bump when drawing changes, so stamped folders are rebuilt
IDENTITY_SEED = 20250703  # the traits of every identity; never depends on data.seed

# Made-up names; no first name or surname appears twice in either list or across them.
TARGET_NAMES: tuple[str, ...] = (
    "Mara Quill", "Tobin Vale", "Ilse Marrow", "Corin Ashby", "Nadia Fenwick", "Oren Castell",
    "Lina Dorsey", "Pavel Brandt", "Sena Holloway", "Ewan Rook", "Talia Penrose", "Rafe Linden",
    "Yara Whitcombe", "Milo Thorne", "Anouk Sterling", "Desmond Kerr",
)
BASE_NAMES: tuple[str, ...] = (
    "Beatrix Hale", "Casimir Wren", "Delphine Ortega", "Emrys Calloway", "Fiora Banks",
    "Gideon Marsh", "Hesper Lyle", "Ivo Pemberton", "Juno Radcliffe", "Kasper Dunmore",
    "Lorelei Finch", "Matthias Crane", "Noemi Blackwood", "Osric Harlow", "Petra Galloway",
    "Quentin Sorrel", "Rosalind Voss", "Silas Ambrose", "Thea Kingsley", "Ulric Mayfield",
    "Vesna Corbett", "Wendell Pryce", "Xenia Hartwell", "Zoltan Everly",
)

HAIR_STYLES = ("bald", "buzz", "short", "side", "long", "bun", "curly")
HAIR_COLOURS = {"black": (28, 24, 24), "dark brown": (66, 42, 28), "brown": (122, 80, 44),
                "auburn": (150, 62, 30), "blond": (222, 188, 104), "grey": (150, 150, 152),
                "white": (232, 230, 224)}
SKIN_TONES = np.array([(255, 226, 200), (240, 194, 160), (222, 170, 128), (196, 134, 94),
                       (158, 102, 68), (108, 70, 46)], dtype=np.float64)
EYE_COLOURS = ((92, 56, 30), (50, 34, 24), (70, 120, 190), (70, 130, 80), (120, 130, 140))
FRAME_COLOURS = ((20, 20, 20), (110, 70, 40), (190, 40, 40), (40, 70, 170), (200, 165, 60))
GLASSES = ("none", "round", "square")
FACIAL_HAIR = ("none", "moustache", "beard")

EXPRESSIONS = ("smiling", "with a neutral expression", "frowning")
TILTS = ("head tilted left", "head upright", "head tilted right")
LIGHTS = ("the left", "the right", "above", "the front")
BACKGROUNDS = {"blue": (70, 110, 200), "green": (80, 160, 90), "red": (200, 70, 60),
               "yellow": (230, 205, 70), "purple": (130, 80, 170), "orange": (235, 140, 50),
               "grey": (128, 128, 128), "teal": (50, 150, 150)}
_LIGHT_DIR = {"the left": (-1.0, 0.0), "the right": (1.0, 0.0), "above": (0.0, -1.0), "the front": (0.0, 0.0)}


@dataclass(frozen=True)
class Identity:
    """Traits of one person. Lengths are in units of the image width, relative to the
    face centre (x right, y down)."""

    name: str
    face_w: float  # half-width of the face
    face_h: float  # half-height of the face
    jaw: float  # superellipse exponent of the lower face: < 2 pointed chin, > 2 square jaw
    skin: float  # 0 (light) .. 1 (dark), along SKIN_TONES
    hair_style: str
    hair_colour: str
    side: int  # +1 / -1: which side a side fringe sweeps to
    eye_y: float
    eye_spacing: float  # half the distance between the eye centres
    eye_w: float  # eye half-width
    eye_open: float  # eye half-height / half-width
    eye_colour: int
    brow_thickness: float
    brow_slope: float  # inner end lower (> 0) or higher (< 0) than the outer end
    nose_len: float
    nose_w: float
    nose_style: int  # 0 line, 1 triangle, 2 round tip
    mouth_gap: float  # nose tip to mouth
    mouth_w: float  # mouth half-width
    glasses: str
    frame_colour: int
    facial_hair: str

    def signature(self) -> tuple:
        """The salient, discrete traits: what tells two people apart at a glance."""
        return (self.hair_style, self.hair_colour, self.glasses != "none", self.facial_hair,
                min(int(self.skin * 3), 2))

    def vector(self) -> np.ndarray:
        """All traits but the name as numbers (a category as its index)."""
        options = {"hair_style": HAIR_STYLES, "hair_colour": tuple(HAIR_COLOURS), "glasses": GLASSES,
                   "facial_hair": FACIAL_HAIR}
        return np.array([options[f.name].index(getattr(self, f.name)) if f.name in options
                         else float(getattr(self, f.name)) for f in fields(self) if f.name != "name"])


def _draw_identity(name: str, rng: np.random.Generator) -> Identity:
    u = rng.uniform
    face_w = u(0.19, 0.245)
    eye_w = u(0.028, 0.04)
    nose_len = u(0.075, 0.115)
    return Identity(
        name=name, face_w=face_w, face_h=u(0.26, 0.31), jaw=u(1.6, 3.4), skin=u(0.0, 1.0),
        hair_style=str(rng.choice(HAIR_STYLES)), hair_colour=str(rng.choice(tuple(HAIR_COLOURS))),
        side=int(rng.choice((-1, 1))), eye_y=u(-0.075, -0.035),
        eye_spacing=u(0.072, min(0.105, face_w - eye_w - 0.035)), eye_w=eye_w, eye_open=u(0.45, 0.7),
        eye_colour=int(rng.integers(len(EYE_COLOURS))), brow_thickness=u(0.008, 0.02),
        brow_slope=u(-0.012, 0.012), nose_len=nose_len, nose_w=u(0.018, 0.038),
        nose_style=int(rng.integers(3)), mouth_gap=u(0.035, 0.055), mouth_w=u(0.045, 0.08),
        glasses=str(rng.choice(GLASSES, p=(0.6, 0.2, 0.2))), frame_colour=int(rng.integers(len(FRAME_COLOURS))),
        facial_hair=str(rng.choice(FACIAL_HAIR, p=(0.55, 0.2, 0.25))),
    )


@lru_cache(maxsize=1)
def identities() -> dict[str, Identity]:
    """Every identity, targets first. A draw is rejected until its salient traits
    differ from every earlier identity's in at least two places, so any two people
    (and in particular every base person and every target) look different."""
    rng = np.random.default_rng(IDENTITY_SEED)
    out: dict[str, Identity] = {}
    for name in TARGET_NAMES + BASE_NAMES:
        while True:
            ident = _draw_identity(name, rng)
            sig = ident.signature()
            if all(sum(a != b for a, b in zip(sig, o.signature())) >= 2 for o in out.values()):
                break
        out[name] = ident
    return out


@dataclass(frozen=True)
class Variation:
    """What changes between two images of one identity. ``tilt`` is in degrees,
    positive = the top of the head leans to the image's left."""

    expression: str
    tilt_label: str
    light: str
    background: str
    tilt: float
    shift: tuple[float, float]
    scale: float
    mouth_curve: float  # > 0 smile, < 0 frown
    light_strength: float
    background_rgb: tuple[int, int, int]


def sample_variation(rng: np.random.Generator) -> Variation:
    """Categories first, then continuous values inside each category with a margin
    between categories, so a caption is never ambiguous about its image."""
    expression = str(rng.choice(EXPRESSIONS))
    tilt_label = str(rng.choice(TILTS))
    light = str(rng.choice(LIGHTS))
    background = str(rng.choice(tuple(BACKGROUNDS)))
    tilt = {"head tilted left": rng.uniform(7, 16), "head upright": rng.uniform(-2.5, 2.5),
            "head tilted right": rng.uniform(-16, -7)}[tilt_label]
    curve = {"smiling": rng.uniform(0.022, 0.032), "with a neutral expression": rng.uniform(-0.003, 0.003),
             "frowning": rng.uniform(-0.026, -0.016)}[expression]
    strength = rng.uniform(0.25, 0.42) if light != "the front" else rng.uniform(0.0, 0.08)
    rgb = np.clip(np.array(BACKGROUNDS[background]) + rng.integers(-12, 13, size=3), 0, 255)
    return Variation(expression, tilt_label, light, background, float(tilt),
                     (float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.035, 0.035))),
                     float(rng.uniform(0.92, 1.08)), float(curve), float(strength),
                     tuple(int(c) for c in rgb))


def caption_for(name: str, var: Variation) -> str:
    """Names the identity and every captioned part of ``var``; the evaluation prompt
    ``"An image of {name}."`` is its prefix. At most 31 MiniLM tokens (max_length 32)."""
    return (f"An image of {name}, {var.expression}, {var.tilt_label}, lit from {var.light}, "
            f"on a {var.background} background.")


_FACE_ZOOM = 1.25  # a tight head crop, as in face datasets: the face, not the backdrop, fills the frame
_FACE_CENTRE_Y = 0.56


def _supersample(resolution: int) -> int:
    """Draw at 4x (2x, 1x for large images) and box-filter down: anti-aliased edges."""
    return max(1, min(4, 512 // resolution))


def render(ident: Identity, var: Variation, resolution: int = 32) -> np.ndarray:
    """``[resolution, resolution, 3]`` uint8 RGB. Shapes are evaluated as masks on a
    supersampled grid mapped into the face's own frame, so pose needs no resampling."""
    ss = _supersample(resolution)
    size = resolution * ss
    c = (np.arange(size) + 0.5) / size
    px, py = np.meshgrid(c, c)  # image coordinates in [0, 1], y down
    # image -> face frame: undo shift, rotation (about the face centre) and scale
    dx, dy = px - 0.5 - var.shift[0], py - _FACE_CENTRE_Y - var.shift[1]
    t = np.deg2rad(var.tilt)
    zoom = _FACE_ZOOM * var.scale
    x = (np.cos(t) * dx - np.sin(t) * dy) / zoom
    y = (np.sin(t) * dx + np.cos(t) * dy) / zoom

    img = np.empty((size, size, 3))
    img[:] = var.background_rgb
    skin = _skin_rgb(ident.skin)
    hair = np.array(HAIR_COLOURS[ident.hair_colour], dtype=np.float64)
    a, b = ident.face_w, ident.face_h

    def paint(mask, rgb):
        img[mask] = rgb

    def ellipse(cx, cy, rx, ry):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0

    # superellipse "radius" of the face: exponent 2.2 above the centre, the jaw's below
    upper = y < 0
    ax, ay = np.abs(x / a), np.abs(y / b)
    face_r = np.where(upper, ax ** 2.2 + ay ** 2.2, ax ** ident.jaw + ay ** ident.jaw)

    def face_outline(grow=1.0):  # the outline scaled by ``grow``: r(x / g) = r(x) / g^n
        return face_r <= np.where(upper, grow ** 2.2, grow ** ident.jaw)

    def segment(x0, y0, x1, y1, half_thickness):
        vx, vy = x1 - x0, y1 - y0
        s = np.clip(((x - x0) * vx + (y - y0) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
        return (x - x0 - s * vx) ** 2 + (y - y0 - s * vy) ** 2 <= half_thickness ** 2

    style = ident.hair_style
    # behind the head
    if style == "long":
        paint(ellipse(0, -0.04, a * 1.25, b * 1.12) | ((np.abs(x) < a * 1.22) & (y > -0.04) & (y < b * 0.95)), hair)
    elif style == "curly":
        r = np.hypot(x / 1.05, y + 0.28 * b)
        theta = np.arctan2(y + 0.28 * b, x)
        paint((r < a * 1.5 * (1 + 0.07 * np.sin(9 * theta))) & (y < b * 0.3), hair)
    elif style == "bun":
        paint(ellipse(0, -b * 1.12, 0.075, 0.065), hair)
    paint((np.abs(x) < a * 0.42) & (y > b * 0.4), skin * 0.86)  # neck
    paint(ellipse(-a, 0.0, 0.035, 0.06) | ellipse(a, 0.0, 0.035, 0.06), skin * 0.92)  # ears
    paint(face_outline(), skin)

    eye_y, es = ident.eye_y, ident.eye_spacing
    nose_tip = eye_y + ident.nose_len
    mouth_y = nose_tip + ident.mouth_gap
    if ident.facial_hair == "beard":
        beard = face_outline(1.04) & ((y > mouth_y - 0.02) | ((np.abs(x) > a * 0.75) & (y > nose_tip - 0.02)))
        paint(beard, hair * 0.9)

    # on top of the head
    cap = None
    if style == "bald":  # a horseshoe of hair at the sides
        cap = face_outline(1.06) & (np.abs(x) > a * 0.8) & (y > -0.45 * b) & (y < 0.02)
    elif style == "buzz":
        cap = face_outline(1.03) & (y < -0.62 * b + 0.55 * b * (np.abs(x) / a) ** 4)
    elif style in ("short", "long", "curly"):
        part = 0.12 * b * np.maximum(0, 1 - np.abs(x) / (0.3 * a)) if style == "long" else 0.0
        cap = face_outline(1.1) & (y < -0.52 * b - part + 0.45 * b * (np.abs(x) / a) ** 4)
    elif style == "side":
        cap = face_outline(1.1) & (y < -0.5 * b + 0.22 * b * ident.side * x / a + 0.4 * b * (np.abs(x) / a) ** 4)
    elif style == "bun":
        cap = face_outline(1.04) & (y < -0.6 * b + 0.5 * b * (np.abs(x) / a) ** 4)
    if cap is not None:
        paint(cap, 0.55 * hair + 0.45 * skin if style == "buzz" else hair)

    # eyebrows: raised when smiling, inner ends pulled down when frowning
    brow_y = eye_y - ident.eye_w * ident.eye_open - 0.03 - (0.008 if var.mouth_curve > 0.01 else 0.0)
    drop = ident.brow_slope + (0.014 if var.mouth_curve < -0.01 else 0.0)
    brow = hair * 0.75
    for s in (-1, 1):
        paint(segment(s * (es + ident.eye_w * 1.1), brow_y, s * (es - ident.eye_w * 0.9), brow_y + drop,
                      ident.brow_thickness), brow)

    ew, eh = ident.eye_w, ident.eye_w * ident.eye_open
    for s in (-1, 1):
        paint(ellipse(s * es, eye_y, ew, eh), (245, 245, 240))
        paint(ellipse(s * es, eye_y, eh * 0.95, eh * 0.95), EYE_COLOURS[ident.eye_colour])
        paint(ellipse(s * es, eye_y, eh * 0.45, eh * 0.45), (15, 15, 15))

    shade = skin * 0.72
    nw = ident.nose_w
    if ident.nose_style == 0:
        paint(segment(0, eye_y + 0.02, nw * 0.3, nose_tip, 0.006)
              | segment(-nw * 0.6, nose_tip, nw * 0.6, nose_tip, 0.006), shade)
    elif ident.nose_style == 1:
        frac = (y - (eye_y + 0.015)) / (nose_tip - eye_y - 0.015)
        paint((frac >= 0) & (frac <= 1) & (np.abs(x) <= nw * frac), skin * 0.85)
        paint(segment(-nw, nose_tip, nw, nose_tip, 0.005), shade)
    else:
        paint(ellipse(0, nose_tip - 0.01, nw * 0.9, 0.017), shade)
        paint(ellipse(0, nose_tip - 0.015, nw * 0.55, 0.011), skin * 0.9)

    mw, curve = ident.mouth_w, var.mouth_curve
    if ident.facial_hair in ("moustache", "beard"):
        lip_y = mouth_y - 0.45 * curve - 0.02
        paint(segment(-mw * 0.9, lip_y + 0.006, 0, lip_y - 0.004, 0.011)
              | segment(mw * 0.9, lip_y + 0.006, 0, lip_y - 0.004, 0.011), hair * 0.85)
    q = np.clip(x / mw, -1.0, 1.0) ** 2
    line = mouth_y - curve * (q - 0.5)  # corners up for curve > 0
    within = np.abs(x) <= mw
    lips = np.array((165, 62, 62)) * (0.6 + 0.4 * (1 - ident.skin))
    if curve > 0.01:  # open smile: a crescent outlined by the lips, teeth along its top
        bottom = line + 1.1 * curve * (1 - q)
        paint(within & (y >= line - 0.006) & (y <= bottom + 0.006), lips)
        paint(within & (y >= line) & (y <= bottom), (70, 20, 25))
        paint(within & (y >= line) & (y <= line + 0.4 * (bottom - line)), (240, 240, 235))
    else:
        paint(within & (np.abs(y - line) <= 0.008), lips)

    if ident.glasses != "none":
        frame = np.array(FRAME_COLOURS[ident.frame_colour], dtype=np.float64)
        r, th = ew * 1.45, 0.008
        for s in (-1, 1):
            if ident.glasses == "round":
                d = np.hypot(x - s * es, y - eye_y)
                paint(np.abs(d - r) <= th, frame)
            else:
                box = np.maximum(np.abs(x - s * es) / (r * 1.15), np.abs(y - eye_y) / (r * 0.8))
                paint(np.abs(box - 1) * r <= th, frame)
            paint(segment(s * (es + r), eye_y, s * a * 1.02, eye_y - 0.01, th * 0.8), frame)
        paint(segment(-(es - r), eye_y, es - r, eye_y, th * 0.8), frame)

    lx, ly = _LIGHT_DIR[var.light]  # brighter towards the light; "the front" lifts all evenly
    if lx or ly:
        img *= (1 + var.light_strength * 2 * (lx * (px - 0.5) + ly * (py - 0.5)))[..., None]
    else:
        img *= 1 + var.light_strength
    out = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")
    return np.asarray(out.reduce(ss) if ss > 1 else out)


def _skin_rgb(t: float) -> np.ndarray:
    pos = t * (len(SKIN_TONES) - 1)
    i = min(int(pos), len(SKIN_TONES) - 2)
    return SKIN_TONES[i] + (pos - i) * (SKIN_TONES[i + 1] - SKIN_TONES[i])
