#!/usr/bin/env python3
"""``make mutation``: mutation testing of the pure loss / reward / cost modules with cosmic-ray.

For every module below, cosmic-ray mutates one operator, number, comparison or keyword at a time and runs the
module's own tests (``packages/<pkg>/tests/test_<module>*.py``, which includes the ``*_mutants.py`` files
written to kill mutants, run first, plus the tests of its functions that live elsewhere, ``EXTRA_TESTS``).
A mutant the tests fail on is *killed*; one they pass on *survived*.

The mutants are applied in a scratch copy (``.mutation/<module>/``: the package and the root pytest config),
never in the working tree; the tests import the copy first through ``PYTHONPATH``. Each module's session is a
SQLite file in that folder, so a stopped run resumes where it stopped (``make mutation`` again). The result,
per module: mutants, killed, survived, timeouts, kill rate and every survivor (operator, line, diff), goes to
``bench/results/mutation.json``; survivors judged equivalent are listed with the reason in
``docs/mutation.md`` and ``EQUIVALENT`` below (keyed by module, line and operator) and counted apart.

    python tools/mutation.py                       # every module
    python tools/mutation.py --only mlcm.losses    # one module
    python tools/mutation.py --report-only         # rebuild the JSON from the sessions
    python tools/mutation.py --retest-survivors    # after adding tests: run only the survivors again

``--retest-survivors`` keeps the first pass's survivors in ``first_pass.json`` beside the session, so the
report shows the kill rate before and after the ``*_mutants.py`` tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / ".mutation"
# name -> (package folder, module file inside the package's src)
MODULES = {
    "mlcm.losses": ("mlcm", "src/diffalign/mlcm/losses.py"),
    "selma.losses": ("selma", "src/diffalign/selma/losses.py"),
    "listener_reward.rewards": ("listener-reward", "src/diffalign/listener_reward/rewards.py"),
    "di_star.losses": ("di-star", "src/diffalign/di_star/losses.py"),
    "ecad.cost": ("ecad", "src/diffalign/ecad/cost.py"),
}
# tests of a module's functions that live in another test file (pytest node ids), run after the module's own
EXTRA_TESTS = {
    # ranking_changes is checked against a brute-force pairwise count beside the sampled-evaluation tests
    "listener_reward.rewards": [
        "packages/listener-reward/tests/test_sampled_eval.py::test_ranking_changes_brute_force"
    ],
}
# cosmic-ray operators left out, with the reason: each would multiply the mutant count without testing
# anything a number check can see.
EXCLUDED_OPERATORS = [
    # replacing a binary operator by a bit or shift operator fails on float tensors before any assert runs
    r"core/ReplaceBinaryOperator_.*_(BitAnd|BitOr|BitXor|LShift|RShift)",
    # floor division, modulo or power in place of + - * /: on float tensors these are not the slips people
    # make (a sign, a scale, a swapped operand); the four arithmetic swaps are kept
    r"core/ReplaceBinaryOperator_.*_(FloorDiv|Mod|Pow)$",
    # a matrix product in place of an elementwise one (and back) fails on shape alone
    r"core/ReplaceBinaryOperator_.*_MatMult",
    r"core/ReplaceBinaryOperator_MatMult_.*",
    # exception classes in `except` clauses: the modules raise, they do not catch
    r"core/ExceptionReplacer",
    # decorators (dataclass, property) change the API, which every test already exercises
    r"core/RemoveDecorator",
]
# (module, line, the mutated line as written) -> why the mutant cannot change any documented result; these are
# reported apart, never counted as survivors.
EQUIVALENT: dict[tuple[str, int, str], str] = {
    (
        "di_star.losses",
        62,
        'raise ValueError(f"per-sample values have batch {values.shape[ -1]}, tensor has {like.shape[0]}")',
    ): (
        "only the text of the error for a mismatched batch changes, and for expand_like's documented 1-D input "
        "shape[0] and shape[-1] are the same number, so the text is the same"
    ),
    ("di_star.losses", 63, "return values.reshape(values.shape[ -1], *([1] * (like.ndim - 1)))"): (
        "expand_like's documented input is a per-sample vector [B] (a scalar returns earlier): for a 1-D tensor "
        "shape[0] and shape[-1] are the same number"
    ),
    ("di_star.losses", 61, "if values.shape[ -1] != like.shape[0]:"): (
        "expand_like's documented input is a per-sample vector [B] (or a scalar, which returns before this "
        "line): for a 1-D tensor shape[0] and shape[-1] are the same number"
    ),
    (
        "di_star.losses",
        170,
        "norm = torch.sqrt(_flat_sq_norm(diff) + (huber_c**2) * sig.flatten(1)[:, -1] ** 2)",
    ): "sig is expand_like(sigma) of shape [B, 1, ..., 1]: flatten(1) has one column, so [:, 0] and [:, -1] are the same",
}
EQUIVALENT[("di_star.losses", 59, "if values.ndim <= 0:")] = "a tensor's ndim is never negative"
# The same mutated text is equivalent on every line listed.
_AFTER_CHECK = (
    "_check_distance has already rejected every value but 'l2' and 'pseudo_huber' just above, and of those "
    "only 'l2' is <= 'l2'"
)
for _line in (105, 118, 167):
    EQUIVALENT[("di_star.losses", _line, 'if distance <= "l2":')] = _AFTER_CHECK
EQUIVALENT[("selma.losses", 50, "if rate <= 0:")] = (
    "the check on line 48 has already rejected every rate below 0 (and NaN), so for each rate that reaches "
    "this line rate <= 0 and rate == 0 are the same test"
)
EQUIVALENT[
    (
        "listener_reward.rewards",
        40,
        "return [1.0 if extract_answer(completion_text(c)) is int(y) else 0.0 for c, y in zip(completions, label)]",
    )
] = (
    "extract_answer returns only 1, 2 (parsed from the one-digit pattern [12]) or None, and CPython keeps a "
    "single object for each small int, so `is` and `==` agree for every value that reaches this comparison"
)
EQUIVALENT[("listener_reward.rewards", 245, 'if cfg.listener_backend is "http":')] = (
    "RewardConfig.listener_backend is a Literal field: pydantic hands back the literal's own str object, so "
    'for every validated config `is "http"` and `== "http"` agree (a non-interned "http" passed in comes '
    "back as the literal's object)"
)
EQUIVALENT[("listener_reward.rewards", 232, "if self.group_size and len(texts) % self.group_size <= 0:")] = (
    "group_size is None or a positive group count (GRPO's num_generations; ranking_changes rejects < 1), and "
    "n % g is never negative for g > 0, so <= 0 and == 0 are the same test"
)
EQUIVALENT[("listener_reward.rewards", 245, 'if cfg.listener_backend <= "http":')] = (
    "RewardConfig.listener_backend is the Literal 'local' or 'http'; of those only 'http' is <= 'http'"
)
_NAN_TEST = (
    "the reward terms are floats (NaN for a missing one): x == x, x <= x and x >= x are all false exactly "
    "when x is NaN, infinities included"
)
for _op in (">=", "<="):
    EQUIVALENT[("listener_reward.rewards", 55, f"if value {_op} value:  # skip NaN")] = _NAN_TEST
EQUIVALENT[
    (
        "listener_reward.rewards",
        72,
        "disagree = sum(int(listener_choice[i]) is not reasoner_choices[i] for i in valid)",
    )
] = (
    "both sides are the ints 1 or 2 (the listener's int() of 1/2, and the reasoner choices kept by `c in (1, 2)`"
    ", which every caller fills from extract_answer); CPython keeps one object per small int, so `is not` "
    "and `!=` agree"
)
EQUIVALENT[("listener_reward.rewards", 227, "rewards = probs.gather(1, labels[:, None]).squeeze( 0)")] = (
    "gather gives [N, 1]; squeeze(0) leaves it [N, 1] (or [1] for N = 1) and every later use turns each row "
    "into a number with float(), so the returned rewards and the logged rank changes are the same"
)
EQUIVALENT[("ecad.cost", 209, "return hits[ -1] if hits else 0")] = (
    "more than one hit raises on the line above, so hits holds exactly one value where it is indexed"
)
EQUIVALENT[("ecad.cost", 273, 'if device.type <= "cpu":')] = (
    "\"cpu\" sorts first among the device types torch.device accepts (cuda, fpga, hip, hpu, ipu, lazy, maia, "
    "meta, mps, mtia, xla, xpu, ...), so `<=` holds exactly where `==` does"
)
for _default in ("1.0", "-1.0"):
    EQUIVALENT[
        (
            "ecad.cost",
            350,
            "inv_table, inv_overhead = _invariant_costs(transformer, arch, table.shape, "
            f"lambda p: med.get(p, {_default}))",
        )
    ] = (
        "every path step_invariant_modules yields was put into `paths` (and so into `med`) above, so the "
        "default of med.get is never read"
    )
for _indent in (0, 2):
    EQUIVALENT[
        (
            "ecad.cost",
            159,
            f'path.write_text(json.dumps(self.to_dict(), indent= {_indent}) + "\\n", encoding="utf-8")',
        )
    ] = "the indent changes only whitespace in the saved JSON: json.loads and from_dict read the same cost model"
for _op in ("<", ">"):
    EQUIVALENT[("listener_reward.rewards", 90, f"changed = (sa {_op} sb).flatten(1).any(1)")] = (
        "sa and sb are antisymmetric sign matrices (entry j, i is minus entry i, j), so wherever they differ at "
        "(i, j), one of (i, j) and (j, i) has sa < sb and the other sa > sb: any() over all pairs is the same "
        "(the rewards are probabilities and 0/1 terms, never NaN, for which sign() would not be antisymmetric)"
    )
ANNOTATION = re.compile(r"(:\s*[\w.\[\], ]+\|\s*[\w.\[\]]+\s*[=,)]|->\s*[\w.\[\], ]+\|)")


def equivalent_reason(name: str, entry: dict) -> str | None:
    """Why a surviving mutant cannot change behaviour, or None (then it is a real survivor)."""
    added = [ln[1:].strip() for ln in entry["diff"].splitlines() if ln.startswith("+")]
    reason = EQUIVALENT.get((name, entry["line"], added[0] if len(added) == 1 else ""))
    if reason:
        return reason
    package, module_file = MODULES[name]
    source = (ROOT / "packages" / package / module_file).read_text()
    removed = [ln[1:] for ln in entry["diff"].splitlines() if ln.startswith("-")]
    if (
        entry["operator"].startswith("core/ReplaceBinaryOperator_BitOr_")
        and "from __future__ import annotations" in source
        and removed
        and all(ANNOTATION.search(ln) for ln in removed)
    ):
        return "mutates a union in a type annotation; with `from __future__ import annotations` annotations are never evaluated"
    return None


def module_tests(name: str) -> list[str]:
    """The module's test files, the ``*_mutants.py`` ones first: they hold the quick pure-function checks, so
    with ``pytest -x`` most mutants die before the slower fixtures (a tiny VLM, tiny pipelines) are built."""
    package, module_file = MODULES[name]
    stem = Path(module_file).stem
    tests = (ROOT / "packages" / package / "tests").glob(f"test_{stem}*.py")
    ordered = sorted(tests, key=lambda p: (not p.stem.endswith("_mutants"), p.name))
    return [str(p.relative_to(ROOT)) for p in ordered] + EXTRA_TESTS.get(name, [])


def prepare(name: str, package: str, module_file: str) -> Path:
    """Scratch copy of the package (and the root pytest config) plus the cosmic-ray config; returns the dir."""
    work = SCRATCH / name
    src = ROOT / "packages" / package
    dst = work / "packages" / package
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "runs", ".pytest_cache"))
    shutil.copy2(ROOT / "pyproject.toml", work / "pyproject.toml")
    tests = module_tests(name)
    if not tests:
        raise SystemExit(f"error: no tests named packages/{package}/tests/test_{Path(module_file).stem}*.py")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    command += ["--import-mode=importlib", "-m", "not slow"]
    excluded = ", ".join(json.dumps(op) for op in EXCLUDED_OPERATORS)
    (work / "cosmic-ray.toml").write_text(
        "[cosmic-ray]\n"
        f'module-path = "packages/{package}/{module_file}"\n'
        "timeout = 600.0\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(shlex.join(command))}\n\n"
        '[cosmic-ray.distributor]\nname = "local"\n\n'
        f"[cosmic-ray.filters.operators-filter]\nexclude-operators = [{excluded}]\n"
    )
    return work


def tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run_module(name: str, deadline: float | None) -> None:
    package, module_file = MODULES[name]
    session = SCRATCH / name / "session.sqlite"
    fresh = not session.exists()
    work = prepare(name, package, module_file)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(work / "packages" / package / "src"), env.get("PYTHONPATH", "")])
    if fresh:
        subprocess.run(
            [tool("cosmic-ray"), "init", "cosmic-ray.toml", "session.sqlite"], cwd=work, check=True
        )
        subprocess.run(
            [tool("cr-filter-operators"), "session.sqlite", "cosmic-ray.toml"], cwd=work, check=True
        )
        baseline = subprocess.run(
            [tool("cosmic-ray"), "baseline", "cosmic-ray.toml"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        if baseline.returncode != 0:
            session.unlink()
            raise SystemExit(
                f"error: the unmutated tests of {name} fail; fix them first:\n{baseline.stdout[-2000:]}"
            )
    timeout = None if deadline is None else max(1.0, deadline - time.time())
    print(f"== {name}: cosmic-ray exec in {work.relative_to(ROOT)}", flush=True)
    try:
        subprocess.run(
            [tool("cosmic-ray"), "exec", "cosmic-ray.toml", "session.sqlite"],
            cwd=work,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        print(f"!! {name}: stopped at the deadline; run again to resume", flush=True)


def reset_survivors(name: str) -> int:
    """Record the current survivors in ``first_pass.json`` (once) and mark them pending again; mutants listed
    as equivalent keep their result (no test can kill them, so running them again only costs time)."""
    report = read_session(name, with_jobs=True)
    if report is None:
        return 0
    jobs = [entry.pop("job_id") for entry in report["survivors"]]
    first = SCRATCH / name / "first_pass.json"
    if not first.exists():
        keep = {
            k: report[k] for k in ("mutants", "killed", "incompetent", "survived", "pending", "kill_rate")
        }
        first.write_text(json.dumps({**keep, "survivors": report["survivors"]}, indent=1) + "\n")
    with sqlite3.connect(SCRATCH / name / "session.sqlite") as db:
        n = sum(
            db.execute(
                "DELETE FROM work_results WHERE test_outcome = 'SURVIVED' AND job_id = ?", (job,)
            ).rowcount
            for job in jobs
        )
    print(f"{name}: {n} survivors marked pending", flush=True)
    return n


def read_session(name: str, with_jobs: bool = False) -> dict | None:
    """Counts and survivors of one module's session (``cosmic-ray dump``: one JSON pair per line)."""
    work = SCRATCH / name
    if not (work / "session.sqlite").exists():
        return None
    dump = subprocess.run(
        [tool("cosmic-ray"), "dump", "session.sqlite"], cwd=work, capture_output=True, text=True, check=True
    )
    counts = {"mutants": 0, "killed": 0, "survived": 0, "equivalent": 0, "incompetent": 0, "pending": 0}
    survivors, equivalent = [], []
    for line in dump.stdout.splitlines():
        if not line.strip():
            continue
        item, result = json.loads(line)
        mutation = item["mutations"][0]
        if result is not None and result.get("worker_outcome") == "skipped":
            continue  # excluded operator
        counts["mutants"] += 1
        if result is None:
            counts["pending"] += 1
            continue
        outcome = result.get("test_outcome")
        entry = {
            **({"job_id": item["job_id"]} if with_jobs else {}),
            "line": mutation["start_pos"][0],
            "operator": mutation["operator_name"],
            "occurrence": mutation["occurrence"],
            "diff": "\n".join(
                ln
                for ln in (result.get("diff") or "").splitlines()
                if ln[:1] in "+-" and ln[:3] not in ("+++", "---")
            ),
        }
        if outcome == "killed":
            counts["killed"] += 1
        elif outcome == "incompetent":
            counts["incompetent"] += 1  # the mutant could not even run (timeout or crash): counted as killed
        else:
            reason = equivalent_reason(name, entry)
            if reason:
                counts["equivalent"] += 1
                equivalent.append({**entry, "reason": reason})
            else:
                counts["survived"] += 1
                survivors.append(entry)
    done = counts["mutants"] - counts["pending"] - counts["equivalent"]
    killed = counts["killed"] + counts["incompetent"]
    counts["kill_rate"] = round(killed / done, 4) if done else None
    package, module_file = MODULES[name]
    first = work / "first_pass.json"
    if first.exists():
        counts["first_pass"] = json.loads(first.read_text())
    return {
        "module": f"packages/{package}/{module_file}",
        "tests": module_tests(name),
        **counts,
        "survivors": survivors,
        "equivalent_mutants": equivalent,
    }


