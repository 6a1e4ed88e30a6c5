"""`vstain evaluate`: score a model and the baselines on held-out pairs.

For every pair (AF, H&E target) it stains the AF with
- the diffusion model (engine.tiling.stain_tiled with the given sampler settings),
- the false-colour baseline (baselines.false_colour: non-learned, bicubically upsampled),
- optionally a cGAN (baselines.cgan, `--cgan FILE`),
and reports SSIM (RGB, per-channel averaged, paper settings), PSNR, LPIPS (AlexNet v0.1, only
with offline weights: otherwise "LPIPS unavailable") and pigment precision / recall / F1
(pigment detected in each output against pigment detected in the H&E target), per image and as
mean +- std over images (pigment scores pooled over all pixels of all images).

CV map against errors: with N >= 2 samples, the Spearman rank correlation over pixels between
the diffusion model's CV map and its absolute error |stain - target| (mean over RGB), over all
pixels and over tissue, beside that of the trivial predictor (the darkness of the stain,
1 - its mean intensity), per image and mean +- std over images.

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

import json
import time
from pathlib import Path

from .evaluation.report import RESULTS_JSON, RESULTS_MD, markdown_report, write_results
from .evaluation.running import EvaluationSettings, evaluate_model, simulated_pairs
from .evaluation.running import central_crop, study_indices  # noqa: F401 (re-exported)
from .settings import SAMPLERS, SETTINGS, StainSettings

DEFAULT_HELD_OUT_SEED = 200  # first seed of the simulated evaluation pairs (training uses >= 1000)


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
                        "tissues, e.g. lung,heart,real (real: crops of the held-out parts of "
                        "the real H&E images installed, AF simulated)")
    data.add_argument("--allow-outside-paths", action="store_true", help="read manifest.json "
                      "entries of the --data folder that name files outside it (absolute "
                      "paths, ../); only for manifests you trust")
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
    from .settings import DEFAULT_SAMPLER, add_setting_argument, sampler_help

    stain = parser.add_argument_group("diffusion staining (image-quality metrics)")
    stain.add_argument("--sampler", choices=list(SAMPLERS), default=DEFAULT_SAMPLER,
                       help=f"{sampler_help()} (default {DEFAULT_SAMPLER})")
    add_setting_argument(stain, "steps")
    add_setting_argument(stain, "samples")
    add_setting_argument(stain, "t_exit", default=SETTINGS["t_exit"].default,
                         help=f"exit step t_e of mean / skip, also in the variance study "
                              f"(default {SETTINGS['t_exit'].default})")
    stain.add_argument("--stain-seed", type=int, default=SETTINGS["seed"].default,
                       help=f"noise seed (default {SETTINGS['seed'].default})")
    stain.add_argument("--tile", type=int, help="tile size in target px (default: the model's "
                       "training crop, twice that for a local U-Net)")
    study = parser.add_argument_group("variance study")
    study.add_argument("--samplers", default=",".join(SAMPLERS),
                       help=f"samplers of the CV study, or 'none' (default "
                            f"{','.join(SAMPLERS)})")
    study.add_argument("--cv-counts", default="1,2,3,5", help="N values (default 1,2,3,5)")
    study.add_argument("--repeats", type=int, default=3, help="repeated runs R (default 3)")
    study.add_argument("--cv-steps", type=int, default=50, help="respaced steps of vanilla, "
                       "mean and skip (default 50)")
    study.add_argument("--full-steps", action="store_true", help="vanilla, mean and skip over "
                       "all T steps (1000 network calls per sample: slow on CPUs)")
    study.add_argument("--fast-steps", type=int, default=10, help="steps of the few-step "
                       "samplers (default 10)")
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
    from .threads import add_threads_argument

    add_threads_argument(parser)
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
    from .data.pairs import load_pairs
    from .engine.checkpoint import default_checkpoint, load_model
    from .engine.devices import describe_device, resolve_device, use_threads

    threads = use_threads(args.threads, "vstain evaluate")
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
        pairs = load_pairs(args.data, allow_outside_paths=args.allow_outside_paths)
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
               "platform": describe_device(device), "threads": threads.describe(),
               "seconds": round(time.time() - start, 1)}
    json_path, md_path = write_results(results, out, context, overwrite=args.overwrite)
    print(markdown_report(results, context))
    print(f"Wrote {json_path} and {md_path}")
    return 0
