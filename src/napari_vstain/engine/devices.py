"""Where inference runs: choose a device (CPU, CUDA, Apple MPS) explicitly or automatically,
describe it for logs and provenance, and set it up for speed.

CUDA: bf16 autocast (where the card supports it), channels_last memory layout and, on request,
torch.compile. CPU: channels_last and the thread count of threads.choose_threads (the cores
other programs leave free; OMP_NUM_THREADS wins when set). Unknown or unavailable devices
raise a ValueError whose message says what is available.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Optional

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def _mps_available(torch) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def device_name(name="auto") -> str:
    """A device name checked for spelling only ('auto', 'cpu', 'mps', 'cuda', 'cuda:N'), for
    work that runs elsewhere (the workers of a cluster resolve it on their own machines)."""
    text = str(name if name is not None else "auto").strip().lower()
    if not re.fullmatch(r"auto|cpu|mps|cuda(?::\d+)?", text):
        raise ValueError(f"Unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}.")
    return text


def resolve_device(name="auto"):
    """'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device
    -> torch.device. Raises ValueError for unknown names and for devices this machine lacks."""
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    text = str(name if name is not None else "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available(torch):
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available(torch):
            raise ValueError("The Apple GPU (mps) was requested but PyTorch finds no MPS "
                             "backend on this machine; use --device cpu or --device auto.")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match:
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build"
            raise ValueError(f"The CUDA device {text!r} was requested but PyTorch ({build}) "
                             "finds no CUDA GPU; use --device cpu or --device auto.")
        index = int(match.group(1) or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"The CUDA device {text!r} was requested but this machine has "
                             f"{count} CUDA device(s) (cuda:0 to cuda:{count - 1}).")
        return torch.device("cuda", index)
    raise ValueError(f"Unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}.")


def physical_cores() -> int:
    """Physical CPU cores (hyper-threads share one core's arithmetic units)."""
    from ..threads import physical_cores as count_physical_cores

    return count_physical_cores()


def apply_threads(choice) -> int:
    """Set torch's CPU thread count to a threads.ThreadChoice (or a plain int); returns it."""
    import torch

    count = int(getattr(choice, "count", choice))
    torch.set_num_threads(count)
    return count


def use_threads(requested=None, command: Optional[str] = None):
    """Choose (threads.choose_threads(requested)), apply, and, when `command` names the
    command, say it once on stderr: "vstain demo: 1 torch thread (machine busy: ...)".
    Returns the ThreadChoice."""
    from ..threads import choose_threads

    choice = choose_threads(requested)
    apply_threads(choice)
    if command:
        print(f"{command}: {choice.describe()}", file=sys.stderr)
    return choice


def describe_device(device) -> str:
    """A one-line description for logs and provenance: name, memory, threads."""
    import torch

    device = resolve_device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB, "
                f"compute capability {props.major}.{props.minor})")
    if device.type == "mps":
        return "mps (Apple GPU, memory shared with the CPU)"
    import platform

    cpu_name = cpu_model_name() or platform.processor() or platform.machine()
    memory = _system_memory_gib()
    memory_text = f", {memory:.1f} GiB RAM" if memory else ""
    return (f"cpu ({cpu_name}, {physical_cores()} physical cores, "
            f"{torch.get_num_threads()} torch threads{memory_text})")


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _system_memory_gib() -> float:
    try:
        import psutil

        return psutil.virtual_memory().total / 2**30
    except ImportError:
        return 0.0


def device_memory_bytes(device) -> int:
    """Memory free for tensors on `device` now (CUDA), or the available RAM (CPU, MPS)."""
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 4 * 2**30


def bf16_supported(device) -> bool:
    import torch

    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def network_dtype(device, precision: str = "auto") -> str:
    """The number type of the network calls: 'auto' is bfloat16 on CUDA cards that support
    it and float32 elsewhere (bf16 is slower than float32 for GroupNorm-heavy U-Nets on
    CPUs); 'bf16' and 'fp32' force a choice."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"Unknown precision {precision!r}; choose auto, bf16 or fp32.")
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_supported(device))
    return "bfloat16" if use_bf16 else "float32"


def autocast_context(device, precision: str = "auto"):
    """The mixed-precision context for network calls (`network_dtype`)."""
    import torch

    if network_dtype(device, precision) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def prepare_model(model, device, compile=False, set_threads: bool = True, threads=None):
    """Move the model to `device` in the channels_last layout (faster convolutions on CPUs
    and tensor cores), set CPU threads, and optionally wrap the U-Net in torch.compile
    (`compile`: True for the default backend, or a backend name such as "eager").

    Threads: `threads` (a threads.ThreadChoice, e.g. from --threads) when given; else
    threads.choose_threads(None) unless OMP_NUM_THREADS is set; none with set_threads=False."""
    import torch

    from ..threads import choose_threads

    device = resolve_device(device)
    if set_threads and threads is not None:
        apply_threads(threads)
    elif device.type == "cpu" and set_threads and "OMP_NUM_THREADS" not in os.environ:
        apply_threads(choose_threads(None))
    model = model.to(device=device, memory_format=torch.channels_last).eval()
    if compile:
        backend = compile if isinstance(compile, str) else "inductor"
        model.unet = torch.compile(model.unet, backend=backend)
    return model
