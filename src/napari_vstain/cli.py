"""The `vstain` command. Each subcommand lives beside the code it drives: its module defines
`configure_cli(parser)` (the arguments) and `run_cli(args) -> int` (the work)."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
import warnings
from typing import Optional

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("napari_vstain.demo", "Simulate a held-out lung sample, stain it with the demo "
             "model, register the H&E target, evaluate, and write a figure."),
    "stain": ("napari_vstain.stain", "Stain an AF image (any size, tiled) and write the RGB "
              "image and the CV map."),
    "simulate": ("napari_vstain.data.simulate", "Write simulated paired AF / H&E tissue."),
    "register": ("napari_vstain.data.register", "Register a brightfield image to an AF image "
                 "or a stained output."),
    "train": ("napari_vstain.train", "Train a model on paired AF / H&E images."),
    "evaluate": ("napari_vstain.evaluate", "Evaluate a model and the baselines on held-out "
                 "pairs."),
    "train-cgan": ("napari_vstain.baselines.cgan", "Train the conditional-GAN baseline on the "
                   "same data as `vstain train`."),
    "import-weights": ("napari_vstain.engine.import_authors", "Convert the paper authors' "
                       ".pt weights into a napari-vstain checkpoint."),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only the module of `command` is imported (so `vstain --help` and
    `vstain <command> --help` load nothing heavy: no command module imports torch at import
    time or in its configure_cli)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="vstain", description="Pixel super-resolved virtual staining of label-free tissue "
        "(autofluorescence -> H&E) with a Brownian bridge diffusion model.")
    parser.add_argument("--version", action="version", version=f"napari-vstain {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (to report a bug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.configure_cli(command_parser)
            command_parser.add_argument("--debug", action="store_true",
                                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            command_parser.set_defaults(run=module.run_cli)
    return parser


def main(argv=None) -> int:
    """Run `vstain`. The one error boundary of every command: an error the user can fix ends
    with one sentence (exit status 2), a bug with "internal error" (exit status 1), never with a
    traceback unless `--debug` (before or after the command) asks for it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((word for word in argv if not word.startswith("-")), None)
    debug = "--debug" in argv
    args = None
    prefix = f"vstain {command}" if command else "vstain"

    def show_warning(message, category, filename, lineno, file=None, line=None):
        # A warning for the user (e.g. clipped AF outliers) is a sentence, not a code line.
        print(f"{prefix}: warning: {message}", file=sys.stderr)

    if not debug:
        warnings.showwarning = show_warning
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
        if not getattr(args, "run", None):
            parser.print_help()
            return 0
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"vstain {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # MemoryError included
        return _report(exc, command, args, debug)


def _report(exc: Exception, command: Optional[str], args, debug: bool) -> int:
    """Print what went wrong (with the traceback under --debug); the exit status."""
    from .explain import explain

    explanation = explain(exc, vars(args) if args is not None else ())
    prefix = f"vstain {command}" if command else "vstain"
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if explanation.internal:
        text = explanation.text if len(explanation.text) <= 400 else \
            explanation.text[:400] + "..."
        todo = "report it with the traceback above" if debug else \
            "rerun with --debug and report it"
        print(f"{prefix}: internal error ({type(exc).__name__}){': ' + text if text else ''}; "
              f"{todo}", file=sys.stderr)
    else:
        print(f"{prefix}: error: {explanation.text}", file=sys.stderr)
    return explanation.status


if __name__ == "__main__":
    sys.exit(main())
