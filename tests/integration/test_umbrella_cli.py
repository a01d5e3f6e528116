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


def test_every_method_cli_module_runs_with_python_dash_m():
    """`python -m diffalign.<m>.cli` is what `accelerate launch -m` runs on every rank: it must run the app,
    not import it and exit 0 having done nothing."""
    for method in METHODS:
        module = f"diffalign.{method.replace('-', '_')}.cli"
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "Usage" in out.stdout, f"`python -m {module} --help` printed no usage: {out.stdout!r}"
        bad = subprocess.run(
            [sys.executable, "-m", module, "no-such-command"], capture_output=True, text=True
        )
        assert bad.returncode == 2, f"`python -m {module} no-such-command` exited {bad.returncode}"
