"""The drawing module of ``usnodule predict --overlay`` (datamodules.overlay): arrays in, arrays and files out."""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from datamodules.overlay import (
    COLOURS,
    ClipOverlay,
    attention_strip,
    cell_colours,
    draw_frame,
    montage,
    stack_attention,
    write_mp4,
    write_png,
)
from datamodules.stacks import stack_positions


def _is(pic: np.ndarray, y: int, x: int, colour) -> bool:
    return tuple(int(v) for v in pic[y, x]) == tuple(colour)


def test_draw_frame_puts_the_contour_on_the_mask_edge_and_the_box_where_given():
    frame = np.full((40, 50), 100, np.uint8)
    mask = np.zeros((40, 50), np.uint8)
    mask[10:20, 20:30] = 1
    pic = draw_frame(frame, mask=mask, boxes=[((5, 15, 25, 35), COLOURS["roi"])], scale=2)
    assert pic.shape == (80, 100, 3)
    red = np.all(pic == COLOURS["mask"], axis=-1)
    ys, xs = np.nonzero(red)
    # The contour runs on the mask's edge, half-way between its pixels and the next: at 2x, rows 20 and 40,
    # columns 40 and 60 (the corners cut by marching squares).
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (20, 40, 40, 60)
    assert red[20, 42:59].all() and red[40, 42:59].all() and red[22:39, 40].all() and red[22:39, 60].all()
    assert not red[22:39, 42:59].any()  # a line, not a filled area
    # Box (y0, x0, y1, x1) = (5, 15, 25, 35), end-exclusive: outline at 10..49 (y), 30..69 (x) at 2x.
    assert _is(pic, 10, 50, COLOURS["roi"]) and _is(pic, 49, 50, COLOURS["roi"])
    assert _is(pic, 30, 30, COLOURS["roi"]) and _is(pic, 30, 69, COLOURS["roi"])
    assert _is(pic, 2, 2, (100, 100, 100))  # no text asked for: the frame itself
    # An empty mask draws nothing red; text is drawn in the top-left corner.
    plain = draw_frame(frame, mask=np.zeros_like(mask), text="p=0.42")
    assert not np.all(plain == COLOURS["mask"], axis=-1).any() and (plain[:12, :40] != 100).any()


def test_stack_attention_is_the_column_mean_over_valid_queries():
    w = np.array([[0.7, 0.2, 0.1, 0.0], [0.1, 0.1, 0.8, 0.0], [0.3, 0.3, 0.4, 0.0], [0.25] * 4])
    valid = np.array([True, True, True, False])
    a = stack_attention(w, valid)
    np.testing.assert_allclose(a, [1.1 / 3, 0.6 / 3, 1.3 / 3, 0.0])  # padded query row ignored
    assert a.sum() == pytest.approx(1.0)
    assert list(np.argsort(-a)) == [2, 0, 1, 3]  # stack order kept: stack 2 receives the most
    with pytest.raises(ValueError):
        stack_attention(np.ones((2, 3)))


def test_attention_strip_cells_follow_the_values_in_stack_order():
    values = np.array([0.1, 0.6, 0.3])
    strip = attention_strip({"self": values, "cross": values[::-1]}, 344, current=1, label_width=44)
    assert strip.shape == (36, 344, 3)
    colours = cell_colours(values)
    # Brighter (viridis: darker blue -> yellow) for more attention; the largest value gets the top colour.
    lum = colours @ np.array([0.299, 0.587, 0.114])
    assert list(np.argsort(lum)) == [0, 2, 1]
    assert tuple(colours[1]) == tuple(cell_colours(np.array([1.0]))[0])
    edges = np.linspace(44, 344, 4).round().astype(int)
    for k in range(3):  # cell k of row 0 has colour k (sampled away from the text and outline)
        assert _is(strip, 4, edges[k] + 4, colours[k])
        assert _is(strip, 18 + 4, edges[k] + 4, cell_colours(values[::-1])[k])
    assert _is(strip, 0, edges[1] + 5, (255, 255, 255))  # the current stack is outlined


def test_montage_layout():
    tiles = [np.full((50, 40, 3), i * 20, np.uint8) for i in range(8)]
    out = montage(tiles, columns=6, gap=4)
    assert out.shape == (2 * 54 + 4, 6 * 44 + 4, 3)
    assert _is(out, 4, 4 + 44, (20, 20, 20)) and _is(out, 4 + 54, 4 + 44, (140, 140, 140))
    titled = montage(tiles[:1], title="a long title that is wider than one tile of forty pixels\nline 2")
    assert titled.shape[0] == 6 + 2 * 20 + 58 and titled.shape[1] > 48


def test_mp4_decodes_to_every_frame_at_its_size(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (37, 50, 3), dtype=np.uint8) for _ in range(7)]  # odd height: padded
    assert write_mp4(frames, tmp_path / "a.mp4", fps=10) == 7
    with av.open(str(tmp_path / "a.mp4")) as f:
        decoded = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(decoded) == 7 and decoded[0].shape == (38, 50, 3)
    # Lossy, but the picture is there: mean absolute error far below the noise's spread.
    assert np.abs(decoded[3][:37].astype(int) - frames[3]).mean() < 60


def test_clip_overlay_video_and_montage(tmp_path):
    t, h, w = 10, 48, 64
    frames = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (t, h, 1))
    masks = np.zeros((t, h, w), np.uint8)
    masks[:, 20:30, 25:40] = 1
    stacks = stack_positions(t)  # 3 stacks; frame 9 in none
    overlay = ClipOverlay(
        name="clip",
        frames=frames,
        masks=masks,
        prob=0.25,
        stacks=stacks,
        rois=[(15, 20, 35, 45)] * 3,
        region=(2, 2, 46, 62),
        attention={"self": np.array([0.2, 0.5, 0.3]), "cross": np.array([0.4, 0.4, 0.2])},
    )
    assert overlay.stack_of_frames().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, -1]
    pics = list(overlay.video_frames())
    assert len(pics) == t
    assert pics[0].shape == (h * 4 + 2 * 18, w * 4, 3)  # enlarged x4 to >= 256 px, two strip rows below
    n = write_mp4(pics, tmp_path / "clip.mp4")
    png = write_png(overlay.montage(), tmp_path / "clip.png")
    with av.open(str(tmp_path / "clip.mp4")) as f:
        assert sum(1 for _ in f.decode(video=0)) == n == t
    # Three tiles (one per stack) of 192 px wide frames over two strip rows, under two title lines.
    tile_h = h * 192 // w + 2 * 18
    shape = np.asarray(Image.open(png)).shape
    assert shape[0] == 46 + 4 + tile_h + 4 and 3 * (192 + 4) + 4 <= shape[1] < 800 and shape[2] == 3
