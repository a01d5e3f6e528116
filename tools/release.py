#!/usr/bin/env python3
"""Release helper: bump one package's version, check its CHANGELOG entry, commit and tag it.

    python tools/release.py mlcm minor            # 0.1.0 -> 0.2.0, needs a "## 0.2.0" CHANGELOG entry
    python tools/release.py core patch --dry-run  # show what would happen

The tag is ``diffalign-<name>==X.Y.Z`` (one tag per package release). Bumping core's minor version
breaks the ``>=0.N,<0.N+1`` range every method declares; the helper refuses until the ranges are updated.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["core", "listener-reward", "selma", "di-star", "mlcm", "ecad"]
VERSION_RE = re.compile(r'^version = "(\d+)\.(\d+)\.(\d+)"$', re.M)


class ReleaseError(RuntimeError):
    pass


def read_version(package: str) -> tuple[int, int, int]:
    text = (ROOT / "packages" / package / "pyproject.toml").read_text()
    match = VERSION_RE.search(text)
    if not match:
        raise ReleaseError(f"packages/{package}/pyproject.toml has no static version line")
    return tuple(int(x) for x in match.groups())  # type: ignore[return-value]


def bump(version: tuple[int, int, int], part: str) -> tuple[int, int, int]:
    major, minor, patch = version
    if part == "major":
        return (major + 1, 0, 0)
    if part == "minor":
        return (major, minor + 1, 0)
    if part == "patch":
        return (major, minor, patch + 1)
    raise ReleaseError(f"unknown bump {part!r}; use major, minor or patch")


def fmt(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


def changelog_has(package: str, version: str) -> bool:
    text = (ROOT / "packages" / package / "CHANGELOG.md").read_text()
    return re.search(rf"^## {re.escape(version)}\b", text, re.M) is not None


def core_range_ok(new_core: tuple[int, int, int]) -> list[str]:
    """Method packages whose declared core range excludes the new core version."""
    bad = []
    for package in PACKAGES[1:]:
        text = (ROOT / "packages" / package / "pyproject.toml").read_text()
        match = re.search(r'"diffalign-core>=(\d+)\.(\d+),<(\d+)\.(\d+)"', text)
        if not match:
            bad.append(package)
            continue
        lo = (int(match.group(1)), int(match.group(2)))
        hi = (int(match.group(3)), int(match.group(4)))
        if not (lo <= new_core[:2] < hi):
            bad.append(package)
    return bad


def release(package: str, part: str, dry_run: bool = False, root: Path = ROOT) -> str:
    if package not in PACKAGES:
        raise ReleaseError(f"unknown package {package!r}; choose from {', '.join(PACKAGES)}")
    old = read_version(package)
    new = bump(old, part)
    new_text = fmt(new)
    if not changelog_has(package, new_text):
        raise ReleaseError(
            f"packages/{package}/CHANGELOG.md has no '## {new_text}' entry; write one before releasing"
        )
    if package == "core":
        bad = core_range_ok(new)
        if bad:
            raise ReleaseError(f"core {new_text} falls outside the core range declared by: {', '.join(bad)}")
    tag = f"diffalign-{package}=={new_text}"
    if dry_run:
        return tag
    pyproject = root / "packages" / package / "pyproject.toml"
    pyproject.write_text(VERSION_RE.sub(f'version = "{new_text}"', pyproject.read_text(), count=1))
    subprocess.run(["git", "add", str(pyproject)], cwd=root, check=True)
    subprocess.run(["git", "commit", "-m", f"Release {tag}"], cwd=root, check=True)
    subprocess.run(["git", "tag", tag], cwd=root, check=True)
    return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("package", choices=PACKAGES)
    parser.add_argument("part", choices=["major", "minor", "patch"])
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    try:
        tag = release(args.package, args.part, args.dry_run)
    except ReleaseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(("would tag " if args.dry_run else "tagged ") + tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
