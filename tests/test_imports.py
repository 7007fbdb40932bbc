"""Every module of the package imports on its own, as a fresh interpreter would import it first: a circular import
that breaks for some entry point (``ImportError: cannot import name ... from partially initialized module``) fails.

One subprocess does it all. Any ``import slimmable.x.y`` runs ``slimmable/__init__.py`` to its end first, so the
modules that ``import slimmable`` loads are the same for every entry point; after importing one module, the checker
removes every module of the package loaded since (and the attributes binding them on their parents), so the next
module is imported from exactly the state a fresh interpreter reaches after ``import slimmable``. That is the
fresh-process test without paying torch's and the package's import once per module.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import slimmable

CHECKER = textwrap.dedent(
    """
    import importlib, pathlib, sys, traceback

    package, root = sys.argv[1], pathlib.Path(sys.argv[2])
    names = sorted(
        ".".join((package, *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        for p in root.rglob("*.py")
    )
    failures = []
    try:
        importlib.import_module(package)
    except Exception:
        print(f"{package}: " + traceback.format_exc(), flush=True)
        sys.exit(1)
    base = set(sys.modules)
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and (err.name == package or err.name.startswith(package + ".")):
                failures.append(f"{name}: " + traceback.format_exc())
            # else: an optional dependency this environment lacks, not a cycle
        except Exception:
            failures.append(f"{name}: " + traceback.format_exc())
        ours = [m for m in sys.modules if m.startswith(package + ".") and m not in base]
        for added in ours:  # other libraries stay loaded: they cannot hide a cycle in the package
            module = sys.modules.pop(added)
            parent, _, child = added.rpartition(".")
            if parent in base and getattr(sys.modules[parent], child, None) is module:
                delattr(sys.modules[parent], child)  # else `from parent import child` would find it
    print("\\n".join(failures))
    print(f"imported {len(names)} modules of {package}, {len(failures)} failed")
    sys.exit(1 if failures else 0)
    """
)


def _check(package: str, root: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHECKER, package, str(root)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_every_module_imports_on_its_own(tmp_path: Path) -> None:
    root = Path(slimmable.__file__).parent
    result = _check("slimmable", root, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"imported {len(list(root.rglob('*.py')))} modules of slimmable, 0 failed" in result.stdout


def test_the_checker_catches_a_cycle_from_one_entry_point(tmp_path: Path) -> None:
    # b imports a, a imports b: entering through a works (b finds the partial a module and needs nothing from it
    # yet), entering through b fails (a asks b for `g`, which b has not defined yet). The package imports neither.
    pkg = tmp_path / "cyclepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import g\n\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("from . import a\n\n\ndef g():\n    return a\n")
    (pkg / "ok.py").write_text("import json\n")
    result = _check("cyclepkg", pkg, tmp_path)
    assert result.returncode == 1
    assert "imported 4 modules of cyclepkg, 1 failed" in result.stdout
    assert "cyclepkg.b: " in result.stdout and "partially initialized module 'cyclepkg.b'" in result.stdout
