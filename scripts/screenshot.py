"""Take the README screenshot of the napari workflow: open the simulated lung sample, stain it,
register the ground truth, show the compare view and save the whole window as a PNG.

    python scripts/screenshot.py [--checkpoint MODEL.safetensors] [--out PATH] [--overwrite]

Runs headless under a virtual X display (pyvirtualdisplay + Xvfb) when DISPLAY is not set.
It drives the same dock widgets a user clicks, in the same order.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPOSITORY / "docs" / "images" / "napari_compare.png"
SMALL_SCREEN_OUT = REPOSITORY / "docs" / "images" / "napari_1366x768.png"
PLUGIN = "napari-vstain"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="model to stain with (default: the shipped demo model)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    parser.add_argument("--tissue", choices=("lung", "heart"), default="lung")
    parser.add_argument("--samples", type=int, default=4, help="averaged samples N")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, nargs=2, default=(1800, 1100),
                        metavar=("WIDTH", "HEIGHT"), help="window size in pixels")
    parser.add_argument("--small-screen", type=Path, default=SMALL_SCREEN_OUT,
                        help="also a 1366 x 768 screenshot with the four docks as tabs")
    parser.add_argument("--timeout", type=float, default=1200.0,
                        help="seconds to wait for the staining and the registration")
    return parser.parse_args(argv)


def wait_for(app, condition, timeout: float, what: str):
    """Process Qt events until condition() is true (the workers report through them)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not finish within {timeout:.0f} s.")
        app.processEvents()
        time.sleep(0.02)


def take_screenshot(args) -> Path:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_vstain._napari._layers import layer_id
    from napari_vstain.data.io import write_png

    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists; pass --overwrite to replace it.")
    viewer = napari.Viewer(title="napari-vstain", show=True)
    app = QApplication.instance()
    viewer.window._qt_window.resize(*args.size)  # a script may reach into the Qt window
    af, he = viewer.open_sample(PLUGIN, args.tissue)

    # 1. Virtual staining: the sample's AF stack is pre-selected
    staining_dock, staining = viewer.window.add_plugin_dock_widget(PLUGIN, "Virtual staining")
    if args.checkpoint is not None and not staining.load_checkpoint(args.checkpoint):
        raise SystemExit(f"Cannot use {args.checkpoint}: {staining.last_message}")
    wait_for(app, lambda: staining.model is not None, 300, "Loading the model")  # a worker
    staining.confirm = lambda question: True  # a script does not stop for the cost dialog
    staining._inputs.value = [af.name]
    staining._samples.value = args.samples
    staining._steps.value = args.steps
    staining._device.value = args.device
    outcomes = []
    staining.run_finished.connect(outcomes.append)
    started = time.monotonic()
    staining.run()
    wait_for(app, lambda: bool(outcomes), args.timeout, "The staining")
    if outcomes[0] != "done":
        raise SystemExit(f"Staining failed: {staining.last_message}")
    print(f"stained in {time.monotonic() - started:.1f} s: {staining.last_message}")
    stained = viewer.layers[f"{af.name} stained"]

    # 2. Ground truth: register the H&E onto the stained output
    truth_dock, truth = viewer.window.add_plugin_dock_widget(PLUGIN, "Ground truth")
    truth.reset_choices()
    truth._reference.value = layer_id(stained)  # the docks' choices hold layer ids
    truth._brightfield.value = layer_id(he)
    results = []
    truth.registration_finished.connect(results.append)
    truth.register()
    wait_for(app, lambda: bool(results), args.timeout, "The registration")
    print(f"registration: {truth.last_message}")
    if results[0]:
        viewer.reset_view()
        truth.measure()
        print(f"metrics: {truth._scores_info.value}")

    # 3. Compare pigment: the registered ground truth if registration worked, else the
    #    sample's H&E, which lies on the stained grid by construction
    compare_dock, compare = viewer.window.add_plugin_dock_widget(PLUGIN, "Compare pigment")
    window = viewer.window._qt_window
    window.tabifyDockWidget(truth_dock, compare_dock)  # one tab group keeps the canvas large
    compare_dock.raise_()
    compare.reset_choices()
    compare._stained.value = layer_id(stained)
    compare._truth.reset_choices()
    registered = f"{he.name} registered"
    compare._truth.value = layer_id(viewer.layers[registered]) \
        if results[0] and registered in viewer.layers else layer_id(he)
    compared = []
    compare.compare_finished.connect(compared.append)
    compare.show_compare()
    wait_for(app, lambda: bool(compared), args.timeout, "The compare view")
    if compared[0] is None:
        raise SystemExit(f"Compare view failed: {compare.last_message}")
    print(compare.last_message)
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for popup in window.findChildren(NapariQtNotification):  # the messages are in the docks
        popup.close()
    for _ in range(20):  # let the docks lay out and the canvas draw
        app.processEvents()
        time.sleep(0.05)
    compare_dock.raise_()
    viewer.layers.selection.active = stained
    viewer.reset_view()
    for _ in range(10):
        app.processEvents()
        time.sleep(0.05)
    image = viewer.screenshot(canvas_only=False, flash=False)
    written = write_png(args.out, image[..., :3], overwrite=args.overwrite)

    # 4. The same session on a 1366 x 768 screen, with all four docks reachable as tabs
    if args.small_screen is not None:
        compare.leave_compare()
        export_dock, _export = viewer.window.add_plugin_dock_widget(PLUGIN, "Export regions")
        for dock in (truth_dock, compare_dock, export_dock):
            window.tabifyDockWidget(staining_dock, dock)
        staining_dock.raise_()
        window.resize(1366, 768)
        for _ in range(30):
            app.processEvents()
            time.sleep(0.05)
        viewer.reset_view()
        small = viewer.screenshot(canvas_only=False, flash=False)
        write_png(args.small_screen, small[..., :3], overwrite=args.overwrite)
        print(f"wrote {args.small_screen}")
    viewer.close()
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    display = None
    if not os.environ.get("DISPLAY"):
        from pyvirtualdisplay import Display

        display = Display(visible=False, size=(args.size[0] + 100, args.size[1] + 100),
                          color_depth=24)
        display.start()
    try:
        path = take_screenshot(args)
    except (FileExistsError, TimeoutError) as error:
        print(error, file=sys.stderr)
        return 2
    finally:
        if display is not None:
            display.stop()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
