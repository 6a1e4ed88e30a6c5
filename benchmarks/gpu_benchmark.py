"""GPU benchmark, one command: the paper's model (import_authors.paper_config(): the authors'
U-Net of ~124 M parameters, factor 5) on one 960 x 960 px field of view (one tile, from
192 x 192 px AF), 20 fast-sampler steps, float32 / bf16 autocast / bf16 + torch.compile, for
N = 1 and N = 4 samples in one network batch.

For each configuration it times, over --repeats runs (median, min, max seconds per field):
  network  the sampler's network calls alone, on inputs already on the card, between two
           synchronisations (the same time steps and batch as the whole run);
  whole    the `vstain stain` path, engine.tiling.stain_tiled: AF normalisation, the CNN,
           noise, blending and copies around the same network calls;
  host     whole - network: the work around the network, reported beside it.
It also reports the achieved TFLOP/s of the network part (FLOPs of one call counted by torch's
FlopCounterMode) against a large matmul on the same card at the same precision, and the peak
GPU memory. Compile caches are reset before every configuration, so each compiled one pays
(and reports, as its first run) its own compilation; cudnn.benchmark is on. Attention gets
4-D inputs, so torch's fused kernels run (the result says whether they are usable). Weights
are random: speed does not depend on them.

    python benchmarks/gpu_benchmark.py --results DIR     # on a CUDA machine
    python benchmarks/gpu_benchmark.py --dry-run         # tiny model on the CPU: checks it runs

Writes DIR/gpu_<card>.json (default folder benchmarks/results) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FIELD_OF_VIEW = 960  # output pixels per side (the authors' training crop)
VARIANTS = (("fp32", "fp32", False), ("bf16", "bf16", False),
            ("bf16 + torch.compile", "bf16", True))
MATMUL_SIDE = {"cuda": 8192, "cpu": 512}  # square matmul of the peak reference


def synchronise(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(dry_run: bool):
    """(model, config): the paper's 5x model with random weights, or a tiny one (dry run)."""
    from napari_vstain.engine.import_authors import paper_config
    from napari_vstain.engine.model import ModelConfig, VStainModel

    config = (ModelConfig.tiny(train_crop=64, factor=4) if dry_run else paper_config())
    return VStainModel(config).eval(), config


def reset_compile_caches() -> None:
    """Forget compiled graphs (in memory, and inductor's FX graph cache on disk), so the next
    configuration compiles afresh instead of reusing the last one's code."""
    import torch

    torch.compiler.reset()
    try:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = False
    except (ImportError, AttributeError):
        pass


def library_versions(device) -> dict:
    import torch

    from napari_vstain import __version__

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__, "napari_vstain": __version__,
                "cuda": torch.version.cuda, "cudnn": None, "driver": None, "triton": None}
    if device.type == "cuda":
        versions["cudnn"] = torch.backends.cudnn.version()
        try:
            versions["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return versions


def card_name(device, dry_run: bool) -> str:
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability "
                f"{props.major}.{props.minor})")
    return f"cpu ({'dry run' if dry_run else 'no GPU'})"


