"""Shared test settings."""

import os

# Tests use tiny models: one thread is fastest for them and keeps parallel runs from
# oversubscribing the cores (OpenMP threads spinning against each other).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import dataclasses  # noqa: E402

import pytest  # noqa: E402


def make_tiny_local_model(num_steps: int = 50, train_crop: int = 16, weight_noise: float = 0.05,
                          seed: int = 0):
    """A tiny local U-Net (per-pixel norm, 3 x 3 neighbourhood attention: the demo model's
    layout, a few thousand parameters) with random weights, so its samples depend on the
    noise (a fresh U-Net's zero-initialised output layer would ignore it)."""
    from napari_vstain.engine.model import ModelConfig, VStainModel

    torch.manual_seed(seed)
    config = ModelConfig.tiny(num_steps=num_steps, train_crop=train_crop)
    config.unet = dataclasses.replace(config.unet, norm="pixel", attention_window=3)
    model = VStainModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(weight_noise * torch.randn_like(parameter))
    return model


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (training may set another), restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_local_model():
    return make_tiny_local_model()


@pytest.fixture(scope="session")
def tiny_local_checkpoint(tmp_path_factory):
    """The tiny local U-Net (T = 1000, training crop 32) saved as a checkpoint:
    (path, content hash)."""
    from napari_vstain.engine.checkpoint import save_model

    path = tmp_path_factory.mktemp("tiny_local") / "tiny.safetensors"
    digest = save_model(make_tiny_local_model(num_steps=1000, train_crop=32,
                                              weight_noise=0.01), path)
    return path, digest


def huge_header_tiff(path, rows: int = 143_000, width: int = 70_000):
    """A ~10 kB deflate-compressed TIFF whose header declares a 4 x rows x width float32
    image (149 GiB by default): written 8 rows high, then its ImageLength tag is patched.
    (Never write such an image for real: the disk is shared.)"""
    import struct
    from pathlib import Path

    import numpy as np
    import tifffile

    path = Path(path)
    tifffile.imwrite(path, np.zeros((4, 8, width), np.float32), photometric="minisblack",
                     planarconfig="separate", compression="zlib", metadata=None)
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages.first.tags["ImageLength"]
        offset, code, byteorder = tag.valueoffset, int(tag.dtype), tif.byteorder
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack(byteorder + ("I" if code == 4 else "H"), rows))
    return path
