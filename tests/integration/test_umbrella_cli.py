"""Every package installed together: the umbrella command lists all five methods and their schemas."""

import json
import subprocess
import sys

METHODS = ["listener-reward", "selma", "di-star", "mlcm", "ecad"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "diffalign.core.cli", *args], capture_output=True, text=True)


def test_help_lists_all_methods():
    out = _cli("--help")
    assert out.returncode == 0, out.stderr
    for method in METHODS + ["world", "info", "config"]:
        assert method in out.stdout, f"{method} missing from `diffalign --help`"
    assert "warning" not in out.stderr.lower(), out.stderr


def test_every_method_prints_its_schema():
    for method in METHODS:
        out = _cli("config", "schema", method)
        assert out.returncode == 0, out.stderr
        schema = json.loads(out.stdout)
        assert schema.get("additionalProperties") is False or "properties" in schema


def test_each_method_has_its_own_console_script():
    import shutil

    for method in METHODS:
        exe = shutil.which(f"diffalign-{method}") or str(
            __import__("pathlib").Path(sys.executable).with_name(f"diffalign-{method}")
        )
        out = subprocess.run([exe, "--help"], capture_output=True, text=True)
        assert out.returncode == 0, (method, out.stderr)
