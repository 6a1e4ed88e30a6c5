"""Readers and writers: every supported layout round-trips with pixel size and channel names;
every kind of bad input gets its own clear error; writes are atomic and never overwrite."""

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_vstain.data import io
from napari_vstain.data.io import InputError, MissingInputError

NAMES = ["DAPI", "FITC", "TxRed", "Cy5"]


def af_stack(dtype=np.uint16, channels=4, height=24, width=20, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.random((channels, height, width))
    if np.issubdtype(np.dtype(dtype), np.integer):
        return (values * min(np.iinfo(dtype).max, 4000)).astype(dtype)
    return values.astype(dtype)


def rgb_image(height=24, width=20, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def leftovers(folder: Path, keep: set) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ---- reading AF: every layout -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_ome_cyx_round_trip_keeps_values_names_and_pixel_size(tmp_path, dtype):
    stack = af_stack(dtype)
    path = io.write_ome_tiff(tmp_path / "af.ome.tif", stack, "CYX", pixel_size=(0.5, 0.25),
                             channel_names=NAMES)
    image = io.read_af(path, expected_channels=4)
    assert image.data.dtype == np.float32 and image.data.shape == (4, 24, 20)
    np.testing.assert_array_equal(image.data, stack.astype(np.float32))
    assert image.channel_names == NAMES
    assert image.pixel_size == pytest.approx((0.5, 0.25))
    assert image.source == str(path)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages.first.dtype == np.dtype(dtype)  # stored in its own type


def test_ome_written_by_other_software_converts_units_to_micrometres(tmp_path):
    stack = af_stack(np.uint16)
    path = tmp_path / "nm.ome.tif"
    tifffile.imwrite(path, stack, ome=True, metadata={
        "axes": "CYX", "PhysicalSizeX": 650.0, "PhysicalSizeXUnit": "nm",
        "PhysicalSizeY": 0.0007, "PhysicalSizeYUnit": "mm", "Channel": {"Name": NAMES}})
    image = io.read_af(path)
    assert image.pixel_size == pytest.approx((0.7, 0.65))
    assert image.channel_names == NAMES


def test_ome_channels_last_samples_axis(tmp_path):
    stack = af_stack(np.uint8, channels=3)
    path = tmp_path / "yxs.ome.tif"
    tifffile.imwrite(path, np.moveaxis(stack, 0, -1), ome=True, photometric="rgb",
                     metadata={"axes": "YXS"})
    np.testing.assert_array_equal(io.read_af(path).data, stack)


def test_imagej_hyperstack_with_channels_labels_and_unit(tmp_path):
    stack = af_stack(np.uint16)
    path = tmp_path / "imagej.tif"
    tifffile.imwrite(path, stack, imagej=True, resolution=(1 / 0.4, 1 / 0.8),
                     metadata={"axes": "CYX", "unit": "um", "Labels": NAMES})
    image = io.read_af(path)
    np.testing.assert_array_equal(image.data, stack)
    assert image.channel_names == NAMES
    assert image.pixel_size == pytest.approx((0.8, 0.4))


def test_imagej_unit_in_nanometres(tmp_path):
    path = tmp_path / "imagej_nm.tif"
    tifffile.imwrite(path, af_stack(np.uint16), imagej=True, resolution=(1 / 500, 1 / 500),
                     metadata={"axes": "CYX", "unit": "nm"})
    assert io.read_af(path).pixel_size == pytest.approx((0.5, 0.5))


def test_plain_tiff_channels_last_one_multichannel_page(tmp_path):
    stack = af_stack(np.uint16)
    path = tmp_path / "contig.tif"
    # One page with 4 samples per pixel, resolution tags in pixels per centimetre.
    tifffile.imwrite(path, np.moveaxis(stack, 0, -1), photometric="rgb",
                     extrasamples=["unspecified"], metadata=None,
                     resolution=(1e4 / 0.3, 1e4 / 0.3), resolutionunit="CENTIMETER")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 1
    image = io.read_af(path)
    np.testing.assert_array_equal(image.data, stack)
    assert image.pixel_size == pytest.approx((0.3, 0.3))
    assert image.channel_names == ["AF 1", "AF 2", "AF 3", "AF 4"]


def test_plain_tiff_channels_last_shape_without_axis_metadata(tmp_path):
    stack = af_stack(np.float32)
    path = tmp_path / "yxc.tif"
    tifffile.imwrite(path, np.moveaxis(stack, 0, -1), photometric="minisblack")
    np.testing.assert_array_equal(io.read_af(path).data, stack)


def test_plain_tiff_channels_first_single_planar_page(tmp_path):
    stack = af_stack(np.uint8)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", planarconfig="separate")
    np.testing.assert_array_equal(io.read_af(path).data, stack)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_one_page_per_channel_with_resolution_in_inches(tmp_path, dtype):
    stack = af_stack(dtype)
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as writer:
        for plane in stack:  # 25400 pixels per inch = 1 micrometre pixels
            writer.write(plane, metadata=None, resolution=(25400, 25400), resolutionunit="INCH")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 4
    image = io.read_af(path, expected_channels=4)
    np.testing.assert_array_equal(image.data, stack.astype(np.float32))
    assert image.pixel_size == pytest.approx((1.0, 1.0))


def test_desktop_default_dpi_is_not_taken_for_a_pixel_size(tmp_path):
    path = tmp_path / "dpi72.tif"
    tifffile.imwrite(path, af_stack(np.uint8), photometric="minisblack", resolution=(72, 72),
                     resolutionunit="INCH")
    assert io.read_af(path).pixel_size is None


def test_single_plane_is_one_channel(tmp_path):
    plane = af_stack(np.uint16)[0]
    path = tmp_path / "plane.tif"
    tifffile.imwrite(path, plane)
    image = io.read_af(path)
    assert image.data.shape == (1, 24, 20)
    np.testing.assert_array_equal(image.data[0], plane)


def test_select_picks_one_plane_of_a_z_stack(tmp_path):
    stack = np.stack([af_stack(np.uint16, seed=z) for z in range(3)])  # Z, C, Y, X
    path = tmp_path / "zstack.ome.tif"
    tifffile.imwrite(path, stack, ome=True, metadata={"axes": "ZCYX"})
    image = io.read_af(path, expected_channels=4, select={"Z": 2})
    np.testing.assert_array_equal(image.data, stack[2])
    with pytest.raises(InputError, match=r"Z index 3 is out of range.*0 to 2"):
        io.read_af(path, select={"Z": 3})
    with pytest.raises(InputError, match=r"no single T axis"):
        io.read_af(path, select={"T": 0})


def test_validate_af_accepts_napari_layouts():
    stack = af_stack(np.float64).astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(io.validate_af(stack), stack)
    np.testing.assert_array_equal(io.validate_af(np.moveaxis(stack, 0, -1)), stack)
    np.testing.assert_array_equal(io.validate_af(stack[:, np.newaxis]), stack)  # C,1,Y,X
    assert io.validate_af(stack[0]).shape == (1, 24, 20)
    assert io.validate_af(stack).dtype == np.float32
    # Both ends small: the expected channel count decides, or the error says to add metadata.
    both_small = np.zeros((4, 20, 3))
    assert io.validate_af(both_small, expected_channels=4, min_size=3).shape == (4, 20, 3)
    assert io.validate_af(both_small, expected_channels=3, min_size=3).shape == (3, 4, 20)
    with pytest.raises(InputError, match=r"channel axis cannot be told from the shape"):
        io.validate_af(both_small, min_size=3)


# ---- reading AF: each bad input has its own message ---------------------------------------

def test_wrong_channel_count_says_how_many_and_how_many_needed(tmp_path):
    path = io.write_ome_tiff(tmp_path / "three.ome.tif", af_stack(channels=3), "CYX")
    with pytest.raises(InputError, match=r"has 3 channels, but the model needs 4 AF channels"):
        io.read_af(path, expected_channels=4)
    with pytest.raises(InputError, match=r"has 1 channel, but the model needs 4"):
        io.validate_af(np.ones((16, 16)), expected_channels=4)


def test_z_stack_names_the_axis_and_how_to_pick_a_plane(tmp_path):
    path = tmp_path / "z.ome.tif"
    tifffile.imwrite(path, np.zeros((5, 4, 16, 16), np.uint16), ome=True,
                     metadata={"axes": "ZCYX"})
    with pytest.raises(InputError) as info:
        io.read_af(path)
    message = str(info.value)
    assert "z-stack" in message and "Z axis has 5 planes" in message
    assert "select={'Z': index}" in message and "0 to 4" in message


def test_time_series_names_the_time_axis(tmp_path):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, np.zeros((3, 4, 16, 16), np.uint16), imagej=True,
                     metadata={"axes": "TCYX"})
    with pytest.raises(InputError, match=r"time series: its T axis has 3 planes"):
        io.read_af(path)


def test_many_pages_without_metadata_look_like_a_stack(tmp_path):
    path = tmp_path / "pages12.tif"
    with tifffile.TiffWriter(path) as writer:
        for _ in range(12):
            writer.write(np.zeros((16, 16), np.uint8), metadata=None)
    with pytest.raises(InputError, match=r"12 planes, more than the 8 channels.*z-stack"):
        io.read_af(path)
    with pytest.raises(InputError, match=r"more axes than channels, height and width"):
        io.validate_af(np.zeros((2, 3, 16, 16)))


def test_nan_and_inf_values_are_refused_naming_the_channel():
    stack = af_stack(np.float32)
    stack[2, 3, 4] = np.nan
    with pytest.raises(InputError, match=r"1 NaN and 0 infinite values \(channel 3\)"):
        io.validate_af(stack)
    stack[2, 3, 4] = 1.0
    stack[0, 0, 0] = np.inf
    with pytest.raises(InputError, match=r"0 NaN and 1 infinite values \(channel 1\)"):
        io.validate_af(stack)


def test_nan_in_a_file_is_refused(tmp_path):
    stack = af_stack(np.float32)
    stack[1, 1, 1] = np.nan
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    with pytest.raises(InputError, match=r"AF image nan.tif contains 1 NaN"):
        io.read_af(path)


def test_empty_and_too_small_images_give_the_minimum(tmp_path):
    with pytest.raises(InputError, match=r"is empty"):
        io.validate_af(np.zeros((4, 0, 16)))
    with pytest.raises(InputError, match=r"5 x 16 pixels, too small: the minimum is 8 x 8"):
        io.validate_af(np.zeros((4, 5, 16)))
    path = tmp_path / "tiny.tif"
    tifffile.imwrite(path, np.zeros((4, 6, 6), np.uint16), photometric="minisblack")
    with pytest.raises(InputError, match=r"minimum is 8 x 8"):
        io.read_af(path)


def test_non_tiff_file_is_refused(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("these are notes, not an image " * 4)
    with pytest.raises(InputError, match=r"is not a readable TIFF file"):
        io.read_af(path)


def test_truncated_tiff_is_refused(tmp_path):
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, af_stack(np.uint16, height=64, width=64), photometric="minisblack")
    raw = full.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(raw[: len(raw) - 2000])  # pixel data cut short
    with pytest.raises(InputError, match=r"could not be read completely.*truncated"):
        io.read_af(cut)
    several_pages = tmp_path / "pages.tif"
    with tifffile.TiffWriter(several_pages) as writer:
        for plane in af_stack(np.uint16, height=64, width=64):
            writer.write(plane, compression="zlib")
    assert io.read_af(several_pages).data.shape == (4, 64, 64)  # intact: one series a page
    raw_pages = several_pages.read_bytes()
    lost_pages = tmp_path / "lost_pages.tif"
    lost_pages.write_bytes(raw_pages[: len(raw_pages) // 2])  # later pages cut off
    with pytest.raises(InputError, match=r"lost_pages.tif (is damaged or|could not be read)"):
        io.read_af(lost_pages)
    # tifffile only logs, and returns the first page, when a shaped stack loses its last pages.
    shaped = tmp_path / "shaped.tif"
    tifffile.imwrite(shaped, af_stack(np.uint16, height=64, width=64), photometric="minisblack",
                     compression="zlib")
    raw_shaped = shaped.read_bytes()
    (tmp_path / "lost_shaped.tif").write_bytes(raw_shaped[: len(raw_shaped) // 2])
    with pytest.raises(InputError, match=r"lost_shaped.tif is damaged or truncated"):
        io.read_af(tmp_path / "lost_shaped.tif")
    header_only = tmp_path / "header.tif"
    header_only.write_bytes(raw[:8])
    with pytest.raises(InputError, match=r"contains no image.*truncated"):
        io.read_af(header_only)
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty file \(0 bytes\)"):
        io.read_af(empty)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(MissingInputError, match=r"does not exist; check the path") as info:
        io.read_af(tmp_path / "nowhere.tif")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, InputError)
    with pytest.raises(InputError, match=r"is a folder, not a file"):
        io.read_af(tmp_path)
    with pytest.raises(MissingInputError):
        io.read_rgb(tmp_path / "nowhere.png")


def test_errors_are_distinct():
    """Each failure mode has its own sentence (not one generic 'bad image')."""
    messages = set()
    for bad in (np.zeros((3, 16, 16)), np.zeros((4, 4, 4, 16, 16)), np.zeros((4, 5, 16)),
                np.full((4, 16, 16), np.nan), np.zeros((0, 16))):
        with pytest.raises(InputError) as info:
            io.validate_af(bad, expected_channels=4)
        messages.add(str(info.value).split(":")[0][:40])
    assert len(messages) == 5


# ---- reading RGB -------------------------------------------------------------------------

def test_rgb_tiff_and_ome_round_trip(tmp_path):
    rgb = rgb_image()
    path = io.write_ome_tiff(tmp_path / "he.ome.tif", rgb, "YXS", pixel_size=0.25)
    image = io.read_rgb(path)
    np.testing.assert_array_equal(image.data, rgb)
    assert image.pixel_size == pytest.approx((0.25, 0.25))
    plain = tmp_path / "he.tif"
    tifffile.imwrite(plain, rgb, photometric="rgb")
    np.testing.assert_array_equal(io.read_rgb(plain).data, rgb)


def test_rgb_png_rgba_drops_alpha_and_jpeg_reads(tmp_path):
    rgb = rgb_image()
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "he.png")
    image = io.read_rgb(tmp_path / "he.png")
    assert image.data.shape == (24, 20, 3) and image.pixel_size is None
    np.testing.assert_array_equal(image.data, rgb)
    smooth = np.repeat(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], 32, 0)
    smooth = np.repeat(smooth, 3, axis=2)
    Image.fromarray(smooth).save(tmp_path / "he.jpg", quality=95)
    read = io.read_rgb(tmp_path / "he.jpg").data
    assert read.shape == (32, 32, 3) and read.dtype == np.uint8
    assert np.abs(read.astype(int) - smooth).max() <= 8  # lossy, but close


def test_a_four_channel_af_stack_is_not_read_as_rgba(tmp_path):
    """A 4-channel AF image (an OME channel stack, or one page per channel) is refused as a
    brightfield image instead of being read as RGB + alpha; a TIFF RGBA is still read."""
    af = np.random.default_rng(0).random((4, 24, 20)).astype(np.float32)
    io.write_ome_tiff(tmp_path / "af.ome.tif", af, "CYX")
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tif:
        for plane in (af * 255).astype(np.uint8):
            tif.write(plane)
    for name in ("af.ome.tif", "pages.tif"):
        with pytest.raises(InputError, match="4 fluorescence channels"):
            io.read_rgb(tmp_path / name)
    rgba = np.concatenate([rgb_image(), np.full((24, 20, 1), 255, np.uint8)], axis=-1)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb")
    np.testing.assert_array_equal(io.read_rgb(tmp_path / "rgba.tif").data, rgb_image())


def test_rgb_uint16_is_scaled_by_bit_depth(tmp_path):
    full = np.zeros((16, 16, 3), np.uint16)
    full[0, 0] = 65535
    full[1, 1] = 257 * 100
    tifffile.imwrite(tmp_path / "16bit.tif", full, photometric="rgb")
    data = io.read_rgb(tmp_path / "16bit.tif").data
    assert data.dtype == np.uint8 and data[0, 0, 0] == 255 and data[1, 1, 0] == 100
    twelve = np.zeros((16, 16, 3), np.uint16)
    twelve[0, 0] = 4095
    twelve[1, 1] = 2048
    tifffile.imwrite(tmp_path / "12bit.tif", twelve, photometric="rgb")
    data = io.read_rgb(tmp_path / "12bit.tif").data
    assert data[0, 0, 0] == 255 and data[1, 1, 0] == 128


def test_rgb_float_in_unit_range_is_scaled(tmp_path):
    values = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "float.tif", values, photometric="rgb")
    data = io.read_rgb(tmp_path / "float.tif").data
    np.testing.assert_array_equal(data, np.round(values * 255).astype(np.uint8))


def test_greyscale_brightfield_is_refused(tmp_path):
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(InputError, match=r"is greyscale .*needs a colour \(RGB\)"):
        io.read_rgb(tmp_path / "grey.png")
    tifffile.imwrite(tmp_path / "grey.tif", np.zeros((16, 16), np.uint8))
    with pytest.raises(InputError, match=r"greyscale"):
        io.read_rgb(tmp_path / "grey.tif")


def test_rgb_problems_have_their_own_messages(tmp_path):
    tifffile.imwrite(tmp_path / "two.tif", np.zeros((2, 16, 16), np.uint8))
    with pytest.raises(InputError, match=r"has 2 channels; an RGB brightfield image needs 3"):
        io.read_rgb(tmp_path / "two.tif")
    Image.fromarray(rgb_image(4, 4)).save(tmp_path / "small.png")
    with pytest.raises(InputError, match=r"4 x 4 pixels, too small: the minimum is 8 x 8"):
        io.read_rgb(tmp_path / "small.png")
    Image.fromarray(rgb_image(64, 64)).save(tmp_path / "whole.png")
    raw = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"cut.png is not a readable image.*truncated"):
        io.read_rgb(tmp_path / "cut.png")
    Image.fromarray(rgb_image()).save(tmp_path / "png_named.tif", format="PNG")
    np.testing.assert_array_equal(io.read_rgb(tmp_path / "png_named.tif").data, rgb_image())
    (tmp_path / "fake.png").write_text("not a png at all")
    with pytest.raises(InputError, match=r"fake.png is not a readable image"):
        io.read_rgb(tmp_path / "fake.png")


