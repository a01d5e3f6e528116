"""Architecture contract: method packages never import each other, core imports no method, and
production code does not import ``diffalign.core.testing`` (tiny models it needs live in named modules).

Every ``.py`` under ``packages/*/src`` is parsed with ``ast`` (nothing is imported or executed), so
imports inside functions, relative imports that climb out of a package, ``from diffalign import x``,
``importlib.import_module("diffalign.x")`` / ``__import__("diffalign.x")`` with a literal name and
``"diffalign.x.module:factory"`` spec strings are all checked.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = "core"
_SPEC = re.compile(r"diffalign\.([A-Za-z_]\w*)(\.[\w.]*)?:[A-Za-z_]\w*")
_DYNAMIC_IMPORTERS = {"import_module", "__import__"}


def _owner_and_package(path: Path, src: Path) -> tuple[str, list[str]]:
    """('selma', ['diffalign', 'selma', 'sub']) for src/diffalign/selma/sub/x.py: the import name that
    owns the file and the dotted package the file lives in (what relative imports resolve against)."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    return (parts[1] if len(parts) > 2 else ""), parts[:-1]


def _resolve_relative(package: list[str], level: int, module: str | None) -> str | None:
    if level == 0:
        return module
    if level - 1 > len(package):
        return None
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imported(tree: ast.AST, package: list[str]):
    """(line, dotted module name) for every import the file can perform."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(package, node.level, node.module)
            if base is None:
                continue
            yield node.lineno, base
            if base == "diffalign":  # from diffalign import mlcm
                for alias in node.names:
                    yield node.lineno, f"diffalign.{alias.name}"
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in _DYNAMIC_IMPORTERS and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    yield node.lineno, first.value
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _SPEC.fullmatch(node.value.strip())
            if match:
                yield node.lineno, node.value.split(":", 1)[0]


def contract_violations(root: Path) -> list[str]:
    """One ``file:line: message`` per forbidden import under ``root/packages/*/src``."""
    out = []
    for src in sorted(root.glob("packages/*/src")):
        for path in sorted(src.rglob("*.py")):
            owner, package = _owner_and_package(path, src)
            if not owner:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            in_testing = package[:3] == ["diffalign", "core", "testing"]
            for line, module in _imported(tree, package):
                parts = module.split(".")
                if parts[0] != "diffalign" or len(parts) < 2:
                    continue
                if parts[1:3] == ["core", "testing"] and not in_testing:
                    rel = path.relative_to(root)
                    out.append(
                        f"{rel}:{line}: diffalign.{owner} imports {module} (core.testing is for tests)"
                    )
                    continue
                target = parts[1]
                if target in (owner, CORE):
                    continue
                rel = path.relative_to(root)
                rule = "core imports no method" if owner == CORE else "methods never import each other"
                out.append(f"{rel}:{line}: diffalign.{owner} imports {module} ({rule})")
    return out


def test_packages_respect_the_import_contract():
    violations = contract_violations(ROOT)
    assert violations == [], "import contract broken:\n" + "\n".join(violations)


def test_the_contract_scan_sees_every_package():
    owners = {p.name for p in ROOT.glob("packages/*/src/diffalign/*") if p.is_dir()}
    assert {"core", "selma", "mlcm", "di_star", "ecad", "listener_reward"} <= owners


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")


def test_seeded_violations_are_reported_with_file_and_line(tmp_path):
    _write(
        tmp_path,
        "packages/selma/src/diffalign/selma/ok.py",
        """\
        import torch
        from diffalign.core import shapes
        from diffalign.selma.config import SelmaConfig
        from . import config
        from .config import SelmaConfig as C
        importlib.import_module("diffalign.core.rewards")
        SPEC = "diffalign.selma.train:hook"
        """,
    )
    _write(
        tmp_path,
        "packages/selma/src/diffalign/selma/bad.py",
        """\
        '''Docstring naming diffalign.mlcm.train:x in prose is not an import.'''
        import diffalign.mlcm

        def later():
            from diffalign.di_star.losses import dsm
            return dsm

        def dynamic():
            import importlib
            return importlib.import_module("diffalign.ecad.search")

        from diffalign import listener_reward
        from ..mlcm import train
        x = __import__("diffalign.mlcm")
        HOOK = "diffalign.mlcm.train:load_hook"
        """,
    )
    _write(
        tmp_path,
        "packages/core/src/diffalign/core/testing/fixtures.py",
        """\
        from diffalign.core.testing.models import tiny_unet
        from . import models
        """,
    )
    _write(
        tmp_path,
        "packages/mlcm/src/diffalign/mlcm/tiny.py",
        """\
        def f():
            from diffalign.core.testing import tiny_unet
            return tiny_unet
        """,
    )
    _write(
        tmp_path,
        "packages/core/src/diffalign/core/sub/leak.py",
        """\
        def f():
            from ...selma import stages
            return stages
        """,
    )
    found = contract_violations(tmp_path)
    selma = "packages/selma/src/diffalign/selma/bad.py"
    core = "packages/core/src/diffalign/core/sub/leak.py"
    expected = {
        (selma, 2, "diffalign.mlcm"),
        (selma, 5, "diffalign.di_star.losses"),
        (selma, 10, "diffalign.ecad.search"),
        (selma, 12, "diffalign.listener_reward"),
        (selma, 13, "diffalign.mlcm"),
        (selma, 14, "diffalign.mlcm"),
        (selma, 15, "diffalign.mlcm.train"),
        (core, 2, "diffalign.selma"),
        ("packages/mlcm/src/diffalign/mlcm/tiny.py", 2, "diffalign.core.testing"),
    }
    got = set()
    for row in found:
        location, message = row.split(": ", 1)
        file, line = location.rsplit(":", 1)
        got.add((file, int(line), message.split(" imports ")[1].split(" (")[0]))
    assert got == expected
    assert any("core imports no method" in r for r in found if r.startswith(core))
    assert all("methods never import each other" in r for r in found if r.startswith(selma))
    assert any("core.testing is for tests" in r for r in found)
