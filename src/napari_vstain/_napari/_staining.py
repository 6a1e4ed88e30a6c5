"""What the staining widget runs, without Qt: gather the AF input from layers (whole, or the
part in view), run the engine's tiled staining as a generator (one yield per network call),
time one network call for the estimate shown before Run, and turn the result into layers.

A multiscale (whole-slide, dask-backed) layer is never read whole: its shape and channels are
checked without reading pixels, "Stain current view" reads only the region in view (from
level 0), and the normalisation statistics are the slide's by data.slide.slide_statistics,
the rule `vstain stain` uses (a large slide is sampled, never read whole).

The engine reports progress through one callback type (napari_vstain.progress);
`stain_steps` turns it into a generator of reports, so a napari thread_worker can drive it,
update a progress bar per network call and stop it at the next call on cancel.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ._layers import (CHANNEL_NAMES, LAYER_ID, LINKS, PIXEL_SIZE, PROVENANCE, ROLE,
                      layer_array, layer_id, pixel_size, upsampled_placement, yx_scale,
                      yx_translate)

# One staining at a time: a cancelled run finishes its current network call in the
# background, and the next run (or timing) waits for it instead of sharing the model with it.
_ENGINE_LOCK = threading.Lock()
MICROMETRE = "µm"
ROLES = ("stained", "cv", "samples")
# Statistics of multiscale inputs (view_statistics): (layer id, level 0, config) -> (level 0,
# config, statistics) for the last few slides.
_SLIDE_STATISTICS: dict = {}
SLIDE_STATISTICS_KEPT = 4


@dataclass
class AFInput:
    """The AF image gathered from one (C, Y, X) layer or several 2-D layers; with `region`
    set, only that part of it (the current view)."""

    data: np.ndarray  # (C, Y, X) float32 (a whole multiscale input: level 0, read lazily)
    layer_names: list
    channel_names: list
    scale: tuple  # (y, x) of the input layers
    translate: tuple  # (y, x) of data's first pixel (of the region, when there is one)
    pixel_size: Optional[tuple]  # micrometres, or None
    layer_ids: list = field(default_factory=list)  # LAYER_ID of each input layer
    units: Optional[tuple] = None  # the input layers' (y, x) units, as names
    region: Optional[tuple] = None  # (y0, x0, y1, x1) of the input's pixels; None: all of it
    whole: Optional[np.ndarray] = None  # with a region: the whole input (C, Y, X)
    lazy: Optional[object] = None  # a multiscale input: its data.slide.LazyAF (not read whole)

    @property
    def base_name(self) -> str:
        return self.layer_names[0]

    @property
    def key(self) -> tuple:
        """Which cached result a run of this input replaces: one per input layers (by id)
        and kind (the whole input, or a view of it)."""
        return (tuple(self.layer_ids), "view" if self.region is not None else "whole")


def _units_of(layer) -> Optional[tuple]:
    units = getattr(layer, "units", None)
    return None if units is None else tuple(str(u) for u in units[-2:])


def _channel_names(layer, channels: int) -> list:
    """The layer's channel names (metadata), or names made from the layer's name."""
    names = list(layer.metadata.get(CHANNEL_NAMES) or [])
    if len(names) == channels:
        return names
    return [f"{layer.name} {i + 1}" for i in range(channels)] if channels > 1 else [layer.name]


def is_multiscale(layer) -> bool:
    return bool(getattr(layer, "multiscale", False))


def af_from_layers(layers: Sequence, expected_channels: Optional[int]) -> AFInput:
    """One (C, Y, X) or 2-D layer, or several 2-D layers stacked in the given order, checked
    by data.io.validate_af (channel count, size, finite values). Several layers must have
    the same shape and placement. A multiscale layer is opened lazily (nothing is read:
    `lazy_af_input`)."""
    from ..data.io import validate_af
    from ..errors import InputError

    if not layers:
        raise InputError("Choose the AF input: one multi-channel (C, Y, X) image layer, or "
                         "several single-channel layers (one per channel).")
    if len(layers) == 1 and is_multiscale(layers[0]):
        return lazy_af_input(layers[0], expected_channels)
    if len(layers) == 1:
        layer = layers[0]
        array = layer_array(layer)
        axes = "CYX" if array.ndim == 3 else None
        data = validate_af(array, expected_channels, name=f"Layer {layer.name!r}", axes=axes)
        names = _channel_names(layer, data.shape[0])
    else:
        first = layers[0]
        for layer in layers:
            if is_multiscale(layer):
                raise InputError(f"Layer {layer.name!r} is a whole-slide (multiscale) image; "
                                 "choose it alone, as one (C, Y, X) input.")
            if layer_array(layer).ndim != 2:
                raise InputError(f"Layer {layer.name!r} is not a single-channel image; to "
                                 "stack channels choose only 2-D layers, or choose one "
                                 "(C, Y, X) layer alone.")
            if layer.data.shape != first.data.shape:
                raise InputError(f"The channel layers differ in size: {first.name!r} is "
                                 f"{first.data.shape}, {layer.name!r} is {layer.data.shape}.")
            if (not np.allclose(yx_scale(layer), yx_scale(first))
                    or not np.allclose(yx_translate(layer), yx_translate(first))):
                raise InputError(f"The channel layers {first.name!r} and {layer.name!r} are "
                                 "not placed alike (scale or translate differ); they must be "
                                 "channels of one acquisition.")
        stacked = np.stack([layer_array(layer) for layer in layers])
        data = validate_af(stacked, expected_channels,
                           name=f"The {len(layers)} stacked layers", axes="CYX")
        names = [layer.name for layer in layers]
    first = layers[0]
    return AFInput(data=data, layer_names=[layer.name for layer in layers],
                   channel_names=names, scale=yx_scale(first), translate=yx_translate(first),
                   pixel_size=pixel_size(first), layer_ids=[layer_id(lay) for lay in layers],
                   units=_units_of(first))


def lazy_af_input(layer, expected_channels: Optional[int]) -> AFInput:
    """A multiscale layer (its data a list of levels, level 0 first, e.g. dask arrays) as
    AF input, without reading its pixels: the channel count and size are checked from level
    0's shape and type (data.slide.lazy_af_from_levels, as files opened lazily are checked).
    Only `crop_to_view` reads pixels (the region in view); a 3-D level is (C, Y, X)."""
    from ..data.slide import lazy_af_from_levels

    levels = list(layer.data)
    source = getattr(layer.source, "path", None) or f"Layer {layer.name!r}"
    lazy = lazy_af_from_levels(levels, f"Layer {layer.name!r}", expected_channels,
                               axes="CYX" if levels[0].ndim == 3 else None, source=str(source))
    return AFInput(data=lazy.levels[0], layer_names=[layer.name],
                   channel_names=_channel_names(layer, lazy.shape[0]),
                   scale=yx_scale(layer), translate=yx_translate(layer),
                   pixel_size=pixel_size(layer), layer_ids=[layer_id(layer)],
                   units=_units_of(layer), lazy=lazy)


def refuse_whole_slide(af: AFInput) -> None:
    """InputError for staining all of a multiscale input at once (it would be read whole
    into memory): the view, or the whole-slide dock, is the way."""
    from ..errors import InputError

    if af.lazy is not None and af.region is None:
        raise InputError(f"{af.base_name!r} is a whole-slide (multiscale) image, too large to "
                         "stain in memory: press 'Stain current view' to stain the part on "
                         "screen, or use the 'Stain whole slide' dock to write all of it to "
                         "an OME-Zarr.")


def crop_to_view(af: AFInput, box: tuple) -> AFInput:
    """The part `box` = (y0, x0, y1, x1) (input pixels, end exclusive) of the AF input,
    placed where it lies in the input; it keeps the whole input for the normalisation (a
    multiscale input: only the part is read here; see view_statistics)."""
    from ..data.io import validate_af
    from ..errors import InputError

    y0, x0, y1, x1 = (int(v) for v in box)
    if y1 <= y0 or x1 <= x0:
        raise InputError(f"The current view shows no part of {af.base_name!r}; pan or zoom "
                         "onto it first.")
    name = f"The part of {af.base_name!r} in view"
    part = af.data[:, y0:y1, x0:x1] if af.lazy is None \
        else af.lazy.read(y0, x0, y1 - y0, x1 - x0)
    data = validate_af(part, af.data.shape[0], name=name, axes="CYX")
    translate = tuple(t + s * o for t, s, o in zip(af.translate, af.scale, (y0, x0)))
    return AFInput(data=data, layer_names=af.layer_names, channel_names=af.channel_names,
                   scale=af.scale, translate=translate, pixel_size=af.pixel_size,
                   layer_ids=af.layer_ids, units=af.units, region=(y0, x0, y1, x1),
                   whole=af.data if af.lazy is None else None, lazy=af.lazy)


def view_statistics(af: AFInput, config) -> Optional[dict]:
    """The whole input's normalisation statistics for a view (None for a whole input: the
    engine takes its own): af_statistics of the whole in-memory input, or, for a
    multiscale input, data.slide.slide_statistics (`vstain stain`'s rule for slides),
    remembered per layer data and model config: a large slide's take one pass over its
    level 0, so only the first view of it waits for them."""
    if af.lazy is not None:
        from ..data.slide import slide_statistics

        level0 = af.lazy.levels[0].raw  # the layer's own array: new data, new statistics
        key = (af.layer_ids[0], id(level0), id(config))
        kept = _SLIDE_STATISTICS.get(key)
        if kept is not None and kept[0] is level0 and kept[1] is config:
            return kept[2]
        stats = slide_statistics(af.lazy, config)
        _SLIDE_STATISTICS[key] = (level0, config, stats)
        while len(_SLIDE_STATISTICS) > SLIDE_STATISTICS_KEPT:
            del _SLIDE_STATISTICS[next(iter(_SLIDE_STATISTICS))]  # the oldest
        return stats
    if af.whole is not None:
        from ..engine.model import af_statistics

        return af_statistics(af.whole, config)
    return None


@dataclass
class StainJob:
    """Everything one run needs; built in the GUI thread, run in a worker thread."""

    model: object  # VStainModel
    af: AFInput
    settings: object  # StainSettings
    tile: Optional[int]
    device: object  # torch.device
    device_description: str
    checkpoint: str

    def network_calls(self) -> int:
        """Network calls of the run (per sample and tile, as its progress counts them)."""
        return self.settings.calls_per_sample(self.model.config.num_steps) * \
            self.settings.samples * self.tile_plan().count

    def tile_plan(self):
        from ..engine.tiling import plan_tiles

        return plan_tiles(self.af.data.shape[-2:], self.model.config, self.tile)


def stain_steps(job: StainJob, cancel: threading.Event):
    """Generator: yields (done, total) network calls, returns the StainResult (with the N
    samples kept). Setting `cancel` makes the engine stop at its next network call. A view
    is normalised with the whole input's statistics, so it is stained as in the whole."""
    from ..engine.tiling import stain_tiled
    from ..progress import progress_reports

    def work(callback):
        stats = view_statistics(job.af, job.model.config)
        return stain_tiled(job.model, job.af.data, job.settings, tile=job.tile,
                           callback=callback, device=job.device, keep_samples=True,
                           af_stats=stats)

    return (yield from progress_reports(work, cancel, lock=_ENGINE_LOCK))


# ---- how long a run takes ----------------------------------------------------------------------

def time_network_call(model, device, lock_timeout: float = 30.0) -> Optional[tuple]:
    """(seconds, target pixels) of one network call of `model` on `device`, measured on one
    small tile (the model's minimum tile) after a warm-up call; None when the engine is busy
    for longer than `lock_timeout` seconds."""
    from ..engine.tiling import minimum_tile, stain_tiled
    from ..settings import StainSettings

    config = model.config
    side = minimum_tile(config)
    af = np.random.default_rng(0).random((config.af_channels, side // config.factor,
                                          side // config.factor)).astype(np.float32)
    if not _ENGINE_LOCK.acquire(timeout=lock_timeout):
        return None
    try:
        stain_tiled(model, af, StainSettings(steps=1, samples=1), device=device)  # warm-up
        timed = StainSettings(steps=2, samples=2)
        start = time.perf_counter()
        stain_tiled(model, af, timed, device=device)
        calls = timed.calls_per_sample(config.num_steps) * timed.samples
        return (time.perf_counter() - start) / calls, side * side
    finally:
        _ENGINE_LOCK.release()


def estimate_seconds(timing: tuple, tile: tuple, calls: int) -> float:
    """About how long `calls` network calls on tiles of `tile` (y, x) target pixels take,
    from one timed call (`time_network_call`): its time scaled to the tile, times the calls."""
    seconds, pixels = timing
    return seconds * (tile[0] * tile[1] / pixels) * calls


def format_duration(seconds: float, approximate: bool = True) -> str:
    """'about 40 s', 'about 12 min', 'about 3.5 h' (or, not approximate, '0:07', '1:02:03')."""
    if not approximate:
        seconds = int(round(seconds))
        hours, rest = divmod(seconds, 3600)
        return (f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours
                else f"{rest // 60}:{rest % 60:02d}")
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


# ---- results as layers -------------------------------------------------------------------------

@dataclass
class StainedRun:
    """A finished run: what the layers show and the cache that re-averaging uses."""

    job: StainJob
    samples: np.ndarray  # (N, H, W, 3) uint8
    rgb: np.ndarray  # engine's mean of all N (H, W, 3) uint8
    cv: np.ndarray  # engine's CV of all N (H, W) float32
    provenance: dict = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.samples.shape[0])

    def average(self, n: int) -> tuple:
        """(rgb, cv) of the first n cached samples; n = N gives the engine's own result."""
        n = int(np.clip(n, 1, self.count))
        if n == self.count:
            return self.rgb, self.cv
        import torch

        from ..engine.inference import summarise_samples
        from ..engine.model import rgb_to_model

        tensor = torch.from_numpy(np.stack([rgb_to_model(s) for s in self.samples[:n]]))
        summary = summarise_samples(tensor, self.job.settings)
        return summary.rgb, summary.cv


@dataclass
class ShownResult:
    """A run and the layers that show it (by LAYER_ID, so renaming does not lose them)."""

    run: StainedRun
    ids: dict  # role -> layer id; the samples id is used only while the stack is shown
    averaged: int  # how many of the cached samples the layers show
    number: int = 1  # the how-manieth run of this input (names kept results)

    @property
    def key(self) -> tuple:
        return self.run.job.af.key


def new_layer_ids() -> dict:
    return {role: uuid.uuid4().hex for role in ROLES}


def finished_run(job: StainJob, result) -> StainedRun:
    """The run as it ran (the engine's provenance: call times, tile, device, dtype) plus
    where its input came from."""
    record = dict(result.provenance, checkpoint=job.checkpoint,
                  input_layers=job.af.layer_names, channel_names=job.af.channel_names,
                  af_shape=list(job.af.data.shape), af_pixel_size_um=job.af.pixel_size)
    if job.af.region is not None:
        record["view_af_box_yx"] = list(job.af.region)
    return StainedRun(job=job, samples=result.samples, rgb=result.rgb, cv=result.cv,
                      provenance=record)


def output_names(base: str, view: bool = False) -> dict:
    suffix = " (view)" if view else ""
    return {"stained": f"{base} stained{suffix}", "cv": f"{base} CV{suffix}",
            "samples": f"{base} samples{suffix}"}


def output_units(af: AFInput) -> Optional[tuple]:
    """(y, x) units of the output layers: micrometres when the input's pixel size is known
    and is its scale, else the input layers' own units."""
    if af.pixel_size is not None and np.allclose(af.pixel_size, af.scale, rtol=1e-6):
        return (MICROMETRE, MICROMETRE)
    return af.units


def output_layer_data(shown: ShownResult, keep_samples: bool) -> dict:
    """{role: (data, kwargs)} of the result layers, placed over the input (scale, translate
    from upsampled_placement), in micrometres where the input's pixel size is known, and
    carrying provenance, their LAYER_ID and the links (ids) in their metadata. The samples
    stack has an axis of its own ("sample"), left of the AF input's channel axis."""
    run = shown.run
    factor = run.job.model.config.factor
    af = run.job.af
    scale, translate = upsampled_placement(af.scale, af.translate, factor)
    out_pixel = None if af.pixel_size is None else tuple(v / factor for v in af.pixel_size)
    names = output_names(af.base_name, view=af.region is not None)
    n = int(np.clip(shown.averaged, 1, run.count))
    rgb, cv = run.average(n)
    record = dict(run.provenance, averaged_samples=n)
    links = {"input": list(af.layer_ids), "stained": shown.ids["stained"],
             "cv": shown.ids["cv"], "samples": shown.ids["samples"] if keep_samples else None,
             "factor": factor}
    units = output_units(af)

    def kwargs(layer_role, **extra):
        metadata = {ROLE: layer_role, PIXEL_SIZE: out_pixel, PROVENANCE: record,
                    LINKS: dict(links), LAYER_ID: shown.ids[layer_role]}
        placed = {"name": names[layer_role], "scale": scale, "translate": translate,
                  "metadata": metadata, **extra}
        if units is not None:
            placed["units"] = units
        return placed

    layers = {"stained": (rgb, kwargs("stained", rgb=True)), "cv": (cv, kwargs("cv"))}
    if keep_samples:
        # (N, 1, H, W, 3): the sample axis, then one plane on the AF channel axis
        stack = kwargs("samples", rgb=True, scale=(1.0, 1.0, *scale),
                       translate=(0.0, 0.0, *translate),
                       axis_labels=("sample", "channel", "y", "x"))
        if units is not None:
            stack["units"] = ("pixel", "pixel", *units)
        layers["samples"] = (run.samples[:, None], stack)
    return layers


def cv_display_range(cv: np.ndarray, maximum: float) -> tuple:
    """Contrast limits of the CV map: (0, maximum), or (0, 99th percentile) when maximum is 0."""
    if maximum > 0:
        return (0.0, float(maximum))
    finite = cv[np.isfinite(cv)]
    top = float(np.percentile(finite, 99)) if finite.size else 1.0
    return (0.0, top if top > 0 else 1.0)


# ---- messages in the dock's words --------------------------------------------------------------

def dock_wording(text: str, labels: dict) -> str:
    """A message of the engine (written for the command line) in the dock's terms:
    `labels` maps command-line options to dock controls, e.g. {"--tile": "Tile"};
    "use --tile 64 or larger" becomes "set Tile to 64 px or larger", "Steps (--steps)"
    becomes "Steps", and no option name is left."""
    def label(option):
        return labels.get(option, option.lstrip("-").replace("-", " "))

    def use(match):
        option, values = match.group(1), [match.group(2)]
        values += re.findall(r" or --[\w-]+ ([\w.:]+)", match.group(3) or "")
        unit = " px" if option == "--tile" else ""
        return f"set {label(option)} to {' or '.join(v + unit for v in values)}"

    text = re.sub(r"\b(?:use|pass) (--[\w-]+) ([\w.:]+)((?: or \1 [\w.:]+)*)", use, text)
    text = re.sub(r"\b(?:use|pass) (--[\w-]+)", lambda m: f"choose {label(m.group(1))}", text)
    text = re.sub(r" ?\((--[\w-]+)\)", "", text)
    text = re.sub(r"`?vstain import-weights`?", "Import authors' weights...", text)
    text = re.sub(r"--[a-z][\w-]*", lambda m: label(m.group(0)), text)
    return text
