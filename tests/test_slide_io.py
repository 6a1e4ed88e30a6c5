"""Whole-slide AF input read region by region (data.slide) from real files: pyramidal
OME-TIFF (SubIFDs and one series per level), plain tiled, striped and uncompressed TIFF,
OME-Zarr 0.4 and 0.5 written by ome-zarr; the normalisation statistics of a slide; and the
napari reader's multiscale layers for pyramids, OME-Zarr AF slides and the stained
OME-Zarr output (layer data tuples, no viewer)."""

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from napari_vstain._napari._layers import (CHANNEL_NAMES, LAYER_ID, LINKS, PIXEL_SIZE,
                                           PROVENANCE, ROLE)
from napari_vstain._napari._reader import get_reader
from napari_vstain.data import slide
from napari_vstain.data.io import read_af, write_ome_tiff
from napari_vstain.data.slide import open_af_lazy, slide_statistics
from napari_vstain.engine.config import ModelConfig
from napari_vstain.engine.model import af_statistics, normalise_af
from napari_vstain.errors import InputError, MissingInputError

NAMES = ["DAPI", "FITC", "TxRed", "Cy5"]


def af_stack(channels=4, height=300, width=260, seed=0, dtype=np.uint16):
    """AF-like counts: smooth tissue structure plus noise, different brightness per channel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    tissue = 0.5 + 0.5 * np.sin(yy / 17.0) * np.cos(xx / 23.0)
    gains = np.array([300.0, 800.0, 500.0, 1200.0][:channels])[:, None, None]
    counts = gains * tissue[None] + rng.normal(0.0, 40.0, (channels, height, width)) + 100.0
    return np.clip(counts, 0, None).astype(dtype)


def mean_2x(level):
    """2 x 2 mean (cropping an odd row / column), as scanners build their pyramids."""
    c, h, w = level.shape
    h2, w2 = h // 2, w // 2
    blocks = level[:, :2 * h2, :2 * w2].astype(np.float64).reshape(c, h2, 2, w2, 2)
    return np.round(blocks.mean(axis=(2, 4))).astype(level.dtype)


def pyramid(level0, count):
    levels = [level0]
    while len(levels) < count:
        levels.append(mean_2x(levels[-1]))
    return levels


def write_pyramidal_ome_tiff(path, levels, pixel_size=(0.5, 0.5), names=NAMES):
    """A tiled OME-TIFF with the reduced levels as SubIFDs (as bioformats2raw / QuPath)."""
    options = dict(tile=(128, 128), compression="zlib", photometric="minisblack")
    with tifffile.TiffWriter(path, bigtiff=False, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, resolutionunit="CENTIMETER",
                  metadata={"axes": "CYX", "PhysicalSizeY": pixel_size[0],
                            "PhysicalSizeYUnit": "µm", "PhysicalSizeX": pixel_size[1],
                            "PhysicalSizeXUnit": "µm",
                            "Channel": {"Name": list(names[:levels[0].shape[0]])}},
                  **options)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **options)
    return path


def write_ome_zarr(path, levels, version, axes="cyx", pixel_size=(0.5, 0.5), names=NAMES,
                   attributes=None):
    """An OME-Zarr image written by ome-zarr's writer: NGFF 0.4 (zarr 2) or 0.5 (zarr 3)."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_multiscale

    fmt = FormatV04() if version == "0.4" else FormatV05()
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    # length-1 time / z axes where `axes` names them, the (c, y, x) data in the others
    singles = tuple(i for i, a in enumerate(axes) if a not in "cyx")
    arrays = [np.expand_dims(level, singles) for level in levels]
    scale = units = None
    if pixel_size is not None:
        scale = {"y": pixel_size[0], "x": pixel_size[1]}
        units = {"y": "micrometer", "x": "micrometer"}
    metadata = {"omero": {"channels": [{"label": n} for n in names[:levels[0].shape[0]]]}}
    write_multiscale(arrays, group, fmt=fmt, axes=list(axes), scale=scale, axes_units=units,
                     metadata=metadata)
    for key, value in (attributes or {}).items():
        group.attrs[key] = value
    return path


def as_float(array):
    return np.asarray(array, dtype=np.float32)


# ---- opening and reading -------------------------------------------------------------------

