#!/usr/bin/env python3
"""``make demo``: run every method's shapes-world recipe at a tiny, fixed amount of work and write ``demo-out/``.

Each stage is defined by its work (training iterations, sampling steps, images), set with ``--set`` overrides
of the method's own recipe, never by seconds: on a slow or busy machine the demo takes longer and still shows
every result. Each stage runs the package CLI in a fresh subprocess with ``HF_HUB_OFFLINE=1`` and a run
directory under ``demo-out/runs/``. A generous safety limit per stage (``--stage-limit``, default 60 minutes)
stops a stage that hangs; that stage counts as failed. The demo goes on with the next stage and exits 1 if any
stage failed.

Images are drawn in a helper subprocess of this script (``--worker``) through each package's own inference
functions, so every grid uses the same held-out prompts and the same seed, each method's grid has its
baseline in the row above, and its faithfulness is measured on exactly the images shown.

``demo-out/report.md`` opens with a one-page overview (teacher grid, each method beside its baseline, the
ECAD Pareto plot, the judge's reasoning), then the stage table and the details.

    python tools/demo.py --out demo-out                    # everything
    python tools/demo.py --only teacher ecad               # some stages

These are demo budgets (a few training iterations); the benchmark is ``make bench`` (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "mlcm": ROOT / "packages/mlcm/recipes/shapes_unet.yaml",
    "ecad": ROOT / "packages/ecad/recipes/shapes_dit.yaml",
    "selma": ROOT / "packages/selma/recipes/shapes_unet.yaml",
    "di-star": ROOT / "packages/di-star/recipes/shapes_unet.yaml",
    "listener-reward": ROOT / "packages/listener-reward/recipes/shapes.yaml",
}
STAGES = ("teacher", "mlcm", "ecad", "selma", "di-star", "listener-reward")
# Safety limit per stage: only a hung stage should reach it; reaching it is a failure. Each stage needs at most
# a few minutes of CPU, but on a 2-core machine shared at load average ~25 the stages ran 6-16x slower in wall
# time than their CPU time, so the limit is an hour.
STAGE_LIMIT_S = 3600.0
SEED = 0
PROMPTS_PER_SKILL = 2
TEACHER_STEPS = 25
TEACHER_GUIDANCE = 4.0  # the shapes teachers' own CFG (world_info.json)
FEW_STEPS = 4
JUDGE_PAIRS = 3

# Tiny budgets: each recipe's own settings, shrunk with --set overrides.
MLCM_SET = [
    "stage1.iterations=4",
    "stage2.iterations=1",
    "reward.iterations=1",
    "distill.batch_size=4",
    "stage1.trajectory=single",
    "data.shapes_prompts_per_skill=50",
    "checkpoint.every=1000",
    "log_every=2",
]
ECAD_SET = [
    "sampling.num_inference_steps=10",
    "sampling.batch_size=8",
    "calibration.num_prompts=4",
    "calibration.num_seeds=1",
    "search.population_size=6",
    "search.generations=2",
    "search.choose_at_flop_ratios=[0.75,0.5]",
]
SELMA_SET = [
    "prompts.n_per_skill=3",
    "images.images_per_prompt=2",
    "images.num_inference_steps=10",
    "images.batch_size=24",
    "train.steps=4",
    "train.batch_size=4",
    "train.checkpoint_every=1000",
    "eval.n_per_skill=2",
    "eval.models=[base,merged]",
    "eval.num_inference_steps=10",
]
DISTAR_SET = [
    "training.max_steps=4",
    "training.checkpoint_every=1000",
    "training.log_every=1",
    "data.batch_size=2",
    "data.num_prompts=64",
    "fake_score.updates_per_generator_step=1",
]
LISTENER_SET = ["sft.max_steps=250", "sft.batch_size=16", "sft.save_steps=1000", "sft.logging_steps=50"]
LISTENER_BUILD = ["--base-steps", "150", "--listener-steps", "8", "--listener-pairs", "64"]


# --------------------------------------------------------------------------------------------- records


@dataclass
class StageResult:
    name: str
    status: str = "not run"  # ok | failed | timeout | not run
    wall_s: float = 0.0
    cpu_s: float = 0.0
    limit_s: float = 0.0  # the safety limit that stops a hung stage
    work: str = ""  # what the stage does: iterations, steps, images
    error: str = ""
    images: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    grids: list[dict[str, Any]] = field(default_factory=list)  # one per grid row: label, faithfulness, ...
    caption: str = ""  # one line for the overview: what the stage's pictures compare
    quote: str = ""  # markdown shown under the stage's pictures in the overview (the judge's reasoning)


def exit_code(results: Sequence[StageResult]) -> int:
    """0 only when every stage that was asked for finished ok (a stopped or failed stage is a failure)."""
    return 0 if results and all(r.status == "ok" for r in results) else 1


class StageError(RuntimeError):
    """A stage command failed; the message is what the report shows."""


@dataclass
class CommandResult:
    returncode: int
    output: str
    wall_s: float
    cpu_s: float
    timed_out: bool


def last_error_line(output: str) -> str:
    """The most telling line of a failed command's output: an ``error:`` line, else an exception line."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", output) if ln.strip()]
    for ln in reversed(lines):
        if ln.lower().startswith("error:"):
            return ln[:400]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", ln):
            return ln[:400]
    return lines[-1][:400] if lines else "(no output)"


