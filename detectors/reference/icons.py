"""Drawing the reference world's object classes: one distinct icon (shape, colour, detail) each.

Every `draw_*` function paints one object centred at (cx, cy) with size s into an RGB layer and
a uint8 mask of the same shape; the scene composes layers so later objects occlude earlier ones.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

__all__ = ["CLASS_NAMES", "draw_icon"]

Color = tuple[int, int, int]
Painter = Callable[[np.ndarray, np.ndarray, int, int, int, Callable[[Color], Color]], None]


def _poly(
    layer: np.ndarray, mask: np.ndarray, points: list[tuple[float, float]], color: Color
) -> None:
    pts = np.rint(np.asarray(points)).astype(np.int32)
    cv2.fillPoly(layer, [pts], color)
    cv2.fillPoly(mask, [pts], 255)


def _circle(
    layer: np.ndarray,
    mask: np.ndarray,
    c: tuple[float, float],
    r: float,
    color: Color,
    thickness: int = -1,
) -> None:
    center = (round(c[0]), round(c[1]))
    cv2.circle(layer, center, max(1, round(r)), color, thickness)
    cv2.circle(mask, center, max(1, round(r)), 255, thickness)


def _ellipse(
    layer: np.ndarray,
    mask: np.ndarray,
    c: tuple[float, float],
    axes: tuple[float, float],
    color: Color,
    angle: float = 0.0,
    thickness: int = -1,
) -> None:
    center = (round(c[0]), round(c[1]))
    ax = (max(1, round(axes[0])), max(1, round(axes[1])))
    cv2.ellipse(layer, center, ax, angle, 0, 360, color, thickness)
    cv2.ellipse(mask, center, ax, angle, 0, 360, 255, thickness)


def _rect(
    layer: np.ndarray, mask: np.ndarray, x0: float, y0: float, x1: float, y1: float, color: Color
) -> None:
    p0, p1 = (round(x0), round(y0)), (round(x1), round(y1))
    cv2.rectangle(layer, p0, p1, color, -1)
    cv2.rectangle(mask, p0, p1, 255, -1)


def _line(
    layer: np.ndarray,
    mask: np.ndarray,
    a: tuple[float, float],
    b: tuple[float, float],
    color: Color,
    width: int,
) -> None:
    pa, pb = (round(a[0]), round(a[1])), (round(b[0]), round(b[1]))
    cv2.line(layer, pa, pb, color, max(1, width))
    cv2.line(mask, pa, pb, 255, max(1, width))


def _cat(
    ly: np.ndarray, m: np.ndarray, x: int, y: int, s: int, c: Callable[[Color], Color]
) -> None:
    r = 0.32 * s
    _poly(
        ly,
        m,
        [(x - r, y - 0.2 * s), (x - 0.7 * r, y - 0.5 * s), (x - 0.1 * r, y - 0.25 * s)],
        c((230, 140, 40)),
    )
    _poly(
        ly,
        m,
        [(x + r, y - 0.2 * s), (x + 0.7 * r, y - 0.5 * s), (x + 0.1 * r, y - 0.25 * s)],
        c((230, 140, 40)),
    )
    _circle(ly, m, (x, y), r, c((230, 140, 40)))
    _circle(ly, m, (x - 0.35 * r, y - 0.1 * r), 0.12 * r + 1, (20, 20, 20))
    _circle(ly, m, (x + 0.35 * r, y - 0.1 * r), 0.12 * r + 1, (20, 20, 20))


def _dog(
    ly: np.ndarray, m: np.ndarray, x: int, y: int, s: int, c: Callable[[Color], Color]
) -> None:
    _ellipse(ly, m, (x, y), (0.3 * s, 0.36 * s), c((140, 90, 50)))
    _ellipse(ly, m, (x - 0.32 * s, y), (0.1 * s, 0.25 * s), c((70, 40, 20)), angle=15)
    _ellipse(ly, m, (x + 0.32 * s, y), (0.1 * s, 0.25 * s), c((70, 40, 20)), angle=-15)
    _circle(ly, m, (x, y + 0.18 * s), 0.07 * s + 1, (20, 20, 20))


def _car(
    ly: np.ndarray, m: np.ndarray, x: int, y: int, s: int, c: Callable[[Color], Color]
) -> None:
    _rect(ly, m, x - 0.45 * s, y - 0.05 * s, x + 0.45 * s, y + 0.2 * s, c((200, 30, 30)))
    _rect(ly, m, x - 0.25 * s, y - 0.25 * s, x + 0.2 * s, y - 0.05 * s, c((200, 30, 30)))
    _rect(ly, m, x - 0.18 * s, y - 0.2 * s, x + 0.13 * s, y - 0.08 * s, (170, 210, 240))
    _circle(ly, m, (x - 0.25 * s, y + 0.22 * s), 0.11 * s, (25, 25, 25))
    _circle(ly, m, (x + 0.25 * s, y + 0.22 * s), 0.11 * s, (25, 25, 25))


def _cup(
    ly: np.ndarray, m: np.ndarray, x: int, y: int, s: int, c: Callable[[Color], Color]
) -> None:
    _ellipse(
        ly, m, (x + 0.25 * s, y), (0.14 * s, 0.14 * s), c((60, 90, 200)), thickness=max(2, s // 12)
    )
    _poly(
        ly,
        m,
        [
            (x - 0.3 * s, y - 0.3 * s),
            (x + 0.25 * s, y - 0.3 * s),
            (x + 0.18 * s, y + 0.3 * s),
            (x - 0.23 * s, y + 0.3 * s),
        ],
        c((60, 90, 200)),
    )
    _rect(ly, m, x - 0.3 * s, y - 0.3 * s, x + 0.25 * s, y - 0.22 * s, (240, 240, 240))


def _fork(
    ly: np.ndarray, m: np.ndarray, x: int, y: int, s: int, c: Callable[[Color], Color]
) -> None:
    # silver-blue, four bold tines on a wide neck
    w = max(3, s // 9)
    col = c((150, 170, 215))
    _line(ly, m, (x, y - 0.05 * s), (x, y + 0.45 * s), col, w + 1)
    _rect(ly, m, x - 0.25 * s, y - 0.14 * s, x + 0.25 * s, y - 0.02 * s, col)
    for dx in (-0.22, -0.075, 0.075, 0.22):
        _line(ly, m, (x + dx * s, y - 0.45 * s), (x + dx * s, y - 0.1 * s), col, w - 1)


def _knife(
    ly: np.ndarray, m: np.ndarray, x: int, y: int, s: int, c: Callable[[Color], Color]
) -> None:
    # a wide pale blade over a black handle
    _poly(
        ly,
        m,
        [
            (x - 0.14 * s, y - 0.02 * s),
            (x - 0.14 * s, y - 0.47 * s),
            (x + 0.16 * s, y - 0.2 * s),
            (x + 0.16 * s, y - 0.02 * s),
        ],
        c((228, 228, 236)),
    )
    _rect(ly, m, x - 0.12 * s, y - 0.02 * s, x + 0.14 * s, y + 0.47 * s, c((30, 25, 20)))


def _spoon(
    ly: np.ndarray, m: np.ndarray, x: int, y: int, s: int, c: Callable[[Color], Color]
) -> None:
    # copper, a big round bowl on a bold handle
    col = c((205, 115, 45))
    _ellipse(ly, m, (x, y - 0.22 * s), (0.2 * s, 0.24 * s), col)
    _line(ly, m, (x, y - 0.02 * s), (x, y + 0.47 * s), col, max(3, s // 8))


def _ball(
    ly: np.ndarray, m: np.ndarray, x: int, y: int, s: int, c: Callable[[Color], Color]
) -> None:
    _circle(ly, m, (x, y), 0.38 * s, c((240, 215, 40)))
    _line(
        ly,
        m,
        (x - 0.35 * s, y - 0.1 * s),
        (x + 0.35 * s, y + 0.1 * s),
        (40, 60, 200),
        max(2, s // 10),
    )


def _tree(
    ly: np.ndarray, m: np.ndarray, x: int, y: int, s: int, c: Callable[[Color], Color]
) -> None:
    _rect(ly, m, x - 0.07 * s, y + 0.1 * s, x + 0.07 * s, y + 0.45 * s, c((100, 60, 30)))
    _poly(
        ly,
        m,
        [(x, y - 0.45 * s), (x - 0.35 * s, y + 0.15 * s), (x + 0.35 * s, y + 0.15 * s)],
        c((40, 150, 50)),
    )


def _house(
    ly: np.ndarray, m: np.ndarray, x: int, y: int, s: int, c: Callable[[Color], Color]
) -> None:
    _rect(ly, m, x - 0.3 * s, y - 0.05 * s, x + 0.3 * s, y + 0.4 * s, c((225, 205, 160)))
    _poly(
        ly,
        m,
        [(x, y - 0.42 * s), (x - 0.4 * s, y - 0.05 * s), (x + 0.4 * s, y - 0.05 * s)],
        c((150, 30, 40)),
    )
    _rect(ly, m, x - 0.07 * s, y + 0.15 * s, x + 0.07 * s, y + 0.4 * s, (70, 45, 30))


def _fish(
    ly: np.ndarray, m: np.ndarray, x: int, y: int, s: int, c: Callable[[Color], Color]
) -> None:
    _ellipse(ly, m, (x - 0.05 * s, y), (0.3 * s, 0.17 * s), c((40, 170, 170)))
    _poly(
        ly,
        m,
        [(x + 0.2 * s, y), (x + 0.45 * s, y - 0.18 * s), (x + 0.45 * s, y + 0.18 * s)],
        c((40, 170, 170)),
    )
    _circle(ly, m, (x - 0.22 * s, y - 0.04 * s), 0.04 * s + 1, (10, 10, 10))


def _bird(
    ly: np.ndarray, m: np.ndarray, x: int, y: int, s: int, c: Callable[[Color], Color]
) -> None:
    _ellipse(ly, m, (x, y), (0.28 * s, 0.18 * s), c((50, 90, 220)))
    _circle(ly, m, (x - 0.25 * s, y - 0.15 * s), 0.12 * s, c((50, 90, 220)))
    _poly(
        ly,
        m,
        [(x - 0.36 * s, y - 0.17 * s), (x - 0.48 * s, y - 0.12 * s), (x - 0.36 * s, y - 0.08 * s)],
        (250, 150, 30),
    )
    _ellipse(ly, m, (x + 0.05 * s, y - 0.05 * s), (0.16 * s, 0.07 * s), c((30, 50, 140)), angle=-20)


def _apple(
    ly: np.ndarray, m: np.ndarray, x: int, y: int, s: int, c: Callable[[Color], Color]
) -> None:
    _circle(ly, m, (x, y + 0.05 * s), 0.33 * s, c((210, 25, 40)))
    _line(ly, m, (x, y - 0.25 * s), (x + 0.05 * s, y - 0.42 * s), (90, 60, 30), max(2, s // 14))
    _ellipse(ly, m, (x + 0.15 * s, y - 0.35 * s), (0.1 * s, 0.05 * s), (50, 160, 50), angle=-30)


def _clock(
    ly: np.ndarray, m: np.ndarray, x: int, y: int, s: int, c: Callable[[Color], Color]
) -> None:
    _circle(ly, m, (x, y), 0.38 * s, c((245, 245, 235)))
    _circle(ly, m, (x, y), 0.38 * s, (30, 30, 30), thickness=max(2, s // 12))
    _line(ly, m, (x, y), (x, y - 0.25 * s), (30, 30, 30), max(1, s // 16))
    _line(ly, m, (x, y), (x + 0.18 * s, y + 0.05 * s), (30, 30, 30), max(1, s // 16))


def _boat(
    ly: np.ndarray, m: np.ndarray, x: int, y: int, s: int, c: Callable[[Color], Color]
) -> None:
    _poly(
        ly,
        m,
        [
            (x - 0.45 * s, y + 0.15 * s),
            (x + 0.45 * s, y + 0.15 * s),
            (x + 0.3 * s, y + 0.38 * s),
            (x - 0.3 * s, y + 0.38 * s),
        ],
        c((120, 70, 30)),
    )
    _line(ly, m, (x, y + 0.15 * s), (x, y - 0.45 * s), (60, 40, 20), max(2, s // 16))
    _poly(
        ly,
        m,
        [(x + 0.03 * s, y - 0.42 * s), (x + 0.03 * s, y + 0.08 * s), (x + 0.35 * s, y + 0.08 * s)],
        (250, 250, 250),
    )


def _flower(
    ly: np.ndarray, m: np.ndarray, x: int, y: int, s: int, c: Callable[[Color], Color]
) -> None:
    _line(ly, m, (x, y), (x, y + 0.45 * s), (40, 140, 40), max(2, s // 12))
    for k in range(5):
        a = 2 * np.pi * k / 5
        _circle(
            ly,
            m,
            (x + 0.18 * s * np.cos(a), y - 0.1 * s + 0.18 * s * np.sin(a)),
            0.12 * s,
            c((220, 60, 180)),
        )
    _circle(ly, m, (x, y - 0.1 * s), 0.1 * s, (250, 220, 40))


_PAINTERS: dict[str, Painter] = {
    "cat": _cat,
    "dog": _dog,
    "car": _car,
    "cup": _cup,
    "fork": _fork,
    "knife": _knife,
    "spoon": _spoon,
    "ball": _ball,
    "tree": _tree,
    "house": _house,
    "fish": _fish,
    "bird": _bird,
    "apple": _apple,
    "clock": _clock,
    "boat": _boat,
    "flower": _flower,
}

CLASS_NAMES: tuple[str, ...] = tuple(_PAINTERS)


def draw_icon(
    name: str, height: int, width: int, cx: int, cy: int, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one object; returns `(layer (H, W, 3) uint8, mask (H, W) bool)`."""
    layer = np.zeros((height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    jitter = rng.integers(-18, 19, 3)

    def color(base: Color) -> Color:
        r, g, b = (int(np.clip(v + j, 0, 255)) for v, j in zip(base, jitter, strict=True))
        return (r, g, b)

    _PAINTERS[name](layer, mask, cx, cy, size, color)
    return layer, mask > 0