def test_pyramidal_ome_tiff_reads_regions_and_levels(tmp_path):
    levels = pyramid(af_stack(), 3)
    path = write_pyramidal_ome_tiff(tmp_path / "slide.ome.tif", levels)
    with open_af_lazy(path, expected_channels=4) as lazy:
        assert lazy.shape == (4, 300, 260) and lazy.dtype == np.uint16
        assert lazy.pixel_size == pytest.approx((0.5, 0.5))
        assert lazy.channel_names == NAMES
        assert lazy.source == str(path)
        assert [level.shape for level in lazy.levels] == [(4, 300, 260), (4, 150, 130),
                                                          (4, 75, 65)]
        region = lazy.read(37, 101, 150, 99)
        assert region.dtype == np.float32 and region.shape == (4, 150, 99)
        np.testing.assert_array_equal(region, as_float(levels[0][:, 37:187, 101:200]))
        np.testing.assert_array_equal(lazy.read(0, 0, 300, 260), read_af(path).data)
        # every level indexes as [c, y0:y1, x0:x1]
        np.testing.assert_array_equal(lazy.levels[2][1, 10:20, 5:9], levels[2][1, 10:20, 5:9])
        np.testing.assert_array_equal(lazy.levels[1][2:4, :7, :8], levels[1][2:4, :7, :8])
        dask_level = lazy.level_dask(1)
        assert isinstance(dask_level, da.Array) and dask_level.shape == (4, 150, 130)
        assert dask_level.chunksize[0] == 1
        np.testing.assert_array_equal(dask_level.compute(), levels[1])
        for box in ((-1, 0, 10, 10), (0, 0, 301, 10), (290, 250, 11, 10), (0, 0, 0, 5)):
            with pytest.raises(InputError, match="outside the AF image"):
                lazy.read(*box)
    assert lazy.levels == []  # closed


def test_pyramid_written_as_one_series_per_level(tmp_path):
    levels = pyramid(af_stack(channels=3, seed=1), 3)
    path = tmp_path / "series.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        for level in levels:
            tif.write(level, tile=(64, 64), compression="zlib", photometric="minisblack",
                      metadata={"axes": "CYX"})
    with open_af_lazy(path) as lazy:
        assert [level.shape[1:] for level in lazy.levels] == [(300, 260), (150, 130), (75, 65)]
        np.testing.assert_array_equal(lazy.levels[2][:, :, :], levels[2])
        assert lazy.pixel_size is None and lazy.channel_names == ["AF 1", "AF 2", "AF 3"]


@pytest.mark.parametrize("layout", ["tiled", "strips", "uncompressed", "channels_last",
                                    "plane_per_series"])
def test_plain_tiffs_read_like_read_af(tmp_path, layout):
    af = af_stack(height=200, width=180, seed=2)
    path = tmp_path / f"{layout}.tif"
    if layout == "tiled":
        tifffile.imwrite(path, af, tile=(64, 64), compression="zlib", photometric="minisblack",
                         metadata=None)
    elif layout == "strips":
        tifffile.imwrite(path, af, compression="zlib", rowsperstrip=16,
                         photometric="minisblack", metadata=None)
    elif layout == "uncompressed":
        tifffile.imwrite(path, af, photometric="minisblack", metadata=None)
    elif layout == "channels_last":
        tifffile.imwrite(path, np.moveaxis(af, 0, -1), photometric="minisblack",
                         planarconfig="contig", metadata=None)
    else:  # one 2-D series per channel (separate writes, no metadata)
        with tifffile.TiffWriter(path) as tif:
            for plane in af:
                tif.write(plane, photometric="minisblack", metadata=None)
    whole = read_af(path)
    with open_af_lazy(path, expected_channels=4) as lazy:
        assert lazy.shape == whole.data.shape == (4, 200, 180)
        assert len(lazy.levels) == 1
        np.testing.assert_array_equal(lazy.read(0, 0, 200, 180), whole.data)
        np.testing.assert_array_equal(lazy.read(150, 3, 50, 17), whole.data[:, 150:, 3:20])
        np.testing.assert_array_equal(lazy.level_dask(0)[2].compute(), af[2])
        if layout == "uncompressed":  # read in place: the file is memory-mapped
            assert isinstance(lazy.levels[0].raw, np.memmap)
        if layout == "strips":  # one strip at a time
            assert lazy.levels[0].storage_chunks == (16, 180)