# ---- writing -----------------------------------------------------------------------------

def test_cv_map_round_trip_as_float32_yx(tmp_path):
    cv = np.random.default_rng(2).random((24, 20)).astype(np.float64)
    path = io.write_ome_tiff(tmp_path / "cv.ome.tif", cv, "YX", pixel_size=0.25,
                             channel_names=["CV"], provenance={"samples": 8})
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "YX" and tif.series[0].dtype == np.float32
        np.testing.assert_array_equal(tif.asarray(), cv.astype(np.float32))
    image = io.read_af(path)
    assert image.channel_names == ["CV"] and image.pixel_size == pytest.approx((0.25, 0.25))
    assert io.read_provenance(path) == {"samples": 8}


def test_provenance_round_trips(tmp_path):
    record = {"software": "napari-vstain", "checkpoint_hash": "ab" * 32, "sampler": "fast",
              "steps": np.int64(20), "t_exit": 0.25, "seed": 7, "tile": [64, 64],
              "notes": 'quotes " and <tags> & ampersands', "nested": {"samples": 8}}
    path = io.write_ome_tiff(tmp_path / "out.ome.tif", rgb_image(), "YXS", provenance=record)
    read = io.read_provenance(path)
    assert read == json.loads(json.dumps({**record, "steps": 20}))
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, rgb_image())
    assert io.read_provenance(plain) == {}
    with pytest.raises(TypeError, match=r"cannot be stored as JSON"):
        io.write_ome_tiff(tmp_path / "bad.ome.tif", rgb_image(), "YXS",
                          provenance={"model": object()})
    assert not (tmp_path / "bad.ome.tif").exists()


