"""Layer conventions shared by the reader, the sample data and the dock widgets (no Qt here).

napari-vstain marks its layers with a few metadata keys:
- ROLE: "af" (input stack, (C, Y, X)), "brightfield" (RGB image), "stained" (mean of N
  samples), "cv" (per-pixel CV map), "samples" (the N samples), "ground_truth" (a brightfield
  image registered onto a stained layer), "pigment" (pigment outlines of the compare view);
- PIXEL_SIZE: (y, x) micrometres of the layer's pixels, or None when unknown;
- PROVENANCE: what made the image (engine.inference.provenance), written into exported files;
- CHANNEL_NAMES: the AF channel names of an (C, Y, X) layer;
- LAYER_ID: an id (uuid4 hex) given to every layer the plugin reads, adds or uses; it stays
  when the user renames the layer, so links survive renaming (`layer_id`, `find_layer`);
- LINKS: ids of the related layers: on a stained / CV / samples layer {"input": [AF layer
  ids], "stained": id, "cv": id, "samples": id or None, "factor": k}; on a registered ground
  truth or a pigment outline {"stained": id, ...}. Links hold ids, never names.
  (The sample data also links its H&E to the AF stack it was made with: {"af": [AF layer
  id]} on the H&E, so that it is offered as the ground truth of that AF's stained layers.)

Positions follow napari's convention: pixel i of a layer is centred at translate + i * scale.
Scales are micrometres when the pixel size is known, and the layers say so (napari
Layer.units "µm" on the image axes, so that the scale bar reads µm); an AF stack's first
axis is labelled "channel".
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

ROLE = "vstain_role"
PIXEL_SIZE = "pixel_size_um"
PROVENANCE = "provenance"
CHANNEL_NAMES = "channel_names"
LINKS = "vstain_links"
LAYER_ID = "vstain_id"
SOURCE = "source"
MICROMETRE = "µm"
AF_AXIS_LABELS = ("channel", "y", "x")
IMAGE_AXIS_LABELS = ("y", "x")


def layer_id(layer) -> str:
    """The layer's plugin id, given now if it has none (it survives renaming)."""
    import uuid

    if not layer.metadata.get(LAYER_ID):
        layer.metadata[LAYER_ID] = uuid.uuid4().hex
    return layer.metadata[LAYER_ID]


def find_layer(layers, wanted_id: Optional[str]):
    """The layer of `layers` whose plugin id is `wanted_id`, or None."""
    if not wanted_id:
        return None
    return next((layer for layer in layers if layer.metadata.get(LAYER_ID) == wanted_id),
                None)


def upsampled_placement(scale: Sequence[float], translate: Sequence[float], factor: int):
    """(scale, translate) of an image upsampled `factor` times over an input placed at
    (scale, translate): its pixels are `factor` times smaller and the input pixel's area is
    split into factor x factor output pixels, so the first output pixel centre lies
    scale (1/f - 1) / 2 before the first input pixel centre."""
    scale = np.asarray(scale, dtype=float)
    translate = np.asarray(translate, dtype=float)
    return (tuple(scale / factor), tuple(translate + scale * (1.0 / factor - 1.0) / 2.0))


def yx_scale(layer) -> tuple:
    """The (y, x) scale of a layer's two displayed image axes."""
    return tuple(float(v) for v in layer.scale[-2:])


def yx_translate(layer) -> tuple:
    return tuple(float(v) for v in layer.translate[-2:])


def yx_units(layer) -> tuple:
    """The units (names, e.g. "micrometer" or "pixel") of a layer's two image axes."""
    return tuple(str(unit) for unit in layer.units[-2:])


def image_units(pixel_size_um: Optional[Sequence[float]], leading: int = 0) -> Optional[tuple]:
    """napari `units` of a layer whose last two axes have pixels of `pixel_size_um` (None:
    napari's default, pixels) and `leading` axes before them that are not lengths (the AF
    channel axis; napari calls their unit "pixel", as for any unit-less axis)."""
    if pixel_size_um is None:
        return None
    return ("pixel",) * leading + (MICROMETRE, MICROMETRE)


def grid_placement(layer) -> dict:
    """Keyword arguments that put a new 2-D layer on the pixel grid of `layer`'s image axes:
    scale, translate and units (so the scale bar keeps its µm)."""
    return {"scale": yx_scale(layer), "translate": yx_translate(layer),
            "units": yx_units(layer)}


