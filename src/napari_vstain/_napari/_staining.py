"""What the staining widget runs, without Qt: gather the AF input from layers, run the engine's
tiled staining as a generator (one yield per network call) and turn the result into layers.

The engine reports progress through one callback type (napari_vstain.progress);
`stain_steps` turns it into a generator of reports, so a napari thread_worker can drive it,
update a progress bar per network call and stop it at the next call on cancel.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ._layers import (CHANNEL_NAMES, LINKS, PIXEL_SIZE, PROVENANCE, ROLE, layer_array,
                      pixel_size, upsampled_placement, yx_scale, yx_translate)

# One staining at a time: a cancelled run finishes its current network call in the
# background, and the next run waits for it instead of sharing the model with it.
_ENGINE_LOCK = threading.Lock()


@dataclass
class AFInput:
    """The AF image gathered from one (C, Y, X) layer or several 2-D layers."""

    data: np.ndarray  # (C, Y, X) float32
    layer_names: list
    channel_names: list
    scale: tuple  # (y, x) of the input layers
    translate: tuple
    pixel_size: Optional[tuple]  # micrometres, or None

    @property
    def base_name(self) -> str:
        return self.layer_names[0]


def af_from_layers(layers: Sequence, expected_channels: Optional[int]) -> AFInput:
    """One (C, Y, X) or 2-D layer, or several 2-D layers stacked in the given order, checked
    by data.io.validate_af (channel count, size, finite values). Several layers must have
    the same shape and placement."""
    from ..data.io import validate_af
    from ..errors import InputError

    if not layers:
        raise InputError("Choose the AF input: one multi-channel (C, Y, X) image layer, or "
                         "several single-channel layers (one per channel).")
    if len(layers) == 1:
        layer = layers[0]
        array = layer_array(layer)
        axes = "CYX" if array.ndim == 3 else None
        data = validate_af(array, expected_channels, name=f"Layer {layer.name!r}", axes=axes)
        names = list(layer.metadata.get(CHANNEL_NAMES) or [])
        if len(names) != data.shape[0]:
            names = [f"{layer.name} {i + 1}" for i in range(data.shape[0])] \
                if data.shape[0] > 1 else [layer.name]
    else:
        first = layers[0]
        for layer in layers:
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
                   pixel_size=pixel_size(first))


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


def stain_steps(job: StainJob, cancel: threading.Event):
    """Generator: yields (done, total) network calls, returns the StainResult (with the N
    samples kept). Setting `cancel` makes the engine stop at its next network call."""
    from ..engine.tiling import stain_tiled
    from ..progress import progress_reports

    def work(callback):
        return stain_tiled(job.model, job.af.data, job.settings, tile=job.tile,
                           callback=callback, device=job.device, keep_samples=True)

    return (yield from progress_reports(work, cancel, lock=_ENGINE_LOCK))


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


def finished_run(job: StainJob, result) -> StainedRun:
    """The run as it ran (the engine's provenance: call times, tile, device, dtype) plus
    where its input came from."""
    record = dict(result.provenance, checkpoint=job.checkpoint,
                  input_layers=job.af.layer_names, channel_names=job.af.channel_names,
                  af_shape=list(job.af.data.shape), af_pixel_size_um=job.af.pixel_size)
    return StainedRun(job=job, samples=result.samples, rgb=result.rgb, cv=result.cv,
                      provenance=record)


def output_names(base: str) -> dict:
    return {"stained": f"{base} stained", "cv": f"{base} CV", "samples": f"{base} samples"}


def output_layer_data(run: StainedRun, n_averaged: int, keep_samples: bool) -> dict:
    """{role: (data, kwargs)} of the result layers, placed over the input (scale, translate
    from upsampled_placement) and carrying provenance and links in their metadata."""
    factor = run.job.model.config.factor
    af = run.job.af
    scale, translate = upsampled_placement(af.scale, af.translate, factor)
    out_pixel = None if af.pixel_size is None else tuple(v / factor for v in af.pixel_size)
    names = output_names(af.base_name)
    n = int(np.clip(n_averaged, 1, run.count))
    rgb, cv = run.average(n)
    record = dict(run.provenance, averaged_samples=n)
    links = {"input": af.layer_names, "stained": names["stained"], "cv": names["cv"],
             "samples": names["samples"] if keep_samples else None, "factor": factor}

    def metadata(layer_role, **extra):
        return {ROLE: layer_role, PIXEL_SIZE: out_pixel, PROVENANCE: record, LINKS: links,
                **extra}

    layers = {
        "stained": (rgb, {"name": names["stained"], "rgb": True, "scale": scale,
                          "translate": translate, "metadata": metadata("stained")}),
        "cv": (cv, {"name": names["cv"], "scale": scale, "translate": translate,
                    "metadata": metadata("cv")}),
    }
    if keep_samples:
        layers["samples"] = (run.samples, {"name": names["samples"], "rgb": True,
                                           "scale": (1.0, *scale), "translate": (0.0, *translate),
                                           "metadata": metadata("samples"), "visible": False})
    return layers


def cv_display_range(cv: np.ndarray, maximum: float) -> tuple:
    """Contrast limits of the CV map: (0, maximum), or (0, 99th percentile) when maximum is 0."""
    if maximum > 0:
        return (0.0, float(maximum))
    finite = cv[np.isfinite(cv)]
    top = float(np.percentile(finite, 99)) if finite.size else 1.0
    return (0.0, top if top > 0 else 1.0)
