"""
Procedural engravings: the built-in demo dataset.

A scene is drawn from a small vocabulary of independent attributes (main subject, its position and size, the
weather, the sky object, birds and secondary objects), rendered as dark ink line art with hatching and
cross-hatching on warm paper, the main subject as a solid ink silhouette, and captioned from those attributes so that
every visible attribute is named:

    >>> image, caption = render_scene(seed=7, image_size=128)
    >>> caption
    'An engraving depicting ...'

Everything is drawn at twice the requested size with PIL and box-filtered down, which gives anti-aliased ink
lines at a few milliseconds per 128 px image.
"""

import math
import random
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter


PAPER_TONE = (236, 224, 199)
INK_TONE = (34, 27, 24)
SUPERSAMPLE = 2

SEA_SUBJECTS = ("ship", "lighthouse")
LAND_SUBJECTS = ("tower", "house", "tree", "windmill", "bridge")
SUBJECTS = SEA_SUBJECTS + LAND_SUBJECTS
POSITIONS = {"left": 0.25, "centre": 0.5, "right": 0.75}
POSITION_PHRASES = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
SIZES = {"small": 0.34, "large": 0.56}
WEATHERS = ("clear", "cloudy", "stormy")
SEA_STATES = {"clear": "calm", "cloudy": "choppy", "stormy": "stormy"}
SKY_OBJECTS = ("sun", "moon", "crescent", "none")
SKY_PHRASES = {"sun": "the sun", "moon": "a full moon", "crescent": "a crescent moon"}
SECONDARY_OBJECTS = {"sea": ("a rowing boat", "rocks"), "land": ("pine trees", "a fence")}


@dataclass
class Scene:
    """The attributes of one engraving; `caption` names every one of them that is visible."""

    ground: str
    subject: str
    position: str
    size: str
    weather: str
    sky_object: str
    birds: bool
    secondary: list = field(default_factory=list)

    @property
    def caption(self):
        subject = f"a {self.size} {self.subject} {POSITION_PHRASES[self.position]}"
        if self.ground == "sea":
            verb = "sailing" if self.subject == "ship" else "above"
            setting = f"{verb} a {SEA_STATES[self.weather]} sea"
        else:
            setting = f"{'over a river ' if self.subject == 'bridge' else ''}among hills under a {self.weather} sky"
        parts = [f"An engraving depicting {subject}, {setting}"]
        if self.sky_object != "none":
            parts.append(f"beneath {SKY_PHRASES[self.sky_object]}")
        extras = self.secondary + (["birds"] if self.birds else [])
        caption = " ".join(parts)
        if extras:
            caption += ", with " + " and ".join(extras)
        return caption


def caption_subject_and_position(caption):
    """
    Reads the main subject and its position back from a demo caption ("... a large ship on the left, ..."): the labels
    that bench/demo_recognisability.py checks generated images against. `(None, None)` where the caption names none.
    """
    subject = next((s for s in SUBJECTS if f" {s} " in f" {caption} ".replace(",", " ")), None)
    position = next((p for p, phrase in POSITION_PHRASES.items() if phrase in caption), None)
    return subject, position


def sample_scene(rng):
    """Draws the attributes of a scene independently (sun is not drawn in a storm)."""
    ground = rng.choice(("sea", "land"))
    weather = rng.choice(WEATHERS)
    sky_objects = [s for s in SKY_OBJECTS if not (s == "sun" and weather == "stormy")]
    secondary = [obj for obj in SECONDARY_OBJECTS[ground] if rng.random() < 0.4]
    return Scene(
        ground=ground,
        subject=rng.choice(SEA_SUBJECTS if ground == "sea" else LAND_SUBJECTS),
        position=rng.choice(tuple(POSITIONS)),
        size=rng.choice(tuple(SIZES)),
        weather=weather,
        sky_object=rng.choice(sky_objects),
        birds=rng.random() < 0.5,
        secondary=secondary,
    )


