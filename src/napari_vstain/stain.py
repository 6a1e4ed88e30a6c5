"""`vstain stain`: stain an AF image of any size (tiled) and write the stained RGB image (the
mean of N samples) and the per-pixel CV map as OME-TIFFs with pixel size and provenance.

Every setting is checked before any work starts; bad settings end with one sentence that
says what to change. Existing outputs are never replaced unless --overwrite is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

OUTPUT_SUFFIXES = (".tif", ".tiff")


def configure_cli(parser) -> None:
    from .settings import add_sampler_arguments

    parser.add_argument("af", type=Path, help="AF image (TIFF / OME-TIFF, channels x Y x X).")
    parser.add_argument("--out", type=Path, required=True,
                        help="Output OME-TIFF for the stained RGB image (e.g. stained.ome.tif).")
    parser.add_argument("--cv-out", type=Path, default=None,
                        help="Output OME-TIFF for the CV map (default: next to --out, with "
                             "_cv added to its name).")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="Model checkpoint (.safetensors); default: the shipped demo model.")
    add_sampler_arguments(parser)
    parser.add_argument("--tile", type=int, default=None,
                        help="Tile side in output pixels (default: the model's training crop, "
                             "twice that for a local U-Net such as the demo model's).")
    parser.add_argument("--overlap", type=float, default=0.25,
                        help="Fraction of a tile shared with its neighbours (default 0.25).")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, mps or auto (default auto: a GPU if present).")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="(Tile, sample) pairs per network call (default: sized to the "
                             "device; halved automatically on a CUDA out-of-memory error).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace existing output files.")


def default_cv_path(out: Path) -> Path:
    """stained.ome.tif -> stained_cv.ome.tif; stained.tif -> stained_cv.tif."""
    name = out.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return out.with_name(name[: -len(suffix)] + "_cv" + name[-len(suffix):])
    return out.with_name(name + "_cv.ome.tif")


def _check_output(path: Path, option: str) -> None:
    if not path.name.lower().endswith(OUTPUT_SUFFIXES):
        raise ValueError(f"{option} {path} must be a TIFF file name ending in .ome.tif "
                         "(the output is written as OME-TIFF).")


def run_cli(args) -> int:
    from .engine.devices import describe_device, resolve_device
    from .errors import UserError
    from .settings import SETTINGS, settings_from_arguments

    # 1. Settings that need nothing loaded (the model's T is checked once it is).
    settings = settings_from_arguments(args)
    for name, setting in SETTINGS.items():
        if getattr(settings, name) is not None:
            setting.check(getattr(settings, name), num_steps=None)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1; got {args.batch_size}.")
    from .engine.tiling import check_overlap

    check_overlap(args.overlap)
    from .data.io import existing_file

    existing_file(args.af, "AF image")  # missing, a folder, a pipe, empty: said now
    out = args.out
    cv_out = args.cv_out if args.cv_out is not None else default_cv_path(out)
    _check_output(out, "--out")
    _check_output(cv_out, "--cv-out")
    from .data.tiff_stream import OmeTiffWriter

    # Refuses now: existing outputs (without --overwrite), --cv-out equal to --out, an output
    # that is an input (the AF image or the checkpoint, even with --overwrite), a folder.
    inputs = [args.af] + ([args.checkpoint] if args.checkpoint is not None else [])
    OmeTiffWriter(out, cv_out, overwrite=args.overwrite, inputs=inputs)
    device = resolve_device(args.device)

    # 2. Settings that depend on the model.
    from .engine.checkpoint import default_checkpoint, load_model
    from .engine.tiling import check_tile, default_tile, plan_tiles

    checkpoint = args.checkpoint if args.checkpoint is not None else default_checkpoint()
    model = load_model(checkpoint, device="cpu")
    cfg = model.config
    settings.validate(cfg.num_steps)
    tile = check_tile(cfg, args.tile) if args.tile is not None else default_tile(cfg)

    # 3. The image (its channel count must match the model).
    from .data.io import read_af

    af = read_af(args.af, expected_channels=cfg.af_channels)
    plan = plan_tiles(af.data.shape, cfg, tile, args.overlap)
    pixel_size = (None if af.pixel_size is None
                  else tuple(size / cfg.factor for size in af.pixel_size))

    # 4. The work.
    from tqdm import tqdm

    from .engine.devices import prepare_model
    from .engine.tiling import stain_tiled

    model = prepare_model(model, device)
    extra = {"input": str(args.af), "checkpoint": str(checkpoint),
             "af_channel_names": list(af.channel_names)}
    writer = OmeTiffWriter(out, cv_out, pixel_size=pixel_size, provenance=extra,
                           overwrite=args.overwrite, inputs=inputs)
    height, width = plan.out_shape
    print(f"Staining {args.af} ({af.data.shape[2]} x {af.data.shape[1]} AF pixels -> {width} x "
          f"{height}) on {describe_device(device)}: {plan.count} tiles of {plan.tile[1]} x "
          f"{plan.tile[0]}; {settings.describe(cfg.num_steps, plan.count)}.", file=sys.stderr)
    with tqdm(total=1, unit="call", desc="vstain stain", file=sys.stderr) as bar:
        def progress(done: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

        stain_tiled(model, af.data, settings, tile=tile, overlap=args.overlap,
                    callback=progress, device=device, batch_size=args.batch_size,
                    writer=writer)
    print(f"Wrote {out} (stained RGB, mean of {settings.samples}) and {cv_out} (CV map).",
          file=sys.stderr)
    return 0