# what a reader must know about a row kept from an earlier report (shown only while its session is gone)
KEPT_NOTES = {
    "di_star.losses": "measured on an earlier losses.py (before the prediction-type conversions moved to core; "
    "the equivalents' line numbers are re-keyed for the current file); `--only di_star.losses --fresh` "
    "measures the current one",
}


def _kept_rows(path: Path, have: dict) -> dict:
    """Modules of an earlier report at ``path`` whose session is no longer on disk, each with ``as_of`` (when
    it was measured): a report is merged, never shrunk because a scratch folder was cleaned."""
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return {}
    generated = str(old.get("generated", ""))
    earlier = re.search(r"earlier modules as of ([^;()]+)", generated)
    default = earlier.group(1).strip() if earlier else generated.split(" (")[0]
    kept = {}
    for name, module in (old.get("modules") or {}).items():
        if name in MODULES and have.get(name) is None:
            kept[name] = {**module, "as_of": module.get("as_of", default), "kept": True}
    return kept


def write_report(path: Path) -> dict:
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    modules = {name: read_session(name) for name in MODULES}
    for name in modules:
        if modules[name] is not None:
            modules[name]["as_of"] = now
            modules[name]["kept"] = False
    modules.update(_kept_rows(path, modules))
    result = {
        "package": "mutation",
        "tool": "cosmic-ray " + _version(),
        "what": "kill rate = (killed + incompetent) / (mutants run - equivalent); each module against its own "
        "tests only; operators excluded: " + "; ".join(EXCLUDED_OPERATORS),
        "command": "make mutation  (python tools/mutation.py)",
        "generated": now,
        "summary": [
            {
                "module": name,
                "mutants": m["mutants"],
                "killed": m["killed"] + m["incompetent"],
                "survived": m["survived"],
                "equivalent": m["equivalent"],
                "pending": m["pending"],
                "kill rate": m["kill_rate"],
                "kill rate, first pass": (m.get("first_pass") or {}).get("kill_rate", m["kill_rate"]),
                "as of": m["as_of"],
            }
            for name, m in modules.items()
            if m is not None
        ],
        "modules": {name: m for name, m in modules.items() if m is not None},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "mutation.md").write_text(render_markdown(result))
    return result