def first_pixel_corner(scale: Sequence[float], translate: Sequence[float]) -> tuple:
    """(y, x) of the outer corner of pixel (0, 0) of a layer placed at (scale, translate): the
    "position" written into exported files (OME Plane PositionY / PositionX)."""
    return tuple(float(t) - float(s) / 2.0 for s, t in zip(scale[-2:], translate[-2:]))


def translate_from_corner(corner: Sequence[float], scale: Sequence[float]) -> tuple:
    """The napari translate (centre of pixel (0, 0)) of an image whose outer corner lies at
    `corner` (y, x), with pixels of `scale` (y, x); the inverse of first_pixel_corner."""
    return tuple(float(c) + float(s) / 2.0 for c, s in zip(corner, scale))


def pixel_size(layer) -> Optional[tuple]:
    """The layer's pixel size in micrometres (y, x), or None when it is not known."""
    value = layer.metadata.get(PIXEL_SIZE)
    return None if value is None else tuple(float(v) for v in value)


def role(layer) -> Optional[str]:
    return layer.metadata.get(ROLE)


def is_rgb_image(layer) -> bool:
    return layer.__class__.__name__ == "Image" and bool(getattr(layer, "rgb", False))


def is_single_or_multichannel_image(layer) -> bool:
    """Image layers that can serve as AF input: not RGB, 2-D (one channel) or 3-D (C, Y, X);
    multiscale (whole-slide) layers too, which the docks read region by region."""
    return (layer.__class__.__name__ == "Image" and not getattr(layer, "rgb", False)
            and layer.ndim in (2, 3))


def layer_array(layer) -> np.ndarray:
    """The full-resolution data of an image layer as a numpy array (level 0 if multiscale)."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return np.asarray(data)


def af_layer_data(af: np.ndarray, name: str, channel_names: Sequence[str],
                  pixel_size_um: Optional[Sequence[float]], source: str = "",
                  extra_metadata: Optional[dict] = None, translate=None) -> tuple:
    """A napari LayerData tuple for an AF stack (C, Y, X): one layer whose first axis is the
    channel (scale 1, labelled "channel"), the image axes scaled by the pixel size (1 when
    unknown) in µm. `translate` (y, x) places its first pixel centre."""
    size = (1.0, 1.0) if pixel_size_um is None else tuple(float(v) for v in pixel_size_um)
    metadata = {ROLE: "af", CHANNEL_NAMES: [str(n) for n in channel_names],
                PIXEL_SIZE: None if pixel_size_um is None else size, SOURCE: source}
    metadata.update(extra_metadata or {})
    kwargs = {"name": name, "scale": (1.0, *size), "colormap": "gray",
              "axis_labels": AF_AXIS_LABELS, "metadata": metadata}
    units = image_units(pixel_size_um, leading=1)
    if units is not None:
        kwargs["units"] = units
    if translate is not None:
        kwargs["translate"] = (0.0, *(float(v) for v in translate))
    return (af, kwargs, "image")


def rgb_layer_data(rgb: np.ndarray, name: str, pixel_size_um: Optional[Sequence[float]],
                   translate=(0.0, 0.0), layer_role: str = "brightfield", source: str = "",
                   extra_metadata: Optional[dict] = None) -> tuple:
    """A napari LayerData tuple for a (Y, X, 3) uint8 RGB image, scaled in µm when the pixel
    size is known."""
    size = (1.0, 1.0) if pixel_size_um is None else tuple(float(v) for v in pixel_size_um)
    metadata = {ROLE: layer_role, PIXEL_SIZE: None if pixel_size_um is None else size,
                SOURCE: source}
    metadata.update(extra_metadata or {})
    kwargs = {"name": name, "rgb": True, "scale": size,
              "translate": tuple(float(v) for v in translate),
              "axis_labels": IMAGE_AXIS_LABELS, "metadata": metadata}
    units = image_units(pixel_size_um)
    if units is not None:
        kwargs["units"] = units
    return (rgb, kwargs, "image")


def data_box(layer, world_corners: np.ndarray, clip: bool = True) -> tuple:
    """Pixel box (y0, x0, y1, x1) of `layer` (end exclusive, clipped to the image unless not
    `clip`) covering the world-coordinate points `world_corners` (n, >= 2) given in the
    layer's world axes."""
    points = np.array([layer.world_to_data(point) for point in world_corners], dtype=float)
    points = points[:, -2:]  # the image axes (an RGB layer's data coordinates are (y, x))
    # data coordinate i is the centre of pixel i: take the pixels whose centres lie inside
    box = (int(np.ceil(points[:, 0].min())), int(np.ceil(points[:, 1].min())),
           int(np.floor(points[:, 0].max()) + 1), int(np.floor(points[:, 1].max()) + 1))
    return clipped_box(box, layer_array_shape(layer)) if clip else box


