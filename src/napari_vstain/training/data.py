"""Training data: the simulated pairs (seeds >= TRAIN_SEED_START) or a folder of AF / H&E
pairs, prepared as training pairs, with the held-out validation pairs."""

from __future__ import annotations

from pathlib import Path

from .settings import TRAIN_SEED_START, VALIDATION_SEEDS, TrainSettings


def simulated_training_seeds(settings: TrainSettings) -> dict:
    """tissue -> the seeds of its simulated training pairs (all >= TRAIN_SEED_START)."""
    seeds, start = {}, TRAIN_SEED_START
    for tissue in settings.simulate:
        seeds[tissue] = list(range(start, start + settings.simulate_count))
        start += settings.simulate_count
    return seeds


def load_training_data(model_config, settings: TrainSettings) -> tuple[list, list, dict]:
    """(training pairs, validation pairs, a description of the data for the checkpoint)."""
    from ..data.patches import make_training_pair, register_pair

    k = model_config.factor

    def prepare(af, he, name):
        if settings.register:
            af, he = register_pair(af, he, k, name)
        return make_training_pair(af, he, model_config, name)

    if settings.simulate:
        from ..data.simulate import simulate_pair

        seeds = simulated_training_seeds(settings)
        train = [prepare(p.af, p.he, f"{tissue}-{seed}")
                 for tissue, tissue_seeds in seeds.items() for seed in tissue_seeds
                 for p in [simulate_pair(tissue, settings.simulate_size, k, seed)]]
        validation = [prepare(p.af, p.he, f"{tissue}-{seed}")
                      for tissue in settings.simulate
                      for seed in [VALIDATION_SEEDS[tissue]]
                      for p in [simulate_pair(tissue, settings.simulate_size, k, seed)]]
        description = {"source": "simulated", "tissues": list(settings.simulate),
                       "size": settings.simulate_size, "factor": k,
                       "registered": settings.register,
                       "train_seeds": {t: [s[0], s[-1]] for t, s in seeds.items()},
                       "validation_seeds": {t: VALIDATION_SEEDS[t] for t in settings.simulate},
                       "held_out_seeds": f"all seeds below {TRAIN_SEED_START}"}
        return train, validation, description

    from ..data.pairs import load_pairs

    folder = Path(settings.data)
    if not folder.is_dir():
        raise FileNotFoundError(f"No data folder at {folder}.")
    records = sorted(load_pairs(folder, allow_outside_paths=settings.allow_outside_paths),
                     key=lambda r: str(r.get("name", "")))
    if not records:
        raise ValueError(f"{folder} holds no AF / H&E pairs (files named <name>_af.tif and "
                         "<name>_he.tif, or a manifest.json).")
    for record in records:
        if record.get("factor") not in (None, k):
            raise ValueError(f"Pair {record.get('name')} in {folder} has factor "
                             f"{record['factor']} but the model is set to {k}; pass --factor "
                             f"{record['factor']}.")
    pairs = [prepare(r["af"], r["he"], str(r.get("name", ""))) for r in records]
    # With two or more pairs the last (by name) is held out for the validation images.
    train, validation = (pairs[:-1], pairs[-1:]) if len(pairs) > 1 else (pairs, pairs)
    description = {"source": str(folder.resolve()), "pairs": len(pairs), "factor": k,
                   "registered": settings.register,
                   "validation_pair": validation[0].name,
                   "validation_held_out": len(pairs) > 1}
    return train, validation, description
