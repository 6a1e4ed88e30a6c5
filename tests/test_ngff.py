"""The stained whole-slide container (data.ngff.SlideOutput): layout and NGFF metadata as
ome-zarr reads them, blocks written from several threads and from two processes at once, the
pyramid against numpy 2x2 means, provenance, and the errors for wrong paths."""

from __future__ import annotations

import json
import multiprocessing
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from napari_vstain.data.ngff import SlideOutput, level_shapes
from napari_vstain.errors import InputError, MissingInputError, OutputError

HEIGHT, WIDTH = 1100, 2100
CHUNK = 256
BLOCK = 512


def pattern(top: int, left: int, height: int, width: int) -> tuple:
    """The test slide's (rgb (h, w, 3) uint8, cv (h, w) float32) at a region: a function of
    the pixel's position, so any block can be made on its own."""
    y, x = np.mgrid[top:top + height, left:left + width]
    rgb = np.stack([(y * 31 + x * 17) % 256, (y * x) % 251, (x ^ y) & 255], axis=-1)
    cv = (np.sin(y * 0.013) * np.cos(x * 0.007) + 1.0).astype(np.float32)
    return rgb.astype(np.uint8), cv


def blocks(height: int = HEIGHT, width: int = WIDTH, size: int = BLOCK) -> list:
    return [(top, left) for top in range(0, height, size) for left in range(0, width, size)]


def write_pattern_block(slide: SlideOutput, top: int, left: int, size: int = BLOCK) -> None:
    height, width = min(size, slide.height - top), min(size, slide.width - left)
    slide.write_block(top, left, *pattern(top, left, height, width))


def reference_level(image: np.ndarray) -> np.ndarray:
    """The next level of (C, Y, X) computed plainly: mean of each 2x2 square of the pixels
    there are (odd edges: one or two pixels), uint8 rounded halves up."""
    channels, height, width = image.shape
    values = image.astype(np.float64)
    padded = np.full((channels, height + height % 2, width + width % 2), np.nan)
    padded[:, :height, :width] = values
    squares = padded.reshape(channels, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2)
    mean = np.nanmean(squares, axis=(2, 4))
    if image.dtype == np.uint8:
        return np.floor(mean + 0.5).astype(np.uint8)
    return mean.astype(np.float32)


def reference_pyramid(rgb: np.ndarray, cv: np.ndarray, levels: int) -> tuple:
    stain, cvs = [np.moveaxis(rgb, -1, 0)], [cv[np.newaxis]]
    for _ in range(1, levels):
        stain.append(reference_level(stain[-1]))
        cvs.append(reference_level(cvs[-1]))
    return stain, cvs


def check_pyramid(slide: SlideOutput) -> None:
    rgb, cv = pattern(0, 0, slide.height, slide.width)
    stain, cvs = reference_pyramid(rgb, cv, slide.levels)
    for level in range(slide.levels):
        np.testing.assert_array_equal(slide.read_level(level)[:], stain[level])
        np.testing.assert_allclose(slide.read_level(level, "cv")[:], cvs[level], rtol=1e-6,
                                   atol=1e-6)