def clipped_box(box: Sequence[int], shape: Sequence[int]) -> tuple:
    """A pixel box (y0, x0, y1, x1) cut to an image of (height, width)."""
    y0, x0, y1, x1 = box
    height, width = shape
    return (int(np.clip(y0, 0, height)), int(np.clip(x0, 0, width)),
            int(np.clip(y1, 0, height)), int(np.clip(x1, 0, width)))


def layer_array_shape(layer) -> tuple:
    """(height, width) of an image layer's displayed image axes."""
    shape = layer.data[0].shape if getattr(layer, "multiscale", False) else layer.data.shape
    return tuple(int(s) for s in (shape[:2] if is_rgb_image(layer) else shape[-2:]))


def on_same_grid(layer_a, layer_b, tolerance: float = 1e-6) -> bool:
    """Whether two image layers have the same (height, width), scale and translate, i.e.
    pixel (i, j) of one lies exactly on pixel (i, j) of the other."""
    return (layer_array_shape(layer_a) == layer_array_shape(layer_b)
            and np.allclose(yx_scale(layer_a), yx_scale(layer_b), rtol=tolerance, atol=0)
            and np.allclose(yx_translate(layer_a), yx_translate(layer_b),
                            atol=tolerance * max(1.0, *np.abs(yx_scale(layer_a)))))


def visible_world_box(viewer) -> np.ndarray:
    """World (y, x) corners [[top, left], [bottom, right]] of what one canvas view box shows
    (the whole canvas, or one cell in grid mode), from the camera centre and zoom."""
    height, width = (float(v) for v in viewer.canvas.size)
    if viewer.canvas.grid.enabled:
        rows, columns = viewer.canvas.grid.actual_shape(list(viewer.layers))
        height, width = height / rows, width / columns
    centre = np.asarray(viewer.scene.camera.center[-2:], dtype=float)
    half = np.array([height, width]) / (2.0 * float(viewer.scene.camera.zoom))
    return np.array([centre - half, centre + half])


def rectangle_world_boxes(shapes_layer) -> list:
    """World (y, x) corners [[top, left], [bottom, right]] of each shape's bounding box."""
    boxes = []
    for vertices in shapes_layer.data:
        world = np.array([shapes_layer.data_to_world(v) for v in np.asarray(vertices)])[:, -2:]
        boxes.append(np.array([world.min(axis=0), world.max(axis=0)]))
    return boxes


# ---- widget choice lists (shared by the dock widgets) ---------------------------------------
# Drop-downs show layer names and hold layer ids: (name, id) pairs, looked up with find_layer,
# so a renamed layer stays chosen and links never go through names.

def id_choices(layers) -> list:
    """(name, id) drop-down choices of `layers`."""
    return [(layer.name, layer_id(layer)) for layer in layers]


def stained_layer_choices(viewer) -> list:
    """(name, id) of the layers the staining widget made (its RGB outputs)."""
    return id_choices(layer for layer in viewer.layers if layer.metadata.get(ROLE) == "stained")


def shapes_layer_choices(viewer) -> list:
    return id_choices(layer for layer in viewer.layers if layer.__class__.__name__ == "Shapes")


def links(layer) -> dict:
    return layer.metadata.get(LINKS) or {}


def linked_layer(layers, layer, key: str):
    """The layer that `layer`'s LINKS[key] id names, or None."""
    return find_layer(layers, links(layer).get(key))


def input_layers(layers, stained) -> list:
    """The AF input layers of a stained / CV / samples layer (those still in `layers`), in
    the order they were stacked."""
    found = [find_layer(layers, wanted) for wanted in links(stained).get("input") or []]
    return [layer for layer in found if layer is not None]


def refresh_choices_on_layer_change(viewer, container) -> None:
    """Keep a widget's layer drop-downs current as layers are added, removed or renamed."""
    for event in (viewer.layers.events.inserted, viewer.layers.events.removed,
                  viewer.layers.events.renamed):
        event.connect(lambda _: container.reset_choices())
