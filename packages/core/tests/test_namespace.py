"""`diffalign` is a PEP 420 namespace shared by six distributions: none may ship diffalign/__init__.py."""

from pathlib import Path

import diffalign

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ["core", "listener-reward", "selma", "di-star", "mlcm", "ecad"]


def test_no_package_ships_a_namespace_init():
    offenders = [str(p) for p in ROOT.glob("packages/*/src/diffalign/__init__.py")]
    assert offenders == [], f"remove these files, diffalign is a namespace package: {offenders}"


def test_diffalign_is_a_namespace_package():
    assert getattr(diffalign, "__file__", None) is None
    assert len(list(diffalign.__path__)) >= 1


def test_every_package_has_release_files():
    for name in PACKAGES:
        base = ROOT / "packages" / name
        for required in ("pyproject.toml", "README.md", "CHANGELOG.md"):
            assert (base / required).is_file(), f"packages/{name}/{required} is missing"
        text = (base / "pyproject.toml").read_text()
        assert 'version = "' in text, f"packages/{name} needs a static version"
        if name != "core":
            assert '"diffalign-core>=0.1,<0.2"' in text, (
                f"packages/{name} must pin core to a compatible range"
            )
            for other in PACKAGES:
                if other not in ("core", name):
                    assert f'"diffalign-{other}' not in text, (
                        f"packages/{name} must not depend on diffalign-{other}"
                    )
