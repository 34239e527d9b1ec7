"""Pictures of a prediction: frames with the predicted mask's contour, crop boxes, the probability, and an
attention strip, as arrays; plus the two writers (PNG, MP4 through PyAV).

Every drawing function takes and returns numpy arrays (``(H, W)`` uint8 gray or ``(H, W, 3)`` uint8 RGB
frames, ``(H, W)`` masks, ``(y0, x0, y1, x1)`` end-exclusive boxes in the frame's pixels), so any predictor can
use them; :class:`ClipOverlay` composes them for one clip of ``usnodule predict`` (one video frame per clip
frame, one montage tile per stack).  Drawing is PIL's (lines, rectangles, its bundled font), contours are
:func:`skimage.measure.find_contours`, colours of attention are matplotlib's viridis.

Choices (nothing here changes a number a model computes):

* Colours: predicted mask contour red, the crop box the image model saw yellow, the ultrasound region the
  clip was cut to blue (:data:`COLOURS`).
* Small frames are enlarged by an integer factor (nearest neighbour: pixels stay visible) so that the video is
  at least :data:`VIDEO_MIN` px on its longer side; montage tiles are scaled to :data:`TILE` px.
* The attention strip shows, per attention block, the share of the head's attention each stack receives
  (:func:`stack_attention`): the mean over the query stacks of the head-averaged weights.  The head mean-pools
  its attention outputs over the query stacks, so this is the weight each stack's values carry into the pooled
  nodule vector (before the residual and LayerNorm).  It sums to 1 over the stacks.  Cells are coloured by the
  value over the largest value of that block, and print the value itself.
* MP4: H.264 (libx264) when PyAV's FFmpeg has it, else MPEG-4 part 2; yuv420p, so odd sizes are padded by one
  black row / column.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "COLOURS",
    "ClipOverlay",
    "attention_strip",
    "cell_colours",
    "draw_frame",
    "mask_contours",
    "montage",
    "stack_attention",
    "write_mp4",
    "write_png",
]

Box = tuple[int, int, int, int]
RGB = tuple[int, int, int]

COLOURS: dict[str, RGB] = {"mask": (255, 60, 60), "roi": (255, 210, 0), "region": (40, 170, 255)}
TILE = 192  # px, longer side of a montage tile
VIDEO_MIN = 256  # px, smallest longer side of a video frame (small frames are enlarged by an integer factor)
BACKGROUND = (24, 24, 24)


# ------------------------------------------------------------------------------------------------- pieces
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def to_rgb(frame: np.ndarray) -> np.ndarray:
    """``(H, W)`` gray or ``(H, W, 3)`` -> ``(H, W, 3)`` uint8."""
    frame = np.asarray(frame)
    if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, axis=2)
    return np.ascontiguousarray(frame.astype(np.uint8, copy=False))


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours ``(N, 2)`` of (row, col) in pixel-centre coordinates around the mask's pixels (padded
    first, so a nodule touching the border still gets a closed line)."""
    from skimage.measure import find_contours

    padded = np.pad(np.asarray(mask) > 0, 1).astype(np.float32)
    return [c - 1.0 for c in find_contours(padded, 0.5)]


def _label(draw, xy: tuple[float, float], text: str, size: int, fill: RGB = (255, 255, 255)) -> None:
    """Text on a dark box, readable on any image."""
    font = _font(size)
    x0, y0, x1, y1 = draw.textbbox(xy, text, font=font)
    draw.rectangle([x0 - 2, y0 - 2, x1 + 2, y1 + 2], fill=(0, 0, 0))
    draw.text(xy, text, fill=fill, font=font)