def test_writer_refuses_to_overwrite_unless_asked(tmp_path):
    path = io.write_ome_tiff(tmp_path / "af.ome.tif", af_stack(), "CYX")
    first = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"already exists"):
        io.write_ome_tiff(path, af_stack(seed=5), "CYX")
    assert path.read_bytes() == first
    io.write_ome_tiff(path, af_stack(seed=5), "CYX", overwrite=True)
    np.testing.assert_array_equal(io.read_af(path).data, af_stack(seed=5))
    png = io.write_png(tmp_path / "he.png", rgb_image())
    with pytest.raises(FileExistsError, match=r"already exists"):
        io.write_png(png, rgb_image(seed=3))
    np.testing.assert_array_equal(np.asarray(Image.open(png)), rgb_image())
    io.write_png(png, rgb_image(seed=3), overwrite=True)
    np.testing.assert_array_equal(np.asarray(Image.open(png)), rgb_image(seed=3))


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    existing = io.write_ome_tiff(tmp_path / "keep.ome.tif", af_stack(), "CYX")
    before = existing.read_bytes()

    def half_write(path, *args, **kwargs):
        Path(path).write_bytes(b"II*\x00half")  # begins a TIFF, then fails
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", half_write)
    with pytest.raises(OSError, match="disk full"):
        io.write_ome_tiff(tmp_path / "new.ome.tif", af_stack(), "CYX")
    with pytest.raises(OSError, match="disk full"):
        io.write_ome_tiff(existing, af_stack(seed=9), "CYX", overwrite=True)
    assert leftovers(tmp_path, set()) == ["keep.ome.tif"]  # no new file, no temp file
    assert existing.read_bytes() == before


