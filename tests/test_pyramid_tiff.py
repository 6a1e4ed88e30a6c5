"""The pyramidal OME-TIFF made from a stained whole-slide container
(data.pyramid_tiff.write_pyramidal_ome_tiff), read back with tifffile and with data.io."""

from __future__ import annotations

import numpy as np
import pytest

from napari_vstain.data.io import read_provenance, read_rgb
from napari_vstain.data.ngff import SlideOutput
from napari_vstain.data.pyramid_tiff import write_pyramidal_ome_tiff

HEIGHT, WIDTH = 1100, 1300
PROVENANCE = {"model": "demo", "seed": 4, "sampler": {"name": "fast", "steps": 10}}


def make_slide(path, version: str = "0.4", pixel_size=(0.25, 0.5)) -> SlideOutput:
    """A finished container (levels 1100 x 1300 .. 275 x 325) with position-made content."""
    slide = SlideOutput.create(path, HEIGHT, WIDTH, pixel_size=pixel_size, version=version,
                               chunk=256, provenance=PROVENANCE)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([(y * 31 + x * 17) % 256, (y * x) % 251, (x ^ y) & 255], -1)
    cv = (np.sin(y * 0.013) * np.cos(x * 0.007) + 1.0).astype(np.float32)
    slide.write_block(0, 0, rgb.astype(np.uint8), cv)
    slide.update_pyramid()
    return slide


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_levels_pixels_pixel_size_and_provenance_read_back(tmp_path, version):
    import tifffile

    slide = make_slide(tmp_path / "slide.zarr", version)
    path = write_pyramidal_ome_tiff(slide, tmp_path / "slide.ome.tif")
    assert path == tmp_path / "slide.ome.tif"
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and len(tif.series) == 2
        stain, cv = tif.series
        assert len(stain.levels) == len(cv.levels) == slide.levels == 3
        for level in range(slide.levels):
            expected_rgb = np.moveaxis(slide.read_level(level)[:], 0, -1)
            expected_cv = slide.read_level(level, "cv")[0]
            assert stain.levels[level].shape == expected_rgb.shape
            assert cv.levels[level].shape == expected_cv.shape
            np.testing.assert_array_equal(stain.levels[level].asarray(), expected_rgb)
            np.testing.assert_array_equal(cv.levels[level].asarray(), expected_cv)
        first = tif.pages[0]
        assert first.photometric == tifffile.PHOTOMETRIC.RGB
        assert first.planarconfig == tifffile.PLANARCONFIG.CONTIG
        assert (first.tilewidth, first.tilelength) == (512, 512)
        assert first.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert len(first.subifds) == slide.levels - 1
        assert cv.dtype == np.float32 and stain.dtype == np.uint8
        assert not tif.is_bigtiff
    # the package's own readers take the first image and the provenance
    rgb = read_rgb(path)
    np.testing.assert_array_equal(rgb.data, np.moveaxis(slide.read_level(0)[:], 0, -1))
    assert rgb.pixel_size == pytest.approx((0.25, 0.5))
    assert read_provenance(path) == PROVENANCE


def test_one_image_per_file(tmp_path):
    import tifffile

    slide = make_slide(tmp_path / "slide.zarr")
    stain = write_pyramidal_ome_tiff(slide, tmp_path / "stain.ome.tif", image="stain")
    cv = write_pyramidal_ome_tiff(slide, tmp_path / "cv.ome.tif", image="cv")
    for path, name, dtype in ((stain, "stain", np.uint8), (cv, "cv", np.float32)):
        with tifffile.TiffFile(path) as tif:
            assert len(tif.series) == 1 and len(tif.series[0].levels) == slide.levels
            assert tif.series[0].dtype == dtype
            for level in range(slide.levels):
                expected = slide.read_level(level, name)[:]
                expected = np.moveaxis(expected, 0, -1) if name == "stain" else expected[0]
                np.testing.assert_array_equal(tif.series[0].levels[level].asarray(), expected)
        assert read_provenance(path) == PROVENANCE
    with pytest.raises(ValueError, match="use 'stain', 'cv' or None"):
        write_pyramidal_ome_tiff(slide, tmp_path / "x.ome.tif", image="rgb")


def test_unknown_pixel_size_writes_none(tmp_path):
    slide = make_slide(tmp_path / "slide.zarr", pixel_size=None)
    path = write_pyramidal_ome_tiff(slide, tmp_path / "slide.ome.tif")
    assert read_rgb(path).pixel_size is None


def test_refuses_to_overwrite_unless_asked(tmp_path):
    slide = make_slide(tmp_path / "slide.zarr")
    target = tmp_path / "out.ome.tif"
    target.write_bytes(b"an earlier result")
    with pytest.raises(FileExistsError, match="already exists"):
        write_pyramidal_ome_tiff(slide, target)
    assert target.read_bytes() == b"an earlier result"
    write_pyramidal_ome_tiff(slide, target, overwrite=True)
    assert read_provenance(target) == PROVENANCE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ome.tif", "slide.zarr"]


def test_a_failure_while_writing_leaves_no_file(tmp_path):
    slide = make_slide(tmp_path / "slide.zarr")
    # a damaged chunk of the last CV level: reading it fails after everything before it
    # has been written to the temporary file
    chunk_file = tmp_path / "slide.zarr" / "cv" / "2" / "0" / "0" / "0"
    assert chunk_file.is_file()
    chunk_file.write_bytes(b"not a blosc chunk")
    with pytest.raises(RuntimeError, match="blosc"):
        write_pyramidal_ome_tiff(slide, tmp_path / "out.ome.tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.zarr"]
