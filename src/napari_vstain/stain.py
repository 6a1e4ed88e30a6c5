"""`vstain stain`: stain AF images of any size, whole slides included, block by block, and
write the stained RGB image (the mean of N samples) with its per-pixel CV map.

Outputs: `NAME.ome.zarr` is one OME-NGFF container (the stain as a pyramid, the CV map as a
second image, provenance in the attributes); `NAME.ome.tif` is a tiled pyramidal OME-TIFF of
the stain plus one of the CV map (--cv-out). The input is read region by region (TIFF,
pyramidal OME-TIFF, OME-Zarr), never whole.

The blocks run in this process, on a local Dask cluster (--workers N) or on an existing one
(--scheduler tcp://HOST:8786). A killed run keeps its finished blocks beside the output;
the same command with --resume computes only the missing ones, and the result is the same,
bit for bit. Every setting is checked before any work starts; bad settings end with one
sentence that says what to change. Existing outputs are never replaced unless --overwrite is
given, never an input.
"""

from __future__ import annotations

import sys
from pathlib import Path

TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_SUFFIX = ".zarr"
AF_SUFFIXES = (".tif", ".tiff", ".zarr")
NGFF_VERSIONS = ("0.4", "0.5")
OUTPUT_CHUNK = 512  # chunk side of the outputs (blocks smaller than this are one chunk)


def output_chunk(block: int) -> int:
    return min(OUTPUT_CHUNK, int(block))


def configure_cli(parser) -> None:
    from .engine.blocks import DEFAULT_BLOCK
    from .engine.config import DEFAULT_OVERLAP
    from .settings import add_sampler_arguments
    from .threads import add_threads_argument

    parser.add_argument("af", type=Path, nargs="+",
                        help="AF image(s): TIFF / OME-TIFF (pyramids too), OME-Zarr, or a "
                             "folder of them; channels x Y x X.")
    parser.add_argument("--out", type=Path, required=True,
                        help="Output: NAME.ome.zarr (OME-NGFF, for whole slides) or "
                             "NAME.ome.tif (pyramidal OME-TIFF); a folder when several "
                             "inputs are given (each becomes FOLDER/<input name>.ome.zarr).")
    parser.add_argument("--cv-out", type=Path, default=None,
                        help="OME-TIFF output of the CV map, for a .ome.tif --out (default: "
                             "next to --out, with _cv added to its name). In an OME-Zarr the "
                             "CV map is the container's second image.")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="Model checkpoint (.safetensors); default: the shipped demo model.")
    add_sampler_arguments(parser)
    parser.add_argument("--tile", type=int, default=None,
                        help="Largest tile side in output pixels (default: the training crop "
                             "for GroupNorm U-Nets, 512 for a local U-Net such as the demo "
                             "model's); tiles are sized to the image within it.")
    parser.add_argument("--overlap", type=int, default=None,
                        help=f"Output pixels neighbouring tiles share (default {DEFAULT_OVERLAP}"
                             ", or a quarter of a smaller tile).")
    parser.add_argument("--block", type=int, default=DEFAULT_BLOCK,
                        help=f"Side of the independent blocks in output pixels, a multiple of "
                             f"{OUTPUT_CHUNK} or less (default {DEFAULT_BLOCK}): the unit of "
                             "resuming and of cluster tasks.")
    parser.add_argument("--workers", type=int, default=None,
                        help="Stain on a local Dask cluster of this many worker processes "
                             "(default: in this process).")
    parser.add_argument("--scheduler", default=None,
                        help="Stain on an existing Dask cluster, e.g. tcp://HOST:8786 (its "
                             "workers must see the input, checkpoint and output paths).")
    parser.add_argument("--resume", action="store_true",
                        help="Continue an interrupted run of the same command: only the "
                             "missing blocks are computed.")
    parser.add_argument("--ngff-version", choices=NGFF_VERSIONS, default="0.4",
                        help="OME-NGFF version of a .zarr output (default 0.4: zarr v2, read "
                             "by napari-ome-zarr and QuPath 0.6; 0.5: zarr v3).")
    add_threads_argument(parser)
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, mps or auto (default auto: a GPU if present).")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="(Tile, sample) pairs per network call (default: sized to the "
                             "device).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace existing outputs (or an interrupted run's blocks).")


def default_cv_path(out: Path) -> Path:
    """stained.ome.tif -> stained_cv.ome.tif; stained.tif -> stained_cv.tif."""
    name = out.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return out.with_name(name[: -len(suffix)] + "_cv" + name[-len(suffix):])
    return out.with_name(name + "_cv.ome.tif")