def test_writer_checks_its_input(tmp_path):
    with pytest.raises(ValueError, match=r"\(Y, X, 3\) uint8"):
        io.write_ome_tiff(tmp_path / "a.tif", rgb_image().astype(np.float32), "YXS")
    with pytest.raises(ValueError, match=r"3 channel names given for an image with 4"):
        io.write_ome_tiff(tmp_path / "b.tif", af_stack(), "CYX", channel_names=NAMES[:3])
    with pytest.raises(ValueError, match=r"does not match axes 'CYX'"):
        io.write_ome_tiff(tmp_path / "c.tif", np.zeros((16, 16)), "CYX")
    with pytest.raises(ValueError, match=r"use 'CYX' \(AF\)"):
        io.write_ome_tiff(tmp_path / "d.tif", np.zeros((16, 16)), "XY")
    with pytest.raises(ValueError, match=r"must be positive micrometres"):
        io.write_ome_tiff(tmp_path / "e.tif", np.zeros((16, 16)), "YX", pixel_size=(0, 1))
    assert leftovers(tmp_path, set()) == []


def test_tile_by_tile_writer_reusing_ome_metadata_matches(tmp_path):
    rgb = rgb_image(64, 48)
    record = {"seed": 1}
    whole = io.write_ome_tiff(tmp_path / "whole.ome.tif", rgb, "YXS", pixel_size=0.5,
                              channel_names=["H&E"], provenance=record)
    tiled = tmp_path / "tiled.ome.tif"

    def tiles():
        for top in range(0, 64, 16):
            for left in range(0, 48, 16):
                yield rgb[top:top + 16, left:left + 16]

    kwargs = io.ome_metadata("YXS", 0.5, ["H&E"], record)
    tifffile.imwrite(tiled, tiles(), shape=rgb.shape, dtype=np.uint8, tile=(16, 16), **kwargs)
    image = io.read_rgb(tiled)
    np.testing.assert_array_equal(image.data, rgb)
    assert image.pixel_size == io.read_rgb(whole).pixel_size == (0.5, 0.5)
    assert io.read_provenance(tiled) == io.read_provenance(whole) == record
    def without_uuid(xml):  # each OME file gets its own UUID
        before, after = xml.split('UUID="', 1)
        return before + after.split('"', 1)[1]

    with tifffile.TiffFile(tiled) as a, tifffile.TiffFile(whole) as b:
        assert without_uuid(a.ome_metadata) == without_uuid(b.ome_metadata)


def test_layout_tiles_large_images_and_uses_bigtiff_when_needed():
    small = io.tiff_layout((3, 512, 512), np.float32)
    assert "tile" not in small and small["bigtiff"] is False
    large = io.tiff_layout((20000, 20000, 3), np.uint8)
    assert large["tile"] == (512, 512) and large["bigtiff"] is False
    huge = io.tiff_layout((4, 30000, 30000), np.float32)
    assert huge["tile"] == (512, 512) and huge["bigtiff"] is True


def test_large_image_is_written_tiled(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "TILED_FROM", 64)
    monkeypatch.setattr(io, "TILE_SIZE", 32)
    rgb = rgb_image(80, 96)
    path = io.write_ome_tiff(tmp_path / "big.ome.tif", rgb, "YXS", pixel_size=0.5)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages.first.is_tiled and tif.pages.first.tilewidth == 32
    np.testing.assert_array_equal(io.read_rgb(path).data, rgb)
