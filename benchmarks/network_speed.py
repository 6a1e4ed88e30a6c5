"""The U-Net's CPU time per network call, before and after the fused per-pixel norm and the
shifted-window neighbourhood attention, and the torch thread count on a busy machine.

Part 1: one network call of the demo model (a batch of 4 target tiles of 128 x 128 px: x_t, the
CNN's y and the upsampled AF, 10 channels) at 1 torch thread, median over several calls, with
the formulas the model used before (PixelNorm as var_mean plus elementwise ops, attention by
unfold plus einsum; re-created here by swapping them in) and now, interleaved call by call in
one run so the machine's load touches both alike; the largest difference of the outputs too.

Part 2: 1 against 2 torch threads, first as the machine is, then with a busy-loop process
pinned to one core (as another user's job would be), and what threads.choose_threads picks.

    python benchmarks/network_speed.py [--quick] [--tiny] [--checkpoint FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH, TILE = 4, 128  # network batch and target tile side (tiling's default tile for the demo)
TOLERANCE = 1e-5  # largest allowed output difference between the old and new formulas
# The busy loop stops by itself after this long, should this script die without ending it.
BUSY_LOOP = ("import os, sys, time\n"
             "os.sched_setaffinity(0, {int(sys.argv[1])})\n"
             "end = time.monotonic() + float(sys.argv[2])\n"
             "while time.monotonic() < end:\n"
             "    pass\n")


# ---- the formulas the model used before --------------------------------------------------

def old_pixel_norm_forward(self, x):
    """PixelNorm.forward as first written: var_mean over the channels, elementwise ops."""
    import torch

    h = x.float()
    var, mean = torch.var_mean(h, dim=1, unbiased=False, keepdim=True)
    h = (h - mean) * torch.rsqrt(var + self.eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (h * self.weight.view(shape) + self.bias.view(shape)).type(x.dtype)


def old_neighbourhood_attention(q, k, v, window: int):
    """neighbourhood_attention as first written: unfold each pixel's window, einsum."""
    import torch
    import torch.nn.functional as F

    b, d, h, w = q.shape
    pad = window // 2
    keys = F.unfold(k, window, padding=pad).view(b, d, window * window, h * w)
    values = F.unfold(v, window, padding=pad).view(b, d, window * window, h * w)
    inside = F.unfold(torch.ones(1, 1, h, w, dtype=q.dtype, device=q.device), window,
                      padding=pad).view(1, window * window, h * w) > 0
    logits = torch.einsum("bdn,bdkn->bkn", q.reshape(b, d, h * w), keys) / math.sqrt(d)
    weights = logits.masked_fill(~inside, float("-inf")).softmax(dim=1)
    return torch.einsum("bkn,bdkn->bdn", weights, values).view(b, d, h, w)


@contextlib.contextmanager
def formulas(old_norm: bool, old_attention: bool):
    """Run the U-Net with the old norm and / or attention swapped in; restores them after."""
    from napari_vstain.engine import unet

    new_forward, new_attention = unet.PixelNorm.forward, unet.neighbourhood_attention
    if old_norm:
        unet.PixelNorm.forward = old_pixel_norm_forward
    if old_attention:
        unet.neighbourhood_attention = old_neighbourhood_attention
    try:
        yield
    finally:
        unet.PixelNorm.forward, unet.neighbourhood_attention = new_forward, new_attention


VARIANTS = (("before: var_mean norm, unfold attention", True, True),
            ("fused layer_norm, unfold attention", False, True),
            ("after: fused layer_norm, shifted-window attention", False, False))


# ---- measuring ---------------------------------------------------------------------------

def network_inputs(model):
    """One network call's arguments for a batch of BATCH target tiles of TILE px."""
    import torch

    torch.manual_seed(0)
    k = model.config.factor
    af = torch.randn(BATCH, model.config.af_channels, TILE // k, TILE // k).contiguous(
        memory_format=torch.channels_last)  # the layout tiling hands the model
    with torch.no_grad():
        y = model.condition(af).float()
    x_t = torch.randn_like(y)
    t = torch.full((BATCH,), 500, dtype=torch.long)
    return x_t, y, t, model._extra_condition(af, y.shape[-2:])


def timed_call(model, inputs):
    """(output, wall seconds, CPU seconds of this process) of one network call."""
    import torch

    with torch.no_grad():
        wall, cpu = time.perf_counter(), time.process_time()
        out = model.network(*inputs)
        return out, time.perf_counter() - wall, time.process_time() - cpu


def compare_formulas(model, inputs, calls: int) -> dict:
    """The variants interleaved call by call (the first round is a warm-up)."""
    wall = {label: [] for label, _, _ in VARIANTS}
    cpu = {label: [] for label, _, _ in VARIANTS}
    outputs = {}
    for round_ in range(calls + 1):
        for label, old_norm, old_attention in VARIANTS:
            with formulas(old_norm, old_attention):
                out, wall_s, cpu_s = timed_call(model, inputs)
            outputs[label] = out
            if round_:
                wall[label].append(wall_s)
                cpu[label].append(cpu_s)
    before, after = VARIANTS[0][0], VARIANTS[-1][0]
    rows = [{"variant": label,
             "median_cpu_ms": 1000 * statistics.median(cpu[label]),
             "median_wall_ms": 1000 * statistics.median(wall[label]),
             "cpu_ms": [round(1000 * s, 2) for s in cpu[label]],
             "max_abs_difference_to_before": float(
                 (outputs[label] - outputs[before]).abs().max())}
            for label, _, _ in VARIANTS]
    by_label = {row["variant"]: row for row in rows}
    return {"rows": rows,
            "speedup_cpu_time": (by_label[before]["median_cpu_ms"]
                                 / by_label[after]["median_cpu_ms"]),
            "max_abs_difference": by_label[after]["max_abs_difference_to_before"]}


