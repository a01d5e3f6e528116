"""NSGA-II search for caching schedules (ECAD, arXiv 2506.15682, section 3).

Genome: the effective bits of a :class:`~diffalign.ecad.schedule.Schedule` without step 0 (see
:mod:`~diffalign.ecad.genome`), so duplicates are recognised on what actually runs.
Objectives (both minimised):

* quality: by default a high quantile (``fidelity_quantile``) of the per-image relative L2 distance
  between the image a schedule produces and the no-cache image of the same prompt and seed (paired,
  so prompt and seed noise cancel; a quantile, because the mean is driven by the few images whose
  content flips). ``quality_objective: reward`` uses the paper's ``1 - mean reward`` instead.
* compute: FLOPs of the transformer for a full sampling run (ratio to the plain no-cache run), or
  measured latency (``cost_model: latency``).

Constraints: at least ``min_cached_bits`` evaluations are reused, and the mean reward stays within
``reward_tolerance`` of the no-cache reward.

pymoo ``NSGA2`` through ask/tell. The initial population holds every heuristic seed and a static
recording of each built-in cache's decisions (the population grows to hold them all). Operators:
component-wise crossover and structured mutation by default, the paper's ``PointCrossover`` and
``BitflipMutation`` on request. The front is re-scored on a separate validation set, and schedules
are chosen per budget on validation scores only.

Reliability: every evaluation is deterministic (seeded generator per image), so a checkpoint only
stores the evaluated genomes and their objectives per generation; resuming replays the GA with the
same seed and takes objectives from the checkpoint, which reproduces the uninterrupted run exactly.
Candidates of a generation are spread over the processes of an ``accelerate`` launch and gathered.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import FINGERPRINT_IGNORE, CalibrationSection, EcadRecipe
from .cost import CostModel, measure_cost_model, measure_latency_model
from .genome import ComponentCrossover, GenomeCodec, StructuredMutation
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
    "builtin_recordings",
    "paired_distances",
    "write_front",
    "validate_front",
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


def calibration_set(cfg: CalibrationSection, exclude: set[str] | None = None) -> tuple[list[str], list[int]]:
    """``(prompts, seeds)`` of equal length: every prompt with every seed (prompt-major order).

    ``exclude``: shapes-world prompts to leave out (a validation set drawn beside the calibration set)."""
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
                drawn = _shapes_prompts(skill, 4 * n if exclude else n, cfg.shapes_split, cfg.prompt_seed)
                prompts += [p for p in drawn if not exclude or p not in exclude][:n]
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
    codec: GenomeCodec | None = None
    step_invariant: bool = True
    fidelity_quantile: float = 0.9
    reference: torch.Tensor | None = None  # no-cache images of the calibration set
    baseline_reward: float | None = None

    def prepare(self) -> None:
        """Generate and score the no-cache images once (the paired reference of every candidate)."""
        if self.reference is None:
            self.reference = self.images(None)
            self.baseline_reward = float(self._scores(self.reference).mean())

    def _scores(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(self.prompts), self.batch_size):
            out.append(
                _score(self.reward, images[i : i + self.batch_size], self.prompts[i : i + self.batch_size])
            )
        return torch.cat(out)

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
            apply_schedule(self.pipe, schedule, step_invariant=self.step_invariant)
        try:
            outs = []
            for i in range(0, len(self.prompts), self.batch_size):
                prompts, seeds = self.prompts[i : i + self.batch_size], self.seeds[i : i + self.batch_size]
                outs.append(per_batch(self._generate(prompts, seeds), prompts))
            return combine(outs)
        finally:
            if schedule is not None:
                remove_schedule(self.pipe)

    def schedule_of(self, genome: np.ndarray) -> Schedule:
        if self.codec is None:
            return Schedule.from_genome(torch.from_numpy(np.asarray(genome, dtype=bool)), self.template)
        return self.codec.decode(genome)

    def evaluate(self, genome: np.ndarray) -> dict[str, float]:
        return self.evaluate_schedule(self.schedule_of(genome))

    def evaluate_schedule(self, schedule: Schedule) -> dict[str, float]:
        """Reward, paired distances to the no-cache images, and cost of one schedule."""
        self.prepare()
        images = self.images(schedule)
        dist = paired_distances(images, self.reference)
        flops = self.cost_model.flops(schedule)
        return {
            "reward": float(self._scores(images).mean()),
            "fidelity": float(torch.quantile(dist, self.fidelity_quantile)),
            "distance_mean": float(dist.mean()),
            "distance_median": float(dist.median()),
            "flops": flops,
            "flop_ratio": flops / self.cost_model.no_cache_flops(schedule.num_steps),
            "num_cached": schedule.num_cached(),
        }


def paired_distances(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image relative L2 distance ``||x - x_ref|| / ||x_ref||`` (same prompt and seed)."""
    if images.shape != reference.shape:
        raise ValueError(
            f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape"
        )
    diff = (images.float() - reference.float()).flatten(1).norm(dim=1)
    return diff / reference.float().flatten(1).norm(dim=1).clamp_min(1e-12)


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