def test_float_and_single_channel_images(tmp_path):
    one = af_stack(channels=1, height=64, width=48).astype(np.float32)[0]
    one[5, 7] = np.nan
    path = write_ome_tiff(tmp_path / "one.ome.tif", one, "YX", pixel_size=(0.3, 0.4))
    with open_af_lazy(path) as lazy:
        assert lazy.shape == (1, 64, 48) and lazy.pixel_size == pytest.approx((0.3, 0.4))
        np.testing.assert_array_equal(lazy.read(10, 10, 20, 20), one[None, 10:30, 10:30])
        np.testing.assert_array_equal(lazy.levels[0][0, 1:3, 2:4], one[1:3, 2:4])
        with pytest.raises(IndexError):
            lazy.levels[0][1, :2, :2]
        with pytest.raises(InputError, match="NaN"):
            lazy.read(0, 0, 10, 10)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_regions_pixel_size_and_names(tmp_path, version):
    levels = pyramid(af_stack(seed=3), 3)
    path = write_ome_zarr(tmp_path / f"slide_{version}.zarr", levels, version,
                          pixel_size=(0.65, 0.6))
    assert (path / ("zarr.json" if version == "0.5" else ".zattrs")).is_file()
    with open_af_lazy(path, expected_channels=4) as lazy:
        assert lazy.shape == (4, 300, 260) and lazy.dtype == np.uint16
        assert lazy.pixel_size == pytest.approx((0.65, 0.6))
        assert lazy.channel_names == NAMES
        assert [level.shape for level in lazy.levels] == [(4, 300, 260), (4, 150, 130),
                                                          (4, 75, 65)]
        np.testing.assert_array_equal(lazy.read(101, 7, 64, 200),
                                      as_float(levels[0][:, 101:165, 7:207]))
        np.testing.assert_array_equal(lazy.level_dask(2).compute(), levels[2])


def test_ome_zarr_with_leading_time_and_z_of_one(tmp_path):
    levels = pyramid(af_stack(channels=2, seed=4), 2)
    path = write_ome_zarr(tmp_path / "tczyx.zarr", levels, "0.4", axes="tczyx",
                          pixel_size=None)
    with open_af_lazy(path) as lazy:
        assert lazy.shape == (2, 300, 260) and lazy.pixel_size is None
        assert lazy.levels[1].shape == (2, 150, 130)
        np.testing.assert_array_equal(lazy.read(5, 6, 7, 8), as_float(levels[0][:, 5:12, 6:14]))
        np.testing.assert_array_equal(lazy.levels[1][1, 3:5, :4], levels[1][1, 3:5, :4])


def test_refusals_say_what_is_wrong(tmp_path):
    levels = pyramid(af_stack(), 2)
    tiff = write_pyramidal_ome_tiff(tmp_path / "four.ome.tif", levels)
    with pytest.raises(InputError, match="4 channels, but the model needs 3 AF channels"):
        open_af_lazy(tiff, expected_channels=3)
    ngff = write_ome_zarr(tmp_path / "four.zarr", levels, "0.5")
    with pytest.raises(InputError, match="4 channels, but the model needs 2 AF channels"):
        open_af_lazy(ngff, expected_channels=2)
    # a z-stack: one plane has to be chosen first
    stack = zarr.open_group(str(tmp_path / "z.zarr"), mode="w", zarr_format=2)
    stack.create_array("0", shape=(2, 5, 64, 64), dtype="uint16", chunks=(1, 1, 64, 64))
    stack.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "c", "type": "channel"}, {"name": "z", "type": "space"},
        {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 1, 1, 1]}]}]}]
    with pytest.raises(InputError, match="z-stack"):
        open_af_lazy(tmp_path / "z.zarr")
    tifffile.imwrite(tmp_path / "tiny.tif", np.zeros((4, 5, 6), np.uint16),
                     photometric="minisblack", metadata=None)
    with pytest.raises(InputError, match="too small"):
        open_af_lazy(tmp_path / "tiny.tif")
    tifffile.imwrite(tmp_path / "complex.tif", np.zeros((64, 64), np.complex64))
    with pytest.raises(InputError, match="pixel type"):
        open_af_lazy(tmp_path / "complex.tif")
    with pytest.raises(MissingInputError):
        open_af_lazy(tmp_path / "missing.ome.tif")
    (tmp_path / "plain_folder").mkdir()
    with pytest.raises(InputError, match="not an OME-Zarr image"):
        open_af_lazy(tmp_path / "plain_folder")
    zarr.open_group(str(tmp_path / "no_image.zarr"), mode="w")
    with pytest.raises(InputError, match="multiscales"):
        open_af_lazy(tmp_path / "no_image.zarr")
    (tmp_path / "notes.tif").write_text("not an image")
    with pytest.raises(InputError, match="not a readable TIFF"):
        open_af_lazy(tmp_path / "notes.tif")