def draw_frame(
    frame: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    boxes: Sequence[tuple[Box, RGB]] = (),
    text: str | None = None,
    scale: float = 1.0,
) -> np.ndarray:
    """One frame with the contour of ``mask`` (red), ``boxes`` (each ``((y0, x0, y1, x1), colour)``) and
    ``text`` in the top-left corner, enlarged or reduced by ``scale``; ``(round(H*scale), round(W*scale), 3)``."""
    from PIL import Image, ImageDraw

    rgb = to_rgb(frame)
    h, w = rgb.shape[:2]
    img = Image.fromarray(rgb)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        img = img.resize(size, Image.NEAREST if scale > 1 else Image.BILINEAR)
    sx, sy = img.width / w, img.height / h
    width = max(1, round(max(img.size) / 256))
    draw = ImageDraw.Draw(img)
    for (y0, x0, y1, x1), colour in boxes:
        draw.rectangle([x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1], outline=colour, width=width)
    if mask is not None:
        for c in mask_contours(mask):
            draw.line([((x + 0.5) * sx, (y + 0.5) * sy) for y, x in c], fill=COLOURS["mask"], width=width)
    if text:
        _label(draw, (3, 3), text, int(np.clip(img.height // 18, 10, 18)))
    return np.asarray(img)


def stack_attention(weights: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """``(S,)`` share of attention each stack (key) receives: the mean over the valid query stacks (rows) of
    ``(S, S)`` head-averaged attention weights; padded stacks get 0.  Sums to 1 when each row does."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"attention weights must be (S, S), got {w.shape}")
    valid = np.ones(len(w), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    return np.where(valid, w[valid].mean(axis=0), 0.0)


def cell_colours(values: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """``(n, 3)`` uint8 viridis colour of each value over ``vmax`` (default: the largest value)."""
    from matplotlib import colormaps

    v = np.asarray(values, dtype=np.float64)
    top = float(v.max()) if vmax is None and v.size else float(vmax or 0.0)
    frac = np.clip(v / top, 0.0, 1.0) if top > 0 else np.zeros_like(v)
    return (colormaps["viridis"](frac)[:, :3] * 255).round().astype(np.uint8)


def attention_strip(
    strips: Mapping[str, np.ndarray],
    width: int,
    *,
    current: int | None = None,
    vmax: Mapping[str, float] | None = None,
    row_height: int = 18,
    label_width: int = 44,
) -> np.ndarray:
    """``(rows * row_height, width, 3)`` strip: one row per attention block (its name on the left), one cell
    per stack in stack order, coloured by :func:`cell_colours` and printing the value; cell ``current``
    outlined in white (the stack of the frame shown above it)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, max(1, row_height * len(strips))), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font(max(8, row_height - 7))
    for r, (name, values) in enumerate(strips.items()):
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        y0 = r * row_height
        draw.text((3, y0 + 3), name, fill=(230, 230, 230), font=font)
        n = max(1, len(values))
        edges = np.linspace(label_width, width, n + 1).round().astype(int)
        colours = cell_colours(values, None if vmax is None else vmax.get(name))
        for k, (v, c) in enumerate(zip(values, colours, strict=True)):
            x0, x1 = int(edges[k]), int(edges[k + 1]) - 1
            draw.rectangle([x0, y0, x1, y0 + row_height - 2], fill=tuple(int(i) for i in c))
            text = f"{v:.2f}"
            if draw.textlength(text, font=font) + 6 <= x1 - x0:  # print the value where it fits
                dark = (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) > 140
                tw = draw.textlength(text, font=font)
                draw.text((x1 - tw - 3, y0 + 3), text, fill=(0, 0, 0) if dark else (255, 255, 255), font=font)
            if k == current:
                draw.rectangle([x0, y0, x1, y0 + row_height - 2], outline=(255, 255, 255), width=2)
    return np.asarray(img)


def montage(
    tiles: Sequence[np.ndarray], *, columns: int = 6, title: str | None = None, gap: int = 4
) -> np.ndarray:
    """Tiles ``(h, w, 3)`` (padded to the largest) in rows of ``columns``, under an optional title bar (one
    20 px line per line of ``title``, the first brighter)."""
    from PIL import Image, ImageDraw

    if not tiles:
        raise ValueError("montage needs at least one tile")
    th, tw = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    lines = title.splitlines() if title else []
    top, font = (6 + 20 * len(lines) if lines else 0), _font(14)
    width = max([cols * (tw + gap) + gap] + [int(font.getlength(t)) + 2 * gap + 4 for t in lines])
    out = np.empty((top + rows * (th + gap) + gap, width, 3), np.uint8)
    out[:] = BACKGROUND
    for i, t in enumerate(tiles):
        y, x = top + gap + (i // cols) * (th + gap), gap + (i % cols) * (tw + gap)
        out[y : y + t.shape[0], x : x + t.shape[1]] = t
    if lines:
        img = Image.fromarray(out)
        draw = ImageDraw.Draw(img)
        for i, line in enumerate(lines):
            draw.text(
                (gap + 2, 6 + 20 * i), line, fill=(240, 240, 240) if i == 0 else (170, 170, 170), font=font
            )
        out = np.asarray(img)
    return out


# ------------------------------------------------------------------------------------------------ writers
def write_png(rgb: np.ndarray, path: str | os.PathLike) -> Path:
    from PIL import Image

    path = Path(path)
    Image.fromarray(to_rgb(rgb)).save(path, format="PNG", optimize=True)
    return path


def write_mp4(frames: Iterable[np.ndarray], path: str | os.PathLike, fps: int = 10) -> int:
    """Encode ``(H, W, 3)`` uint8 frames (all one size) to ``path``; returns the number of frames written."""
    import av

    path = Path(path)
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("write_mp4 needs at least one frame")
    h, w = first.shape[:2]
    eh, ew = h + h % 2, w + w % 2  # yuv420p: even sizes
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    n = 0
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = ew, eh, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18"}
        else:
            stream.bit_rate = 8_000_000
        for f in itertools.chain([first], it):
            if f.shape[:2] != (h, w):
                raise ValueError(f"frame {n} is {f.shape[:2]}, the first was {(h, w)}")
            if (eh, ew) != (h, w):
                f = np.pad(to_rgb(f), ((0, eh - h), (0, ew - w), (0, 0)))
            for packet in stream.encode(av.VideoFrame.from_ndarray(to_rgb(f), format="rgb24")):
                out.mux(packet)
            n += 1
        for packet in stream.encode():
            out.mux(packet)
    return n


# ------------------------------------------------------------------------------------------ one clip
@dataclass
class ClipOverlay:
    """What to draw for one predicted clip, in full-frame pixels.

    ``frames`` / ``masks`` ``(T, H, W)``; ``stacks``: the frame positions of each stack (as
    :func:`datamodules.stacks.stack_positions`); ``rois``: each stack's crop box; ``region``: the box the clip
    was cut to (None: the whole frame); ``attention``: block name -> ``(S,)`` from :func:`stack_attention`
    (empty: no strip).
    """

    name: str
    frames: np.ndarray
    masks: np.ndarray
    prob: float
    stacks: Sequence[np.ndarray]
    rois: Sequence[Box]
    region: Box | None = None
    attention: Mapping[str, np.ndarray] = field(default_factory=dict)

    def _boxes(self, stack: int | None) -> list[tuple[Box, RGB]]:
        boxes = [] if self.region is None else [(self.region, COLOURS["region"])]
        if stack is not None:
            boxes.append((self.rois[stack], COLOURS["roi"]))
        return boxes

    def stack_of_frames(self) -> np.ndarray:
        """``(T,)`` stack index of each frame, -1 for frames in no stack (a dropped trailing remainder)."""
        out = np.full(len(self.frames), -1, dtype=np.int64)
        for s, pos in enumerate(self.stacks):
            for t in np.asarray(pos):
                if out[t] < 0:  # a 1-2 frame clip repeats its last frame inside one stack
                    out[t] = s
        return out

    def _vmax(self) -> dict[str, float]:
        return {k: float(np.max(v)) if len(v) else 0.0 for k, v in self.attention.items()}

    def video_frames(self) -> Iterable[np.ndarray]:
        """One picture per clip frame: the frame (contour, region and crop boxes, probability, frame number),
        above the attention strip with the frame's stack outlined."""
        h, w = self.frames.shape[1:]
        scale = max(1, -(-VIDEO_MIN // max(h, w)))
        of = self.stack_of_frames()
        vmax = self._vmax()
        for t in range(len(self.frames)):
            s = int(of[t]) if of[t] >= 0 else None
            pic = draw_frame(
                self.frames[t],
                mask=self.masks[t],
                boxes=self._boxes(s),
                text=f"{self.name}  p={self.prob:.3f}  frame {t + 1}/{len(self.frames)}",
                scale=scale,
            )
            if self.attention:
                strip = attention_strip(self.attention, pic.shape[1], current=s, vmax=vmax)
                pic = np.concatenate([pic, strip], axis=0)
            yield pic

    def montage(self, max_tiles: int = 12, columns: int = 6) -> np.ndarray:
        """The middle frame of each stack (evenly chosen when more than ``max_tiles``), each above its own
        attention cells, under a title with the probability."""
        h, w = self.frames.shape[1:]
        scale = TILE / max(h, w)
        n = len(self.stacks)
        chosen = np.unique(np.linspace(0, n - 1, min(n, max_tiles)).round().astype(int)) if n else []
        vmax = self._vmax()
        tiles = []
        for s in chosen:
            t = int(np.asarray(self.stacks[s])[len(self.stacks[s]) // 2])
            pic = draw_frame(
                self.frames[t],
                mask=self.masks[t],
                boxes=self._boxes(int(s)),
                text=f"stack {s + 1} frame {t + 1}",
                scale=scale,
            )
            if self.attention:
                cells = {k: np.asarray(v)[[s]] for k, v in self.attention.items()}
                strip = attention_strip(cells, pic.shape[1], vmax=vmax)
                pic = np.concatenate([pic, strip], axis=0)
            tiles.append(pic)
        if not tiles:  # no stack at all: show the first frame
            tiles = [draw_frame(self.frames[0], mask=self.masks[0], boxes=self._boxes(None), scale=scale)]
        title = f"{self.name}   p(malignant) = {self.prob:.3f}   {len(self.frames)} frames, {n} stacks"
        legend = "red: predicted nodule  yellow: model's crop" + (
            "  blue: ultrasound region" if self.region is not None else ""
        )
        if self.attention:
            legend += "  cells: attention per stack"
        return montage(tiles, columns=columns, title=f"{title}\n{legend}")