def initial_population(
    codec: GenomeCodec, cfg: EcadRecipe, rng: np.random.Generator, extra: list[Schedule] | None = None
) -> np.ndarray:
    """Seed schedules (files, heuristics, ``extra`` such as built-in recordings), de-duplicated on the
    effective schedule, filled up to the population size with uniform random bits. Every seed is kept:
    the population grows to hold them all."""
    template = codec.template
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
    seeds += list(extra or [])
    rows: list[np.ndarray] = []
    keys: set[bytes] = set()
    for s in seeds:
        g = codec.encode(s)
        k = np.packbits(g).tobytes()
        if k not in keys:
            keys.add(k)
            rows.append(g)
    while len(rows) < cfg.search.population_size:
        g = rng.random(codec.n_var) < 0.5
        k = np.packbits(g).tobytes()
        if k not in keys:
            keys.add(k)
            rows.append(g)
    return np.stack(rows).astype(bool)


def builtin_recordings(pipe, evaluator: CandidateEvaluator, names=None, log=print) -> list[Schedule]:
    """Static schedules imitating each built-in cache on the first calibration batch (see
    :func:`~diffalign.ecad.baselines.record_schedule`); a built-in that cannot run on this model is
    reported and skipped."""
    import copy

    from .baselines import BUILTIN_CACHES, BuiltinCache, record_schedule

    n = min(evaluator.batch_size, len(evaluator.prompts))
    prompts, seeds = evaluator.prompts[:n], evaluator.seeds[:n]
    original = pipe.transformer
    out = []
    for name in names or BUILTIN_CACHES:
        pipe.transformer = copy.deepcopy(original)
        try:
            cache = BuiltinCache(name, pipe.transformer).apply()

            def run(cache=cache):
                with cache.context():
                    evaluator._generate(prompts, seeds)

            out.append(
                record_schedule(
                    pipe,
                    run,
                    evaluator.num_inference_steps,
                    f"recorded_{name}",
                    evaluator.cost_model.calls_per_step,
                )
            )
        except Exception as err:  # noqa: BLE001 - a seed is optional; say why it is missing
            log(f"ecad: no recording of {name}: {type(err).__name__}: {err}")
        finally:
            pipe.transformer = original
    return out


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
    codec: GenomeCodec | None = None
    validation: dict[str, dict[str, float]] = field(default_factory=dict)  # genome key -> scores

    def key(self, i: int) -> str:
        return np.packbits(self.X[i]).tobytes().hex()

    def front_schedules(self) -> list[Schedule]:
        out = []
        for i in self.front:
            name = f"gen{self.generation[i]:03d}_eval{i:05d}"
            s = self.codec.decode(self.X[i], name=name)
            s.metadata = {k: float(v) for k, v in self.records[i].items()} | {
                "generation": int(self.generation[i])
            }
            val = self.validation.get(self.key(i))
            if val is not None:
                s.metadata |= {f"validation_{k}": float(v) for k, v in val.items()}
            out.append(s)
        return out


def _make_problem(n_var: int):
    from pymoo.core.problem import Problem

    return Problem(n_var=n_var, n_obj=2, n_ieq_constr=2, xl=0, xu=1, vtype=bool)


def _make_algorithm(cfg: EcadRecipe, X0: np.ndarray, codec: GenomeCodec):
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.population import Population
    from pymoo.operators.crossover.pntx import PointCrossover
    from pymoo.operators.mutation.bitflip import BitflipMutation

    s = cfg.search
    if s.mutation == "structured":
        mutation = StructuredMutation(codec)
    else:
        mutation_kwargs = {"prob": s.mutation_prob}
        if s.mutation_bit_prob is not None:
            mutation_kwargs["prob_var"] = s.mutation_bit_prob
        mutation = BitflipMutation(**mutation_kwargs)
    if s.crossover == "component":
        crossover = ComponentCrossover(codec, prob=s.crossover_prob)
    else:
        crossover = PointCrossover(prob=s.crossover_prob, n_points=s.crossover_points)
    return NSGA2(
        pop_size=len(X0),
        n_offsprings=s.offspring or s.population_size,
        sampling=Population.new("X", X0),
        crossover=crossover,
        mutation=mutation,
        eliminate_duplicates=True,
    )