# ---- normalisation statistics --------------------------------------------------------------

@pytest.mark.parametrize("normalisation", ["percentile", "zscore", "zscore_joint"])
def test_statistics_of_small_images_equal_the_in_memory_path(tmp_path, normalisation):
    config = ModelConfig(af_normalisation=normalisation)
    levels = pyramid(af_stack(seed=5), 3)
    path = write_pyramidal_ome_tiff(tmp_path / "small.ome.tif", levels)
    with open_af_lazy(path) as lazy:
        assert slide_statistics(lazy, config) == af_statistics(read_af(path).data, config)
    ngff = write_ome_zarr(tmp_path / "small.zarr", levels, "0.4")
    with open_af_lazy(ngff) as lazy:
        assert slide_statistics(lazy, config) == af_statistics(as_float(levels[0]), config)


@pytest.mark.parametrize("layout", ["tiles", "strips"])
def test_statistics_of_large_images_equal_the_in_memory_path(tmp_path, monkeypatch, layout):
    """Above af_statistics' 4 M sampled pixels (every 2nd pixel here), read in small blocks
    (several side by side, BAND_BYTES lowered): still exactly the in-memory statistics, with
    every order-sensitive sum (mean, std) alike."""
    level0 = af_stack(channels=2, height=2100, width=2000, seed=9)
    path = tmp_path / f"{layout}.tif"
    storage = {"tile": (128, 128)} if layout == "tiles" else {"rowsperstrip": 40}
    tifffile.imwrite(path, level0, compression="zlib", photometric="minisblack",
                     metadata=None, **storage)
    monkeypatch.setattr(slide, "BAND_BYTES", 2**20)
    with open_af_lazy(path) as lazy:
        blocks = slide._sample_blocks(lazy.levels[0], 2, 2000)
        assert blocks == ((128, 1024) if layout == "tiles" else (40, 2000))
        for normalisation in ("percentile", "zscore"):
            config = ModelConfig(af_normalisation=normalisation)
            assert slide_statistics(lazy, config) == af_statistics(as_float(level0), config)


def test_statistics_refuse_nan_anywhere(tmp_path):
    af = af_stack(channels=2, height=64, width=64).astype(np.float32)
    af[1, 60, 3] = np.nan
    path = write_ome_tiff(tmp_path / "nan.ome.tif", af, "CYX")
    with open_af_lazy(path) as lazy, pytest.raises(InputError, match="NaN"):
        slide_statistics(lazy, ModelConfig())


def test_tile_sample_statistics_approximate_the_whole_image(tmp_path):
    """The faster approximation: 64 tiles of level 0 (also when there is a pyramid, whose
    averaged pixels are less noisy than level 0's), read one by one or from bands of strips
    alike, normalise the image nearly as the whole image's statistics do."""
    config = ModelConfig()
    level0 = af_stack(height=1024, width=1024, seed=6)
    pyramidal = write_pyramidal_ome_tiff(tmp_path / "big.ome.tif", pyramid(level0, 4))
    plain = tmp_path / "big.tif"
    tifffile.imwrite(plain, level0, compression="zlib", rowsperstrip=32,
                     photometric="minisblack", metadata=None)
    whole = af_statistics(as_float(level0), config)
    estimates = []
    for path in (pyramidal, plain):
        with open_af_lazy(path) as lazy:
            estimates.append(slide.tile_sample_statistics(lazy, config))
            tiles = np.concatenate([lazy.read(top, left, side, side)
                                    for top, left, side in slide.sample_tile_boxes(lazy.shape)],
                                   axis=2)
            assert estimates[-1] == af_statistics(tiles, config)
    assert estimates[0] == estimates[1]
    span = np.array(whole["high"]) - np.array(whole["low"])
    for key in ("low", "high"):
        assert np.all(np.abs(np.array(estimates[0][key]) - whole[key]) < 0.02 * span), key
    difference = normalise_af(level0, estimates[0]) - normalise_af(level0, whole)
    assert float(np.abs(difference).max()) < 0.05


