"""What vpgtrans needs is what it declares: every third-party import in vpgtrans/, tests/, benchmarks/
and scripts/ comes from a distribution pyproject.toml declares for that code, and an optional extra
that is not installed is a one-line error that says what to install."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vpgtrans.bundle import load_model
from vpgtrans.cli import app
from vpgtrans.errors import VpgtransError
from test_cli import _user_error  # exit 2, one "error: ..." line, no traceback

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent

# Where code lives -> the extras installed beside the dependencies when it runs.
EXTRAS_FOR = {"vpgtrans": [], "scripts": [], "tests": ["test"], "benchmarks": ["bench"]}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: "Pillow" == "pillow", "typing_extensions" == "typing-extensions"


def _declared(extras: list[str]) -> set[str]:
    """Normalised distribution names of pyproject's dependencies plus the named extras (all extras: None)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    requirements = project["dependencies"] + [r for extra in (optional if extras is None else extras)
                                              for r in optional[extra]]
    return {_normal(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r).group()) for r in requirements}


def _catches_import_error(node: ast.Try) -> bool:
    caught = [h.type.elts if isinstance(h.type, ast.Tuple) else [h.type] for h in node.handlers]
    return any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for ts in caught for t in ts)


def imported_modules(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, guarded) for each absolute import in ``path``. Guarded: inside the body of a
    ``try`` that catches ImportError. ``pytest.importorskip("x")`` counts as a plain import: a test that
    the CI install skips proves nothing."""
    tree = ast.parse(path.read_text(), filename=str(path))
    guarded = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.Try) and _catches_import_error(node)
               for statement in node.body for sub in ast.walk(statement)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        else:
            continue
        found += [(name.split(".")[0], node.lineno, id(node) in guarded) for name in names]
    return found


def undeclared_imports(files: list[Path], extras: list[str], local: set[str]) -> list[str]:
    """One line per import in ``files`` whose distribution pyproject does not declare: plain imports need
    the dependencies or ``extras``, guarded ones any extra. A guarded import that is not installed is an
    optional extra absent here; a plain one is a problem (no distribution to check it against)."""
    distributions = packages_distributions()
    needed, optional = _declared(extras), _declared(None)
    problems = []
    for path in files:
        for module, line, guarded in imported_modules(path):
            if module in sys.stdlib_module_names or module in local:
                continue
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"
            names = {_normal(d) for d in distributions.get(module, [])}
            if not names:
                if not guarded:
                    problems.append(f"{where}: imports {module}, which no installed distribution provides")
            elif not names & (optional if guarded else needed):
                declared_in = "dependencies or any extra" if guarded else \
                    "dependencies" + "".join(f" or extra [{e}]" for e in extras)
                problems.append(f"{where}: imports {module} (distribution {', '.join(sorted(names))}), "
                                f"not declared in pyproject.toml's {declared_in}")
    return problems


def test_every_import_is_declared_where_its_code_runs():
    # Our packages, and the test and script files pytest or a script imports as top-level modules.
    local = set(EXTRAS_FOR) | {p.stem for top in ("tests", "scripts") for p in (ROOT / top).glob("*.py")}
    problems = []
    for top, extras in EXTRAS_FOR.items():
        problems += undeclared_imports(sorted((ROOT / top).rglob("*.py")), extras, local)
    assert not problems, "\n".join(problems)


def test_an_undeclared_import_is_reported(tmp_path):
    """pluggy and iniconfig are pytest's own dependencies: always installed here, never declared by us."""
    module = tmp_path / "uses_undeclared.py"
    module.write_text("import torch\nimport pluggy\nfrom surely_not_installed_xyz import x\n"
                      "try:\n    import iniconfig\nexcept ImportError:\n    iniconfig = None\n"
                      "try:\n    import also_not_installed_xyz\nexcept ImportError:\n    pass\n")
    problems = undeclared_imports([module], [], local=set())
    assert [p.split(": ", 1)[1] for p in problems] == [
        "imports pluggy (distribution pluggy), not declared in pyproject.toml's dependencies",
        "imports surely_not_installed_xyz, which no installed distribution provides",
        "imports iniconfig (distribution iniconfig), not declared in pyproject.toml's dependencies or any extra",
    ]


# --- an optional extra that is not installed --------------------------------------------------------

@pytest.fixture
def no_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # "import bitsandbytes" now raises ImportError


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantization_without_bitsandbytes_says_what_to_install(no_bitsandbytes, inherited, quantization):
    with pytest.raises(VpgtransError) as err:
        load_model(inherited, quantization=quantization)
    message = str(err.value)
    assert f"--load-in-{quantization} needs bitsandbytes" in message and "pip install" in message, message
    assert "\n" not in message


def test_load_in_8bit_without_bitsandbytes_on_the_command_line(no_bitsandbytes, inherited, tiny):
    result = CliRunner().invoke(app, ["eval", str(inherited), "--data", str(tiny["caption"]), "--max-samples", "2",
                                      "--load-in-8bit"])
    _user_error(result, "--load-in-8bit needs bitsandbytes", "pip install")