def _objectives(rec: dict[str, float], cfg: EcadRecipe, baseline_reward: float | None):
    compute = rec["flop_ratio"] if cfg.search.objective == "flop_ratio" else rec["flops"]
    quality = rec["fidelity"] if cfg.search.quality_objective == "fidelity" else 1.0 - rec["reward"]
    G = [float(cfg.search.min_cached_bits - rec["num_cached"])]
    tol = cfg.search.reward_tolerance
    G.append(-1.0 if tol is None or baseline_reward is None else float(baseline_reward - tol - rec["reward"]))
    return [quality, compute], G


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
    from diffalign.core.launch import check_process_count
    from diffalign.core.monitor import StepLogger
    from diffalign.core.rundir import recipe_fingerprint
    from diffalign.core.training import CheckpointManager

    run_dir = Path(cfg.run_dir)
    if accelerator is not None:
        check_process_count(accelerator, cfg.launch)
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
    call_kwargs = pipeline_call_kwargs(
        pipe,
        prompts[: sc.batch_size],
        seeds[: sc.batch_size],
        sc.num_inference_steps,
        sc.guidance_scale,
        sc.height,
        sc.width,
        device,
        sc.extra_call_kwargs,
    )
    if cfg.search.cost_model == "latency":
        cost_model = measure_latency_model(pipe, call_kwargs)
    else:
        cost_model = measure_cost_model(pipe, call_kwargs)
    # the cost model is per call at the measured batch; ratios are batch-independent, absolute costs are
    # reported per image
    per_image = max(1, min(sc.batch_size, len(prompts)))
    cost_model = cost_model.scaled(1.0 / per_image).with_step_invariant(cfg.search.step_invariant_cache)
    codec = GenomeCodec(template)

    def make_evaluator(prompts_, seeds_):
        return CandidateEvaluator(
            pipe,
            reward,
            cost_model,
            template,
            prompts_,
            seeds_,
            sc.num_inference_steps,
            sc.guidance_scale,
            sc.height,
            sc.width,
            sc.batch_size,
            device,
            sc.extra_call_kwargs,
            codec=codec,
            step_invariant=cfg.search.step_invariant_cache,
            fidelity_quantile=cfg.search.fidelity_quantile,
        )

    evaluator = make_evaluator(prompts, seeds)
    n_var = codec.n_var
    # core's recipe fingerprint (the one the CLI records in the run directory) and the genome length
    fingerprint = f"{recipe_fingerprint(cfg, FINGERPRINT_IGNORE)}-{n_var}"

    ckpt = CheckpointManager(run_dir, keep_last=2)
    state = ckpt.load_latest()
    hist_X: list[np.ndarray] = []
    hist_F: list[np.ndarray] = []
    hist_G: list[np.ndarray] = []
    hist_rec: list[list[dict[str, float]]] = []
    wall_before = 0.0
    X0 = None
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
        X0 = state["X0"].numpy().astype(bool)
        evaluator.reference = state["reference"]
        evaluator.baseline_reward = float(state["baseline_reward"])

    if X0 is None:  # fresh run: the no-cache reference, the recordings, the initial population
        evaluator.prepare()
        recordings = []
        if cfg.search.seed_builtin_recordings:
            recordings = builtin_recordings(pipe, evaluator, log=print if is_main else (lambda *_: None))
        rng = np.random.default_rng(cfg.search.seed)
        X0 = initial_population(codec, cfg, rng, recordings)
    algorithm = _make_algorithm(cfg, X0, codec)
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
    # a bar on a terminal, a line per generation otherwise (main process only)
    bar = (
        StepLogger(cfg.search.generations, log_every=1, desc="ecad generations", enabled=True)
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
            FG = [_objectives(r, cfg, evaluator.baseline_reward) for r in recs]
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
                        "X0": torch.from_numpy(X0.astype(np.uint8)),
                        "reference": evaluator.reference,
                        "baseline_reward": evaluator.baseline_reward,
                    },
                )
                write_front(_result(hist_X, hist_F, hist_G, hist_rec, codec, wall, evaluator), run_dir, cfg)
            if accelerator is not None:
                accelerator.wait_for_everyone()
        pop.set("F", F)
        pop.set("G", G)
        algorithm.tell(infills=pop)
        if bar is not None:
            bar.step(
                gen + 1, {"evaluated": len(seen), "best_reward": max(r["reward"] for r in seen.values())}
            )
        if (
            stop_after_generation is not None
            and gen + 1 >= stop_after_generation
            and gen + 1 < cfg.search.generations
        ):
            raise SearchInterrupted(f"stopped after generation {gen + 1}")
    if bar is not None:
        bar.close()
    wall = wall_before + time.perf_counter() - start
    result = _result(hist_X, hist_F, hist_G, hist_rec, codec, wall, evaluator)
    if is_main:
        # the front is always re-scored on validation before anything is chosen
        val_prompts, val_seeds = calibration_set(validation_section(cfg), exclude=set(prompts))
        validate_front(result, make_evaluator(val_prompts, val_seeds), run_dir, cfg)
        write_front(result, run_dir, cfg)
    return result