@lru_cache(maxsize=64)
def hatch_pattern(width, angles, spacing, line_width):
    """An 'L' image of parallel ink lines (255) at each angle in degrees, `spacing` pixels apart, slightly wavy."""
    y, x = np.mgrid[0:width, 0:width].astype(np.float32)
    ink = np.zeros((width, width), dtype=bool)
    for angle in angles:
        theta = math.radians(angle)
        along = x * math.cos(theta) + y * math.sin(theta)
        across = -x * math.sin(theta) + y * math.cos(theta) + 0.6 * np.sin(along / (spacing * 2.3))
        ink |= np.mod(across, spacing) < line_width
    return Image.fromarray(ink.astype(np.uint8) * 255)


@lru_cache(maxsize=8)
def frame_interior(width, margin):
    """A white square mask inside the plate margin."""
    mask = Image.new("L", (width, width), 0)
    ImageDraw.Draw(mask).rectangle((margin, margin, width - margin, width - margin), fill=255)
    return mask


class Plate:
    """An ink layer at supersampled resolution: 255 is ink, 0 is bare paper."""

    def __init__(self, width, rng):
        self.width = width
        self.rng = rng
        self.ink = Image.new("L", (width, width), 0)
        self.draw = ImageDraw.Draw(self.ink)
        self.line = max(2, round(width / 160))
        self.spacing = max(6, round(width / 32))
        # While set, painted shapes are solid ink instead of hatched (level 0 still clears to paper): the main subject
        # is printed as a silhouette, the darkest mass of the plate, so a small model trained for minutes draws it
        # as a clear shape rather than a faint hatched blur.
        self.silhouette = False

    def px(self, u):
        return round(u * self.width)

    def tone(self, level):
        """Hatching for tone 1 (light) to 4 (dark): horizontal, diagonal, cross-hatched, densely cross-hatched."""
        angles = {1: (0,), 2: (-50,), 3: (-50, 40), 4: (-50, 40, 0)}[level]
        spacing = self.spacing if level < 4 else max(4, self.spacing * 3 // 4)
        return hatch_pattern(self.width, angles, spacing, self.line * 0.5)

    def mask(self):
        return Image.new("L", (self.width, self.width), 0)

    def paint(self, mask, level):
        """Clears the masked region to paper and hatches it at `level` (0: bare; solid ink under `silhouette`)."""
        self.ink.paste(0, mask=mask)
        if level and self.silhouette:
            self.ink.paste(255, mask=mask)
        elif level:
            self.ink.paste(255, mask=ImageChops.multiply(mask, self.tone(level)))

    def shape(self, kind, xy, level, outline=True):
        """Paints a polygon or ellipse with hatching, then inks its outline."""
        mask = self.mask()
        getattr(ImageDraw.Draw(mask), kind)(xy, fill=255)
        self.paint(mask, level)
        if outline:
            getattr(self.draw, kind)(xy, outline=255, width=self.line)
        return mask

    def wavy_line(self, x0, x1, y, amplitude, period, phase=0.0, width=None):
        steps = max(4, int((x1 - x0) / max(2, period / 6)))
        points = [
            (
                x0 + (x1 - x0) * i / steps,
                y + amplitude * math.sin(phase + 2 * math.pi * (x1 - x0) * i / steps / period),
            )
            for i in range(steps + 1)
        ]
        self.draw.line(points, fill=255, width=width or self.line)


def draw_sky(plate, scene, horizon):
    """Horizontal engraved lines, denser towards the top, cross-hatched in a storm and at night."""
    night = scene.sky_object in ("moon", "crescent")
    rows = {"clear": 0.35, "cloudy": 0.6, "stormy": 1.0}[scene.weather] + (0.3 if night else 0.0)
    y, gap = plate.spacing * 0.6, plate.spacing * 0.7
    while y < horizon * min(1.0, rows):
        plate.wavy_line(0, plate.width, y, plate.line * 0.4, plate.width / 3, phase=y)
        y += gap
        gap *= 1.06 if scene.weather == "clear" else 1.02
    if scene.weather == "stormy":
        mask = plate.mask()
        ImageDraw.Draw(mask).rectangle((0, 0, plate.width, horizon * 0.55), fill=255)
        plate.ink.paste(255, mask=ImageChops.multiply(mask, plate.tone(2)))


def draw_sky_object(plate, scene, horizon, subject_x):
    if scene.sky_object == "none":
        return
    rng = plate.rng
    cx = plate.px(0.8 if subject_x < 0.5 else 0.2) + rng.randint(-plate.spacing, plate.spacing)
    cy = round(horizon * rng.uniform(0.22, 0.35))
    r = plate.px(rng.uniform(0.055, 0.08))
    plate.shape("ellipse", (cx - r, cy - r, cx + r, cy + r), 0)
    if scene.sky_object == "sun":
        for k in range(12):
            angle = 2 * math.pi * k / 12
            inner, outer = r * 1.3, r * (1.8 if k % 2 else 2.2)
            plate.draw.line(
                (
                    cx + inner * math.cos(angle),
                    cy + inner * math.sin(angle),
                    cx + outer * math.cos(angle),
                    cy + outer * math.sin(angle),
                ),
                fill=255,
                width=plate.line,
            )
    elif scene.sky_object == "moon":
        plate.shape("ellipse", (cx - r * 0.4, cy - r * 0.3, cx - r * 0.05, cy + r * 0.05), 1, outline=False)
        plate.shape("ellipse", (cx + r * 0.1, cy + r * 0.2, cx + r * 0.5, cy + r * 0.55), 1, outline=False)
    else:
        shadow = (cx - r * 0.45, cy - r * 1.05, cx + r * 1.35, cy + r * 0.95)
        mask = plate.mask()
        ImageDraw.Draw(mask).ellipse(shadow, fill=255)
        plate.ink.paste(255, mask=ImageChops.multiply(mask, plate.tone(3)))
        plate.draw.arc(shadow, 90, 270, fill=255, width=plate.line)


def draw_clouds(plate, scene, horizon):
    if scene.weather == "clear":
        return
    rng = plate.rng
    for _ in range(rng.randint(2, 4)):
        cx, cy = rng.uniform(0.0, 1.0) * plate.width, horizon * rng.uniform(0.15, 0.6)
        w, h = plate.px(rng.uniform(0.12, 0.22)), plate.px(rng.uniform(0.04, 0.07))
        puffs = [
            (cx + rng.uniform(-1, 1) * w, cy + rng.uniform(-0.6, 0.3) * h, rng.uniform(0.6, 1.0) * h) for _ in range(5)
        ]
        mask = plate.mask()
        for x, y, r in puffs:
            ImageDraw.Draw(mask).ellipse((x - r * 1.4, y - r, x + r * 1.4, y + r), fill=255)
        plate.paint(mask, 0)
        underside = ImageChops.multiply(mask, mask.transform(mask.size, Image.AFFINE, (1, 0, 0, 0, 1, -h * 0.6)))
        plate.paint(ImageChops.subtract(mask, underside), 3 if scene.weather == "stormy" else 1)
        edges = mask.filter(ImageFilter.FIND_EDGES)
        plate.ink.paste(255, mask=edges)


def draw_hills(plate, horizon, level, amplitude, seed_phase):
    """A hill line across the plate, hatched below down to the bottom edge."""
    rng = plate.rng
    phases = [rng.uniform(0, 6.3) + seed_phase for _ in range(3)]
    points = []
    for i in range(33):
        x = plate.width * i / 32
        y = horizon - amplitude * (0.6 + 0.25 * math.sin(phases[0] + i / 4.0) + 0.15 * math.sin(phases[1] + i / 1.7))
        points.append((x, y))
    plate.shape("polygon", points + [(plate.width, plate.width), (0, plate.width)], level, outline=False)
    plate.draw.line(points, fill=255, width=plate.line)


def draw_sea(plate, scene, horizon):
    state = SEA_STATES[scene.weather]
    mask = plate.mask()
    ImageDraw.Draw(mask).rectangle((0, horizon, plate.width, plate.width), fill=255)
    plate.paint(mask, 0)
    plate.draw.line((0, horizon, plate.width, horizon), fill=255, width=plate.line)
    amplitude = {"calm": 0.15, "choppy": 0.5, "stormy": 1.3}[state] * plate.spacing
    y, gap = horizon + plate.spacing * 0.6, plate.spacing * 0.5
    while y < plate.width:
        period = plate.width / (14 if state == "calm" else 8) * (1 + (y - horizon) / plate.width)
        plate.wavy_line(0, plate.width, y, amplitude * (0.5 + (y - horizon) / plate.width), period, phase=y * 0.37)
        y += gap
        gap *= 1.08 if state != "stormy" else 1.03
    if state == "stormy":
        plate.ink.paste(255, mask=ImageChops.multiply(mask, plate.tone(2)))


def draw_land(plate, horizon):
    draw_hills(plate, horizon, 2, plate.px(0.08), 0.0)
    draw_hills(plate, horizon + plate.px(0.1), 1, plate.px(0.04), 2.0)
    rng = plate.rng
    for _ in range(40):
        x, y = rng.uniform(0, plate.width), rng.uniform(horizon + plate.px(0.15), plate.width)
        plate.draw.line((x, y, x + rng.uniform(-2, 2), y - plate.spacing * 0.8), fill=255, width=plate.line)


def draw_ship(plate, cx, base, h, tilt):
    def rotate(points):
        c, s = math.cos(tilt), math.sin(tilt)
        return [(cx + (x - cx) * c - (y - base) * s, base + (x - cx) * s + (y - base) * c) for x, y in points]

    w = h * 0.9
    plate.shape(
        "polygon",
        rotate(
            [(cx - w / 2, base - h * 0.16), (cx + w / 2, base - h * 0.2), (cx + w * 0.38, base), (cx - w * 0.4, base)]
        ),
        4,
    )
    for offset, height in ((-0.2, 0.8), (0.12, 1.0)):
        mx = cx + offset * w
        plate.draw.line(rotate([(mx, base - h * 0.16), (mx, base - h * height)]), fill=255, width=plate.line * 2)
        for top, bottom in ((height - 0.05, height * 0.62), (height * 0.58, 0.25)):
            sail = [
                (mx - w * 0.17, base - h * top),
                (mx + w * 0.17, base - h * top),
                (mx + w * 0.2, base - h * bottom),
                (mx - w * 0.2, base - h * bottom),
            ]
            plate.shape("polygon", rotate(sail), 1)
    plate.draw.line(
        rotate([(cx + 0.12 * w, base - h), (cx + 0.12 * w + w * 0.1, base - h * 0.97)]), fill=255, width=plate.line * 2
    )


def draw_lighthouse(plate, cx, base, h):
    w = h * 0.22
    plate.shape(
        "polygon",
        [
            (cx - w * 2, base + h * 0.05),
            (cx - w * 1.2, base - h * 0.12),
            (cx + w * 0.4, base - h * 0.15),
            (cx + w * 1.8, base - h * 0.02),
            (cx + w * 2.2, base + h * 0.06),
        ],
        3,
    )
    plate.shape(
        "polygon",
        [
            (cx - w / 2, base - h * 0.1),
            (cx - w / 3, base - h * 0.8),
            (cx + w / 3, base - h * 0.8),
            (cx + w / 2, base - h * 0.1),
        ],
        0,
    )
    plate.shape(
        "polygon",
        [(cx, base - h * 0.1), (cx, base - h * 0.8), (cx + w / 3, base - h * 0.8), (cx + w / 2, base - h * 0.1)],
        2,
        outline=False,
    )
    for k in range(1, 3):
        y = base - h * (0.1 + 0.7 * k / 3)
        plate.draw.line((cx - w * 0.45, y, cx + w * 0.45, y), fill=255, width=plate.line)
    plate.shape("rectangle", (cx - w * 0.3, base - h * 0.93, cx + w * 0.3, base - h * 0.8), 0)
    plate.shape("polygon", [(cx - w * 0.4, base - h * 0.93), (cx, base - h), (cx + w * 0.4, base - h * 0.93)], 3)


def draw_tower(plate, cx, base, h):
    w = h * 0.34
    top = base - h * 0.88
    plate.shape("rectangle", (cx - w / 2, top, cx + w / 2, base), 1)
    plate.shape("rectangle", (cx + w * 0.1, top, cx + w / 2, base), 3, outline=False)
    merlon = w / 5
    for k in range(3):
        x = cx - w / 2 + k * 2 * merlon
        plate.shape("rectangle", (x, base - h, x + merlon, top), 1)
    for fy in (0.3, 0.6):
        y = base - h * fy
        plate.shape("rectangle", (cx - w * 0.1, y - h * 0.06, cx + w * 0.05, y + h * 0.03), 4)
    plate.shape(
        "polygon",
        [
            (cx - w * 0.15, base),
            (cx - w * 0.15, base - h * 0.12),
            (cx + w * 0.15, base - h * 0.12),
            (cx + w * 0.15, base),
        ],
        4,
    )


def draw_house(plate, cx, base, h):
    w = h * 0.95
    wall_top = base - h * 0.5
    plate.shape("rectangle", (cx - w / 2, wall_top, cx + w / 2, base), 1)
    plate.shape("rectangle", (cx + w / 2 - h * 0.28, base - h * 0.95, cx + w / 2 - h * 0.16, base - h * 0.6), 3)
    plate.shape(
        "polygon",
        [
            (cx - w * 0.58, wall_top),
            (cx - w * 0.3, base - h * 0.88),
            (cx + w * 0.3, base - h * 0.88),
            (cx + w * 0.58, wall_top),
        ],
        2,
    )
    plate.shape("rectangle", (cx - w * 0.08, base - h * 0.3, cx + w * 0.08, base), 4)
    for side in (-1, 1):
        x = cx + side * w * 0.28
        plate.shape("rectangle", (x - h * 0.07, base - h * 0.38, x + h * 0.07, base - h * 0.24), 3)


def draw_tree(plate, cx, base, h):
    rng = plate.rng
    plate.shape(
        "polygon",
        [
            (cx - h * 0.06, base),
            (cx - h * 0.03, base - h * 0.5),
            (cx + h * 0.03, base - h * 0.5),
            (cx + h * 0.07, base),
        ],
        3,
    )
    mask = plate.mask()
    for _ in range(7):
        x, y = cx + rng.uniform(-0.22, 0.22) * h, base - h * rng.uniform(0.55, 0.8)
        r = h * rng.uniform(0.14, 0.22)
        ImageDraw.Draw(mask).ellipse((x - r, y - r, x + r, y + r), fill=255)
    plate.paint(mask, 2)
    shadow = ImageChops.subtract(mask, mask.transform(mask.size, Image.AFFINE, (1, 0, -h * 0.12, 0, 1, h * 0.12)))
    plate.ink.paste(255, mask=ImageChops.multiply(shadow, plate.tone(4)))
    plate.ink.paste(255, mask=mask.filter(ImageFilter.FIND_EDGES))


def draw_windmill(plate, cx, base, h):
    w = h * 0.3
    plate.shape(
        "polygon",
        [(cx - w / 2, base), (cx - w / 3, base - h * 0.6), (cx + w / 3, base - h * 0.6), (cx + w / 2, base)],
        1,
    )
    plate.shape("polygon", [(cx - w * 0.4, base - h * 0.6), (cx, base - h * 0.75), (cx + w * 0.4, base - h * 0.6)], 3)
    hub = (cx, base - h * 0.66)
    # Sails stand as a saltire, only slightly turned: a free rotation is a continuous factor that a few CPU minutes
    # of training never learn, and the sails blur into the body (12% of windmill reconstructions read right).
    start = math.pi / 4 + plate.rng.uniform(-0.12, 0.12)
    for k in range(4):
        a = start + k * math.pi / 2
        c, s = math.cos(a), math.sin(a)
        near, far, half = h * 0.05, h * 0.45, h * 0.11
        sail = [
            (hub[0] + c * near - s * half, hub[1] + s * near + c * half),
            (hub[0] + c * far - s * half, hub[1] + s * far + c * half),
            (hub[0] + c * far, hub[1] + s * far),
            (hub[0] + c * near, hub[1] + s * near),
        ]
        plate.shape("polygon", sail, 1)
        plate.draw.line((hub, (hub[0] + c * far, hub[1] + s * far)), fill=255, width=plate.line * 2)
    plate.shape("rectangle", (cx - w * 0.1, base - h * 0.18, cx + w * 0.1, base), 4)


def draw_bridge(plate, cx, base, h):
    span = h * 1.6
    left, right = cx - span / 2, cx + span / 2
    plate.shape(
        "rectangle", (left - span * 0.1, base + h * 0.02, right + span * 0.1, base + h * 0.22), 0, outline=False
    )
    for y in np.linspace(base + h * 0.05, base + h * 0.2, 4):
        plate.wavy_line(left - span * 0.1, right + span * 0.1, y, plate.line * 0.6, span / 5, phase=y)
    deck = plate.shape("rectangle", (left, base - h * 0.42, right, base + h * 0.12), 3)
    arches = plate.mask()
    for k in range(3):
        x0 = left + span * (0.06 + k * 0.32)
        ImageDraw.Draw(arches).ellipse((x0, base - h * 0.28, x0 + span * 0.24, base + h * 0.35), fill=255)
    arches = ImageChops.multiply(arches, deck)
    plate.paint(arches, 0)
    plate.ink.paste(255, mask=arches.filter(ImageFilter.FIND_EDGES))
    plate.draw.line(
        (left - span * 0.03, base - h * 0.42, right + span * 0.03, base - h * 0.42), fill=255, width=plate.line * 2
    )


def draw_secondary(plate, scene, horizon, subject_x):
    rng = plate.rng
    away = 0.18 if subject_x > 0.5 else 0.82
    for name in scene.secondary:
        x = plate.px(away + rng.uniform(-0.06, 0.06))
        if name == "a rowing boat":
            y, w = horizon + plate.px(0.16), plate.px(0.1)
            plate.shape(
                "polygon", [(x - w, y - w * 0.2), (x + w, y - w * 0.25), (x + w * 0.7, y), (x - w * 0.7, y)], 3
            )
            plate.draw.line((x, y - w * 0.2, x + w * 0.5, y - w * 0.7), fill=255, width=plate.line)
        elif name == "rocks":
            y, w = horizon + plate.px(0.3), plate.px(0.09)
            plate.shape(
                "polygon",
                [
                    (x - w * 1.4, y),
                    (x - w * 0.8, y - w * 0.7),
                    (x - w * 0.1, y - w),
                    (x + w * 0.6, y - w * 0.5),
                    (x + w * 1.3, y),
                ],
                3,
            )
        elif name == "pine trees":
            for k in range(3):
                tx, ty, th = x + (k - 1) * plate.px(0.05), horizon + plate.px(0.05 + 0.02 * (k % 2)), plate.px(0.14)
                plate.shape("polygon", [(tx - th * 0.25, ty), (tx, ty - th), (tx + th * 0.25, ty)], 3)
        else:
            y = horizon + plate.px(0.33)
            x0, x1 = x - plate.px(0.15), x + plate.px(0.15)
            for rail in (0.03, 0.06):
                plate.draw.line(
                    (x0, y - plate.px(rail), x1, y - plate.px(rail) + plate.px(0.02)), fill=255, width=plate.line
                )
            for k in range(6):
                px = x0 + (x1 - x0) * k / 5
                plate.draw.line((px, y + plate.px(0.01), px, y - plate.px(0.08)), fill=255, width=plate.line)


def draw_birds(plate, horizon, subject_x):
    rng = plate.rng
    cx, cy = plate.px(0.35 if subject_x > 0.5 else 0.65), horizon * rng.uniform(0.3, 0.5)
    for _ in range(rng.randint(3, 6)):
        x, y = cx + rng.uniform(-1, 1) * plate.px(0.12), cy + rng.uniform(-1, 1) * plate.px(0.07)
        s = plate.px(rng.uniform(0.025, 0.04))
        plate.draw.line(
            (
                (x - s, y - s * 0.5),
                (x - s * 0.4, y - s * 0.6),
                (x, y),
                (x + s * 0.4, y - s * 0.6),
                (x + s, y - s * 0.5),
            ),
            fill=255,
            width=plate.line,
            joint="curve",
        )


SUBJECT_DRAWERS = {
    "lighthouse": draw_lighthouse,
    "tower": draw_tower,
    "house": draw_house,
    "tree": draw_tree,
    "windmill": draw_windmill,
    "bridge": draw_bridge,
}


def ink_on_paper(ink, image_size, rng):
    """Box-filters the supersampled ink layer down and prints it in ink tone on slightly mottled warm paper."""
    coverage = np.asarray(ink.reduce(SUPERSAMPLE), dtype=np.float32)[..., None] / 255.0
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 3.0, (image_size // 8 + 1, image_size // 8 + 1))
    mottle = np.asarray(Image.fromarray(noise.astype(np.float32)).resize((image_size, image_size), Image.BILINEAR))
    paper = np.asarray(PAPER_TONE, dtype=np.float32) + mottle[..., None]
    pixels = paper * (1.0 - coverage * 0.92) + np.asarray(INK_TONE, dtype=np.float32) * coverage * 0.92
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def scene_subject(seed: int):
    """The main subject of the scene `render_scene(seed, ...)` draws, without drawing it."""
    return sample_scene(random.Random(seed)).subject


def render_scene(seed: int, image_size: int):
    """
    Renders the procedural engraving for `seed` as an `image_size` x `image_size` RGB PIL image.

    Returns `(image, caption)`; the same seed and size always give the same image and caption.
    """
    rng = random.Random(seed)
    scene = sample_scene(rng)
    plate = Plate(image_size * SUPERSAMPLE, rng)
    horizon = plate.px(rng.uniform(0.58, 0.68))
    subject_x = POSITIONS[scene.position] + rng.uniform(-0.04, 0.04)

    draw_sky(plate, scene, horizon)
    draw_clouds(plate, scene, horizon)
    draw_sky_object(plate, scene, horizon, subject_x)
    if scene.ground == "sea":
        draw_sea(plate, scene, horizon)
    else:
        draw_land(plate, horizon)
    draw_secondary(plate, scene, horizon, subject_x)

    height = plate.px(SIZES[scene.size] * rng.uniform(0.9, 1.1))
    cx = plate.px(subject_x)
    plate.silhouette = True
    if scene.subject == "ship":
        tilt = {"clear": 0.0, "cloudy": 0.05, "stormy": 0.16}[scene.weather] * rng.choice((-1, 1))
        draw_ship(plate, cx, horizon + plate.px(0.12), height, tilt)
    else:
        base = horizon + plate.px(0.1 if scene.ground == "sea" else 0.14)
        SUBJECT_DRAWERS[scene.subject](plate, cx, base, height)
    plate.silhouette = False
    if scene.birds:
        draw_birds(plate, horizon, subject_x)

    margin = plate.px(0.03)
    plate.paint(ImageChops.invert(frame_interior(plate.width, margin)), 0)
    plate.draw.rectangle((margin, margin, plate.width - margin, plate.width - margin), outline=255, width=plate.line)
    return ink_on_paper(plate.ink, image_size, rng), scene.caption
