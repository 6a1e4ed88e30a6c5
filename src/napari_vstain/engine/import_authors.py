"""Import the paper authors' published weights into a napari-vstain checkpoint.

The authors (Zhang et al., code at github Yijie-Zhang/Super-resolved-virtual-staining,
Apache-2.0) publish two PyTorch files per model: the U-Net (`ema_0.9999_220000.pt`) and the
shallow "compress" CNN (`ema_0.9999_220000_compress.pt`). Each is a plain state dict saved with
torch.save. What their code does, and how it maps onto ours:

- U-Net: improved-diffusion's UNetModel inside their SuperResModel: input = concat(x_t, y)
  (6 channels), 128 channels, mult (1,1,2,2,4,4), 2 res blocks per level, attention at
  downsample 16 and 32 and in the middle, 4 heads with the per-head [q; k; v] qkv layout,
  scale-shift time conditioning, learned up/down-sampling convolutions, GroupNorm(32). Our
  `UNet(UNetConfig.authors())` has the same parameter names (456 tensors, 124,056,707 values)
  and computes the same function, so the U-Net's keys need no renaming.
- CNN: conv3x3 4->64 + LeakyReLU(0.01), conv3x3 64->64 + LeakyReLU(0.01), conv3x3 64->320,
  conv3x3 320->1600, PixelShuffle(5), conv1x1 64->3: ours with other names and
  cnn_negative_slope = 0.01 (our default is 0.2).
- Time: they train with t in 0..T-1, m_t = t/T, delta_t = 2 m_t (1 - m_t), T = 1000, and
  give the network t itself: our convention, so no offset is applied. (Their sampling loop
  gives the network t - 1 for the state x_t, one step off their own training; we follow the
  training.) Objective: the network predicts m_t (y - x0) + sqrt(delta_t) eps and
  x0_hat = x_t - output (our "grad"); MSE loss; x0_hat is not clipped in their test scripts.
- Inputs: the low-resolution AF patch is z-scored with ONE mean and std over all four
  channels and pixels (our "zscore_joint"); the H&E target is RGB / 127.5 - 1.

The .pt files are pickles; they are read only with torch.load(weights_only=True), which
refuses anything but tensors and plain containers, so no code stored in them ever runs. Before
that, the sizes of the file's records are read from its zip directory (a .pt file is a zip
archive with one data/<n> entry per tensor storage) and a record larger than the largest weight
of the model, or records adding up to more than the whole model, are refused unread; the
numbers are then checked (floating point, no NaN or infinity) before anything is converted.
"""

from __future__ import annotations

import hashlib
import math
import re
import zipfile
from pathlib import Path

AUTHORS_REPOSITORY = "https://github.com/Yijie-Zhang/Super-resolved-virtual-staining"
AUTHORS_LICENSE = "Apache-2.0"

# Our DimensionMatchingCNN layer -> the authors' CompressCNN layer (same tensors, other names).
CNN_LAYER_NAMES = {
    "layers.0": "in_layers.0",
    "layers.2": "conv_before_upsample.0",
    "layers.4": "upsample.0",
    "layers.5": "upsample.1",
    "layers.7": "conv_last",
}
# Containers a weights file may wrap its state dict in (an EMA copy is preferred).
WRAPPER_KEYS = ("ema", "state_dict", "model")
DATA_PARALLEL_PREFIX = "module."
# Bytes a stored value may take (float64 copies of the weights are accepted and converted).
MAX_VALUE_BYTES = 8
# Zip entries other than tensor records (the pickle of names and shapes, version tags): the
# pickle of the authors' 456 tensors takes about 40 KB.
MAX_OTHER_ENTRY_BYTES = 16 * 2**20


def paper_config():
    """The ModelConfig of the authors' published 5x model."""
    from .config import ModelConfig, UNetConfig

    return ModelConfig(
        af_channels=4, factor=5, cnn_width=64, cnn_hidden=320, cnn_negative_slope=0.01,
        unet=UNetConfig.authors(), num_steps=1000, max_variance=1.0, objective="grad",
        loss="l2", clip_x0=False, af_normalisation="zscore_joint", train_crop=960,
        description=(f"The paper authors' published 5x model (EMA 0.9999, 220k iterations), "
                     f"imported from {AUTHORS_REPOSITORY} ({AUTHORS_LICENSE}). Expects "
                     "4-channel autofluorescence from their microscope, in their channel "
                     "order."))