def fmt_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def faithfulness_cell(row: dict[str, Any]) -> str:
    value = row.get("faithfulness")
    return "" if value is None else f"{value:.3f}"


def stage_work() -> dict[str, str]:
    """What each stage does, in units of work (from the overrides below), for the progress lines and report."""
    sel, few = _set_value, FEW_STEPS
    return {
        "teacher": f"2 teachers x {4 * PROMPTS_PER_SKILL} images x {TEACHER_STEPS} DDIM steps",
        "mlcm": f"{sel(MLCM_SET, 'stage1.iterations')} + {sel(MLCM_SET, 'stage2.iterations')} + "
        f"{sel(MLCM_SET, 'reward.iterations')} iterations (batch {sel(MLCM_SET, 'distill.batch_size')}); "
        f"student and teacher at {few} steps",
        "ecad": f"GA population {sel(ECAD_SET, 'search.population_size')} x "
        f"{sel(ECAD_SET, 'search.generations')} generations on {sel(ECAD_SET, 'calibration.num_prompts')} "
        f"prompts x {sel(ECAD_SET, 'sampling.num_inference_steps')} steps",
        "selma": f"{sel(SELMA_SET, 'prompts.n_per_skill')} prompts x {sel(SELMA_SET, 'images.images_per_prompt')} "
        f"images per skill, {sel(SELMA_SET, 'train.steps')} LoRA steps per expert, merge, eval",
        "di-star": f"{sel(DISTAR_SET, 'training.max_steps')} generator steps (batch "
        f"{sel(DISTAR_SET, 'data.batch_size')}); one-step and teacher samples",
        "listener-reward": f"tiny VLMs ({LISTENER_BUILD[1]} + {LISTENER_BUILD[3]} steps), "
        f"{sel(LISTENER_SET, 'sft.max_steps')} SFT steps, {JUDGE_PAIRS} judged pairs",
    }


def render_overview(results: Sequence[StageResult]) -> list[str]:
    """The one-page top of the report: every stage's pictures (method beside its baseline) and the judge."""
    lines = ["## Overview", ""]
    for r in results:
        mark = "ok" if r.status == "ok" else f"**{r.status.upper()}**: {r.error}"
        lines.append(f"**{r.name}** ({mark}). {r.caption}".rstrip())
        lines.append("")
        rows = [g for g in r.grids if g.get("faithfulness") is not None]
        if rows:
            lines.append(
                "Faithfulness (rows top to bottom): "
                + "; ".join(f"{g['label']} {g['faithfulness']:.3f}" for g in rows)
            )
            lines.append("")
        if r.images:
            lines.append(" ".join(f"![{img}]({img})" for img in r.images))
            lines.append("")
        if r.quote:
            lines += [r.quote, ""]
    return lines


