"""Simulated pairs and folders of image pairs: the SimulatedPair record and its metadata, the
per-pair seeds of a run, writing pairs as OME-TIFF files with a manifest.json (`write_pairs`)
and reading any folder of AF / H&E pairs, simulated or real (`load_pairs`)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .rendering import CHANNEL_NAMES, EMISSION_NM, NUMERICAL_APERTURE, READ_NOISE_E

SIMULATOR_VERSION = 1


@dataclass
class SimulatedPair:
    """One simulated pair. `he` (S, S, 3) uint8 at the high resolution; `af` (4, S/k, S/k)
    float32 camera counts; `pigment_mask` (S, S) bool in H&E coordinates; `metadata` with the
    pixel sizes (micrometres), factor k, seed, tissue, the misregistration and the sources."""

    he: np.ndarray
    af: np.ndarray
    pigment_mask: np.ndarray
    metadata: dict = field(default_factory=dict)


def _metadata(tissue, seed, factor, pixel_um, shift, exposure, he_source, **extra):
    return {
        "simulated": True,
        "af_simulated": True,
        "he_source": he_source,
        "tissue": tissue,
        "seed": seed,
        "factor": factor,
        "pixel_size_he": [pixel_um, pixel_um],
        "pixel_size_af": [pixel_um * factor, pixel_um * factor],
        "shift_he_px": list(shift),  # AF pixel at (y, x) shows H&E position (y+dy, x+dx)
        "shift_af_px": [shift[0] / factor, shift[1] / factor],
        "channel_names": list(CHANNEL_NAMES),
        "emission_nm": list(EMISSION_NM),
        "numerical_aperture": NUMERICAL_APERTURE,
        "photons_per_unit": list(exposure),
        "read_noise_e": READ_NOISE_E,
        "simulator_version": SIMULATOR_VERSION,
        **extra,
    }


def pair_seed(run_seed: int, index: int) -> int:
    """Seed of pair `index` of a run with seed `run_seed`: different run seeds give independent
    streams (numpy SeedSequence), so held-out data made with another seed is disjoint."""
    state = np.random.SeedSequence([int(run_seed), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 32 | int(state[1])) & (2 ** 63 - 1)  # fits a signed 64-bit int


def _pair_name(pair: SimulatedPair, index: int) -> str:
    name = pair.metadata.get("name") or f"{pair.metadata.get('tissue', 'pair')}_{index:03d}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"Pair name {name!r} must use letters, digits, '_', '.', '-' only.")
    return name


def write_pairs(out_dir, pairs, overwrite: bool = False) -> Path:
    """Write each pair as <name>_af.ome.tif, <name>_he.ome.tif, <name>_pigment.ome.tif and a
    manifest.json listing them; returns the manifest path. Refuses to replace existing files
    unless `overwrite`."""
    from ..atomic import atomic_write
    from .io import write_ome_tiff

    out_dir = Path(out_dir)
    pairs = list(pairs)
    names = [_pair_name(pair, i) for i, pair in enumerate(pairs)]
    if len(set(names)) != len(names):
        raise ValueError("Two pairs have the same name; give each pair a distinct "
                         "metadata['name'].")
    manifest_path = out_dir / "manifest.json"
    planned = [manifest_path] + [out_dir / f"{n}_{part}.ome.tif" for n in names
                                 for part in ("af", "he", "pigment")]
    if not overwrite:
        existing = [str(p) for p in planned if p.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} already exists (and {len(existing) - 1} more); "
                                  "choose another folder or allow overwriting (--overwrite).")
    entries = []
    for name, pair in zip(names, pairs):
        meta = dict(pair.metadata, name=name)
        provenance = {"simulated_pair": meta}
        ps_af = tuple(meta["pixel_size_af"]) if "pixel_size_af" in meta else None
        ps_he = tuple(meta["pixel_size_he"]) if "pixel_size_he" in meta else None
        write_ome_tiff(out_dir / f"{name}_af.ome.tif", pair.af.astype(np.float32), "CYX",
                       pixel_size=ps_af, channel_names=list(CHANNEL_NAMES),
                       provenance=provenance, overwrite=overwrite)
        write_ome_tiff(out_dir / f"{name}_he.ome.tif", pair.he, "YXS", pixel_size=ps_he,
                       provenance=provenance, overwrite=overwrite)
        write_ome_tiff(out_dir / f"{name}_pigment.ome.tif", pair.pigment_mask.astype(np.uint8),
                       "YX", pixel_size=ps_he, provenance=provenance, overwrite=overwrite)
        entries.append({
            "name": name, "af": f"{name}_af.ome.tif", "he": f"{name}_he.ome.tif",
            "pigment": f"{name}_pigment.ome.tif", "tissue": meta.get("tissue"),
            "factor": meta.get("factor"), "seed": meta.get("seed"),
            "pixel_size_af": meta.get("pixel_size_af"), "pixel_size_he": meta.get("pixel_size_he"),
            "he_source": meta.get("he_source"), "shift_he_px": meta.get("shift_he_px"),
        })
    manifest = {"simulated": True, "simulator_version": SIMULATOR_VERSION, "pairs": entries}
    text = json.dumps(manifest, indent=2)
    atomic_write(manifest_path, lambda tmp: tmp.write_text(text), overwrite=overwrite)
    return manifest_path


def _read_mask(path: Path) -> np.ndarray:
    import tifffile

    return np.asarray(tifffile.imread(path)).squeeze() > 0


AF_FILE = re.compile(r"^(?P<stem>.+)_af\.(ome\.tiff?|tiff?)$", re.IGNORECASE)
HE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def _partner(folder: Path, stem: str, part: str):
    """The `<stem>_<part>.*` image beside an AF file (TIFF preferred), or None."""
    found = sorted((p for p in folder.glob(f"{_glob_escape(stem)}_{part}.*")
                    if p.is_file() and p.suffix.lower() in HE_SUFFIXES),
                   key=lambda p: (p.suffix.lower() not in (".tif", ".tiff"), p.name))
    return found[0] if found else None


MANIFEST_FILE = "manifest.json"
_NO_MANIFEST = "or remove it to load the *_af / *_he files by name"


def _is_str(value) -> bool:
    return isinstance(value, str)


def _is_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        bool(np.isfinite(value))


def _number_pair(positive: bool):
    return lambda value: (isinstance(value, list) and len(value) == 2
                          and all(_is_number(v) and (v > 0 or not positive) for v in value))


# The fields of a manifest entry that napari-vstain reads: field -> (required, test, what it
# must be). Optional fields may be null; other fields are kept as they are.
MANIFEST_FIELDS = {
    "af": (True, _is_text, "the AF image's file name"),
    "he": (True, _is_text, "the H&E image's file name"),
    "pigment": (False, _is_text, "the pigment mask's file name"),
    "name": (False, _is_str, "text"),
    "tissue": (False, _is_str, "text"),
    "he_source": (False, _is_str, "text"),
    "factor": (False, lambda v: _is_int(v) and v >= 1, "a whole number of at least 1"),
    "seed": (False, _is_int, "a whole number"),
    "pixel_size_af": (False, _number_pair(True), "two positive numbers [y, x] (micrometres)"),
    "pixel_size_he": (False, _number_pair(True), "two positive numbers [y, x] (micrometres)"),
    "shift_he_px": (False, _number_pair(False), "two numbers [dy, dx]"),
}
FILE_FIELDS = ("af", "he", "pigment")


def _entry_label(manifest_path: Path, index: int, entry) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    return f"{manifest_path} entry {index + 1}" + (f" ({name!r})" if _is_text(name) else "")


def _manifest_file(folder: Path, text: str, allow_outside_paths: bool, where: str) -> Path:
    """The file a manifest field names, relative to the manifest's folder. A path that leaves
    the folder (absolute, or through "..") is refused unless `allow_outside_paths`: a manifest
    handed on with a folder must not make a program read files elsewhere on the machine.
    (A symbolic link inside the folder is the folder owner's own choice and is followed.)"""
    relative = Path(text)
    outside = relative.is_absolute() or bool(relative.anchor) or \
        os.path.normpath(text).split(os.sep)[0] == ".."
    if outside and not allow_outside_paths:
        raise ValueError(f"{where} points outside {folder} ({text!r}); name a file inside the "
                         "folder, or pass --allow-outside-paths if you trust this manifest.")
    return folder / relative


def read_manifest(folder, allow_outside_paths: bool = False) -> list:
    """The checked entries of `folder`/manifest.json: dicts with every field of the entry,
    "af_path", "he_path" (and "pigment_path" when that file exists) resolved against the
    folder, and "simulated" from the manifest. A wrong entry is refused with a sentence naming
    the manifest, the entry and the field, before any image is read."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8 or not JSON
        from ..explain import read_problem

        raise ValueError(f"{manifest_path} is not a valid pair manifest ({read_problem(exc)}); "
                         f"fix it, {_NO_MANIFEST}.") from None
    entries = manifest.get("pairs") if isinstance(manifest, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{manifest_path} is not a valid pair manifest (it needs a non-empty "
                         f"list \"pairs\" of {{\"af\": ..., \"he\": ...}} entries); fix it, "
                         f"{_NO_MANIFEST}.")
    checked = []
    for index, entry in enumerate(entries):
        label = _entry_label(manifest_path, index, entry)
        if not isinstance(entry, dict):
            raise ValueError(f"{label} is not an object with the fields \"af\" and \"he\"; fix "
                             f"it, {_NO_MANIFEST}.")
        for key, (required, test, what) in MANIFEST_FIELDS.items():
            value = entry.get(key)
            if value is None and not required:
                continue
            if key not in entry:
                raise ValueError(f"{label} has no field {key!r} ({what}); add it, "
                                 f"{_NO_MANIFEST}.")
            if not test(value):
                raise ValueError(f"{label}: field {key!r} must be {what}; got {value!r}.")
        record = dict(entry, simulated=bool(manifest.get("simulated", False)))
        for key in FILE_FIELDS:
            if entry.get(key) is None:
                continue
            path = _manifest_file(folder, entry[key], allow_outside_paths,
                                  f"{label}: field {key!r}")
            if path.is_file():
                record[f"{key}_path"] = str(path)
            elif key != "pigment":  # a missing pigment mask is optional
                raise FileNotFoundError(f"{label}: field {key!r} names {path}, which does not "
                                        f"exist; fix the entry, {_NO_MANIFEST}.")
        checked.append(record)
    return checked


def load_pairs(folder, allow_outside_paths: bool = False) -> list:
    """Read the pairs in `folder`: from manifest.json when present, otherwise every
    `<name>_af.*` with a matching `<name>_he.*` (and optional `<name>_pigment.*`). Each pair is
    a dict with numpy arrays "af" (C, h, w) float32 and "he" (Y, X, 3) uint8, optional
    "pigment" (Y, X) bool, "af_path" and "he_path", and the manifest fields (or "name" only).
    Manifest entries that name files outside `folder` are refused unless
    `allow_outside_paths`."""
    from .io import read_af, read_rgb

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of image pairs.")
    pairs = []
    if (folder / MANIFEST_FILE).is_file():
        for record in read_manifest(folder, allow_outside_paths):
            pair = dict(record)
            pair["af"] = read_af(record["af_path"]).data
            pair["he"] = read_rgb(record["he_path"]).data
            if "pigment_path" in record:
                pair["pigment"] = _read_mask(Path(record["pigment_path"]))
            pairs.append(pair)
        return pairs
    for af_path in sorted(folder.iterdir()):
        match = AF_FILE.match(af_path.name)
        if not match or not af_path.is_file():
            continue
        stem = match.group("stem")
        he_path = _partner(folder, stem, "he")
        if he_path is None:
            raise FileNotFoundError(f"{af_path.name} has no matching {stem}_he image (TIFF, "
                                    f"PNG or JPEG) in {folder}; add it or move the AF image.")
        pair = {"name": stem, "af": read_af(af_path).data, "he": read_rgb(he_path).data,
                "af_path": str(af_path), "he_path": str(he_path)}
        pigment_path = _partner(folder, stem, "pigment")
        if pigment_path is not None:
            pair["pigment"] = _read_mask(pigment_path)
        pairs.append(pair)
    if not pairs:
        raise FileNotFoundError(f"No image pairs in {folder}: expected manifest.json or files "
                                "named <name>_af.ome.tif and <name>_he.ome.tif.")
    return pairs


def _glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)