def _unwrap(data, path: Path) -> dict:
    """The flat name -> tensor dict inside whatever their code (or a variant) saved."""
    import torch

    from .checkpoint import name_some

    for _ in range(3):  # e.g. {"ema": {"state_dict": {...}}}
        if not isinstance(data, dict) or all(isinstance(v, torch.Tensor) for v in data.values()):
            break
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(data.get(k), dict)), None)
        if wrapper is None:
            break
        data = data[wrapper]
    if not isinstance(data, dict):
        raise _checkpoint_error(f"{path} holds no state dict (a mapping of weight names to "
                                f"tensors) but a {type(data).__name__}.")
    if not data:
        raise _checkpoint_error(f"{path} holds an empty state dict: no weights.")
    not_tensors = [str(k) for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise _checkpoint_error(f"{path} is not a state dict: {len(not_tensors)} entries are "
                                f"not tensors ({name_some(not_tensors)}).")
    if all(str(k).startswith(DATA_PARALLEL_PREFIX) for k in data):
        data = {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in data.items()}
    return dict(data)


def _checkpoint_error(message: str):
    """The engine's CheckpointError (imported late: this module is loaded with the CLI, and
    the engine modules import torch)."""
    from .checkpoint import CheckpointError

    return CheckpointError(message)


def _check_record_sizes(path: Path, config) -> None:
    """Refuse, before torch reads it, a .pt file whose records (from the zip directory) could
    not be weights of `config`'s model: one larger than its largest weight, or all together
    more than the whole model (at MAX_VALUE_BYTES a value). A file in PyTorch's older non-zip
    format is held to the whole model's size."""
    unet, cnn = authors_shapes(config)
    sizes = [math.prod(shape) for shape in (*unet.values(), *cnn.values())]
    largest, total = max(sizes) * MAX_VALUE_BYTES, sum(sizes) * MAX_VALUE_BYTES
    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        if size > total + MAX_OTHER_ENTRY_BYTES:
            raise _checkpoint_error(f"{path} is {size:,} bytes, more than the authors' whole "
                                    f"model takes ({total:,} bytes), so it was not loaded; pass "
                                    "the authors' ema_0.9999_220000.pt and its _compress.pt.")
        return
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _checkpoint_error(f"{path} is not a readable PyTorch weights file ({exc}); it may "
                                "be truncated or of another format.") from None
    records = [e for e in entries if e.filename.split("/")[-2:-1] == ["data"]]
    for entry in entries:
        limit, what = ((largest, "the largest weight of the authors' model") if entry in records
                       else (MAX_OTHER_ENTRY_BYTES, "a weights file's index may take"))
        if entry.file_size > limit:
            raise _checkpoint_error(
                f"{path}: the record {entry.filename} holds {entry.file_size:,} bytes, more "
                f"than {what} ({limit:,} bytes), so the file was not loaded; pass the authors' "
                "ema_0.9999_220000.pt and its _compress.pt.")
    stored = sum(entry.file_size for entry in records)
    if stored > total:
        raise _checkpoint_error(
            f"{path} holds {stored:,} bytes of tensors in {len(records)} records, more than the "
            f"authors' whole model takes ({total:,} bytes), so it was not loaded; pass the "
            "authors' ema_0.9999_220000.pt and its _compress.pt.")


def load_authors_state(path, config=None) -> dict:
    """Read one of the authors' .pt files as a flat {name: tensor} dict, safely.

    The record sizes are checked against `config`'s model (default `paper_config()`) from the
    zip directory first; then only torch.load(weights_only=True) is used, so a file that would
    need to run code to load (a pickled object rather than plain tensors) is refused with
    CheckpointError; weights that are not floating point or not finite are refused too.
    """
    import pickle

    import torch

    from .checkpoint import check_weights

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No weights file at {path}.")
    _check_record_sizes(path, paper_config() if config is None else config)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needed = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        reason = (f"it would need to run code ({needed.group(1)}) to load" if needed
                  else "it is not a readable PyTorch tensor file")
        raise _checkpoint_error(
            f"{path} is not a plain weights file: {reason}, so it was not loaded. Pass the "
            "authors' state-dict files (ema_0.9999_220000.pt and its _compress.pt).") from None
    except Exception:  # torch's own texts ("pop from empty list", "[enforce fail ...]")
        raise _checkpoint_error(f"{path} is not a readable PyTorch weights file; it may be "
                                "truncated or of another format. Pass the authors' .pt "
                                "files (ema_0.9999_220000.pt and its _compress.pt).") from None
    state = _unwrap(data, path)
    check_weights(state, path)
    return state


def authors_shapes(config) -> tuple[dict, dict]:
    """The parameter names and shapes the authors' U-Net and CNN files must hold for `config`
    (the authors' names: ours for the U-Net, CompressCNN's for the CNN)."""
    import torch

    from .model import VStainModel

    with torch.device("meta"):  # names and shapes only; nothing allocated
        reference = VStainModel(config)
    unet = {name: tuple(t.shape) for name, t in reference.unet.state_dict().items()}
    cnn = {authors_cnn_name(name): tuple(t.shape)
           for name, t in reference.cnn.state_dict().items()}
    return unet, cnn


def authors_cnn_name(our_name: str) -> str:
    layer, _, parameter = our_name.rpartition(".")
    return f"{CNN_LAYER_NAMES[layer]}.{parameter}"


def _our_cnn_name(authors_name: str) -> str:
    layer, _, parameter = authors_name.rpartition(".")
    ours = {theirs: ours for ours, theirs in CNN_LAYER_NAMES.items()}[layer]
    return f"{ours}.{parameter}"


def _check_names_and_shapes(label: str, state: dict, expected: dict) -> None:
    from .checkpoint import shape_problems

    problems = shape_problems({k: tuple(v.shape) for k, v in state.items()}, expected)
    if problems:
        raise _checkpoint_error(f"The {label} does not match the paper's model: "
                                + "; ".join(problems) + ". Nothing was imported.")


def authors_to_vstain(unet_state: dict, cnn_state: dict, config) -> dict:
    """Check both state dicts name for name and shape, and return our model's state dict."""
    unet_expected, cnn_expected = authors_shapes(config)
    if "time_embed.0.weight" in cnn_state and "conv_last.weight" in unet_state:
        raise _checkpoint_error("The two files are swapped: pass the U-Net file first and the "
                                "CNN file (the one ending in _compress.pt) second.")
    _check_names_and_shapes("U-Net file", unet_state, unet_expected)
    _check_names_and_shapes("CNN file (_compress.pt)", cnn_state, cnn_expected)
    # Their EMA files hold nn.Parameter copies: keep only the values, as float32.
    state = {f"unet.{name}": tensor.detach().float() for name, tensor in unet_state.items()}
    state.update({f"cnn.{_our_cnn_name(name)}": tensor.detach().float()
                  for name, tensor in cnn_state.items()})
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def import_weights(unet_pt, cnn_pt, out_path, overwrite: bool = False, config=None) -> Path:
    """Convert the authors' U-Net and CNN .pt files into one napari-vstain checkpoint.

    `config` defaults to `paper_config()` (other values are for tests and variants of their
    code). Refuses files with missing, unexpected or wrongly shaped weights, naming them.
    """
    from ..settings import AUTHORS_CONVENTION
    from .checkpoint import save_model
    from .model import VStainModel

    unet_pt, cnn_pt, out_path = Path(unet_pt), Path(cnn_pt), Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} already exists; choose another name or allow "
                              "overwriting (--overwrite).")
    config = paper_config() if config is None else config
    state = authors_to_vstain(load_authors_state(unet_pt, config),
                              load_authors_state(cnn_pt, config), config)
    model = VStainModel(config)
    model.load_state_dict(state, strict=True)
    extra = {"source": f"{AUTHORS_REPOSITORY}: U-Net {unet_pt.name}, CNN {cnn_pt.name}",
             "license": AUTHORS_LICENSE,
             "source_sha256": {unet_pt.name: _sha256(unet_pt), cnn_pt.name: _sha256(cnn_pt)},
             # the sampler convention that reproduces their published images
             "sampling_convention": AUTHORS_CONVENTION}
    save_model(model.eval(), out_path, extra=extra, overwrite=overwrite)
    return out_path


def configure_cli(parser) -> None:
    parser.add_argument("unet_pt", metavar="UNET.pt",
                        help="the authors' U-Net weights, e.g. ema_0.9999_220000.pt")
    parser.add_argument("cnn_pt", metavar="CNN.pt",
                        help="the authors' CNN weights, e.g. ema_0.9999_220000_compress.pt")
    parser.add_argument("--out", required=True, metavar="MODEL.safetensors",
                        help="the napari-vstain checkpoint to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace MODEL.safetensors if it exists")


def run_cli(args) -> int:
    path = import_weights(args.unet_pt, args.cnn_pt, args.out, overwrite=args.overwrite)
    print(f"Wrote {path}: the authors' 5x model ({AUTHORS_LICENSE}). It expects 4-channel "
          "autofluorescence from their microscope.")
    return 0