def validation_section(cfg: EcadRecipe) -> CalibrationSection:
    """The validation prompts x seeds: ``cfg.validation``, or the calibration section with other seeds."""
    if cfg.validation is not None:
        return cfg.validation
    c = cfg.calibration
    return c.model_copy(update={"seed_offset": c.seed_offset + 1000, "prompt_seed": c.prompt_seed + 1})


def _result(hist_X, hist_F, hist_G, hist_rec, codec, wall, evaluator) -> SearchResult:
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
    return SearchResult(X, F, G, gen, recs, front, codec.template, evaluator.baseline_reward, wall, codec)


def choose(
    entries: list[dict[str, Any]], budget: float, cfg: EcadRecipe | None, validation_baseline: float | None
) -> dict[str, Any] | None:
    """The front entry to use within a cost budget: on validation scores when the front was validated
    (best validation quality among entries meeting the validation reward constraint), otherwise on
    calibration scores. ``None`` if no entry fits the budget."""
    ok = [e for e in entries if e["flop_ratio"] <= budget + 1e-12]
    if not ok:
        return None
    use_reward = cfg is not None and cfg.search.quality_objective == "reward"
    prefix = "validation_" if all("validation_reward" in e for e in ok) else ""
    tol = cfg.search.reward_tolerance if cfg is not None else None
    if prefix and tol is not None and validation_baseline is not None:
        meets = [e for e in ok if e["validation_reward"] >= validation_baseline - tol]
        ok = meets or ok
    if use_reward or f"{prefix}fidelity" not in ok[0]:
        return max(ok, key=lambda e: e[f"{prefix}reward"])
    return min(ok, key=lambda e: e[f"{prefix}fidelity"])


def validate_front(
    result: SearchResult, evaluator: CandidateEvaluator, run_dir: str | Path, cfg=None
) -> None:
    """Re-score every front schedule on the validation set (cached in ``run_dir/validation.json``)."""
    import json as _json

    path = Path(run_dir) / "validation.json"
    cache = _json.loads(path.read_text()) if path.is_file() else {}
    todo = [i for i in result.front if result.key(i) not in cache]
    if todo or "no_cache" not in cache:
        evaluator.prepare()
        cache["no_cache"] = {"reward": evaluator.baseline_reward, "images": len(evaluator.prompts)}
        for i in todo:
            cache[result.key(i)] = evaluator.evaluate(result.X[i])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(_json.dumps(cache, indent=1) + "\n")
        tmp.replace(path)
    result.validation = cache


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
    for old in chosen_dir.glob("*.json"):
        old.unlink()
    val_base = result.validation.get("no_cache", {}).get("reward")
    for budget in budgets:
        best = choose(entries, budget, cfg, val_base)
        if best is not None:
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
        "validation_baseline_reward": val_base,
        "search_wall_time_s": result.wall_time_s,
        "front": entries,
        "chosen": chosen,
    }
    write_json(summary, run_dir / "front.json")
    feas = np.all(result.G <= 0, axis=1)
    q = "reward" if cfg is not None and cfg.search.quality_objective == "reward" else "fidelity"
    groups = {
        "evaluated": (
            [r["flop_ratio"] for r, f in zip(result.records, feas) if f],
            [r[q] for r, f in zip(result.records, feas) if f],
        ),
        "Pareto front": ([e["flop_ratio"] for e in entries], [e[q] for e in entries]),
    }
    if q == "reward" and result.baseline_reward is not None:
        groups["no cache"] = ([1.0], [result.baseline_reward])
    scatter_plot(
        groups,
        run_dir / "front.png",
        title="ECAD Pareto front (calibration)",
        xlabel="cost ratio vs no cache",
        ylabel="mean reward" if q == "reward" else "distance to no-cache image (quantile)",
        connect=("Pareto front",),
    )
    return summary