def _is_zarr(path: Path) -> bool:
    return path.name.lower().rstrip("/").endswith(ZARR_SUFFIX)


def _check_output(path: Path, option: str, zarr_allowed: bool = True) -> None:
    name = path.name.lower()
    if name.endswith(TIFF_SUFFIXES) or (zarr_allowed and _is_zarr(path)):
        return
    kinds = "NAME.ome.zarr (OME-NGFF) or NAME.ome.tif" if zarr_allowed else "NAME.ome.tif"
    raise ValueError(f"{option} {path} must be {kinds}; the name ending says which format "
                     "is written.")


def expand_inputs(paths) -> list:
    """The AF images named: files and OME-Zarr folders as given; other folders stand for the
    TIFF and OME-Zarr images inside them (sorted by name)."""
    from .data.io import existing_file
    from .errors import InputError

    images = []
    for path in paths:
        path = Path(path).expanduser()
        if path.is_dir() and not _is_zarr(path):
            found = sorted(p for p in path.iterdir() if p.name.lower().endswith(AF_SUFFIXES)
                           and not p.name.startswith("."))
            if not found:
                raise InputError(f"The folder {path} holds no TIFF or OME-Zarr image; give "
                                 "image files or a folder of them.")
            images.extend(found)
        elif _is_zarr(path):
            if not path.is_dir():
                raise InputError(f"The AF image {path} does not exist or is not an OME-Zarr "
                                 "folder; check the path.")
            images.append(path)
        else:
            images.append(existing_file(path, "AF image"))
    names = [image_stem(p) for p in images]
    if len(set(names)) != len(names):
        raise InputError("Two inputs have the same name; their outputs would collide. Rename "
                         "one or stain them in separate runs.")
    return images


def image_stem(path: Path) -> str:
    """The image's name without its format endings: slide.ome.tif -> slide."""
    name = path.name.rstrip("/")
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _outputs(args, inputs: list) -> list:
    """(input, output, cv output or None) for every input: one image file gives one output
    named by --out; several, or a folder of them, give FOLDER/<input name>.ome.zarr each."""
    folder_given = any(Path(p).is_dir() and not _is_zarr(Path(p)) for p in args.af)
    if len(inputs) == 1 and not folder_given:
        out = args.out
        _check_output(out, "--out")
        if _is_zarr(out):
            if args.cv_out is not None:
                raise ValueError("--cv-out is for OME-TIFF outputs; an OME-Zarr output holds "
                                 "the CV map as its second image (the 'cv' group).")
            return [(inputs[0], out, None)]
        cv_out = args.cv_out if args.cv_out is not None else default_cv_path(out)
        _check_output(cv_out, "--cv-out", zarr_allowed=False)
        return [(inputs[0], out, cv_out)]
    if args.cv_out is not None:
        raise ValueError("--cv-out names one file; with several inputs each output is "
                         "FOLDER/<input name>.ome.zarr with its CV map inside.")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; with several inputs --out is a folder.")
    if _is_zarr(args.out):
        raise ValueError(f"--out {args.out} names one OME-Zarr; with several inputs --out is "
                         "a folder that receives one NAME.ome.zarr per input.")
    return [(path, args.out / f"{image_stem(path)}.ome.zarr", None) for path in inputs]