def test_sample_tiles_are_spread_evenly_and_inside():
    boxes = slide.sample_tile_boxes((4, 5000, 3000))
    assert len(boxes) == 64 and len(set(boxes)) == 64
    tops = sorted({top for top, _, _ in boxes})
    lefts = sorted({left for _, left, _ in boxes})
    assert len(tops) == len(lefts) == 8
    assert all(side == 256 for _, _, side in boxes)
    assert tops[0] > 0 and tops[-1] + 256 < 5000 and lefts[-1] + 256 < 3000
    assert np.ptp(np.diff(tops)) <= 1 and np.ptp(np.diff(lefts)) <= 1
    small = slide.sample_tile_boxes((100, 90))  # smaller than a tile: tiles of 90 px
    assert {(left, side) for _, left, side in small} == {(0, 90)}
    assert min(top for top, _, _ in small) == 0 and max(top for top, _, _ in small) == 10


# ---- napari reader -------------------------------------------------------------------------

def test_reader_gives_a_multiscale_layer_for_a_pyramidal_tiff(tmp_path):
    levels = pyramid(af_stack(), 3)
    path = write_pyramidal_ome_tiff(tmp_path / "slide.ome.tif", levels, pixel_size=(0.5, 0.5))
    (data, kwargs, kind), = get_reader(str(path))(str(path))
    assert kind == "image" and kwargs["multiscale"] is True
    assert isinstance(data, list) and len(data) == 3
    assert all(isinstance(level, da.Array) for level in data)
    assert [level.shape for level in data] == [(4, 300, 260), (4, 150, 130), (4, 75, 65)]
    np.testing.assert_array_equal(data[2].compute(), levels[2])
    assert kwargs["name"] == "slide AF" and kwargs["scale"] == (1.0, 0.5, 0.5)
    assert kwargs["units"] == ("pixel", "µm", "µm")
    assert kwargs["axis_labels"] == ("channel", "y", "x")
    assert kwargs["metadata"][ROLE] == "af" and kwargs["metadata"][CHANNEL_NAMES] == NAMES
    assert kwargs["metadata"][PIXEL_SIZE] == (0.5, 0.5)
    # a single-level file still opens as one in-memory layer
    small = write_ome_tiff(tmp_path / "small.ome.tif", levels[1], "CYX", pixel_size=(1, 1))
    (data, kwargs, _), = get_reader(str(small))(str(small))
    assert isinstance(data, np.ndarray) and "multiscale" not in kwargs


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_reader_opens_an_ome_zarr_af_folder(tmp_path, version):
    levels = pyramid(af_stack(seed=7), 3)
    path = write_ome_zarr(tmp_path / "af.ome.zarr", levels, version, pixel_size=(0.65, 0.6))
    reader = get_reader(str(path))
    assert reader is not None and get_reader(str(path) + "/") is not None
    (data, kwargs, kind), = reader(str(path))
    assert kind == "image" and kwargs["multiscale"] is True and len(data) == 3
    assert [level.shape for level in data] == [(4, 300, 260), (4, 150, 130), (4, 75, 65)]
    np.testing.assert_array_equal(data[1][:, 10:20, 30:40].compute(),
                                  levels[1][:, 10:20, 30:40])
    assert kwargs["name"] == "af AF" and kwargs["scale"] == (1.0, 0.65, 0.6)
    assert kwargs["metadata"][CHANNEL_NAMES] == NAMES and kwargs["metadata"][ROLE] == "af"


