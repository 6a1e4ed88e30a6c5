"""Does the simulated AF carry the carbon pigment? A simple classifier on the AF alone, per AF
pixel, on held-out simulated lung pairs.

    python benchmarks/pigment_in_af.py [--quick]

Data: simulated lung pairs (data.simulate.simulate_pair, 512 px H&E / 128 px AF, factor 4,
seeds 500 on, all below the training seeds); the first two thirds of the pairs train the
classifier, the rest test it. Labels come from the simulator's own pigment mask and the
tissue of the H&E target (metrics.tissue_mask_from_rgb), both moved onto the AF grid by the
pair's known misregistration and averaged over each k x k block: an AF pixel is
- pigment when at least half of its block is pigment,
- air when under 5 % of its block is tissue and none is pigment,
- ordinary tissue when at least 95 % of its block is tissue and none is pigment;
"everything else" is every pixel without pigment (air, tissue and their borders).

Features at each AF pixel (AF normalised per image as the model normalises it): the 4
channels, their mean b, the channel fractions of the raw counts, and local features of b:
means over 3 x 3, 7 x 7 and 15 x 15 pixels, minimum and maximum over 3 x 3, maxima over
7 x 7 and 15 x 15 (is there bright tissue nearby?), the 5 x 5 standard deviation and
b minus its 3 x 3 mean. Classifiers: logistic regression (class-balanced, L2 1e-3, fitted by
L-BFGS) on (a) the darkness -b alone, (b) the 4 channels alone, (c) all features; and a
small MLP (one hidden layer of 32 units, class-balanced) on (b) and (c), to see what a linear
boundary misses. Scores on the test pairs: ROC AUC, average precision, and precision /
recall / F1 at the threshold that gives the best F1 on the training pairs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FIRST_SEED = 500
FACTOR = 4
PIGMENT_MIN_FRACTION = 0.5
AIR_MAX_TISSUE = 0.05
TISSUE_MIN_FRACTION = 0.95
CLASSIFIERS = (("logistic", "darkness"), ("logistic", "af_channels"),
               ("logistic", "af_and_local"), ("mlp", "af_channels"), ("mlp", "af_and_local"))


def _to_af_grid(mask: np.ndarray, shift, factor: int) -> np.ndarray:
    """Fraction of each AF pixel's k x k block covered by `mask` (H&E grid), after moving the
    mask onto the AF grid (AF pixel (y, x) shows H&E position (y + dy, x + dx))."""
    from scipy import ndimage

    moved = ndimage.shift(mask.astype(np.float32), (-shift[0], -shift[1]), order=1,
                          mode="nearest")
    h, w = moved.shape[0] // factor, moved.shape[1] // factor
    return moved[: h * factor, : w * factor].reshape(h, factor, w, factor).mean(axis=(1, 3))


def features(af: np.ndarray) -> dict:
    """Per-pixel feature maps of one AF image (4, h, w) of raw counts: name -> (h, w)."""
    from scipy import ndimage

    from napari_vstain.engine.model import ModelConfig, af_statistics, normalise_af

    norm = normalise_af(af, af_statistics(af, ModelConfig()))
    b = norm.mean(axis=0)
    raw = np.clip(af, 0, None) + 1e-3
    out = {f"af_{c}": norm[c] for c in range(norm.shape[0])}
    out["mean"] = b
    for c in range(3):
        out[f"fraction_{c}"] = raw[c] / raw.sum(axis=0)
    for size in (3, 7, 15):
        out[f"mean_{size}"] = ndimage.uniform_filter(b, size, mode="reflect")
        out[f"max_{size}"] = ndimage.maximum_filter(b, size, mode="reflect")
    out["min_3"] = ndimage.minimum_filter(b, 3, mode="reflect")
    mean5 = ndimage.uniform_filter(b, 5, mode="reflect")
    out["std_5"] = np.sqrt(np.clip(ndimage.uniform_filter(b * b, 5, mode="reflect")
                                   - mean5 ** 2, 0, None))
    out["contrast_3"] = b - out["mean_3"]
    return out


def feature_matrix(maps: dict, feature_set: str) -> np.ndarray:
    if feature_set == "darkness":
        return -maps["mean"].reshape(-1, 1)
    if feature_set == "af_channels":
        return np.stack([maps[f"af_{c}"].ravel() for c in range(4)], axis=1)
    return np.stack([m.ravel() for m in maps.values()], axis=1)


def pair_data(seed: int, size: int) -> dict:
    """Features and labels of one simulated lung pair."""
    from napari_vstain.data.simulate import simulate_pair
    from napari_vstain.metrics import tissue_mask_from_rgb

    pair = simulate_pair("lung", size, FACTOR, seed)
    shift = pair.metadata["shift_he_px"]
    pigment = _to_af_grid(pair.pigment_mask, shift, FACTOR)
    tissue = _to_af_grid(tissue_mask_from_rgb(pair.he) & ~pair.pigment_mask, shift, FACTOR)
    labels = {"pigment": pigment >= PIGMENT_MIN_FRACTION,
              "air": (tissue <= AIR_MAX_TISSUE) & (pigment == 0),
              "tissue": (tissue >= TISSUE_MIN_FRACTION) & (pigment == 0),
              "no_pigment": pigment == 0}
    # how much of the pigment area lies in AF pixels that are mostly pigment
    covered = pigment[labels["pigment"]].sum() * FACTOR ** 2
    return {"seed": seed, "maps": features(pair.af),
            "labels": {k: v.ravel() for k, v in labels.items()},
            "pigment_he_pixels": int(pair.pigment_mask.sum()),
            "pigment_he_pixels_resolved": float(covered)}


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> tuple:
    """Class-balanced logistic regression on standardised x: (mean, std, weights, bias)."""
    from scipy.optimize import minimize

    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mean) / std
    sample_weight = np.where(y, 0.5 / y.mean(), 0.5 / (1 - y.mean())) / len(y)
    target = y.astype(np.float64)

    def loss(params):
        w, b = params[:-1], params[-1]
        logits = z @ w + b
        p = 1.0 / (1.0 + np.exp(-logits))
        value = np.sum(sample_weight * (np.logaddexp(0, logits) - target * logits)) \
            + l2 * w @ w
        grad_logits = sample_weight * (p - target)
        return value, np.concatenate([z.T @ grad_logits + 2 * l2 * w, [grad_logits.sum()]])

    result = minimize(loss, np.zeros(z.shape[1] + 1), jac=True, method="L-BFGS-B",
                      options={"maxiter": 500})
    return mean, std, result.x[:-1], result.x[-1]


def fit_mlp(x: np.ndarray, y: np.ndarray, hidden: int = 32, epochs: int = 400,
            max_rows: int = 100_000, seed: int = 0):
    """A small class-balanced MLP (one hidden layer of `hidden` ReLU units) on standardised x,
    full-batch Adam on at most `max_rows` rows (all pigment rows kept): a nonlinear check on
    what the linear classifier may miss. Returns a function x -> scores."""
    import torch

    rng = np.random.default_rng(seed)
    keep = np.flatnonzero(y)
    others = np.flatnonzero(~y)
    if len(keep) + len(others) > max_rows:
        others = rng.choice(others, max(1, max_rows - len(keep)), replace=False)
    rows = np.concatenate([keep, others])
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, 1))
    inputs = torch.from_numpy(((x[rows] - mean) / std).astype(np.float32))
    labels = torch.from_numpy(y[rows].astype(np.float32))
    positive = float(labels.mean())
    weights = torch.where(labels > 0, 0.5 / positive, 0.5 / (1 - positive))
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        logits = net(inputs)[:, 0]
        loss = (weights * torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels, reduction="none")).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    def scores(x_new: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = torch.from_numpy(((x_new - mean) / std).astype(np.float32))
            return net(z)[:, 0].numpy().astype(np.float64)

    return scores


def predict(model: tuple, x: np.ndarray) -> np.ndarray:
    mean, std, w, b = model
    return ((x - mean) / std) @ w + b


def roc_auc(scores: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U from average ranks)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    positives, negatives = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def average_precision(scores: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    hits = y[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits].mean())


def best_f1_threshold(scores: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    hits = y[order]
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / max(1, hits.sum())
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(scores[order][int(np.argmax(f1))])


def scores_at(scores: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    predicted = scores >= threshold
    tp = int((predicted & y).sum())
    precision = tp / predicted.sum() if predicted.any() else float("nan")
    recall = tp / y.sum()
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def task_rows(pairs: list, negative: str, feature_set: str) -> tuple:
    """(x, y) of pigment (y True) against `negative` pixels over the pairs."""
    xs, ys = [], []
    for pair in pairs:
        labels = pair["labels"]
        keep = labels["pigment"] | labels[negative]
        xs.append(feature_matrix(pair["maps"], feature_set)[keep])
        ys.append(labels["pigment"][keep])
    return np.concatenate(xs), np.concatenate(ys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=24, help="simulated lung pairs")
    parser.add_argument("--size", type=int, default=512, help="H&E size in px")
    parser.add_argument("--quick", action="store_true", help="6 pairs of 256 px")
    parser.add_argument("--results", type=Path, default=common.RESULTS)
    args = parser.parse_args()
    count, size = (6, 256) if args.quick else (args.pairs, args.size)
    start = time.time()
    pairs = [pair_data(FIRST_SEED + i, size) for i in range(count)]
    split = max(1, (2 * count) // 3)
    train, test = pairs[:split], pairs[split:]
    tasks = {}
    for negative, label in (("air", "pigment vs air"), ("tissue", "pigment vs ordinary tissue"),
                            ("no_pigment", "pigment vs everything else")):
        tasks[label] = {}
        for classifier, feature_set in CLASSIFIERS:
            x_train, y_train = task_rows(train, negative, feature_set)
            x_test, y_test = task_rows(test, negative, feature_set)
            if classifier == "logistic":
                model = fit_logistic(x_train, y_train)
                score = lambda x, model=model: predict(model, x)  # noqa: E731
            else:
                score = fit_mlp(x_train, y_train)
            threshold = best_f1_threshold(score(x_train), y_train)
            test_scores = score(x_test)
            name = f"{classifier} on {feature_set}"
            tasks[label][name] = {
                "roc_auc": roc_auc(test_scores, y_test),
                "average_precision": average_precision(test_scores, y_test),
                **scores_at(test_scores, y_test, threshold),
                "test_pigment_pixels": int(y_test.sum()),
                "test_other_pixels": int((~y_test).sum()),
                "test_prevalence": float(y_test.mean())}
            row = tasks[label][name]
            print(f"{label:28s} {name:26s} AUC {row['roc_auc']:.3f} AP "
                  f"{row['average_precision']:.3f} P {row['precision']:.3f} R "
                  f"{row['recall']:.3f} F1 {row['f1']:.3f}", file=sys.stderr)
    pigment_total = sum(p["pigment_he_pixels"] for p in pairs)
    record = {
        "benchmark": "pigment_in_af",
        "command": common.command_line(),
        "machine": common.machine(),
        "data": {"tissue": "lung", "simulated": True, "size_he_px": size, "factor": FACTOR,
                 "train_seeds": [p["seed"] for p in train],
                 "test_seeds": [p["seed"] for p in test]},
        "labels": {"pigment": f"AF pixel whose {FACTOR}x{FACTOR} block is >= "
                              f"{PIGMENT_MIN_FRACTION:.0%} simulator pigment",
                   "air": f"tissue < {AIR_MAX_TISSUE:.0%} of the block, no pigment",
                   "tissue": f"tissue >= {TISSUE_MIN_FRACTION:.0%} of the block, no pigment",
                   "everything else": "every AF pixel without pigment"},
        "pigment_area_in_mostly_pigment_af_pixels": (
            sum(p["pigment_he_pixels_resolved"] for p in pairs) / max(1, pigment_total)),
        "pigment_fraction_of_he_pixels": pigment_total / (count * size * size),
        "classifiers": {"logistic": "logistic regression, class-balanced, L2 1e-3, "
                                    "standardised features",
                        "mlp": "one hidden layer of 32 ReLU units, class-balanced, Adam "
                               "lr 1e-2, 400 full-batch epochs on <= 100,000 rows",
                        "threshold": "best F1 on the training pairs"},
        "feature_sets": {"darkness": "-mean of the 4 normalised channels",
                         "af_channels": "the 4 normalised channels",
                         "af_and_local": sorted(pairs[0]["maps"])},
        "tasks": tasks,
        "seconds": round(time.time() - start, 1),
    }
    common.write_result("pigment_in_af", record, args.results)


if __name__ == "__main__":
    main()
