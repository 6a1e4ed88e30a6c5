"""The torch thread count (threads.py): --threads wins, then OMP_NUM_THREADS, then the cores
the load average says others leave free; and the commands that take --threads."""

import argparse
import os
import subprocess
import sys

import pytest

from napari_vstain.errors import UserError
from napari_vstain.threads import (ThreadChoice, add_threads_argument, choose_threads,
                                   threads_for)


def test_a_requested_count_wins():
    choice = choose_threads(3)
    assert choice == ThreadChoice(3, "asked for with --threads")
    assert choice.describe() == "3 torch threads (asked for with --threads)"
    assert choose_threads(1).describe() == "1 torch thread (asked for with --threads)"
    assert choose_threads(1024).count == 1024


@pytest.mark.parametrize("requested", [0, -2, 1025, 10**6, 2.5, "4", True])
def test_a_requested_count_outside_1_to_1024_is_refused(requested):
    with pytest.raises(UserError, match="--threads"):
        choose_threads(requested)


def test_omp_num_threads_is_respected_when_nothing_is_requested(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(None) == ThreadChoice(3, "OMP_NUM_THREADS=3")
    assert choose_threads(2).count == 2  # the flag is more specific than the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # unusable: chosen from the machine instead
    assert 1 <= choose_threads(None).count <= (os.cpu_count() or 1)


def test_without_a_request_the_count_fits_this_machine(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    choice = choose_threads(None)
    assert 1 <= choice.count <= len(os.sched_getaffinity(0))
    assert choice.reason


def test_an_idle_machine_gets_one_thread_per_core():
    assert threads_for(cpus=2, physical=2, load=0.1) == ThreadChoice(
        2, "one per core, machine idle: load 0.1 on 2 cores")
    assert threads_for(cpus=8, physical=8, load=0.0).count == 8


def test_busy_cores_are_left_to_others():
    assert threads_for(cpus=2, physical=2, load=1.9) == ThreadChoice(
        1, "machine busy: load 1.9 on 2 cores")
    assert threads_for(cpus=2, physical=2, load=1.0).count == 1
    assert threads_for(cpus=8, physical=8, load=3.0).count == 5
    assert threads_for(cpus=8, physical=8, load=2.2).count == 6  # 2.2 busy cores: 3 taken
    assert threads_for(cpus=8, physical=8, load=2.2).reason == \
        "machine busy: load 2.2 on 8 cores"


def test_small_load_counts_as_idle_and_heavy_load_still_leaves_one_thread():
    assert threads_for(cpus=4, physical=4, load=0.25).count == 4
    assert threads_for(cpus=4, physical=4, load=0.3).count == 3
    assert threads_for(cpus=2, physical=2, load=40.0).count == 1
    assert threads_for(cpus=1, physical=1, load=0.9).count == 1


def test_hyper_threads_count_once_and_the_load_is_spread_over_the_machine():
    # 8 logical CPUs on 4 physical cores: one thread per physical core.
    assert threads_for(cpus=8, physical=4, load=0.0) == ThreadChoice(
        4, "one per physical core, machine idle: load 0.0 on 8 cores")
    # A process allowed on 4 of 64 CPUs sees 4/64 of the load: load 16 is one busy CPU here.
    assert threads_for(cpus=4, physical=32, load=16.0, machine_cpus=64).count == 3
    assert threads_for(cpus=4, physical=32, load=16.0, machine_cpus=64).reason == \
        "machine busy: load 16.0 on 64 cores"


def test_without_a_load_average_one_thread_per_core():
    assert threads_for(cpus=6, physical=6, load=None) == ThreadChoice(
        6, "one per core; no load average on this system")


def test_the_argument_is_none_unless_given():
    parser = argparse.ArgumentParser()
    add_threads_argument(parser)
    assert parser.parse_args([]).threads is None
    assert parser.parse_args(["--threads", "2"]).threads == 2
    assert "load average" in parser.format_help()


def test_apply_threads_sets_torch():
    import torch

    from napari_vstain.engine.devices import apply_threads, use_threads

    previous = torch.get_num_threads()
    try:
        assert apply_threads(ThreadChoice(2, "test")) == 2
        assert torch.get_num_threads() == 2
        assert use_threads(1).count == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("command", ["demo", "evaluate", "train-cgan"])
def test_commands_list_threads_in_their_help(command):
    result = subprocess.run([sys.executable, "-m", "napari_vstain.cli", command, "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--threads N" in result.stdout
    assert "load average" in " ".join(result.stdout.split())


def test_a_bad_thread_count_is_one_sentence_from_the_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "napari_vstain.cli", "demo", "--threads",
                             "0", "--out", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("vstain demo: error: --threads must be from 1 to 1,024 "
                                     "threads; got 0.")
    assert not (tmp_path / "demo").exists()
