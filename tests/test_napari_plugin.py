"""The napari manifest, reader, writer and layer helpers (no viewer window needed)."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_vstain._napari._layers import (CHANNEL_NAMES, PIXEL_SIZE, PROVENANCE, ROLE,
                                           upsampled_placement)
from napari_vstain._napari._reader import get_reader
from napari_vstain._napari._roi_export import safe_prefix, snapped_box
from napari_vstain._napari._staining import af_from_layers, cv_display_range
from napari_vstain._napari._writer import write_image_layer
from napari_vstain.data.io import (InputError, read_af, read_provenance, read_rgb,
                                   write_ome_tiff, write_png)


def test_manifest_validates():
    npe2 = shutil.which("npe2", path=str(Path(sys.executable).parent)) or shutil.which("npe2")
    assert npe2, "the npe2 command comes with napari / npe2"
    result = subprocess.run([npe2, "validate", "napari-vstain"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_manifest_lists_every_contribution():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-vstain")
    contributions = manifest.contributions
    assert {w.display_name for w in contributions.widgets} == {
        "Virtual staining", "Ground truth", "Compare pigment", "Export regions",
        "Stain whole slide"}
    assert {s.key for s in contributions.sample_data} == {"lung", "heart"}
    assert contributions.readers and contributions.writers
    # every python_name resolves to a callable (the module imports without torch or Qt errors)
    import importlib

    for command in contributions.commands:
        module, name = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), name)), command.id


def test_upsampled_placement_matches_pixel_centres():
    scale, translate = upsampled_placement((2.0, 3.0), (10.0, -4.0), 4)
    assert scale == (0.5, 0.75)
    assert translate == pytest.approx((10.0 - 0.75, -4.0 - 1.125))
    # the first and last output pixels sit symmetrically inside the first / last input pixel
    first_input_edge = np.array([10.0, -4.0]) - np.array([2.0, 3.0]) / 2
    first_output_edge = np.array(translate) - np.array(scale) / 2
    np.testing.assert_allclose(first_output_edge, first_input_edge)


def test_reader_takes_af_and_brightfield_and_declines_others(tmp_path):
    af = np.random.default_rng(0).random((4, 20, 24), dtype=np.float32)
    af_path = write_ome_tiff(tmp_path / "slide_af.ome.tif", af, "CYX", pixel_size=(0.8, 0.9),
                             channel_names=["DAPI", "FITC", "TxRed", "Cy5"],
                             provenance={"note": "test"})
    rgb = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    rgb_path = write_png(tmp_path / "he.png", rgb)

    (data, kwargs, kind), = get_reader(str(af_path))(str(af_path))
    assert kind == "image" and data.shape == (4, 20, 24) and data.dtype == np.float32
    np.testing.assert_array_equal(data, af)
    assert kwargs["name"] == "slide_af AF" and kwargs["scale"] == (1.0, 0.8, 0.9)
    assert kwargs["metadata"][CHANNEL_NAMES] == ["DAPI", "FITC", "TxRed", "Cy5"]
    assert kwargs["metadata"][ROLE] == "af"
    assert kwargs["metadata"][PROVENANCE] == {"note": "test"}

    (data, kwargs, kind), = get_reader(str(rgb_path))(str(rgb_path))
    assert kwargs["rgb"] and kwargs["scale"] == (1.0, 1.0)
    assert kwargs["metadata"][PIXEL_SIZE] is None  # PNG: no pixel size
    np.testing.assert_array_equal(data, rgb)

    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    tifffile.imwrite(tmp_path / "zstack.tif", np.zeros((12, 5, 16, 16), np.uint16))
    tifffile.imwrite(tmp_path / "wide.tif", np.zeros((12, 16, 16), np.uint16))
    for name in ("notes.txt", "broken.tif", "zstack.tif", "wide.tif", "missing.tif"):
        assert get_reader(str(tmp_path / name)) is None, name
    assert get_reader([str(af_path), str(rgb_path)]) is None


def test_writer_keeps_pixel_size_and_provenance_and_replaces_atomically(tmp_path, monkeypatch):
    rgb = np.random.default_rng(2).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    record = {"checkpoint_hash": "abc", "seed": 3}
    meta = {"name": "x stained", "rgb": True,
            "metadata": {PIXEL_SIZE: (0.25, 0.25), PROVENANCE: record}}
    (path,) = write_image_layer(str(tmp_path / "out.ome.tif"), rgb, meta)
    image = read_rgb(path)
    np.testing.assert_array_equal(image.data, rgb)
    assert image.pixel_size == pytest.approx((0.25, 0.25))
    assert read_provenance(path) == record
    # napari's save dialog confirmed the replacement: the file is replaced ...
    (path,) = write_image_layer(path, 255 - rgb, meta)
    np.testing.assert_array_equal(read_rgb(path).data, 255 - rgb)
    # ... atomically: a write that fails part-way leaves the old file whole, and no temporary.
    def fail_half_way(tmp, *args, **kwargs):
        Path(tmp).write_bytes(b"II*\x00half")
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        write_image_layer(path, rgb, meta)
    monkeypatch.undo()
    np.testing.assert_array_equal(read_rgb(path).data, 255 - rgb)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ome.tif"]

    cv = np.random.default_rng(3).random((16, 20)).astype(np.float32)
    (cv_path,) = write_image_layer(str(tmp_path / "cv.ome.tif"), cv,
                                   {"name": "cv", "rgb": False,
                                    "metadata": {PIXEL_SIZE: (0.25, 0.25)}})
    np.testing.assert_array_equal(tifffile.imread(cv_path), cv)

    af = np.ones((4, 8, 8), np.float32)
    (af_path,) = write_image_layer(str(tmp_path / "af.ome.tif"), af,
                                   {"name": "af", "metadata": {CHANNEL_NAMES: list("abcd"),
                                                               PIXEL_SIZE: (1.0, 1.0)}})
    assert read_af(af_path).channel_names == list("abcd")

    with pytest.raises(ValueError, match="uint8"):
        write_image_layer(str(tmp_path / "f.ome.tif"), rgb.astype(np.float32), meta)
    with pytest.raises(ValueError, match="dimensions"):
        write_image_layer(str(tmp_path / "g.ome.tif"), np.zeros((2, 3, 8, 8)), {"name": "g"})


def test_af_from_layers_stacks_and_checks():
    from napari.layers import Image

    rng = np.random.default_rng(4)
    stack = Image(rng.random((4, 12, 12), dtype=np.float32), name="stack",
                  scale=(1, 2, 2), translate=(0, 1, 1),
                  metadata={CHANNEL_NAMES: list("abcd"), PIXEL_SIZE: (2.0, 2.0)})
    af = af_from_layers([stack], 4)
    assert af.data.shape == (4, 12, 12) and af.channel_names == list("abcd")
    assert af.scale == (2.0, 2.0) and af.translate == (1.0, 1.0) and af.pixel_size == (2.0, 2.0)

    singles = [Image(rng.random((12, 12), dtype=np.float32), name=f"ch{i}") for i in range(4)]
    af = af_from_layers(singles, 4)
    assert af.data.shape == (4, 12, 12) and af.channel_names == ["ch0", "ch1", "ch2", "ch3"]
    np.testing.assert_array_equal(af.data[2], singles[2].data)

    with pytest.raises(InputError, match="3 channels"):
        af_from_layers(singles[:3], 4)
    moved = Image(singles[3].data, name="moved", translate=(5, 0))
    with pytest.raises(InputError, match="not placed alike"):
        af_from_layers(singles[:3] + [moved], 4)
    with pytest.raises(InputError, match="differ in size"):
        af_from_layers(singles[:3] + [Image(np.zeros((10, 12)), name="small")], 4)
    with pytest.raises(InputError, match="Choose the AF input"):
        af_from_layers([], 4)


def test_brightfield_resampled_to_the_stained_pixel_size():
    from napari_vstain._napari._ground_truth_widget import matched_resolution

    rgb = np.random.default_rng(5).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    same, zoom = matched_resolution(rgb, (0.5, 0.5), (0.5, 0.5))
    assert same is rgb and zoom == 1.0
    assert matched_resolution(rgb, None, (0.5, 0.5))[0] is rgb
    half, zoom = matched_resolution(rgb, (0.25, 0.25), (0.5, 0.5))  # 40x scan onto 20x grid
    assert half.shape == (20, 30, 3) and half.dtype == np.uint8 and zoom == 0.5


def test_region_helpers():
    assert snapped_box((18, 18, 82, 82), 4, (128, 128)) == (16, 16, 84, 84)
    assert snapped_box((0, 5, 127, 128), 4, (128, 128)) == (0, 4, 128, 128)
    assert safe_prefix(" lung AF (simulated) stained ") == "lung_AF_simulated_stained"
    assert safe_prefix("///") == "region"
    cv = np.array([[0.0, 0.1], [0.2, np.nan]], np.float32)
    assert cv_display_range(cv, 0.5) == (0.0, 0.5)
    assert cv_display_range(cv, 0.0)[1] == pytest.approx(np.percentile([0, 0.1, 0.2], 99))


@pytest.mark.gui
def test_viewer_opens_whole_slides_as_multiscale_layers(make_napari_viewer, tmp_path):
    """A pyramidal AF OME-TIFF and the stained OME-Zarr folder opened in a real viewer
    through the plugin: multiscale layers in µm, read lazily."""
    from test_slide_io import af_stack, pyramid, write_pyramidal_ome_tiff, write_stained_output

    levels = pyramid(af_stack(height=256, width=192), 3)
    af_path = write_pyramidal_ome_tiff(tmp_path / "slide.ome.tif", levels, pixel_size=(0.5, 0.5))
    stained_path = tmp_path / "slide_stained.zarr"
    write_stained_output(stained_path, "0.4", provenance={"seed": 1})
    viewer = make_napari_viewer()
    (af,) = viewer.open(str(af_path), plugin="napari-vstain")
    assert af.multiscale and len(af.data) == 3 and af.data[0].shape == (4, 256, 192)
    assert tuple(af.scale) == (1.0, 0.5, 0.5) and str(af.units[-1]) == "micrometer"
    assert af.metadata[ROLE] == "af" and af.metadata[CHANNEL_NAMES] == ["DAPI", "FITC",
                                                                        "TxRed", "Cy5"]
    layers = viewer.open(str(stained_path), plugin="napari-vstain")
    by_role = {layer.metadata[ROLE]: layer for layer in layers}
    assert by_role["stained"].rgb and by_role["stained"].multiscale
    assert by_role["stained"].data[0].shape == (300, 260, 3)
    assert by_role["cv"].multiscale and not by_role["cv"].visible
    assert tuple(by_role["stained"].scale) == (0.25, 0.25)
    assert by_role["stained"].metadata[PROVENANCE] == {"seed": 1}
