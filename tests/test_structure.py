"""The code's floors: one source of truth for the sampler table, imports that point down
only, and a command line that starts without torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from napari_vstain.cli import COMMANDS
from napari_vstain.settings import SAMPLERS, SETTINGS

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "napari_vstain"


def modules(folder: Path = PACKAGE):
    for path in sorted(folder.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def imported_modules(path: Path, tree) -> set:
    """Absolute names of the napari_vstain modules a file imports (relative imports
    resolved), at any depth of the file."""
    package = ["napari_vstain", *path.relative_to(PACKAGE).parent.parts]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("napari_vstain")}


def test_engine_imports_nothing_from_data_commands_or_widgets():
    above = ("napari_vstain.data", "napari_vstain._napari", "napari_vstain.train",
             "napari_vstain.evaluate", "napari_vstain.stain", "napari_vstain.demo",
             "napari_vstain.cli", "napari_vstain.baselines", "napari_vstain.training",
             "napari_vstain.evaluation")
    for path, tree in modules(PACKAGE / "engine"):
        wrong = sorted(n for n in imported_modules(path, tree) if n.startswith(above))
        assert not wrong, f"{path.name} imports {wrong}"


def test_baselines_do_not_import_the_training_command():
    for path, tree in modules(PACKAGE / "baselines"):
        names = imported_modules(path, tree)
        assert "napari_vstain.train" not in names and not any(
            n.startswith("napari_vstain.train.") for n in names), path.name


def test_data_imports_no_engine_at_module_level():
    """data/ sits above the engine but writing files must not load torch: no module-level
    engine import in data/."""
    for path, tree in modules(PACKAGE / "data"):
        top = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import,
                                                                      ast.ImportFrom))],
                         type_ignores=[])
        wrong = sorted(n for n in imported_modules(path, top)
                       if n.startswith("napari_vstain.engine"))
        assert not wrong, f"{path.name} imports {wrong} at module level"


def _string_constants(tree):
    """(node, value) of the string constants of a tree, without docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value,
                                                                     ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            yield node, node.value


def test_sampler_names_defaults_and_ranges_live_only_in_the_sampler_table():
    settings_file = PACKAGE / "settings.py"
    for path, tree in modules():
        if path == settings_file:
            continue
        # no sampler name as a string: not in comparisons, lists, defaults or calls
        names = [value for _, value in _string_constants(tree) if value in SAMPLERS
                 and value != "mean"]  # "mean" is also a statistics key (af_statistics)
        assert not names, f"{path.name} names samplers {names}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                members = [e for o in operands if isinstance(o, (ast.Tuple, ast.List, ast.Set))
                           for e in o.elts]
                constants = [c.value for c in operands + members if isinstance(c, ast.Constant)]
                assert not set(constants) & set(SAMPLERS), f"{path.name}: {ast.unparse(node)}"
                # the exit step's range check: 0 <= t_exit <= T
                text = ast.unparse(node)
                assert not ("t_exit" in text and "num_steps" in text), \
                    f"{path.name} checks the t_e range itself: {text}"
        # the default exit step 50 is typed nowhere else
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == SETTINGS["t_exit"].default:
                parent_text = path.read_text().splitlines()[node.lineno - 1]
                assert "t_exit" not in parent_text and "t_e" not in parent_text, \
                    f"{path.name}:{node.lineno} types the default t_e: {parent_text.strip()}"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_imports_no_torch(command):
    """`vstain --help` and every `vstain <command> --help` start without torch."""
    words = ["--help"] if command is None else [command, "--help"]
    code = ("import sys\nfrom napari_vstain.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "print('TORCH', heavy[:3])")
    result = subprocess.run([sys.executable, "-c", code, *words], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "TORCH []" in result.stdout, f"vstain {command} --help imported torch"
    assert "usage: vstain" in result.stdout


def test_writing_a_tiff_imports_no_torch(tmp_path):
    code = ("import sys, numpy as np\nfrom napari_vstain.data.io import write_ome_tiff\n"
            f"write_ome_tiff({str(tmp_path / 'a.ome.tif')!r}, np.zeros((8, 8), np.float32), "
            "'YX')\nprint('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "False", result.stderr
