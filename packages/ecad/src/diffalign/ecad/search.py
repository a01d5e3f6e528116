"""NSGA-II search for caching schedules (ECAD, arXiv 2506.15682, section 3).

Genome: the flattened ``recompute`` tensor of a :class:`~diffalign.ecad.schedule.Schedule`.
Objectives (both minimised): ``1 - mean reward`` over calibration prompts x seeds, and compute
(FLOPs of the transformer for a full sampling run, as a ratio to no caching by default).
Constraint: at least ``min_cached_bits`` evaluations are reused (``G = min_cached_bits - cached <= 0``).
Counting the bits of the *effective* schedule (step 0 always recomputes) keeps a schedule that only
"caches" at step 0 from passing as cached.

Operators as in the paper's code: pymoo ``NSGA2`` through ask/tell, ``PointCrossover(prob=0.9,
n_points=4)``, ``BitflipMutation(prob=0.05)``, initial population seeded with heuristic schedules.

Reliability: every evaluation is deterministic (seeded generator per image), so a checkpoint only
stores the evaluated genomes and their objectives per generation; resuming replays the GA with the
same seed and takes objectives from the checkpoint, which reproduces the uninterrupted run exactly.
Candidates of a generation are spread over the processes of an ``accelerate`` launch and gathered.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import CalibrationSection, EcadRecipe
from .cost import CostModel, measure_cost_model
from .hooks import apply_schedule, remove_schedule
from .pareto import non_dominated_mask
from .sampling import generate, pipeline_call_kwargs
from .schedule import Schedule, ScheduleError, heuristic_population, no_cache

__all__ = [
    "SearchInterrupted",
    "calibration_set",
    "load_reward",
    "CandidateEvaluator",
    "SearchResult",
    "run_search",
    "initial_population",
    "write_front",
]


class SearchInterrupted(RuntimeError):
    """Raised by a ``stop_after_generation`` request (used to test resume)."""


# ---------------------------------------------------------------------------------------------- inputs


def _shapes_prompts(skill: str, n: int, split: str, seed: int) -> list[str]:
    try:
        from diffalign.core.shapes import sample_prompts
    except ImportError:
        from diffalign.core.shapes.grammar import sample_prompts
    return list(sample_prompts(skill, n, split=split, seed=seed))


def calibration_set(cfg: CalibrationSection) -> tuple[list[str], list[int]]:
    """``(prompts, seeds)`` of equal length: every prompt with every seed (prompt-major order)."""
    if cfg.prompts is not None:
        prompts = list(cfg.prompts)
    elif cfg.prompt_file is not None:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"calibration.prompt_file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
            prompts = [p if isinstance(p, str) else p.get("prompt") for p in data]
        else:
            prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError(f"calibration.prompt_file {path} holds no prompts")
    else:
        skills = list(cfg.shapes_skills)
        if not skills:
            raise ValueError("calibration.shapes_skills is empty")
        per = [
            cfg.num_prompts // len(skills) + (1 if i < cfg.num_prompts % len(skills) else 0)
            for i in range(len(skills))
        ]
        prompts = []
        for skill, n in zip(skills, per):
            if n:
                prompts += _shapes_prompts(skill, n, cfg.shapes_split, cfg.prompt_seed)
    prompts = prompts[: cfg.num_prompts]
    seeds = list(range(cfg.seed_offset, cfg.seed_offset + cfg.num_seeds))
    return [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds]


def load_reward(spec: str, **kwargs):
    """A registered reward name, or ``package.module:factory`` for an importable factory."""
    if ":" in spec:
        module_name, attr = spec.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import reward factory {spec!r}: {err}") from err
        return factory(**kwargs)
    from diffalign.core.rewards import get_reward

    return get_reward(spec, **kwargs)


def _score(reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    if getattr(reward, "input_range", "[-1,1]") == "pil":
        from diffalign.core.report import to_pil

        images = to_pil(images)
    with torch.no_grad():
        return torch.as_tensor(reward.score(images, prompts)).float().flatten().cpu()


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class CandidateEvaluator:
    """Scores schedules: mean reward of the images a schedule produces, and its analytic FLOPs."""

    pipe: Any
    reward: Any
    cost_model: CostModel
    template: Schedule
    prompts: list[str]
    seeds: list[int]
    num_inference_steps: int
    guidance_scale: float
    height: int | None = None
    width: int | None = None
    batch_size: int = 16
    device: Any = "cpu"
    extra_call_kwargs: dict[str, Any] = field(default_factory=dict)

    def _generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return generate(
            self.pipe,
            prompts,
            seeds,
            self.num_inference_steps,
            self.guidance_scale,
            self.height,
            self.width,
            self.batch_size,
            self.device,
            self.extra_call_kwargs,
        )

    def images(self, schedule: Schedule | None) -> torch.Tensor:
        """All calibration images (``[N, 3, H, W]`` in [-1, 1]) under ``schedule`` (None = unhooked)."""
        return self._run(schedule, lambda imgs, prompts: imgs, torch.cat)

    def quality(self, schedule: Schedule | None) -> float:
        """Mean reward over the calibration prompts x seeds (scored batch by batch)."""
        return float(
            self._run(schedule, lambda imgs, prompts: _score(self.reward, imgs, prompts), torch.cat).mean()
        )

    def _run(self, schedule, per_batch, combine):
        if schedule is not None:
            apply_schedule(self.pipe, schedule)
        try:
            outs = []
            for i in range(0, len(self.prompts), self.batch_size):
                prompts, seeds = self.prompts[i : i + self.batch_size], self.seeds[i : i + self.batch_size]
                outs.append(per_batch(self._generate(prompts, seeds), prompts))
            return combine(outs)
        finally:
            if schedule is not None:
                remove_schedule(self.pipe)

    def evaluate(self, genome: np.ndarray) -> dict[str, float]:
        schedule = Schedule.from_genome(torch.from_numpy(np.asarray(genome, dtype=bool)), self.template)
        flops = self.cost_model.flops(schedule)
        return {
            "reward": self.quality(schedule),
            "flops": flops,
            "flop_ratio": flops / self.cost_model.no_cache_flops(schedule.num_steps),
            "num_cached": schedule.num_cached(),
        }


def _distributed_map(accelerator, items: list, fn: Callable) -> list:
    """``[fn(x) for x in items]`` with item i computed on process ``i % num_processes``."""
    if accelerator is None or accelerator.num_processes == 1:
        return [fn(x) for x in items]
    from accelerate.utils import gather_object

    mine = [
        (i, fn(items[i])) for i in range(accelerator.process_index, len(items), accelerator.num_processes)
    ]
    gathered = gather_object(mine)
    results = dict(gathered)
    if len(results) != len(items):
        raise RuntimeError(f"gathered {len(results)} of {len(items)} evaluations")
    return [results[i] for i in range(len(items))]


# ---------------------------------------------------------------------------------------------- GA


def initial_population(template: Schedule, cfg: EcadRecipe, rng: np.random.Generator) -> np.ndarray:
    """Seed schedules (files, then heuristics), filled up to the population size with uniform random bits."""
    seeds: list[Schedule] = []
    for path in cfg.search.initial_schedules:
        s = Schedule.load(path)
        if s.architecture != template.architecture or s.group_sizes != template.group_sizes:
            raise ScheduleError(
                f"initial schedule {path} is for {s.architecture} {s.group_sizes}, not "
                f"{template.architecture} {template.group_sizes}"
            )
        if s.num_steps != template.num_steps:
            raise ScheduleError(
                f"initial schedule {path} has {s.num_steps} steps, the search uses {template.num_steps}"
            )
        seeds.append(s)
    if cfg.search.seed_heuristics:
        seeds += heuristic_population(template.architecture, template.num_steps, template.group_sizes)
    rows: list[np.ndarray] = []
    for s in seeds:
        g = s.to_genome().numpy()
        if not any(np.array_equal(g, r) for r in rows):
            rows.append(g)
    rows = rows[: cfg.search.population_size]
    n_var = template.recompute.numel()
    while len(rows) < cfg.search.population_size:
        rows.append(rng.random(n_var) < 0.5)
    return np.stack(rows).astype(bool)


def _search_fingerprint(cfg: EcadRecipe, n_var: int) -> str:
    """Hash of everything that changes the GA trajectory (not the generation count or run dir)."""
    d = cfg.model_dump(mode="json")
    d.pop("run_dir", None)
    d.pop("launch", None)
    d["search"].pop("generations", None)
    d["search"].pop("num_threads", None)
    d["sampling"].pop("batch_size", None)
    d["n_var"] = n_var
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SearchResult:
    X: np.ndarray  # every evaluated genome, in evaluation order
    F: np.ndarray
    G: np.ndarray
    generation: np.ndarray  # generation index of each row
    records: list[dict[str, float]]
    front: np.ndarray  # indices into X of the non-dominated archive
    template: Schedule
    baseline_reward: float | None
    wall_time_s: float

    def front_schedules(self) -> list[Schedule]:
        out = []
        for i in self.front:
            s = Schedule.from_genome(
                torch.from_numpy(self.X[i]), self.template, name=f"gen{self.generation[i]:03d}_eval{i:05d}"
            )
            s.metadata = {k: float(v) for k, v in self.records[i].items()} | {
                "generation": int(self.generation[i])
            }
            out.append(s)
        return out


def _make_problem(n_var: int):
    from pymoo.core.problem import Problem

    return Problem(n_var=n_var, n_obj=2, n_ieq_constr=1, xl=0, xu=1, vtype=bool)


def _make_algorithm(cfg: EcadRecipe, X0: np.ndarray):
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.population import Population
    from pymoo.operators.crossover.pntx import PointCrossover
    from pymoo.operators.mutation.bitflip import BitflipMutation

    s = cfg.search
    mutation_kwargs = {"prob": s.mutation_prob}
    if s.mutation_bit_prob is not None:
        mutation_kwargs["prob_var"] = s.mutation_bit_prob
    return NSGA2(
        pop_size=s.population_size,
        sampling=Population.new("X", X0),
        crossover=PointCrossover(prob=s.crossover_prob, n_points=s.crossover_points),
        mutation=BitflipMutation(**mutation_kwargs),
        eliminate_duplicates=True,
    )


def _objectives(rec: dict[str, float], cfg: EcadRecipe) -> tuple[list[float], list[float]]:
    compute = rec["flop_ratio"] if cfg.search.objective == "flop_ratio" else rec["flops"]
    return [1.0 - rec["reward"], compute], [float(cfg.search.min_cached_bits - rec["num_cached"])]


def run_search(
    cfg: EcadRecipe,
    pipe=None,
    accelerator=None,
    reward=None,
    stop_after_generation: int | None = None,
    show_progress: bool = True,
) -> SearchResult:
    """Run (or resume) the search described by ``cfg`` in ``cfg.run_dir``.

    ``pipe``/``reward`` may be given to skip loading; ``accelerator`` spreads evaluations over processes.
    ``stop_after_generation`` raises :class:`SearchInterrupted` once that many generations are
    checkpointed (a controlled stand-in for a kill).
    """
    from diffalign.core.training import CheckpointManager, progress

    run_dir = Path(cfg.run_dir)
    is_main = accelerator is None or accelerator.is_main_process
    if cfg.search.num_threads is not None:
        torch.set_num_threads(cfg.search.num_threads)
    device = accelerator.device if accelerator is not None else torch.device(cfg.model.device)

    if pipe is None:
        from diffalign.core.models import load_pipeline

        dtype = getattr(torch, cfg.model.dtype) if cfg.model.dtype else None
        pipe = load_pipeline(cfg.model.source, dtype=dtype, device=device)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.eval()
    if reward is None:
        reward = load_reward(cfg.quality.reward, **cfg.quality.reward_kwargs)
    prompts, seeds = calibration_set(cfg.calibration)
    sc = cfg.sampling
    template = no_cache(pipe.transformer, sc.num_inference_steps)
    cost_model = measure_cost_model(
        pipe,
        pipeline_call_kwargs(
            pipe,
            prompts[: sc.batch_size],
            seeds[: sc.batch_size],
            sc.num_inference_steps,
            sc.guidance_scale,
            sc.height,
            sc.width,
            device,
            sc.extra_call_kwargs,
        ),
    )
    # the cost model is per call at the measured batch; ratios are batch-independent, absolute FLOPs are
    # reported per image
    per_image = max(1, min(sc.batch_size, len(prompts)))
    cost_model = CostModel(
        cost_model.architecture,
        cost_model.group_sizes,
        cost_model.component_flops / per_image,
        cost_model.overhead_flops / per_image,
        cost_model.calls_per_step,
    )
    evaluator = CandidateEvaluator(
        pipe,
        reward,
        cost_model,
        template,
        prompts,
        seeds,
        sc.num_inference_steps,
        sc.guidance_scale,
        sc.height,
        sc.width,
        sc.batch_size,
        device,
        sc.extra_call_kwargs,
    )
    n_var = template.recompute.numel()
    fingerprint = _search_fingerprint(cfg, n_var)

    ckpt = CheckpointManager(run_dir, keep_last=2)
    state = ckpt.load_latest()
    hist_X: list[np.ndarray] = []
    hist_F: list[np.ndarray] = []
    hist_G: list[np.ndarray] = []
    hist_rec: list[list[dict[str, float]]] = []
    wall_before = 0.0
    if state is not None:
        if state.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{run_dir} holds a search with a different recipe (fingerprint {state.get('fingerprint')} != "
                f"{fingerprint}); use a new run_dir or restore the original recipe"
            )
        for g in range(int(state["generations_done"])):
            hist_X.append(state["X"][g].numpy().astype(bool))
            hist_F.append(state["F"][g].numpy())
            hist_G.append(state["G"][g].numpy())
            hist_rec.append(state["records"][g])
        wall_before = float(state["wall_time_s"])

    rng = np.random.default_rng(cfg.search.seed)
    X0 = initial_population(template, cfg, rng)
    algorithm = _make_algorithm(cfg, X0)
    from pymoo.core.termination import NoTermination

    algorithm.setup(_make_problem(n_var), termination=NoTermination(), seed=cfg.search.seed, verbose=False)

    seen: dict[bytes, dict[str, float]] = {}
    for X, recs in zip(hist_X, hist_rec):
        for x, r in zip(X, recs):
            seen[np.packbits(x).tobytes()] = r

    start = time.perf_counter()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        from diffalign.core.config import save_config

        save_config(cfg, run_dir)
        cost_model.save(run_dir / "cost_model.json")
    bar = (
        progress(range(cfg.search.generations), desc="ecad generations")
        if show_progress and is_main
        else None
    )
    for gen in range(cfg.search.generations):
        pop = algorithm.ask()
        X = pop.get("X").astype(bool)
        if gen < len(hist_X):
            if not np.array_equal(X, hist_X[gen]):
                raise RuntimeError(
                    f"resume replay diverged at generation {gen}: the checkpoint in {run_dir} was written by a "
                    "different pymoo version or code; start a new run_dir"
                )
            F, G, recs = hist_F[gen], hist_G[gen], hist_rec[gen]
        else:
            keys = [np.packbits(x).tobytes() for x in X]
            todo = sorted({k: i for i, k in enumerate(keys) if k not in seen}.values())
            results = _distributed_map(accelerator, [X[i] for i in todo], evaluator.evaluate)
            for i, r in zip(todo, results):
                seen[keys[i]] = r
            recs = [dict(seen[k]) for k in keys]
            FG = [_objectives(r, cfg) for r in recs]
            F = np.array([f for f, _ in FG], dtype=float)
            G = np.array([g for _, g in FG], dtype=float)
            hist_X.append(X)
            hist_F.append(F)
            hist_G.append(G)
            hist_rec.append(recs)
            wall = wall_before + time.perf_counter() - start
            if is_main:
                ckpt.save(
                    gen + 1,
                    {
                        "fingerprint": fingerprint,
                        "generations_done": gen + 1,
                        "X": [torch.from_numpy(x.astype(np.uint8)) for x in hist_X],
                        "F": [torch.from_numpy(f) for f in hist_F],
                        "G": [torch.from_numpy(g) for g in hist_G],
                        "records": hist_rec,
                        "wall_time_s": wall,
                    },
                )
                write_front(_result(hist_X, hist_F, hist_G, hist_rec, template, wall, X0), run_dir, cfg)
            if accelerator is not None:
                accelerator.wait_for_everyone()
        pop.set("F", F)
        pop.set("G", G)
        algorithm.tell(infills=pop)
        if bar is not None:
            bar.update(1)
        if (
            stop_after_generation is not None
            and gen + 1 >= stop_after_generation
            and gen + 1 < cfg.search.generations
        ):
            raise SearchInterrupted(f"stopped after generation {gen + 1}")
    if bar is not None:
        bar.close()
    wall = wall_before + time.perf_counter() - start
    result = _result(hist_X, hist_F, hist_G, hist_rec, template, wall, X0)
    if is_main:
        write_front(result, run_dir, cfg)
    return result


def _result(hist_X, hist_F, hist_G, hist_rec, template, wall, X0) -> SearchResult:
    X = np.concatenate(hist_X, 0)
    F = np.concatenate(hist_F, 0)
    G = np.concatenate(hist_G, 0)
    gen = np.concatenate([np.full(len(x), g) for g, x in enumerate(hist_X)])
    recs = [r for rs in hist_rec for r in rs]
    # de-duplicate identical genomes (elitism re-asks nothing, but offspring can repeat earlier genomes)
    keys = [np.packbits(x).tobytes() for x in X]
    first = sorted({k: i for i, k in reversed(list(enumerate(keys)))}.values())
    X, F, G, gen, recs = X[first], F[first], G[first], gen[first], [recs[i] for i in first]
    front = np.flatnonzero(non_dominated_mask(F, G))
    front = front[np.argsort(F[front, 1])]
    default = template.to_genome().numpy()
    base = [recs[i]["reward"] for i in range(len(X)) if np.array_equal(X[i], default)]
    return SearchResult(X, F, G, gen, recs, front, template, base[0] if base else None, wall)


def write_front(result: SearchResult, run_dir: str | Path, cfg: EcadRecipe | None = None) -> dict[str, Any]:
    """``front.json``, ``front.png``, one JSON per front schedule and the schedules chosen per FLOP budget."""
    from diffalign.core.report import scatter_plot, write_json

    run_dir = Path(run_dir)
    sched_dir = run_dir / "front"
    sched_dir.mkdir(parents=True, exist_ok=True)
    for old in sched_dir.glob("*.json"):
        old.unlink()
    entries = []
    for s in result.front_schedules():
        path = s.save(sched_dir / f"{s.name}.json")
        entries.append({"name": s.name, "path": str(path.relative_to(run_dir)), **s.metadata})
    chosen = {}
    budgets = cfg.search.choose_at_flop_ratios if cfg is not None else (0.75, 0.5, 0.35)
    chosen_dir = run_dir / "chosen"
    chosen_dir.mkdir(exist_ok=True)
    for budget in budgets:
        ok = [e for e in entries if e["flop_ratio"] <= budget]
        if ok:
            best = max(ok, key=lambda e: e["reward"])
            dst = chosen_dir / f"flop_ratio_{budget:.2f}.json"
            Schedule.load(run_dir / best["path"]).with_name(f"ecad_flop_ratio_{budget:.2f}").save(dst)
            chosen[f"{budget:.2f}"] = {**best, "path": str(dst.relative_to(run_dir))}
    summary = {
        "architecture": result.template.architecture,
        "group_sizes": list(result.template.group_sizes),
        "num_inference_steps": result.template.num_steps,
        "evaluations": len(result.X),
        "generations": int(result.generation.max()) + 1 if len(result.generation) else 0,
        "baseline_reward": result.baseline_reward,
        "search_wall_time_s": result.wall_time_s,
        "front": entries,
        "chosen": chosen,
    }
    write_json(summary, run_dir / "front.json")
    feas = np.all(result.G <= 0, axis=1)
    groups = {
        "evaluated": (
            [r["flop_ratio"] for r, f in zip(result.records, feas) if f],
            [r["reward"] for r, f in zip(result.records, feas) if f],
        ),
        "Pareto front": ([e["flop_ratio"] for e in entries], [e["reward"] for e in entries]),
    }
    if result.baseline_reward is not None:
        groups["no cache"] = ([1.0], [result.baseline_reward])
    scatter_plot(
        groups,
        run_dir / "front.png",
        title="ECAD Pareto front",
        xlabel="FLOP ratio vs no cache",
        ylabel="reward",
        connect=("Pareto front",),
    )
    return summary