def run_cli(args) -> int:
    from .errors import UserError
    from .settings import SETTINGS, settings_from_arguments
    from .threads import choose_threads

    # 1. Settings that need nothing loaded (the model's T is checked once it is).
    settings = settings_from_arguments(args)
    for name, setting in SETTINGS.items():
        if getattr(settings, name) is not None:
            setting.check(getattr(settings, name), num_steps=None)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1; got {args.batch_size}.")
    if args.workers is not None and not 1 <= args.workers <= 1024:
        raise UserError(f"--workers must be from 1 to 1,024; got {args.workers}.")
    if args.workers is not None and args.scheduler is not None:
        raise UserError("Give --workers (a local cluster) or --scheduler (an existing one), "
                        "not both.")
    from .engine.tiling import check_overlap

    if args.overlap is not None:
        check_overlap(args.overlap)
    inputs = expand_inputs(args.af)
    outputs = _outputs(args, inputs)
    from .atomic import check_place, recover_killed_runs, refuse_inputs

    checkpoint_input = [args.checkpoint] if args.checkpoint is not None else []
    for af_path, out, cv_out in outputs:
        files = [out] + ([cv_out] if cv_out is not None else [])
        if cv_out is not None and cv_out.resolve() == out.resolve():
            raise UserError(f"The stained image and the CV map cannot both be written to "
                            f"{out}; give --cv-out another name.")
        refuse_inputs(files, inputs + checkpoint_input)
        recover_killed_runs(files)
        for path in files:
            check_place(path, folder=_is_zarr(path))
            if path.exists() and not args.overwrite:
                raise FileExistsError(f"{path} already exists; choose another name or allow "
                                      "overwriting (--overwrite).")
    # Threads: a distributed run uses one count everywhere (the bits depend on it).
    distributed = args.workers is not None or args.scheduler is not None
    threads = choose_threads(args.threads if args.threads is not None
                             else (1 if distributed else None))
    from .engine.devices import device_name, resolve_device

    # On an existing cluster each worker resolves the device (this machine may have no GPU).
    device = device_name(args.device) if args.scheduler else resolve_device(args.device)

    # 2. Settings that depend on the model.
    from .engine.checkpoint import default_checkpoint, load_model
    from .engine.tiling import check_tile

    checkpoint = args.checkpoint if args.checkpoint is not None else default_checkpoint()
    model = load_model(checkpoint, device="cpu")
    cfg = model.config
    settings.validate(cfg.num_steps)
    if args.tile is not None:
        check_tile(cfg, args.tile)
    from .engine.blocks import plan_blocks

    # 3. The images: opened lazily, channel counts checked, statistics from a low level.
    from .data.slide import open_af_lazy, slide_statistics

    jobs = []
    for af_path, out, cv_out in outputs:
        with open_af_lazy(af_path, expected_channels=cfg.af_channels) as af:
            plan_blocks(af.shape, cfg, args.block, chunk=output_chunk(args.block))  # refused now
            jobs.append((af_path, out, cv_out, af.shape, af.pixel_size, list(af.channel_names),
                         slide_statistics(af, cfg)))

    # 4. The work, one output at a time (each its own set of blocks).
    from .slide import close_client, open_client

    client = open_client(args.workers, args.scheduler, threads.count)
    try:
        where = (f"a local Dask cluster of {args.workers} worker processes" if args.workers
                 else f"the Dask cluster at {args.scheduler}" if args.scheduler
                 else "this process")
        print(f"vstain stain: {threads.count} torch thread(s) per process ({threads.reason}); "
              f"blocks run in {where}.", file=sys.stderr)
        for job in jobs:
            _stain_one(args, model, checkpoint, settings, device, threads.count, client,
                       *job, inputs + checkpoint_input)
    finally:
        close_client(client)
    return 0


def _stain_one(args, model, checkpoint, settings, device, threads, client, af_path, out,
               cv_out, af_shape, pixel_size, channel_names, stats, inputs) -> None:
    from tqdm import tqdm

    from .slide import describe_where, make_job, stain_output

    job = make_job(model, checkpoint, settings, af_path, af_shape, channel_names, stats,
                   out, block=args.block, chunk=output_chunk(args.block), tile=args.tile,
                   overlap=args.overlap, device=device, batch_size=args.batch_size,
                   threads=threads)
    plan, tiles = job.plan(), job.tile_plan(model.config)
    height, width = plan.out_shape
    count = len(plan.indices)
    print(f"Staining {af_path} ({af_shape[2]} x {af_shape[1]} AF pixels -> {width} x "
          f"{height}) on {describe_where(device)}: {count} block(s) of up to {args.block} px, "
          f"tiles of up to {tiles.tile[1]} x {tiles.tile[0]}; "
          f"{settings.describe(model.config.num_steps, tiles.count)} per block.",
          file=sys.stderr)
    out_pixel_size = (None if pixel_size is None
                      else tuple(size / model.config.factor for size in pixel_size))
    with tqdm(total=count, unit="block", desc="vstain stain", file=sys.stderr) as bar:
        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        counts = stain_output(job, out, cv_out, inputs=inputs, overwrite=args.overwrite,
                              resume=args.resume, version=args.ngff_version,
                              pixel_size=out_pixel_size, client=client, progress=progress,
                              say=lambda text: print(f"vstain stain: {text}", file=sys.stderr))
    resumed = (f" ({counts['done_before']} block(s) from the interrupted run, "
               f"{counts['computed']} computed now)" if counts["done_before"] else "")
    written = f"{out} (stained RGB and CV map)" if cv_out is None else \
        f"{out} (stained RGB, mean of {settings.samples}) and {cv_out} (CV map)"
    print(f"Wrote {written}{resumed}.", file=sys.stderr)