def render_report(
    results: Sequence[StageResult],
    total_wall_s: float,
    total_cpu_s: float,
    machine: str,
    prompts: Sequence[str],
    files: Sequence[str] = (),
) -> str:
    """The markdown of ``demo-out/report.md`` (pure: no file or model access)."""
    from diffalign.core.report import markdown_table

    stage_rows = []
    for r in results:
        numbers = ", ".join(f"{k} {_short(v)}" for k, v in r.numbers.items())
        stage_rows.append(
            {
                "stage": r.name,
                "status": r.status,
                "wall (s)": round(r.wall_s, 1),
                "CPU (s)": round(r.cpu_s, 1),
                "work": r.work,
                "numbers": numbers,
                "error": r.error.replace("|", "/"),
            }
        )
    grid_rows = []
    for r in results:
        for g in r.grids:
            per_skill = g.get("per_skill") or {}
            grid_rows.append(
                {
                    "grid": f"[{g['image']}]({g['image']})",
                    "row": g["label"],
                    "steps": g.get("steps", ""),
                    "faithfulness": faithfulness_cell(g),
                    **{skill: per_skill.get(skill) for skill in ("object", "count", "color", "spatial")},
                    "sample s": g.get("seconds"),
                }
            )
    ok = sum(r.status == "ok" for r in results)
    lines = [
        "# diffalign demo",
        "",
        f"{ok}/{len(results)} stages ok; wall time {fmt_seconds(total_wall_s)}, CPU time of all subprocesses "
        f"{total_cpu_s:.0f} s. Machine: {machine}.",
        "",
        "**These are tiny demo budgets, not the benchmark.** Every method ran its shapes-world recipe for a few",
        "iterations (fixed work, set with `--set` overrides listed at the end), so the students and adapters are",
        "barely trained and their faithfulness says nothing about the methods. The measured comparisons with",
        "baselines are `make bench` ([BENCHMARKS.md](../BENCHMARKS.md)). In every grid the baseline is the row",
        f"above the method; the columns are {len(prompts)} held-out prompts (listed below), all rows from seed "
        f"{SEED}; faithfulness is the shapes verifier's DSG score of exactly the images shown (8 images: noisy).",
        "",
        *render_overview(results),
        "## Stages",
        "",
        "Each stage is a fixed amount of work; wall time depends on what else the machine runs, CPU time (user +",
        "system of the stage's subprocesses) is the steadier number.",
        "",
        markdown_table(stage_rows, digits=1),
        "## Grids",
        "",
        markdown_table(grid_rows) if grid_rows else "(no grids were written)\n",
        "Prompts, left to right: " + "; ".join(f"`{p}`" for p in prompts),
        "",
    ]
    images = {img for r in results for img in r.images}
    extra = [f for f in files if f not in images]
    if extra:
        lines += ["## Other files", ""] + [f"- [{f}]({f})" for f in extra] + [""]
    lines += ["## Budgets", "", "Each stage's recipe, with these overrides:", ""]
    for name, overrides in (
        ("mlcm", MLCM_SET),
        ("ecad", ECAD_SET),
        ("selma", SELMA_SET),
        ("di-star", DISTAR_SET),
        ("listener-reward", LISTENER_SET + LISTENER_BUILD),
    ):
        lines.append(f"- {name} (`{RECIPES[name].relative_to(ROOT)}`): `" + " ".join(overrides) + "`")
    lines.append("")
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# --------------------------------------------------------------------------------------------- running


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_command(cmd: Sequence[str], log_path: Path, timeout_s: float, env: dict[str, str]) -> CommandResult:
    """Run ``cmd`` in its own process group, echo its output live (progress bars included) and to a log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start, cpu0 = time.time(), child_cpu_seconds()
    chunks: list[bytes] = []
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        proc = subprocess.Popen(
            list(cmd),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def pump() -> None:
            assert proc.stdout is not None
            while True:
                data = proc.stdout.read1(4096)
                if not data:
                    break
                chunks.append(data)
                log.write(data)
                sys.stdout.buffer.write(data)
                sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
        reader.join(timeout=10)
    output = b"".join(chunks).decode("utf-8", errors="replace")
    return CommandResult(proc.returncode, output, time.time() - start, child_cpu_seconds() - cpu0, timed_out)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Demo:
    def __init__(self, out: Path, stage_limit_s: float, progress: bool, total_stages: int = len(STAGES)):
        self.out = out
        self.runs = out / "runs"
        self.logs = out / "logs"
        self.start = time.time()
        self.stage_limit_s = stage_limit_s
        self.total_stages = total_stages
        self.stage_index = 0
        self.work = stage_work()
        self.env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
            DIFFALIGN_LISTENER_SHAPES_DIR=str((self.runs / "listener-reward" / "shapes-models").resolve()),
        )
        self.env.pop("DIFFALIGN_NO_PROGRESS", None)
        if progress:
            self.env["DIFFALIGN_PROGRESS"] = "1"
            if not sys.stdout.isatty():
                self.env.setdefault("TQDM_MININTERVAL", "10")
        self.current: StageResult | None = None
        self.deadline = 0.0

    # -- plumbing
    def elapsed(self) -> float:
        return time.time() - self.start

    def cli(self, *args: str) -> list[str]:
        """The umbrella ``diffalign`` console script beside this Python, else ``python -m diffalign.core.cli``
        (which also works but prints a spurious circular-import warning for di-star)."""
        script = Path(sys.executable).parent / "diffalign"
        if script.exists():
            return [str(script), *args]
        return [sys.executable, "-m", "diffalign.core.cli", *args]

    def run(self, cmd: Sequence[str], what: str) -> CommandResult:
        assert self.current is not None
        remaining = self.deadline - time.time()
        if remaining < 1:
            self.current.status = "timeout"
            raise StageError(f"the stage reached its safety limit ({self.stage_limit_s:.0f} s) before {what}")
        shown = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))
        print(f"\n--- [{fmt_seconds(self.elapsed())}] {what}: {shown}", flush=True)
        res = run_command(cmd, self.logs / f"{self.current.name}.log", remaining, self.env)
        self.current.wall_s += res.wall_s
        self.current.cpu_s += res.cpu_s
        if res.timed_out:
            self.current.status = "timeout"
            raise StageError(
                f"{what} was stopped by the stage's safety limit ({self.stage_limit_s:.0f} s) after "
                f"{res.wall_s:.0f} s; the work is fixed, so this means a hang or a very slow machine "
                "(raise --stage-limit)"
            )
        if res.returncode != 0:
            raise StageError(f"{what} exited with code {res.returncode}: {last_error_line(res.output)}")
        return res

    def sample(
        self, name: str, rows: list[dict[str, Any]], prompts: list[str], what: str
    ) -> list[dict[str, Any]]:
        """Draw one grid row per model in a worker subprocess; returns the rows with their faithfulness."""
        spec = {"out": str(self.out / name), "prompts": prompts, "seed": SEED, "rows": rows}
        spec_path = self.logs / f"{Path(name).stem}.spec.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec, indent=2))
        self.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)], what)
        result = json.loads((self.out / name).with_suffix(".json").read_text())
        assert self.current is not None
        self.current.images.append(name)
        for row in result["rows"]:
            self.current.grids.append({"image": name, **row})
        return result["rows"]

    def stage(self, name: str, body: Callable[[StageResult], None]) -> StageResult:
        result = StageResult(name, limit_s=self.stage_limit_s, work=self.work.get(name, ""))
        self.current = result
        self.stage_index += 1
        bar = "=" * 100
        print(
            f"\n{bar}\n[{fmt_seconds(self.elapsed())}] stage {self.stage_index}/{self.total_stages}: {name} "
            f"({result.work})\n{bar}",
            flush=True,
        )
        self.deadline = time.time() + self.stage_limit_s
        try:
            body(result)
            result.status = "ok"
        except StageError as err:
            result.status = "timeout" if result.status == "timeout" else "failed"
            result.error = str(err)
        except Exception as err:  # a bug in the demo itself must not stop the other stages
            result.status, result.error = "failed", f"{type(err).__name__}: {err}"
        print(
            f"[{fmt_seconds(self.elapsed())}] stage {name}: {result.status} in {result.wall_s:.0f} s wall, "
            f"{result.cpu_s:.0f} s CPU" + (f" -- {result.error}" if result.error else ""),
            flush=True,
        )
        return result

    # -- stages
    def teacher(self, prompts: list[str]) -> Callable[[StageResult], None]:
        def body(r: StageResult) -> None:
            r.caption = (
                f"The two committed teachers, `shapes/unet` and `shapes/dit`, at {TEACHER_STEPS} DDIM steps "
                f"(CFG {TEACHER_GUIDANCE}): the reference every method starts from."
            )
            for kind in ("unet", "dit"):
                rows = [
                    {
                        "kind": "teacher",
                        "model": f"shapes/{kind}",
                        "label": f"shapes/{kind} {TEACHER_STEPS} steps",
                        "steps": TEACHER_STEPS,
                        "guidance": TEACHER_GUIDANCE,
                    }
                ]
                self.sample(f"teacher_{kind}.png", rows, prompts, f"sample shapes/{kind}")

        return body

    def mlcm(self, prompts: list[str]) -> Callable[[StageResult], None]:
        def body(r: StageResult) -> None:
            r.caption = (
                f"Multistep consistency student at {FEW_STEPS} steps (bottom row) beside its baseline, the "
                f"teacher's own DDIM at {FEW_STEPS} steps (top row)."
            )
            run_dir = self.runs / "mlcm"
            sets = _set_args(MLCM_SET)
            res = self.run(
                self.cli("mlcm", "distill", str(RECIPES["mlcm"]), *sets, "--run-dir", str(run_dir)), "distill"
            )
            m = re.search(r"\((\d+) iterations, ([\d.]+)s\)", res.output)
            if m:
                r.numbers["iterations"] = int(m.group(1))
                r.numbers["train s"] = float(m.group(2))
            last = _last_jsonl(run_dir / "metrics.jsonl")
            if last:
                r.numbers["last loss"] = last.get("loss")
            rows = [
                {
                    "kind": "teacher",
                    "model": "shapes/unet",
                    "label": f"teacher DDIM {FEW_STEPS}",
                    "steps": FEW_STEPS,
                    "guidance": TEACHER_GUIDANCE,
                },
                {
                    "kind": "mlcm",
                    "student": str(run_dir / "student"),
                    "label": f"MLCM student {FEW_STEPS}",
                    "steps": FEW_STEPS,
                },
            ]
            self.sample("distilled.png", rows, prompts, "sample student and teacher at 4 steps")

        return body

    def ecad(self, prompts: list[str]) -> Callable[[StageResult], None]:
        def body(r: StageResult) -> None:
            r.caption = (
                "Pareto front of the caching-schedule search (FLOPs against reward), and `shapes/dit` with the "
                "cheapest chosen schedule (bottom row) beside no cache (top row)."
            )
            run_dir = self.runs / "ecad"
            sets = _set_args(ECAD_SET)
            self.run(
                self.cli("ecad", "search", str(RECIPES["ecad"]), *sets, "--run-dir", str(run_dir)), "search"
            )
            front = json.loads((run_dir / "front.json").read_text())
            r.numbers["front size"] = len(front.get("front", []))
            if front.get("baseline_reward") is not None:
                r.numbers["no-cache reward"] = front["baseline_reward"]
            if (run_dir / "front.png").exists():
                shutil.copyfile(run_dir / "front.png", self.out / "ecad_pareto.png")
                r.images.append("ecad_pareto.png")
            chosen = front.get("chosen") or {}
            if not chosen:
                raise StageError("the search chose no schedule (front.json has no 'chosen' entries)")
            budget = min(chosen, key=float)  # the cheapest budget that has a schedule
            entry = chosen[budget]
            schedule = Path(entry["path"])
            if not schedule.is_absolute() and not schedule.exists():
                schedule = run_dir / schedule
            r.numbers["chosen FLOP ratio"] = entry.get("flop_ratio")
            r.numbers["chosen reward"] = entry.get("reward")
            steps = int(_set_value(ECAD_SET, "sampling.num_inference_steps"))
            rows = [
                {
                    "kind": "teacher",
                    "model": "shapes/dit",
                    "label": f"DiT {steps} no cache",
                    "steps": steps,
                    "guidance": 4.5,
                },
                {
                    "kind": "ecad",
                    "model": "shapes/dit",
                    "schedule": str(schedule),
                    "label": f"ECAD <= {float(budget):.2f} FLOPs",
                    "steps": steps,
                    "guidance": 4.5,
                },
            ]
            self.sample("cached.png", rows, prompts, "sample with and without the chosen schedule")

        return body

    def selma(self, prompts: list[str]) -> Callable[[StageResult], None]:
        def body(r: StageResult) -> None:
            r.caption = (
                "Skill experts merged into one model (bottom row) beside the base teacher `shapes/unet` (top row), "
                f"both at {TEACHER_STEPS} steps."
            )
            run_dir = self.runs / "selma"
            sets = _set_args(SELMA_SET)
            self.run(
                self.cli("selma", "run", str(RECIPES["selma"]), *sets, "--run-dir", str(run_dir)), "selma run"
            )
            results = run_dir / "eval" / "results.json"
            if results.exists():
                data = json.loads(results.read_text())
                for model, row in (data.get("models") or {}).items():
                    value = row.get("faithfulness", row) if isinstance(row, dict) else row
                    if isinstance(value, dict):
                        value = value.get("overall", value.get("mean"))
                    if isinstance(value, (int, float)):
                        r.numbers[f"eval {model}"] = float(value)
            pipeline = run_dir / "merged" / "linear" / "pipeline"
            rows = [
                {
                    "kind": "teacher",
                    "model": "shapes/unet",
                    "label": f"base shapes/unet {TEACHER_STEPS}",
                    "steps": TEACHER_STEPS,
                    "guidance": TEACHER_GUIDANCE,
                },
                {
                    "kind": "teacher",
                    "model": str(pipeline),
                    "label": f"SELMA merged {TEACHER_STEPS}",
                    "steps": TEACHER_STEPS,
                    "guidance": TEACHER_GUIDANCE,
                },
            ]
            self.sample("merged.png", rows, prompts, "sample the merged model")

        return body

    def di_star(self, prompts: list[str]) -> Callable[[StageResult], None]:
        def body(r: StageResult) -> None:
            r.caption = (
                "One-step generator after reward post-training (bottom row) beside its baseline at the same cost, "
                "the teacher `shapes/unet` with one DDIM step (top row)."
            )
            run_dir = self.runs / "di-star"
            sets = _set_args(DISTAR_SET)
            self.run(
                self.cli("di-star", "train", str(RECIPES["di-star"]), *sets, "--run-dir", str(run_dir)),
                "train",
            )
            last = _last_jsonl(run_dir / "metrics.jsonl")
            for key in ("loss_generator", "reward", "loss_fake"):
                if last and isinstance(last.get(key), (int, float)):
                    r.numbers[key] = last[key]
            rows = [
                {
                    "kind": "teacher",
                    "model": "shapes/unet",
                    "label": "teacher DDIM 1",
                    "steps": 1,
                    "guidance": TEACHER_GUIDANCE,
                },
                {"kind": "di-star", "model": str(run_dir / "generator"), "label": "DI* one step", "steps": 1},
            ]
            self.sample("one_step.png", rows, prompts, "one-step samples and the teacher at one step")

        return body

    def listener(self) -> Callable[[StageResult], None]:
        def body(r: StageResult) -> None:
            r.caption = (
                "A reasoning preference judge (tiny VLM after a few SFT steps) compares two images for a prompt; "
                "its reasoning for the first pair is quoted, all pairs are in [judge.md](judge.md)."
            )
            recipe = str(RECIPES["listener-reward"])
            run_dir = self.runs / "listener-reward"
            models = Path(self.env["DIFFALIGN_LISTENER_SHAPES_DIR"])
            if not ((models / "reasoner").is_dir() and (models / "listener").is_dir()):
                self.run(self.cli("listener-reward", "build-models", recipe, *LISTENER_BUILD), "build-models")
            sft_dir = run_dir / "sft"
            sets = _set_args([*LISTENER_SET, f"sft.output_dir={sft_dir}"])
            self.run(self.cli("listener-reward", "sft", recipe, *sets), "sft")
            pairs_dir = self.out / "judge"
            spec = {"pairs_dir": str(pairs_dir), "n": JUDGE_PAIRS, "seed": SEED}
            spec_path = self.logs / "judge_pairs.spec.json"
            spec_path.write_text(json.dumps(spec))
            self.run(
                [sys.executable, str(Path(__file__).resolve()), "--worker-pairs", str(spec_path)],
                "make pairs",
            )
            pairs = json.loads((pairs_dir / "pairs.json").read_text())
            verdicts = []
            for pair in pairs:
                res = self.run(
                    self.cli(
                        "listener-reward",
                        "judge",
                        recipe,
                        "--prompt",
                        pair["prompt"],
                        "--image-a",
                        pair["image_a"],
                        "--image-b",
                        pair["image_b"],
                        "--checkpoint",
                        str(sft_dir / "final"),
                    ),
                    f"judge pair {pair['index']}",
                )
                verdicts.append(_json_tail(res.output))
            (self.out / "judge.md").write_text(render_judge(pairs, verdicts, self.out), encoding="utf-8")
            agree = sum(
                1 for p, v in zip(pairs, verdicts, strict=True) if v and v.get("choice") == p["label"]
            )
            r.numbers["agrees with annotator"] = f"{agree}/{len(pairs)}"
            r.images.append(str(Path(pairs[0]["grid"]).relative_to(self.out)))
            r.quote = judge_quote(pairs[0], verdicts[0])

        return body


def _set_args(overrides: Sequence[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]`` (recipe overrides on a method CLI)."""
    return [arg for override in overrides for arg in ("--set", override)]


