"""Nothing lost and no tracebacks: every command ends an error with one sentence that says what
was wrong and what to do (exit status 2), a bug with "internal error" (exit status 1), and
shows a traceback only under --debug. Inputs are never changed."""

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import huge_header_tiff

from napari_vstain import cli
from napari_vstain.data import io, register, simulate
from napari_vstain.data.io import InputError, write_ome_tiff
from napari_vstain.data.simulate import simulate_pair
from napari_vstain.explain import (explain, format_bytes, os_error_sentence,
                                   record_problem)

SIZE, FACTOR = 128, 4


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A real simulated lung pair on disk: the H&E image (0.5 um) and its AF stack (2 um)."""
    folder = tmp_path_factory.mktemp("errors_cli")
    pair = simulate_pair("lung", SIZE, FACTOR, seed=0)
    he = write_ome_tiff(folder / "he.ome.tif", pair.he, "YXS", pixel_size=(0.5, 0.5))
    af = write_ome_tiff(folder / "af.ome.tif", pair.af, "CYX", pixel_size=(2.0, 2.0))
    return {"he": he, "af": af}


def digests(*paths) -> dict:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def vstain(capsys, *words) -> tuple:
    """Run the command in this process: (exit status, standard error)."""
    status = cli.main([str(word) for word in words])
    err = capsys.readouterr().err
    assert "Traceback" not in err or "--debug" in words, err
    return status, err


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"vstain {command}:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- the error boundary: OSError by errno ---------------------------------------------------

@pytest.mark.parametrize("code, words", [
    (errno.EACCES, "Permission denied for {path}; check the permissions"),
    (errno.EPERM, "Permission denied for {path}"),
    (errno.EROFS, "{path} is on a read-only file system; write the output to another"),
    (errno.ENOSPC, "No space left on the disk of {path}"),
    (errno.ENOENT, "{path} does not exist; check the path."),
    (errno.EISDIR, "{path} is a folder, not a file"),
    (errno.ENOTDIR, "{path} cannot be used: a part of the path is a file, not a folder"),
    (errno.EEXIST, "{path} already exists; choose another name"),
    (errno.ENAMETOOLONG, "The path {path} is too long"),
    (errno.EIO, "Input/output error at {path}"),
    (errno.EMFILE, "Too many files are open"),
    (errno.ENOMEM, "Ran out of memory; use a smaller --size"),
    (errno.ESTALE, "({path}); check the path and the disk"),
])
def test_every_os_error_becomes_one_sentence_naming_the_path(code, words, tmp_path, capsys,
                                                             monkeypatch):
    path = tmp_path / "somewhere" / "file.tif"

    def fail(args):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(simulate, "run_cli", fail)
    status, err = vstain(capsys, "simulate", "--out", tmp_path / "out")
    line = one_error_line(err, "simulate")
    assert status == 2
    assert line.startswith("vstain simulate: error: ")
    assert words.format(path=path) in line
    assert "[Errno" not in line and "internal error" not in line


def test_an_os_error_with_two_paths_names_both(tmp_path, capsys, monkeypatch):
    def fail(args):
        raise OSError(errno.EXDEV, "Invalid cross-device link", "/a/tmp.tif", None, "/b/out.tif")

    monkeypatch.setattr(simulate, "run_cli", fail)
    status, err = vstain(capsys, "simulate", "--out", tmp_path / "out")
    assert status == 2 and "/a/tmp.tif -> /b/out.tif" in err


def test_real_os_errors_name_the_path(tmp_path, capsys, images):
    before = digests(images["he"], images["af"])
    # a file where simulate needs a folder, and a path through a file
    status, err = vstain(capsys, "simulate", "--count", "1", "--size", "32", "--out",
                         images["he"])
    assert status == 2 and "is a file, but a folder is needed; choose another --out" in err
    status, err = vstain(capsys, "register", images["he"], images["af"], "--out",
                         Path(images["he"]) / "registered.ome.tif")
    assert status == 2
    assert f"{images['he']} is a file, not a folder; choose another --out" in err
    assert "[Errno" not in err
    assert digests(images["he"], images["af"]) == before


def test_a_sentence_raised_as_os_error_is_shown_as_it_is(tmp_path, capsys, monkeypatch):
    def fail(args):
        raise FileExistsError(f"{tmp_path} already holds files; choose another --out.")

    monkeypatch.setattr(simulate, "run_cli", fail)
    status, err = vstain(capsys, "simulate", "--out", tmp_path / "out")
    assert status == 2 and err.strip() == \
        f"vstain simulate: error: {tmp_path} already holds files; choose another --out."


# ---- the error boundary: memory ------------------------------------------------------------

@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 4294967296 bytes. Error code 12"),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total)"),
])
def test_out_of_memory_suggests_smaller_tiles_batches_and_fewer_samples(error, tmp_path, capsys,
                                                                        monkeypatch):
    from napari_vstain import stain

    def fail(args):
        raise error

    monkeypatch.setattr(stain, "run_cli", fail)
    status, err = vstain(capsys, "stain", tmp_path / "af.tif", "--out", tmp_path / "o.ome.tif")
    line = one_error_line(err, "stain")
    assert status == 2
    assert "Ran out of memory" in line
    assert "smaller tiles (--tile), a smaller --batch-size or fewer samples (--samples)" in line
    if "4294967296" in str(error):
        assert "(it asked for 4.0 GiB more)" in line
    assert "DefaultCPUAllocator" not in line and "alloc_cpu" not in line


def test_a_real_numpy_allocation_failure_is_out_of_memory(tmp_path, capsys, monkeypatch):
    def allocate(args):
        return np.ones((2**40, 2**20), np.uint8).sum()  # 1 EiB: numpy refuses at once

    monkeypatch.setattr(simulate, "run_cli", allocate)
    status, err = vstain(capsys, "simulate", "--out", tmp_path / "out")
    assert status == 2 and "Ran out of memory (it asked for 1.00 EiB more); use a smaller " \
        "--size" in err


# ---- the error boundary: bugs, --debug, interrupts ------------------------------------------

@pytest.mark.parametrize("error, shown", [
    (KeyError("config"), "internal error (KeyError): 'config'"),
    (ValueError("invalid literal for int() with base 10: 'x'"),
     "internal error (ValueError): invalid literal for int() with base 10: 'x'"),
    (IndexError("index -1 is out of bounds for axis 0 with size 0"),
     "internal error (IndexError): index -1 is out of bounds"),
    (TypeError("unsupported operand type(s) for +: 'int' and 'str'"),
     "internal error (TypeError)"),
])
def test_unexpected_errors_are_internal_with_status_1(error, shown, tmp_path, capsys,
                                                      monkeypatch):
    def fail(args):
        raise error

    monkeypatch.setattr(simulate, "run_cli", fail)
    status, err = vstain(capsys, "simulate", "--out", tmp_path / "out")
    line = one_error_line(err, "simulate")
    assert status == 1
    assert line.startswith(f"vstain simulate: {shown}")
    assert line.endswith("; rerun with --debug and report it")


def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path, capsys, monkeypatch):
    def fail(args):
        raise KeyError("config")

    monkeypatch.setattr(simulate, "run_cli", fail)
    for words in (["--debug", "simulate", "--out", str(tmp_path)],
                  ["simulate", "--out", str(tmp_path), "--debug"]):
        status, err = vstain(capsys, *words)
        assert status == 1
        assert "Traceback (most recent call last)" in err and "KeyError: 'config'" in err
        assert "internal error (KeyError): 'config'; report it with the traceback above" in err
    # user errors keep their status and sentence under --debug
    monkeypatch.undo()
    status, err = vstain(capsys, "--debug", "simulate", "--out", tmp_path, "--count", "0")
    assert status == 2 and "vstain simulate: error: --count must be from 1 to 100,000" in err


def test_interrupt_keeps_status_130(tmp_path, capsys, monkeypatch):
    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(simulate, "run_cli", interrupt)
    status, err = vstain(capsys, "simulate", "--out", tmp_path)
    assert status == 130 and err.strip() == "vstain simulate: interrupted"


def test_a_missing_dependency_says_what_to_install(tmp_path, capsys, monkeypatch):
    def fail(args):
        raise ModuleNotFoundError("No module named 'skimage'", name="skimage")

    monkeypatch.setattr(simulate, "run_cli", fail)
    status, err = vstain(capsys, "simulate", "--out", tmp_path)
    assert status == 2 and "needs the Python package skimage" in err \
        and "pip install skimage" in err


def test_explain_tells_sentences_from_raw_text():
    assert explain(ValueError("--count must be at least 1, not 0.")).status == 2
    assert explain(ValueError("could not convert string to float: 'a'")).internal
    assert explain(ValueError("math domain error")).internal  # not a sentence
    assert explain(InputError("anything the readers say")).status == 2
    assert os_error_sentence(OSError(errno.EACCES, "Permission denied")) == (
        "Permission denied for a file; check the permissions of the file and its folder, or "
        "use another location.")
    assert format_bytes(149.16 * 2**30) == "149.2 GiB"


def test_stored_record_problems_are_words_not_python_text():
    assert record_problem(KeyError("config")) == "its entry 'config' is missing"
    with pytest.raises(json.JSONDecodeError) as info:
        json.loads("")
    assert record_problem(info.value) == "it is not valid JSON"
    assert record_problem(TypeError("__init__() got an unexpected keyword argument 'x'")) == \
        "an entry has an unexpected name or type"
    assert record_problem(ValueError("invalid literal for int() with base 10: 'x'")) == \
        "an entry has a value that cannot be used"


# ---- inputs: folders, pipes, huge images, raw texts ------------------------------------------

def test_a_folder_given_as_an_image_says_it_is_a_folder(tmp_path, capsys, images):
    folder = tmp_path / "slides"
    folder.mkdir()
    for words in (["register", folder, images["af"]], ["register", images["he"], folder]):
        status, err = vstain(capsys, *words, "--out", tmp_path / "r.ome.tif")
        assert status == 2
        assert f"{folder} is a folder, not a file; give the image file itself" in err
        assert "does not exist" not in err
    assert not (tmp_path / "r.ome.tif").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_pipe_given_as_an_image_is_not_a_regular_file(tmp_path, capsys, images):
    pipe = tmp_path / "he.fifo"
    os.mkfifo(pipe)
    status, err = vstain(capsys, "register", pipe, images["af"], "--out", tmp_path / "r.tif")
    assert status == 2
    assert f"{pipe} is not a regular file but a named pipe (FIFO)" in err
    with pytest.raises(InputError, match="is not a regular file but a character device"):
        io.read_af("/dev/null")


def test_an_image_declared_larger_than_memory_is_refused_from_its_header(tmp_path, images):
    """The real command, in its own process: a 10 kB file declaring 149 GiB of pixels."""
    huge = huge_header_tiff(tmp_path / "huge.tif")
    assert huge.stat().st_size < 100_000
    before = digests(huge, images["he"])
    result = subprocess.run(
        [sys.executable, "-m", "napari_vstain.cli", "register", str(images["he"]), str(huge),
         "--out", str(tmp_path / "r.ome.tif"), "--factor", "4"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = one_error_line(result.stderr, "register")
    assert "4 x 143000 x 70000 image (float32) that needs 149.2 GiB of memory decoded" in line
    assert "GiB available" in line and "region by region" in line
    assert "`vstain stain` does that for AF slides" in line
    assert "truncated" not in line and "damaged" not in line
    assert digests(huge, images["he"]) == before and not (tmp_path / "r.ome.tif").exists()


def test_a_small_deflate_tiff_that_expands_past_memory_is_refused_before_decoding(
        tmp_path, capsys, monkeypatch, images):
    path = tmp_path / "zeros.tif"
    tifffile.imwrite(path, np.zeros((4, 1024, 1024), np.float32), compression="zlib",
                     photometric="minisblack")
    assert path.stat().st_size < 200_000  # 16 MiB of pixels
    monkeypatch.setattr(io, "available_memory", lambda: 4 * 2**20)
    read_series = io._read_series

    def decode(series, source):
        assert source != path, "decoded although it does not fit in memory"
        return read_series(series, source)

    monkeypatch.setattr(io, "_read_series", decode)
    before = digests(path)
    status, err = vstain(capsys, "register", images["he"], path, "--out", tmp_path / "r.tif",
                         "--factor", "4")
    assert status == 2
    assert "that needs 16.0 MiB of memory decoded, more than the 4.0 MiB available" in err
    assert "truncated" not in err
    assert digests(path) == before
    # PNG / JPEG are checked from their header too
    png = tmp_path / "big.png"
    Image.fromarray(np.zeros((2048, 1024, 3), np.uint8)).save(png)
    with pytest.raises(InputError, match=r"2048 x 1024 x 3 image \(uint8\) that needs 6.0 MiB"):
        io.read_rgb(png)


def test_running_out_of_memory_while_decoding_is_not_called_damage(tmp_path, capsys,
                                                                   monkeypatch, images):
    def decode(series, source):
        return np.ones((2**40, 2**20), np.uint8)  # numpy's MemoryError

    monkeypatch.setattr(io, "_read_series", decode)
    status, err = vstain(capsys, "register", images["he"], images["af"], "--out",
                         tmp_path / "r.tif")
    assert status == 2 and "Ran out of memory" in err
    assert "truncated" not in err and "damaged" not in err


def test_available_memory_reads_the_system(monkeypatch):
    available = io.available_memory()
    assert available is None or available > 2**20


def test_readers_never_show_raw_python_text(tmp_path, images, monkeypatch):
    # damaged provenance JSON
    path = write_ome_tiff(tmp_path / "p.ome.tif", np.zeros((8, 8), np.float32), "YX",
                          provenance={"a": 1})
    raw = path.read_bytes()
    damaged = tmp_path / "damaged_json.ome.tif"
    start = raw.index(b"{&quot;a&quot;")
    damaged.write_bytes(raw[:start] + b"{{{{" + raw[start + 4:])
    with pytest.raises(InputError) as info:
        io.read_provenance(damaged)
    assert "not valid JSON" in str(info.value) and "Expecting" not in str(info.value)
    # damaged OME-XML
    xml_damaged = tmp_path / "damaged_xml.ome.tif"
    start = raw.index(b"<OME")
    xml_damaged.write_bytes(raw[:start] + b"<<<<" + raw[start + 4:])
    with pytest.raises(InputError) as info:
        io.read_af(xml_damaged)
    assert "damaged (not well-formed XML)" in str(info.value)
    assert "invalid token" not in str(info.value) and "line 1" not in str(info.value)
    # a TIFF that tifffile refuses, and one it cannot decode
    fake = tmp_path / "fake.tif"
    fake.write_bytes(b"II*\x00" + b"\xff" * 64)
    with pytest.raises(InputError) as info:
        io.read_af(fake)
    assert str(info.value).endswith("truncated TIFF file); copy or export it again.")
    cut = tmp_path / "cut.tif"
    tifffile.imwrite(cut, np.ones((4, 64, 64), np.uint16), photometric="minisblack",
                     compression="zlib")
    cut.write_bytes(cut.read_bytes()[:-600])
    with pytest.raises(InputError) as info:
        io.read_af(cut)
    assert "tifffile" not in str(info.value) and "Error" not in str(info.value)
    assert str(info.value).endswith("copy or export it again.")
    # permission denied, as the system says it (tests may run as root, so it is simulated)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(images["af"]))

    monkeypatch.setattr(tifffile, "TiffFile", denied)
    with pytest.raises(InputError) as info:
        io.read_af(images["af"])
    assert str(info.value) == (f"Permission denied for {images['af']}; check the permissions "
                               "of the file and its folder, or use another location.")


# ---- register: options checked up front -----------------------------------------------------

@pytest.mark.parametrize("option, value, words", [
    ("--factor", "1000", "--factor must be a whole number from 1 to 32"),
    ("--factor", "0", "--factor must be a whole number from 1 to 32"),
    ("--factor", "-4", "--factor must be a whole number from 1 to 32"),
    ("--min-score", "nan", "--min-score must be a number from 0 to 1"),
    ("--min-score", "inf", "--min-score must be a number from 0 to 1"),
    ("--min-score", "-0.1", "--min-score must be a number from 0 to 1"),
    ("--min-score", "1.5", "--min-score must be a number from 0 to 1"),
])
def test_register_refuses_bad_numbers_before_reading(option, value, words, tmp_path, capsys,
                                                     monkeypatch, images):
    def no_reading(*args, **kwargs):
        raise AssertionError("an image was read before the options were checked")

    monkeypatch.setattr(io, "read_rgb", no_reading)
    monkeypatch.setattr(io, "read_af", no_reading)
    before = digests(images["he"], images["af"])
    out = tmp_path / "r.ome.tif"
    status, err = vstain(capsys, "register", images["he"], images["af"], "--out", out,
                         option, value)
    assert status == 2 and words in one_error_line(err, "register")
    assert digests(images["he"], images["af"]) == before and not out.exists()


def test_register_refuses_a_factor_that_makes_the_field_far_too_large(tmp_path, capsys,
                                                                      images):
    status, err = vstain(capsys, "register", images["he"], images["af"], "--out",
                         tmp_path / "r.tif", "--factor", "30")
    assert status == 2
    assert "is far too small for the fixed field of 960 x 960 px (32 x 32 AF pixels at " \
           "factor 30)" in err and "Check the factor" in err


def test_register_function_refuses_nan_scores_and_bad_settings(images):
    he = io.read_rgb(images["he"]).data
    af = io.read_af(images["af"]).data
    for bad in (float("nan"), float("inf"), -0.5, 2.0, "high"):
        with pytest.raises(register.RegistrationFailed, match="min_score must be a number "
                           "from 0 to 1"):
            register.register(he, af, "af", factor=FACTOR, min_score=bad)
    for bad in (1000, 2.5, float("nan"), 0):
        with pytest.raises(register.RegistrationFailed, match="factor must be a whole number"):
            register.register(he, af, "af", factor=bad)
    with pytest.raises(register.RegistrationFailed, match="elastic_spacing must be a positive"):
        register.register(he, af, "af", factor=FACTOR, elastic=True, elastic_spacing=-1)


def test_register_never_replaces_its_inputs(tmp_path, capsys, images):
    before = digests(images["he"], images["af"])
    for out in (images["he"], images["af"]):
        status, err = vstain(capsys, "register", images["he"], images["af"], "--out", out,
                             "--overwrite", "--factor", "4")
        assert status == 2 and "is also an input of this run" in err
    assert digests(images["he"], images["af"]) == before


def test_simulate_refuses_a_negative_seed(tmp_path, capsys):
    status, err = vstain(capsys, "simulate", "--out", tmp_path / "s", "--seed", "-1")
    assert status == 2 and "--seed must be 0 or more, not -1." in err
    assert not (tmp_path / "s").exists()


def test_manifest_of_a_refused_run_is_untouched(tmp_path, capsys):
    """simulate into a folder that holds files: refused, the files as they were."""
    folder = tmp_path / "pairs"
    assert vstain(capsys, "simulate", "--out", folder, "--count", "1", "--size", "32")[0] == 0
    files = sorted(folder.iterdir())
    before = digests(*files)
    status, err = vstain(capsys, "simulate", "--out", folder, "--count", "1", "--size", "32",
                         "--seed", "3")
    assert status == 2 and "already exist" in err
    assert digests(*files) == before
    assert json.loads((folder / "manifest.json").read_text())