def write_stained_output(path, version, height=300, width=260, pixel_size=(0.25, 0.25),
                         provenance=None):
    """napari-vstain's stained OME-Zarr layout: the RGB (3, Y, X) uint8 multiscale at the
    root with omero red / green / blue and the "napari_vstain" attribute, the CV map
    (1, Y, X) float32 in the group "cv"."""
    rng = np.random.default_rng(8)
    rgb = rng.integers(0, 256, (3, height, width), dtype=np.uint8)
    cv = rng.random((1, height, width), dtype=np.float32)
    rgb_levels, cv_levels = pyramid(rgb, 3), [cv, cv[:, ::2, ::2], cv[:, ::4, ::4]]
    write_ome_zarr(path, rgb_levels, version, pixel_size=pixel_size,
                   names=["red", "green", "blue"],
                   attributes={"napari_vstain": {"provenance": provenance or {},
                                                 "format": "stain"}})
    write_ome_zarr(path / "cv", cv_levels, version, pixel_size=pixel_size, names=["CV"])
    return rgb_levels, cv_levels


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_reader_opens_the_stained_ome_zarr_output(tmp_path, version):
    path = tmp_path / "slide_stained.zarr"
    record = {"checkpoint_hash": "abc", "seed": 3, "factor": 4}
    rgb_levels, cv_levels = write_stained_output(path, version, provenance=record)
    reader = get_reader(str(path))
    assert reader is not None
    layers = {kwargs["metadata"][ROLE]: (data, kwargs, kind)
              for data, kwargs, kind in reader(str(path))}
    assert set(layers) == {"stained", "cv"}
    data, kwargs, kind = layers["stained"]
    assert kind == "image" and kwargs["rgb"] is True and kwargs["multiscale"] is True
    assert [level.shape for level in data] == [(300, 260, 3), (150, 130, 3), (75, 65, 3)]
    np.testing.assert_array_equal(data[1].compute(), np.moveaxis(rgb_levels[1], 0, -1))
    assert kwargs["scale"] == (0.25, 0.25) and kwargs["units"] == ("µm", "µm")
    assert kwargs["metadata"][PROVENANCE] == record
    assert kwargs["name"] == "slide_stained stained"
    cv_data, cv_kwargs, _ = layers["cv"]
    assert cv_kwargs["multiscale"] is True and not cv_kwargs["rgb"]
    assert [level.shape for level in cv_data] == [(300, 260), (150, 130), (75, 65)]
    np.testing.assert_array_equal(cv_data[2].compute(), cv_levels[2][0])
    assert cv_kwargs["scale"] == (0.25, 0.25) and cv_kwargs["metadata"][PROVENANCE] == record
    assert cv_kwargs["visible"] is False
    # the two layers are linked as the staining dock links its results
    for _, layer_kwargs, _ in layers.values():
        links = layer_kwargs["metadata"][LINKS]
        assert links["stained"] == kwargs["metadata"][LAYER_ID]
        assert links["cv"] == cv_kwargs["metadata"][LAYER_ID]
        assert links["factor"] == 4


def test_reader_declines_folders_that_are_not_ours(tmp_path):
    (tmp_path / "folder.zarr").mkdir()  # no zarr metadata
    (tmp_path / "plain").mkdir()
    zarr.open_group(str(tmp_path / "group.zarr"), mode="w")  # a group without an image
    labels = zarr.open_group(str(tmp_path / "labels.zarr"), mode="w")
    labels.attrs["labels"] = ["cells"]
    stack = zarr.open_group(str(tmp_path / "zstack.zarr"), mode="w", zarr_format=2)
    stack.create_array("0", shape=(2, 5, 64, 64), dtype="uint16", chunks=(1, 1, 64, 64))
    stack.attrs["multiscales"] = [{"version": "0.4", "axes": ["c", "z", "y", "x"],
                                   "datasets": [{"path": "0"}]}]
    wide = zarr.open_group(str(tmp_path / "wide.zarr"), mode="w", zarr_format=2)
    wide.create_array("0", shape=(12, 64, 64), dtype="uint16", chunks=(1, 64, 64))
    wide.attrs["multiscales"] = [{"version": "0.4", "axes": ["c", "y", "x"],
                                  "datasets": [{"path": "0"}]}]
    broken = tmp_path / "broken.zarr"
    broken.mkdir()
    (broken / ".zattrs").write_text("{not json")
    (broken / ".zgroup").write_text('{"zarr_format": 2}')
    for name in ("folder.zarr", "plain", "group.zarr", "labels.zarr", "zstack.zarr",
                 "wide.zarr", "broken.zarr", "missing.zarr"):
        assert get_reader(str(tmp_path / name)) is None, name