def _set_value(overrides: Sequence[str], key: str) -> str:
    for item in overrides:
        k, _, v = item.partition("=")
        if k == key:
            return v
    raise KeyError(key)


def _last_jsonl(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def _json_tail(output: str) -> dict[str, Any] | None:
    """The last JSON object printed by a command (the judge prints one, indented)."""
    start = output.rfind("\n{")
    start = start + 1 if start >= 0 else output.find("{")
    if start < 0:
        return None
    end = output.rfind("}")
    try:
        return json.loads(output[start : end + 1])
    except json.JSONDecodeError:
        return None


def judge_quote(pair: dict[str, Any], verdict: dict[str, Any] | None) -> str:
    """One pair's verdict as a short markdown block for the overview (pure)."""
    head = f"Prompt `{pair['prompt']}`; the simulated annotator prefers image {pair['label']}. "
    if verdict is None:
        return head + "The judge gave no verdict (see logs/listener-reward.log)."
    reasoning = str(verdict.get("reasoning") or "(empty)").replace("\n", "\n> ")
    return head + f"The judge chooses image {verdict.get('choice')}:\n\n> {reasoning}"


def render_judge(
    pairs: Sequence[dict[str, Any]], verdicts: Sequence[dict[str, Any] | None], out: Path
) -> str:
    """Markdown of the judge's verdicts (pure)."""
    lines = [
        "# Listener-reward judge on shapes pairs",
        "",
        "The reasoner after a few SFT steps (demo budget: expect the format, not good judgement). Each pair is",
        "one image drawn for the prompt and one for a wrong colour or shape; the simulated annotator's choice",
        "is shown beside the judge's.",
        "",
    ]
    for pair, verdict in zip(pairs, verdicts, strict=True):
        grid = Path(pair["grid"])
        rel = grid.relative_to(out) if grid.is_absolute() and out.resolve() in grid.parents else grid
        lines += [f"## Pair {pair['index']}: `{pair['prompt']}`", "", f"![pair {pair['index']}]({rel})", ""]
        lines.append(f"- annotator prefers image {pair['label']}; faithful: {pair.get('faithful')}")
        if verdict is None:
            lines += ["- judge: no verdict (see logs/listener-reward.log)", ""]
            continue
        prob = verdict.get("probability")
        prob_s = f"{prob:.3f}" if isinstance(prob, (int, float)) else str(prob)
        lines += [
            f"- judge chooses image {verdict.get('choice')} (probability {prob_s})",
            "- reasoning:",
            "",
            "  > " + (str(verdict.get("reasoning") or "(empty)").replace("\n", "\n  > ")),
            "",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- workers


def worker_sample(spec_path: Path) -> int:
    """Draw each row's images, write one grid (save_image_grid) and a JSON with the faithfulness per row."""
    import torch

    from diffalign.core.report import save_image_grid
    from diffalign.core.shapes import faithfulness

    spec = json.loads(spec_path.read_text())
    prompts, seed = spec["prompts"], int(spec["seed"])
    images, rows = [], []
    for row in spec["rows"]:
        t0 = time.time()
        print(f"sampling: {row['label']}", flush=True)
        batch = _sample_row(row, prompts, seed)
        score = faithfulness(batch, prompts)
        images.append(batch)
        rows.append(
            {
                "label": row["label"],
                "steps": row.get("steps"),
                "faithfulness": score.overall,
                "per_skill": score.per_skill,
                "per_prompt": score.per_prompt,
                "seconds": round(time.time() - t0, 1),
            }
        )
        print(f"  faithfulness {score.overall:.3f} " + json.dumps(score.per_skill), flush=True)
    out = Path(spec["out"])
    labels = [r["label"] for r in rows]
    captions = [p for _ in rows for p in prompts]
    save_image_grid(torch.cat(images), out, nrow=len(prompts), captions=captions, row_labels=labels)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "prompts": prompts}, indent=2))
    print(f"wrote {out}", flush=True)
    return 0


