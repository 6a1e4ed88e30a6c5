"""Reporting an evaluation: results.md (Markdown tables ready for the README, with the training
budgets), comparison.png (AF, each method's output, the target and the CV map) and results.json
(strict JSON: NaN and inf made JSON-ready), written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from .running import EXAMPLES_KEY

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
FIGURE_FILE = "comparison.png"


def _fmt(stat: Optional[dict], digits: int) -> str:
    if stat is None:
        return "unavailable"
    if stat["mean"] is None:
        return "inf" if stat.get("infinite") else "n/a"
    text = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    if stat.get("infinite"):
        text += f" ({stat['infinite']} identical: inf)"
    return text


def _quality_cells(summary: dict) -> str:
    """SSIM, PSNR, LPIPS and pigment precision / recall / F1 of a summary, as table cells."""
    pig = summary["pigment"]
    lpips_text = _fmt(summary["lpips"], 3) if summary["lpips"] is not None else "unavailable"
    return " | ".join([_fmt(summary["ssim"], 3), _fmt(summary["psnr"], 2), lpips_text,
                       _fmt_score(pig["precision"]), _fmt_score(pig["recall"]),
                       _fmt_score(pig["f1"])])


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
        if "real" in seeds:
            lines += ["The `real` pairs are not procedural: they are crops of the held-out parts "
                      "(the last quarter along the longer side) of real H&E images shipped in "
                      "installed packages; their H&E is real, their AF is SIMULATED from its "
                      "colour deconvolution. No training crop overlaps them.", ""]
    else:
        lines += [f"**Data: {len(pairs)} pairs** from {context.get('data', 'a folder')}.", ""]
    model = results["model"]
    extra = model.get("extra") or {}
    budget = _budget_text(extra.get("training_steps"), extra.get("training_time_s"),
                          extra.get("hardware"))
    if extra.get("init_from_hash"):  # a continued model: its time includes what came before?
        total = extra.get("training_time_total_s")
        budget += (f", continued from model `{extra['init_from_hash'][:12]}`: "
                   + (f"{total / 60:.1f} min of training in all" if total is not None else
                      "the time of the training before is not recorded in the checkpoint"))
    diffusion_total = extra.get("training_time_total_s",
                                None if extra.get("init_from_hash")
                                else extra.get("training_time_s"))
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
        comparison = _budget_comparison(cextra.get("time_s"), diffusion_total)
        lines += [f"cGAN: checkpoint `{(results['cgan']['checkpoint_hash'] or '')[:12]}`"
                  f"{cgan_budget}{comparison}."]
    if figure:
        lines += ["", f"![AF input, each method's output and the H&E target]({figure})"]
    lines += ["", "## Image quality (mean ± std over images)", "",
              "| Method | SSIM (RGB, per-channel averaged) | PSNR (dB) | LPIPS (AlexNet) | "
              "Pigment precision | Pigment recall | Pigment F1 |",
              "|---|---|---|---|---|---|---|"]
    for method in results["methods"]:
        lines.append(f"| {method} | {_quality_cells(results['summary'][method])} |")
    if results.get("by_group"):
        lines += ["", "By tissue (real pairs by the H&E image they were cut from; mean ± std "
                  "over images, pigment pooled):", "",
                  "| Tissue | Images | Method | SSIM | PSNR (dB) | LPIPS | Pigment precision | "
                  "Pigment recall | Pigment F1 |", "|---|---|---|---|---|---|---|---|---|"]
        for group, by_method in results["by_group"].items():
            for method, summary in by_method.items():
                lines.append(f"| {group} | {summary['ssim']['n']} | {method} | "
                             f"{_quality_cells(summary)} |")
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
    lines += _correlation_lines(results.get("cv_error_correlation"))
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
              f"{context.get('platform', '')}".rstrip(", ")
              + (f"; {context['threads']}" if context.get("threads") else ""), ""]
    return "\n".join(lines)


def _correlation_lines(correlation: Optional[dict]) -> list:
    """The section on whether the CV map points at the errors (none without a CV map)."""
    if not correlation:
        return []
    mean = correlation["mean"]
    lines = ["", "## Does the CV map point at the errors?", "",
             "Spearman rank correlation, per pixel, between an error predictor and the absolute "
             "error |stain - target| (mean over RGB), mean ± std over images. The CV map is "
             f"the diffusion model's, over its N = {correlation['samples']} samples; the "
             "trivial predictor is the darkness of the stain (1 - its mean intensity). A CV "
             "map worth showing must beat the darkness.", "",
             "| Error predictor | all pixels | tissue pixels |", "|---|---|---|"]
    for label, key in (("CV map", "cv"), ("stain darkness (baseline)", "darkness")):
        lines.append(f"| {label} | {_fmt(mean[key], 3)} | {_fmt(mean[key + '_tissue'], 3)} |")
    return lines


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
    """Say so when the cGAN had clearly less (or more) training time than the diffusion model
    (diffusion_seconds: its whole training, None when not known)."""
    if not cgan_seconds:
        return ""
    if not diffusion_seconds:
        return ("; NOTE: the diffusion model's whole training time is not recorded, so the "
                "comparison may not be budget-matched")
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
    OUT/comparison.png as one result (all or none); returns the JSON and Markdown paths."""
    from ..atomic import result_transaction

    out = Path(out)
    json_path, md_path = out / RESULTS_JSON, out / RESULTS_MD
    examples = results.get(EXAMPLES_KEY) or []
    results = {k: v for k, v in results.items() if k != EXAMPLES_KEY}
    files = (json_path, md_path) + ((out / FIGURE_FILE,) if examples else ())
    payload = _json_ready({**results, "context": context or {}})
    text = json.dumps(payload, indent=2, allow_nan=False)
    report = markdown_report(results, context, figure=FIGURE_FILE if examples else None)
    with result_transaction(files, overwrite=overwrite) as tx:
        tx.temporary(json_path).write_text(text)
        tx.temporary(md_path).write_text(report)
        if examples:
            comparison_figure(examples, tx.temporary(out / FIGURE_FILE))
    return json_path, md_path


def comparison_figure(examples: list, path) -> None:
    """One row per example pair: the AF (false-colour preview), each method's output, the
    H&E target and the diffusion model's CV map over its N samples, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..training.reports import af_preview  # stretches each AF channel by its own percentiles

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
