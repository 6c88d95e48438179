"""The repository's layout: fsc/ is the one installed package and stands alone; bench/, sim/,
examples/ and tests/ sit beside it and are never installed.

Three checks: no module under fsc/ reaches beside the package (read with ast, so a lazy
import inside a function counts too); the wheel holds fsc and nothing else, and fsc imports
from the unpacked wheel with the checkout off the path; and a script beside a clone of the
checkout named fsc/ imports the real package, not that folder as a namespace package.
"""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BESIDE = ("bench", "sim", "examples", "tests")
# never part of a build: version control, environments, build outputs, caches, results
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "results",
              "freescale_out", "peers", "tmp")


# ----------------------------------------------------------------------- the import graph


def _sys_path(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys")


def _outside(name: str) -> bool:
    return name.split(".")[0] in BESIDE


def layout_violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What in ``source`` (the module ``module``) reaches beside the package: an import of
    bench, sim, examples or tests (absolute, relative past the top of fsc, or by a constant
    name given to importlib.import_module/__import__), an edit of sys.path, or a module loaded
    from a file (spec_from_file_location, SourceFileLoader). One line per finding."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if _outside(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if _outside(node.module or ""):
                    found.append(f"{line}: from {node.module} import ...")
                elif node.module == "sys" and any(a.name == "path" for a in node.names):
                    found.append(f"{line}: from sys import path")
            else:
                parts = package.split(".")
                if node.level > len(parts):
                    found.append(f"{line}: relative import (level {node.level}) climbs out of {parts[0]}")
            if any(a.name in ("spec_from_file_location", "SourceFileLoader") for a in node.names):
                found.append(f"{line}: imports a file loader")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _outside(arg.value):
                    found.append(f"{line}: {name}({arg.value!r})")
            if isinstance(func, ast.Attribute) and _sys_path(func.value):
                found.append(f"{line}: sys.path.{func.attr}(...)")
            if name in ("spec_from_file_location", "SourceFileLoader", "addsitedir"):
                found.append(f"{line}: {name}(...)")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                if _sys_path(target) or (isinstance(target, ast.Subscript) and _sys_path(target.value)):
                    found.append(f"{line}: assigns to sys.path")
    return found


def _fsc_modules() -> list[tuple[pathlib.Path, str, bool]]:
    modules = []
    for path in sorted((ROOT / "fsc").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        modules.append((path, ".".join(parts[:-1] if is_package else parts), is_package))
    return modules


def test_no_module_in_fsc_imports_from_beside_it_edits_sys_path_or_loads_files():
    modules = _fsc_modules()
    assert len(modules) > 20 and ("fsc.passes", True) in {(m, p) for _, m, p in modules}
    found = [f"{path.relative_to(ROOT)}:{finding}" for path, module, is_package in modules
             for finding in layout_violations(path.read_text(), module, is_package)]
    assert found == []


@pytest.mark.parametrize("source, module, finding", [
    ("import bench.spawn", "fsc.x", "1: import bench.spawn"),
    ("import torch, sim", "fsc.x", "1: import sim"),
    ("def f():\n    from examples.hstu import model", "fsc.passes.x", "2: from examples.hstu import ..."),
    ("from tests import models", "fsc.x", "1: from tests import ..."),
    ("from ... import bench", "fsc.passes.x", "1: relative import (level 3) climbs out of fsc"),
    ("from .. import examples", "fsc.x", "1: relative import (level 2) climbs out of fsc"),
    ("import importlib\nimportlib.import_module('examples.tinyrec')", "fsc.x", "2: import_module('examples.tinyrec')"),
    ("__import__('sim.engine')", "fsc.x", "1: __import__('sim.engine')"),
    ("import sys\nsys.path.insert(0, '/checkout')", "fsc.x", "2: sys.path.insert(...)"),
    ("import sys\nsys.path += ['/checkout']", "fsc.x", "2: assigns to sys.path"),
    ("import sys\nsys.path[:0] = ['/checkout']", "fsc.x", "2: assigns to sys.path"),
    ("from sys import path", "fsc.x", "1: from sys import path"),
    ("import importlib.util\nimportlib.util.spec_from_file_location('m', 'm.py')", "fsc.x",
     "2: spec_from_file_location(...)"),
    ("from importlib.util import spec_from_file_location", "fsc.x", "1: imports a file loader"),
])
def test_layout_check_finds_each_way_of_reaching_beside_the_package(source, module, finding):
    assert finding in layout_violations(source, module)


def test_layout_check_allows_imports_within_fsc_and_reading_sys_path():
    source = textwrap.dedent("""
        import sys
        import importlib
        import torch
        from . import base
        from ..analysis import cost_model
        from fsc.passes import REGISTRY
        print(sys.path)
        importlib.import_module("fsc.kernels.jagged_attention")
    """)
    assert layout_violations(source, "fsc.passes.overlap_schedule") == []
    assert layout_violations("from . import passes", "fsc", is_package=True) == []


# ----------------------------------------------------------------------- the wheel


def _source_copy(dest: pathlib.Path) -> pathlib.Path:
    """The checkout's files, without build outputs, so building writes nothing into the
    checkout (others may be building there)."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(*NOT_SOURCE), symlinks=True)
    return dest


def _build_wheel(source: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("fsc-*.whl")
    return wheel


def _site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    tmp = tmp_path_factory.mktemp("wheel")
    source = _source_copy(tmp / "src")
    return source, _build_wheel(source, tmp / "dist")


@pytest.mark.ranks
def test_wheel_holds_the_fsc_package_and_nothing_beside_it(wheel):
    source, path = wheel
    names = set(zipfile.ZipFile(path).namelist())
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"fsc"}, tops
    for required in ("fsc/__init__.py", "fsc/passes/__init__.py", "fsc/runtime/__init__.py",
                     "fsc/kernels/__init__.py", "fsc/analysis/__init__.py"):
        assert required in names
    # every module of the package, in every subpackage, and nothing from beside it
    modules = {p.relative_to(source).as_posix() for p in (source / "fsc").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    for folder in ("passes", "runtime", "kernels", "analysis"):
        assert any(n.startswith(f"fsc/{folder}/") and n != f"fsc/{folder}/__init__.py" for n in names), folder
    assert not [n for n in names if n.split("/")[0] in BESIDE]


@pytest.mark.ranks
def test_unpacked_wheel_imports_every_module_with_the_checkout_off_the_path(wheel, tmp_path):
    _, path = wheel
    site = tmp_path / "site"
    zipfile.ZipFile(path).extractall(site)
    entry_points = next(site.glob("fsc-*.dist-info")) / "entry_points.txt"
    assert "freescale = fsc.backend:freescale" in entry_points.read_text()
    script = textwrap.dedent("""
        import importlib, importlib.util, pkgutil, sys
        site = sys.argv[1]
        import fsc
        assert fsc.__file__.startswith(site + "/"), fsc.__file__

        def fail(name):
            raise ImportError(f"cannot import {name}")

        names = [m.name for m in pkgutil.walk_packages(fsc.__path__, "fsc.", onerror=fail)]
        for name in names:
            module = importlib.import_module(name)
            assert module.__file__.startswith(site + "/"), (name, module.__file__)
        for name in ("examples", "bench", "sim"):
            spec = importlib.util.find_spec(name)
            assert spec is None, f"{name} is importable from {spec.origin or spec.submodule_search_locations}"
        print(len(names), "modules")
    """)
    # -S: site is not imported, so the editable install's .pth (the checkout) is not on the
    # path; the venv's site-packages comes in as a plain entry, for torch and triton.
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{_site_packages()}"}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    done = subprocess.run([sys.executable, "-S", "-c", script, str(site)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-2]) > 20, done.stdout


# ----------------------------------------------------------------------- a clone named fsc


@pytest.mark.ranks
def test_script_beside_a_clone_named_fsc_imports_the_package_not_the_folder(tmp_path):
    """A clone of this repository is a folder named fsc/ without __init__.py: beside a script,
    it is a namespace package candidate. The installed regular package must win."""
    (tmp_path / "fsc").symlink_to(ROOT, target_is_directory=True)
    (tmp_path / "script.py").write_text("import fsc\nassert callable(fsc.last_compile)\nprint(fsc.__file__)\n")
    done = subprocess.run([sys.executable, "script.py"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert pathlib.Path(done.stdout.strip()) == ROOT / "fsc" / "__init__.py"