def matmul_tflops(device, precision: str, repeats: int = 20) -> float:
    """TFLOP/s of a large square matmul on `device` in the network's number type: the peak
    this card reaches in practice, to compare the network against."""
    import torch

    side = MATMUL_SIDE.get(device.type, 512)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronise(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronise(device)
    return 2 * side ** 3 * repeats / (time.perf_counter() - start) / 1e12


def fused_attention_usable(model, device, precision: str) -> dict:
    """Whether the U-Net's attention runs on a fused kernel (flash, memory-efficient or
    cuDNN): one attention block called with only those allowed."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from napari_vstain.engine.devices import autocast_context
    from napari_vstain.engine.unet import AttentionBlock

    block = next((m for m in model.unet.modules() if isinstance(m, AttentionBlock)), None)
    if block is None:
        return {"usable": None, "note": "the model has no attention block"}
    if block.window:
        return {"usable": None, "note": "neighbourhood attention (no scaled_dot_product_"
                                        "attention call)"}
    channels = block.qkv.in_channels
    x = torch.randn(1, channels, 32, 32, device=device)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        fused.append(SDPBackend.CUDNN_ATTENTION)
    try:
        with torch.no_grad(), autocast_context(device, precision), sdpa_kernel(fused):
            block(x)
        return {"usable": True}
    except RuntimeError as error:
        return {"usable": False, "note": str(error).splitlines()[0][:200]}


def network_inputs(model, af: np.ndarray, samples: int, device, precision: str):
    """(denoise, x_t): the sampler's model call for one tile x `samples`, inputs on `device`."""
    import torch

    from napari_vstain.engine.devices import autocast_context
    from napari_vstain.engine.model import af_statistics, normalise_af

    normalised = normalise_af(af, af_statistics(af, model.config))
    af_tensor = torch.from_numpy(np.ascontiguousarray(normalised[None])).to(device)
    af_tensor = af_tensor.contiguous(memory_format=torch.channels_last).repeat(
        samples, 1, 1, 1)
    with torch.no_grad(), autocast_context(device, precision):
        y = model.condition(af_tensor).float()
        denoise = model.denoiser(y, af_tensor)
    x_t = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(device)
    return denoise, x_t.contiguous(memory_format=torch.channels_last)


def time_network(denoise, x_t, call_times, device, precision: str) -> float:
    """Seconds of the sampler's network calls alone (one run over `call_times`)."""
    import torch

    from napari_vstain.engine.devices import autocast_context

    synchronise(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast_context(device, precision):
        for t in call_times:
            denoise(x_t, int(t))
    synchronise(device)
    return time.perf_counter() - start


def network_flops(model, x_t, denoise) -> int:
    """FLOPs of one network call: convolutions and matmuls counted by torch's
    FlopCounterMode; attention (QK^T and the weighted sum of V, 4 L S d per image) from each
    attention block's input shape, as the counter knows not every fused attention kernel."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from napari_vstain.engine.unet import AttentionBlock

    attention = []

    def count_attention(block, inputs):
        b, c, h, w = inputs[0].shape
        keys = block.window ** 2 if block.window else h * w
        attention.append(4 * b * h * w * keys * c)

    hooks = [m.register_forward_pre_hook(count_attention) for m in model.unet.modules()
             if isinstance(m, AttentionBlock)]
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            denoise(x_t, 500)
    finally:
        for hook in hooks:
            hook.remove()
    counted = sum(flops for op, flops in counter.get_flop_counts().get("Global", {}).items()
                  if "attention" not in str(op))
    return int(counted + sum(attention))


def spread(times: list) -> dict:
    return {"median": float(statistics.median(times)), "min": float(min(times)),
            "max": float(max(times))}


def measure(model, af, settings, samples: int, device, precision: str, repeats: int,
            flops_per_call: int, matmul: float) -> dict:
    """One configuration (the model already prepared): the row of the result."""
    import torch

    from napari_vstain.engine.tiling import stain_tiled

    def whole_run():
        stain_tiled(model, af, settings, device=device, precision=precision,
                    batch_size=samples)
        synchronise(device)

    with common.Stopwatch() as first:  # warm-up (and compilation, cudnn's kernel search)
        whole_run()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    whole = []
    for _ in range(repeats):
        with common.Stopwatch() as watch:
            whole_run()
        whole.append(watch.seconds)
    denoise, x_t = network_inputs(model, af, samples, device, precision)
    call_times = settings.call_times(model.config.num_steps)
    time_network(denoise, x_t, call_times[:1], device, precision)  # warm-up at this batch
    network = [time_network(denoise, x_t, call_times, device, precision)
               for _ in range(repeats)]
    network_median = statistics.median(network)
    whole_median = statistics.median(whole)
    tflops = flops_per_call * len(call_times) / network_median / 1e12
    return {
        "samples": samples, "batch": samples, "network_calls": len(call_times),
        "first_run_seconds": first.seconds,
        "seconds_per_field": spread(whole),
        "network_seconds_per_field": spread(network),
        "host_seconds_per_field": whole_median - network_median,
        "seconds_per_sample_image": whole_median / samples,
        "milliseconds_per_network_call": 1000 * network_median / len(call_times),
        "flops_per_network_call": flops_per_call,
        "achieved_tflops": tflops, "matmul_tflops": matmul,
        "fraction_of_matmul": tflops / matmul if matmul else None,
        "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                if device.type == "cuda" else None),
        "whole_times": whole, "network_times": network}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="default cuda (cpu with --dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny model, 64 px, 2 steps, 1 repeat on the CPU, eager compile "
                             "backend; results go to a temporary folder unless --results is "
                             "given")
    parser.add_argument("--steps", type=int, default=None, help="fast steps (default 20)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per configuration (default 5)")
    parser.add_argument("--samples", default="1,4", help="N values (default 1,4)")
    parser.add_argument("--results", type=Path, default=None, metavar="DIR",
                        help="folder for the result file (default benchmarks/results)")
    args = parser.parse_args(argv)

    import torch

    from napari_vstain.engine.devices import (describe_device, prepare_model, resolve_device,
                                              use_threads)
    from napari_vstain.settings import StainSettings

    device = resolve_device(args.device or ("cpu" if args.dry_run else "cuda"))
    # Host threads (noise, blending; everything on a CPU dry run): the cores left free.
    threads = use_threads(None, "gpu_benchmark")
    torch.backends.cudnn.benchmark = True  # pick the fastest convolution kernels per shape
    steps = args.steps or (2 if args.dry_run else 20)
    repeats = args.repeats or (1 if args.dry_run else 5)
    sample_counts = [int(n) for n in args.samples.split(",")]
    results_folder = args.results or (Path(tempfile.mkdtemp(prefix="vstain-gpu-dry-run-"))
                                      if args.dry_run else common.RESULTS)
    card = card_name(device, args.dry_run)
    versions = library_versions(device)
    torch.manual_seed(0)
    base_model, config = build_model(args.dry_run)
    base_model = prepare_model(base_model, device, set_threads=False)
    side, factor = config.train_crop, config.factor
    af = np.random.default_rng(0).uniform(500, 1500, (config.af_channels, side // factor,
                                                      side // factor)).astype(np.float32)
    params = base_model.parameter_count()
    print(f"GPU: {card}", file=sys.stderr)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
          file=sys.stderr)
    print(f"model: {params['unet']:,} U-Net + {params['cnn']:,} CNN parameters, factor "
          f"{factor}, field {side} x {side} px, fast sampler {steps} steps", file=sys.stderr)
    matmul = {precision: matmul_tflops(device, precision) for precision in ("fp32", "bf16")}
    print("matmul peak: " + ", ".join(f"{p} {v:.2f} TFLOP/s" for p, v in matmul.items()),
          file=sys.stderr)
    fused = {precision: fused_attention_usable(base_model, device, precision)
             for precision in ("fp32", "bf16")}
    print("fused attention kernels: " + ", ".join(
        f"{p} {'yes' if v['usable'] else 'no' if v['usable'] is False else 'n/a'}"
        for p, v in fused.items()), file=sys.stderr)
    flops = {}
    for n in sample_counts:  # FLOPs do not depend on the number type: counted once per batch
        denoise, x_t = network_inputs(base_model, af, n, device, "fp32")
        flops[n] = network_flops(base_model, x_t, denoise)
        del denoise, x_t
    rows = []
    for label, precision, compiled in VARIANTS:
        for n in sample_counts:
            reset_compile_caches()
            model = prepare_model(base_model, device,
                                  compile=("eager" if args.dry_run else True) if compiled
                                  else False, set_threads=False)
            settings = StainSettings(sampler="fast", steps=steps, eta=0.0, samples=n, seed=0)
            try:
                row = measure(model, af, settings, n, device, precision, repeats, flops[n],
                              matmul[precision])
            except Exception as error:  # record a failed setting (e.g. no compiler) and go on
                rows.append({"variant": label, "precision": precision, "samples": n,
                             "error": f"{error}"[:300]})
                print(f"{label}, N={n}: failed: {error}", file=sys.stderr)
                continue
            finally:
                if compiled:
                    base_model.unet = getattr(model.unet, "_orig_mod", model.unet)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append({"variant": label, "precision": precision, **row})
            whole, network = row["seconds_per_field"], row["network_seconds_per_field"]
            print(f"{label:22s} N={n} (batch {row['batch']}): {whole['median']:7.3f} s per "
                  f"field (min {whole['min']:.3f}, max {whole['max']:.3f}) = network "
                  f"{network['median']:.3f} + host {row['host_seconds_per_field']:.3f}; "
                  f"{row['achieved_tflops']:.2f} TFLOP/s "
                  f"({100 * (row['fraction_of_matmul'] or 0):.0f} % of matmul)"
                  + (f"; peak {row['peak_gpu_memory_gib']:.1f} GiB"
                     if row["peak_gpu_memory_gib"] is not None else ""), file=sys.stderr)
    fp32 = {r["samples"]: r for r in rows if r["variant"] == "fp32" and "error" not in r}
    for row in rows:
        if "error" not in row and row["samples"] in fp32:
            row["speed_vs_fp32"] = (fp32[row["samples"]]["seconds_per_field"]["median"]
                                    / row["seconds_per_field"]["median"])
    record = {
        "benchmark": "gpu", "card": card, "device": describe_device(device),
        "command": common.command_line(), "versions": versions,
        "host_threads": {"count": threads.count, "reason": threads.reason},
        "torch": torch.__version__,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_tf32_convolutions": bool(torch.backends.cudnn.allow_tf32),
        "tf32_matmuls": bool(torch.backends.cuda.matmul.allow_tf32),
        "fused_attention": fused,
        "model": ("paper_config(): the authors' U-Net + CNN, factor 5, random weights"
                  if not args.dry_run else "tiny (dry run)"),
        "parameters": params, "factor": factor,
        "field_of_view_px": side, "sampler": f"fast, {steps} steps, eta 0",
        "repeats": repeats, "matmul_tflops": matmul, "rows": rows}
    slug = re.sub(r"[^a-z0-9]+", "-", card.split(" (")[0].lower()).strip("-")
    common.write_result(f"gpu_{slug}", record, results_folder)
    print(markdown_table(record))
    return 0


def markdown_table(record: dict) -> str:
    versions = record.get("versions", {})
    params = record.get("parameters", {})
    lines = [f"GPU: {record['card']}; torch {record['torch']}"
             + (f", CUDA {versions['cuda']}" if versions.get("cuda") else "")
             + (f", cuDNN {versions['cudnn']}" if versions.get("cudnn") else "")
             + f"; {record['model']}"
             + (f" ({params['unet'] + params['cnn']:,} parameters)" if params else "")
             + f"; {record['field_of_view_px']} px field of view; {record['sampler']}; "
             f"median (min-max) of {record.get('repeats', '?')} runs", "",
             "| setting | N (batch) | s / field | network s | host s | TFLOP/s (% of matmul) "
             "| peak GiB | vs fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for row in record["rows"]:
        if "error" in row:
            lines.append(f"| {row['variant']} | {row['samples']} | failed: {row['error'][:60]} "
                         "| | | | | |")
            continue
        whole, network = row["seconds_per_field"], row["network_seconds_per_field"]
        memory = row["peak_gpu_memory_gib"]
        fraction = row.get("fraction_of_matmul")
        lines.append(f"| {row['variant']} | {row['samples']} ({row['batch']}) | "
                     f"{whole['median']:.3f} ({whole['min']:.3f}-{whole['max']:.3f}) | "
                     f"{network['median']:.3f} | {row['host_seconds_per_field']:.3f} | "
                     f"{row['achieved_tflops']:.2f}"
                     + (f" ({100 * fraction:.0f} %)" if fraction else "") + " | "
                     f"{'' if memory is None else f'{memory:.1f}'} | "
                     f"{row.get('speed_vs_fp32', 1.0):.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