def _cell(diff: str) -> str:
    """A diff as one markdown table cell: lines joined, pipes escaped, code in backticks."""
    return " / ".join(f"`{ln.strip()}`" for ln in diff.splitlines()).replace("|", "\\|")


def render_markdown(result: dict) -> str:
    """``docs/mutation.md``: the kill rate per module, every equivalent mutant with its reason, every survivor."""
    from diffalign.core.report import markdown_table

    lines = [
        "# Mutation testing",
        "",
        f"Generated by `make mutation` ({result['tool']}) on {result['generated']}; numbers in "
        "`bench/results/mutation.json`. Each module is mutated one change at a time and tested with its own",
        "tests only (`packages/<pkg>/tests/test_<module>*.py`, including the `*_mutants.py` files written to kill",
        "survivors, plus the tests of its functions kept in other files: `EXTRA_TESTS` in the tool).",
        "Kill rate = killed / (mutants run - equivalent); a mutant that crashes or hangs the tests",
        "counts as killed. *First pass* is the rate before the `*_mutants.py` tests were run against the survivors",
        "(`python tools/mutation.py --retest-survivors`). Pending mutants were not run yet (the run resumes).",
        "*As of* is when a row was measured: a module whose session (`.mutation/<module>/`) is gone keeps the row",
        "of the earlier report instead of losing it.",
        "",
        "Operators left out: "
        + "; ".join(f"`{op}`" for op in EXCLUDED_OPERATORS)
        + " (reasons in `tools/mutation.py`).",
        "",
        markdown_table(result["summary"]) if result["summary"] else "(no sessions yet)\n",
    ]
    kept = [(name, m) for name, m in result["modules"].items() if m.get("kept")]
    for name, module in kept:
        note = KEPT_NOTES.get(name, "its session is gone")
        lines.append(f"- {name}: kept from the report of {module['as_of']}: {note}.")
    if kept:
        lines.append("")
    for name, module in result["modules"].items():
        if module["equivalent_mutants"]:
            lines += [f"## {name}: equivalent mutants", ""]
            rows = [
                {"line": e["line"], "operator": e["operator"], "change": _cell(e["diff"]), "why": e["reason"]}
                for e in module["equivalent_mutants"]
            ]
            lines += [markdown_table(rows), ""]
        if module["survivors"]:
            lines += [f"## {name}: surviving mutants (not yet killed or explained)", ""]
            rows = [
                {"line": e["line"], "operator": e["operator"], "change": _cell(e["diff"])}
                for e in module["survivors"]
            ]
            lines += [markdown_table(rows), ""]
    return "\n".join(lines) + "\n"


def _version() -> str:
    from importlib.metadata import version

    return version("cosmic-ray")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", choices=sorted(MODULES), default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "mutation.json"))
    parser.add_argument("--report-only", action="store_true", help="only rebuild the JSON from the sessions")
    parser.add_argument("--fresh", action="store_true", help="start the chosen modules' sessions over")
    parser.add_argument("--retest-survivors", action="store_true", help="run the survivors again (new tests)")
    parser.add_argument("--deadline-minutes", type=float, default=None, help="stop exec after this long")
    args = parser.parse_args(argv)
    names = args.only or list(MODULES)
    deadline = None if args.deadline_minutes is None else time.time() + 60 * args.deadline_minutes
    if not args.report_only:
        for name in names:
            if args.fresh:
                shutil.rmtree(SCRATCH / name, ignore_errors=True)
            elif args.retest_survivors:
                reset_survivors(name)
            if deadline is not None and time.time() >= deadline:
                break
            run_module(name, deadline)
            write_report(Path(args.out))
    result = write_report(Path(args.out))
    from diffalign.core.report import markdown_table

    print(markdown_table(result["summary"]) if result["summary"] else "no sessions yet")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