def _sample_row(row: dict[str, Any], prompts: list[str], seed: int):
    import torch

    kind = row["kind"]
    if kind in ("teacher", "ecad"):
        from diffalign.core.models import resolve_model_path
        from diffalign.core.shapes.evaluate import load_shapes_pipeline
        from diffalign.core.shapes.teachers import sample_pipeline

        pipe = load_shapes_pipeline(resolve_model_path(row["model"]))
        if kind == "teacher":
            return sample_pipeline(pipe, prompts, steps=row["steps"], guidance=row["guidance"], seed=seed)
        from diffalign.ecad.hooks import apply_schedule, remove_schedule, reset_schedule_state
        from diffalign.ecad.schedule import Schedule

        schedule = Schedule.load(row["schedule"])
        apply_schedule(pipe, schedule)
        try:
            reset_schedule_state(pipe)
            return sample_pipeline(
                pipe, prompts, steps=schedule.num_steps, guidance=row["guidance"], seed=seed
            )
        finally:
            remove_schedule(pipe)
    if kind == "mlcm":
        from diffalign.mlcm.inference import load_student, sample_images

        pipe = load_student(row["student"])
        pipe.set_progress_bar_config(disable=True)
        return sample_images(pipe, prompts, row["steps"], guidance_scale=0.0, seed=seed).clamp(-1, 1)
    if kind == "di-star":
        from diffalign.core.models import load_pipeline
        from diffalign.di_star.inference import read_metadata, sample_one_step, to_one_step_pipeline

        pipe = to_one_step_pipeline(load_pipeline(row["model"]))
        pipe.set_progress_bar_config(disable=True)
        t_star = int(read_metadata(row["model"])["t_star"])
        images = sample_one_step(
            pipe, prompts, t_star, generator=torch.Generator().manual_seed(seed), output_type="pt"
        )
        return (images.float() * 2 - 1).clamp(-1, 1)
    raise ValueError(f"unknown row kind {kind!r}")


