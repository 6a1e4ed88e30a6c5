"""The `vstain` command. Each subcommand lives beside the code it drives: its module defines
`configure_cli(parser)` (the arguments) and `run_cli(args) -> int` (the work)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from .errors import CheckpointError, UserError

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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.configure_cli(command_parser)
            command_parser.set_defaults(run=module.run_cli)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((word for word in argv if not word.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except (UserError, CheckpointError, ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"vstain {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vstain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