def compare_thread_counts(model, inputs, calls: int) -> dict:
    """1 against 2 torch threads, interleaved; wall time (what the user waits for)."""
    import torch

    seconds = {1: [], 2: []}
    for round_ in range(calls + 1):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            _, wall_s, _ = timed_call(model, inputs)
            if round_:  # the first round warms up each thread pool
                seconds[threads].append(wall_s)
    torch.set_num_threads(1)
    one, two = (statistics.median(seconds[n]) for n in (1, 2))
    return {"median_ms_1_thread": 1000 * one, "median_ms_2_threads": 1000 * two,
            "two_threads_time_over_one": two / one,
            "faster": "1 thread" if one <= two else "2 threads"}


def thread_choice() -> dict:
    from napari_vstain.threads import choose_threads, load_average

    choice = choose_threads(None)
    return {"load_average_1min": load_average(), "count": choice.count,
            "reason": choice.reason}


def busy_loop(seconds: float) -> subprocess.Popen:
    """A process spinning on the last CPU this process may use (another user's job)."""
    cpu = sorted(os.sched_getaffinity(0))[-1]
    return subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(cpu), str(seconds)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--calls", type=int, default=None,
                        help="timed calls per variant (default 9; 3 with --quick); half as "
                             "many, at least 3, per thread count")
    args = parser.parse_args(argv)
    calls = args.calls or (3 if args.quick else 9)
    thread_calls = max(3, calls // 2)  # 2 threads on a busy core are slow: fewer calls
    started = time.perf_counter()
    common.setup_threads(args.threads)
    import torch

    from napari_vstain.threads import threads_for, usable_cpus, physical_cores

    model, model_text = common.load_benchmark_model(args)
    inputs = network_inputs(model)
    machine = common.machine()

    print(f"formulas: {calls} calls each at {torch.get_num_threads()} thread(s)",
          file=sys.stderr)
    network = compare_formulas(model, inputs, calls)
    for row in network["rows"]:
        print(f"  {row['variant']:52s} {row['median_cpu_ms']:7.1f} ms CPU per call, "
              f"max diff {row['max_abs_difference_to_before']:.2e}", file=sys.stderr)
    print(f"  speed-up {network['speedup_cpu_time']:.2f}x", file=sys.stderr)

    threads = {"cpus": usable_cpus(), "physical_cores": physical_cores(),
               "as_the_machine_is": {"choice": thread_choice()}}
    if threads["cpus"] < 2:
        threads["note"] = "one CPU: no 1 against 2 thread comparison"
    else:
        print("threads: 1 against 2, machine as it is", file=sys.stderr)
        threads["as_the_machine_is"].update(compare_thread_counts(model, inputs, thread_calls))
        print("threads: 1 against 2, with a busy loop on one core", file=sys.stderr)
        spinner = busy_loop(seconds=300)
        try:
            time.sleep(2.0)  # let it start spinning
            timing = compare_thread_counts(model, inputs, thread_calls)
            seen = thread_choice()  # the 1-minute load average catches up slowly
        finally:
            spinner.terminate()
            spinner.wait(timeout=30)
        steady_load = (threads["as_the_machine_is"]["choice"]["load_average_1min"] or 0.0) + 1
        steady = threads_for(threads["cpus"], threads["physical_cores"], steady_load,
                             machine_cpus=os.cpu_count())
        threads["with_a_busy_loop_on_one_core"] = dict(
            timing, choice_seen=seen,
            choice_once_load_average_includes_it={"load_average_1min": steady_load,
                                                   "count": steady.count,
                                                   "reason": steady.reason})
        for name in ("as_the_machine_is", "with_a_busy_loop_on_one_core"):
            part = threads[name]
            print(f"  {name}: 1 thread {part['median_ms_1_thread']:.0f} ms, 2 threads "
                  f"{part['median_ms_2_threads']:.0f} ms", file=sys.stderr)

    record = {
        "benchmark": "network_speed", "command": common.command_line(), "machine": machine,
        "model": model_text,
        "call": f"one U-Net call on a batch of {BATCH} target tiles of {TILE} x {TILE} px "
                f"({model.config.unet.in_channels} input channels), channels_last, "
                f"no_grad, float32, {torch.get_num_threads()} torch thread(s); median of "
                f"{calls} calls per variant, the variants interleaved call by call",
        "network": network, "tolerance": TOLERANCE,
        "within_tolerance": network["max_abs_difference"] <= TOLERANCE,
        "threads": dict(threads, calls_per_thread_count=thread_calls), "wall_seconds": round(time.perf_counter() - started, 1)}
    common.write_result("network_speed", record, args.results)
    if not record["within_tolerance"]:
        print(f"the new formulas differ from the old by {network['max_abs_difference']:.2e} "
              f"> {TOLERANCE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