def worker_pairs(spec_path: Path) -> int:
    """Write a few listener-reward shapes pairs as PNG files (plus a side-by-side grid each) and pairs.json."""
    from diffalign.core.config import load_config
    from diffalign.core.report import save_image_grid
    from diffalign.listener_reward.config import RECIPE_CONFIG
    from diffalign.listener_reward.data import load_pairs

    spec = json.loads(spec_path.read_text())
    out = Path(spec["pairs_dir"])
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(RECIPE_CONFIG, RECIPES["listener-reward"], [])
    pairs = load_pairs(cfg.data, "test_id")[: int(spec["n"])]
    records = []
    for i, pair in enumerate(pairs, 1):
        a, b = pair.images()
        pa, pb = out / f"pair{i}_image1.png", out / f"pair{i}_image2.png"
        a.save(pa)
        b.save(pb)
        grid = save_image_grid([a, b], out / f"pair{i}.png", nrow=2, captions=["image 1", "image 2"], scale=6)
        records.append(
            {
                "index": i,
                "prompt": pair.prompt,
                "image_a": str(pa.resolve()),
                "image_b": str(pb.resolve()),
                "grid": str(grid.resolve()),
                "label": pair.label,
                "faithful": list(pair.faithful) if pair.faithful else None,
            }
        )
    (out / "pairs.json").write_text(json.dumps(records, indent=2))
    print(f"wrote {len(records)} pairs to {out}", flush=True)
    return 0


