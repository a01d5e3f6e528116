"""The release helper: version bump arithmetic, CHANGELOG check and the core-range guard."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("release", ROOT / "tools" / "release.py")
release = importlib.util.module_from_spec(spec)
spec.loader.exec_module(release)


def test_bump_arithmetic():
    assert release.bump((0, 1, 0), "patch") == (0, 1, 1)
    assert release.bump((0, 1, 3), "minor") == (0, 2, 0)
    assert release.bump((0, 1, 3), "major") == (1, 0, 0)


def test_missing_changelog_entry_is_refused():
    with pytest.raises(release.ReleaseError, match="CHANGELOG"):
        release.release("mlcm", "major", dry_run=True)


def test_core_minor_bump_outside_method_ranges_is_detected():
    assert set(release.core_range_ok((0, 2, 0))) == {"listener-reward", "selma", "di-star", "mlcm", "ecad"}
    assert release.core_range_ok((0, 1, 5)) == []