def read_with_ome_zarr(path: Path, version: str):
    """The image node that ome-zarr's reader finds at `path`."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    fmt = FormatV04() if version == "0.4" else FormatV05()
    nodes = list(Reader(parse_url(str(path), fmt=fmt))())
    assert nodes, f"ome-zarr finds no image in {path}"
    node = nodes[0]
    assert any(isinstance(spec, Multiscales) for spec in node.specs)
    return node


# ---- levels and layout ----------------------------------------------------------------------

def test_levels_halve_until_both_sides_fit_512():
    assert level_shapes(8192, 8192) == [(8192, 8192), (4096, 4096), (2048, 2048),
                                        (1024, 1024), (512, 512)]
    assert level_shapes(HEIGHT, WIDTH) == [(1100, 2100), (550, 1050), (275, 525), (138, 263)]
    assert level_shapes(512, 300) == [(512, 300)]
    assert level_shapes(513, 10) == [(513, 10), (257, 5)]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_layout_and_metadata_read_by_ome_zarr(tmp_path, version):
    path = tmp_path / "slide.zarr"
    slide = SlideOutput.create(path, HEIGHT, WIDTH, pixel_size=(0.25, 0.5), version=version,
                               chunk=CHUNK, provenance={"model": "demo"})
    assert (slide.height, slide.width, slide.levels, slide.chunk) == (HEIGHT, WIDTH, 4, CHUNK)
    assert slide.version == version and slide.pixel_size == (0.25, 0.5)
    marker = ".zgroup" if version == "0.4" else "zarr.json"
    assert (path / marker).is_file() and (path / "cv" / marker).is_file()
    shapes = level_shapes(HEIGHT, WIDTH)
    for level, (height, width) in enumerate(shapes):
        stain, cv = slide.read_level(level), slide.read_level(level, "cv")
        assert stain.shape == (3, height, width) and stain.dtype == np.uint8
        assert cv.shape == (1, height, width) and cv.dtype == np.float32
        assert stain.chunks == (3, CHUNK, CHUNK) and cv.chunks == (1, CHUNK, CHUNK)
    if version == "0.4":  # NGFF 0.4 wants "/" between chunk indices
        assert json.loads((path / "0" / ".zarray").read_text())["dimension_separator"] == "/"

    for where, channels in ((path, ["red", "green", "blue"]), (path / "cv", ["CV"])):
        node = read_with_ome_zarr(where, version)
        assert len(node.data) == 4
        assert [tuple(level.shape) for level in node.data] == \
            [(len(channels), h, w) for h, w in shapes]
        axes = node.metadata["axes"]
        assert [a["name"] for a in axes] == ["c", "y", "x"]
        assert [a["type"] for a in axes] == ["channel", "space", "space"]
        assert axes[1]["unit"] == axes[2]["unit"] == "micrometer"
        for level, transforms in enumerate(node.metadata["coordinateTransformations"]):
            scale = next(t["scale"] for t in transforms if t["type"] == "scale")
            shift = next(t["translation"] for t in transforms if t["type"] == "translation")
            assert scale == pytest.approx([1.0, 0.25 * 2 ** level, 0.5 * 2 ** level])
            assert shift == pytest.approx([0.0, 0.25 * (2 ** level - 1) / 2,
                                           0.5 * (2 ** level - 1) / 2])
        assert node.metadata["channel_names"] == channels

    attributes = dict(slide._root.attrs)
    ome = attributes["ome"] if version == "0.5" else attributes
    colours = [c["color"] for c in ome["omero"]["channels"]]
    assert colours == ["FF0000", "00FF00", "0000FF"]
    assert all(c["window"]["start"] == 0 and c["window"]["end"] == 255
               for c in ome["omero"]["channels"])
    assert attributes["napari_vstain"] == {"provenance": {"model": "demo"}, "format": "stain"}


def test_unknown_pixel_size_gives_unitless_pixel_scales(tmp_path):
    slide = SlideOutput.create(tmp_path / "s.zarr", 1000, 700, chunk=CHUNK)
    assert slide.pixel_size is None and slide.levels == 2
    node = read_with_ome_zarr(tmp_path / "s.zarr", "0.4")
    assert all("unit" not in axis for axis in node.metadata["axes"])
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales == [[1.0, 1.0, 1.0], [1.0, 2.0, 2.0]]
    assert SlideOutput.open(tmp_path / "s.zarr", mode="r").pixel_size is None


# ---- writing blocks and the pyramid -----------------------------------------------------------

@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_blocks_from_threads_then_pyramid_equals_numpy_means(tmp_path, version):
    slide = SlideOutput.create(tmp_path / "slide.zarr", HEIGHT, WIDTH, version=version,
                               chunk=CHUNK)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda corner: write_pattern_block(slide, *corner), blocks()))
    slide.update_pyramid()
    check_pyramid(SlideOutput.open(tmp_path / "slide.zarr", mode="r"))


def write_blocks_in_process(slide: SlideOutput, corners: list, start) -> None:
    """Runs in a separate process: `slide` arrives pickled (as its path) and is opened there;
    both processes start writing together."""
    start.wait()
    for top, left in corners:
        write_pattern_block(slide, top, left)


def test_blocks_from_two_processes(tmp_path):
    slide = SlideOutput.create(tmp_path / "slide.zarr", HEIGHT, WIDTH, chunk=CHUNK)
    corners = blocks()
    # a checkerboard: every block's neighbours are written by the other process
    halves = [[c for c in corners if (c[0] // BLOCK + c[1] // BLOCK) % 2 == parity]
              for parity in (0, 1)]
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    processes = [context.Process(target=write_blocks_in_process, args=(slide, half, start))
                 for half in halves]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [p.exitcode for p in processes] == [0, 0]
    slide.update_pyramid()
    check_pyramid(slide)


def test_update_of_a_region_recomputes_only_its_chunks(tmp_path):
    slide = SlideOutput.create(tmp_path / "slide.zarr", HEIGHT, WIDTH, chunk=CHUNK)
    for top, left in blocks():
        write_pattern_block(slide, top, left)
    slide.update_pyramid()
    # a far chunk of level 1 set to a sentinel: a region update must leave it alone
    slide.read_level(1)[:, :CHUNK, :CHUNK] = 7
    # a new block of level 0 (white), then the pyramid over its region
    slide.write_block(768, 1024, np.full((256, 512, 3), 255, np.uint8),
                      np.zeros((256, 512), np.float32))
    slide.update_pyramid(768, 1024, 256, 512)
    rgb, cv = pattern(0, 0, HEIGHT, WIDTH)
    rgb[768:1024, 1024:1536], cv[768:1024, 1024:1536] = 255, 0.0
    stain, cvs = reference_pyramid(rgb, cv, slide.levels)
    for level in range(1, slide.levels):
        np.testing.assert_allclose(slide.read_level(level, "cv")[:], cvs[level], atol=1e-6)
        got = slide.read_level(level)[:]
        if level == 1:
            assert (got[:, :CHUNK, :CHUNK] == 7).all()
            got[:, :CHUNK, :CHUNK] = stain[1][:, :CHUNK, :CHUNK]
        np.testing.assert_array_equal(got, stain[level])


def test_rgb_means_round_halves_up_and_odd_edges_average_what_is_there(tmp_path):
    slide = SlideOutput.create(tmp_path / "s.zarr", 515, 17, chunk=16)
    rgb = np.zeros((515, 17, 3), np.uint8)
    rgb[0:2, 0:2, 0] = [[0, 1], [0, 1]]  # mean 0.5 -> 1
    rgb[0:2, 2:4, 0] = [[0, 0], [0, 1]]  # mean 0.25 -> 0
    rgb[0:2, 4:6, 0] = [[1, 1], [1, 0]]  # mean 0.75 -> 1
    rgb[514, 16] = 201  # the corner pixel is alone in its square
    rgb[512:514, 16, 1] = [10, 13]  # the odd column: a square of two pixels, 11.5 -> 12
    slide.write_block(0, 0, rgb, np.zeros((515, 17), np.float32))
    slide.update_pyramid()
    level1 = slide.read_level(1)[:]
    assert level1.shape == (3, 258, 9)
    assert list(level1[0, 0, :3]) == [1, 0, 1]
    assert (level1[:, 257, 8] == 201).all()
    assert level1[1, 256, 8] == 12


def test_write_block_refuses_blocks_off_the_chunk_grid(tmp_path):
    slide = SlideOutput.create(tmp_path / "s.zarr", 600, 600, chunk=CHUNK)
    rgb, cv = pattern(0, 0, 256, 256)
    with pytest.raises(ValueError, match="chunk grid"):
        slide.write_block(100, 0, rgb, cv)
    with pytest.raises(ValueError, match="chunk grid"):
        slide.write_block(0, 0, rgb[:200], cv[:200])
    with pytest.raises(ValueError, match="outside"):
        slide.write_block(512, 512, rgb, cv)
    with pytest.raises(ValueError, match="uint8"):
        slide.write_block(0, 0, rgb.astype(np.float32), cv)
    slide.write_block(512, 512, *pattern(512, 512, 88, 88))  # the edge block is fine


# ---- provenance, pickling, opening ------------------------------------------------------------

def test_provenance_round_trip_and_pickling(tmp_path):
    path = tmp_path / "s.zarr"
    slide = SlideOutput.create(path, 300, 300, pixel_size=0.5, chunk=CHUNK,
                               provenance={"seed": np.int64(3), "steps": [1, 2],
                                           "input": Path("/data/af.tif")})
    assert SlideOutput.open(path, mode="r").provenance == \
        {"seed": 3, "steps": [1, 2], "input": "/data/af.tif"}
    slide.set_provenance({"model": "demo", "scale": np.float32(0.5)})
    reopened = SlideOutput.open(path, mode="r")
    assert reopened.provenance == {"model": "demo", "scale": 0.5}
    assert reopened._root.attrs["napari_vstain"]["format"] == "stain"
    copy = pickle.loads(pickle.dumps(reopened))
    assert (copy.path, copy.mode, copy.height, copy.levels) == (path, "r", 300, 1)
    with pytest.raises(ValueError, match="read-only"):
        copy.set_provenance({})
    with pytest.raises(ValueError, match="read-only"):
        copy.write_block(0, 0, *pattern(0, 0, 256, 256))


def test_create_refuses_an_existing_path(tmp_path):
    path = tmp_path / "s.zarr"
    SlideOutput.create(path, 300, 300)
    with pytest.raises(OutputError, match="already exists"):
        SlideOutput.create(path, 300, 300)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        SlideOutput.create(tmp_path / "empty", 300, 300)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="already exists"):
        SlideOutput.create(tmp_path / "file", 300, 300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "s.zarr"]


def test_open_says_what_is_wrong(tmp_path):
    import zarr

    with pytest.raises(MissingInputError, match="does not exist"):
        SlideOutput.open(tmp_path / "missing.zarr")
    (tmp_path / "image.tif").write_bytes(b"II*\x00")
    with pytest.raises(InputError, match="is a file"):
        SlideOutput.open(tmp_path / "image.tif")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(InputError, match="not a zarr group"):
        SlideOutput.open(tmp_path / "empty.zarr")
    other = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    other.create_array("0", shape=(3, 10, 10), dtype="uint8")
    with pytest.raises(InputError, match="not a stained slide written by napari-vstain"):
        SlideOutput.open(tmp_path / "other.zarr")
    SlideOutput.create(tmp_path / "cut.zarr", 300, 300)
    import shutil

    shutil.rmtree(tmp_path / "cut.zarr" / "cv" / "0")
    with pytest.raises(InputError, match="level 0 of its CV map is missing"):
        SlideOutput.open(tmp_path / "cut.zarr")