# --------------------------------------------------------------------------------------------- main


def clear_outputs(out: Path) -> None:
    """Remove what an earlier demo wrote into ``out`` (only its own files and folders)."""
    for sub in ("runs", "logs", "judge"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for pattern in ("*.png", "*.json", "*.md"):
        for path in out.glob(pattern):
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def machine() -> str:
    import platform

    return f"{platform.platform()}, {os.cpu_count()} CPU threads, python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    parser.add_argument("--only", nargs="*", choices=STAGES, default=None, help="run only these stages")
    parser.add_argument(
        "--stage-limit",
        type=float,
        default=STAGE_LIMIT_S,
        help=f"safety limit per stage in seconds (default {STAGE_LIMIT_S:.0f}); a stage stopped by it fails",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not force the tools' progress bars")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-pairs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_sample(args.worker)
    if args.worker_pairs:
        return worker_pairs(args.worker_pairs)

    out = Path(args.out)
    if not out.is_absolute():
        out = Path.cwd() / out
    clear_outputs(out)  # a fresh demo each time: the run dirs would otherwise resume finished runs
    sys.path.insert(0, str(ROOT / "packages" / "core" / "src"))
    from diffalign.core.shapes.grammar import eval_prompts

    prompts = eval_prompts(PROMPTS_PER_SKILL)
    chosen = [name for name in STAGES if args.only is None or name in args.only]
    demo = Demo(out, args.stage_limit, progress=not args.no_progress, total_stages=len(chosen))
    plan = {
        "teacher": demo.teacher(prompts),
        "mlcm": demo.mlcm(prompts),
        "ecad": demo.ecad(prompts),
        "selma": demo.selma(prompts),
        "di-star": demo.di_star(prompts),
        "listener-reward": demo.listener(),
    }
    results: list[StageResult] = []
    cpu0 = child_cpu_seconds()

    def write_report() -> tuple[float, float]:
        wall, cpu = demo.elapsed(), child_cpu_seconds() - cpu0
        files = sorted(str(p.relative_to(out)) for p in out.glob("*.png"))
        files += ["judge.md"] if (out / "judge.md").exists() else []
        text = render_report(results, wall, cpu, machine(), prompts, files)
        (out / "report.md").write_text(text, encoding="utf-8")
        return wall, cpu

    for name in chosen:
        results.append(demo.stage(name, plan[name]))
        write_report()  # after every stage, so a stopped demo still leaves a report
    total_wall, total_cpu = write_report()
    print(f"\nwrote {out / 'report.md'} ({fmt_seconds(total_wall)} wall, {total_cpu:.0f} s CPU)")
    for r in results:
        print(f"  {r.name:16s} {r.status:8s} {r.wall_s:6.1f} s wall {r.cpu_s:6.1f} s CPU  {r.error}")
    failed = [r.name for r in results if r.status != "ok"]
    if failed:
        print(f"demo FAILED: {len(failed)} stage(s) did not finish: {', '.join(failed)}", file=sys.stderr)
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
