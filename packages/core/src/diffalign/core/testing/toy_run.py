"""A toy recipe run through core's runner: a tiny regression model trained data-parallel.

It uses every piece a method trainer needs, in the order a trainer uses them, and is small enough to
run on CPU with 1 or N processes, with or without DeepSpeed::

    python -m diffalign.core.testing.toy_run recipe.yaml                       # 1 process
    python -m diffalign.core.testing.toy_run recipe.yaml \\
        --set launch.launcher=torchrun --set launch.num_processes=2          # 2 processes (gloo on CPU)

Each step takes the global batch ``data.global_batch`` (rows ``step * global_batch ...`` of a fixed
data set, wrapping around) and gives every rank an equal, different slice of it, so the averaged
gradient equals the one-process gradient of the whole batch. Outputs (``final_params.json``,
``metrics.jsonl``, checkpoints) are written once, by the main process; ``seen/rank<R>.json`` records
which rows each rank trained on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from pydantic import Field

from diffalign.core.checkpoints import StateCheckpoints
from diffalign.core.config import Config
from diffalign.core.launch import LaunchConfig, check_process_count, make_accelerator
from diffalign.core.monitor import StepLogger
from diffalign.core.rundir import MetricsLog
from diffalign.core.runner import run_recipe

__all__ = ["ToyData", "ToyRecipe", "main", "toy_data", "toy_model", "train"]


class ToyData(Config):
    size: int = Field(64, ge=1)
    global_batch: int = Field(8, ge=1)
    seed: int = 0


class ToyRecipe(Config):
    run_dir: str = "runs/toy"
    steps: int = Field(6, ge=1)
    lr: float = Field(0.05, gt=0)
    checkpoint_every: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    stop_after: int | None = Field(None, ge=1, description="return after this step (to test resume)")
    data: ToyData = Field(default_factory=ToyData)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)


def toy_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def toy_data(cfg: ToyData) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(cfg.size, 4, generator=gen)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(cfg.size, 1, generator=gen)
    return x, y


def batch_rows(step: int, cfg: ToyData) -> torch.Tensor:
    """Row indices of the global batch of ``step`` (0-based)."""
    return torch.arange(step * cfg.global_batch, (step + 1) * cfg.global_batch) % cfg.size


def train(cfg: ToyRecipe) -> dict:
    run_dir = Path(cfg.run_dir)
    accelerator = make_accelerator(cfg.launch, run_dir)
    check_process_count(accelerator, cfg.launch)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.data.global_batch % world:
        raise ValueError(f"data.global_batch ({cfg.data.global_batch}) must divide by the {world} processes")
    local_batch = cfg.data.global_batch // world
    if accelerator.state.deepspeed_plugin is not None:  # no dataloader is prepared: say the batch size
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = local_batch

    model = toy_model(cfg.data.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    x, y = toy_data(cfg.data)

    checkpoints = StateCheckpoints(accelerator, run_dir)
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    start = 0
    resumed = checkpoints.load_latest()
    if resumed is not None:
        start = resumed[0]
        metrics.truncate(start)
    seen: list[int] = []
    stop = min(cfg.steps, cfg.stop_after or cfg.steps)
    with StepLogger(cfg.steps, log_every=cfg.log_every, desc="toy", initial=start) as log:
        for step in range(start, stop):
            rows = batch_rows(step, cfg.data)[rank * local_batch : (rank + 1) * local_batch]
            seen += rows.tolist()
            loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            done = step + 1
            values = {"loss": accelerator.reduce(loss.detach(), reduction="mean").item()}
            log.step(done, values)
            if done % cfg.log_every == 0 or done == cfg.steps:
                metrics.append(done, values)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                checkpoints.save(done, extra={"step": done})

    seen_dir = run_dir / "seen"
    seen_dir.mkdir(parents=True, exist_ok=True)
    (seen_dir / f"rank{rank}.json").write_text(json.dumps({"start": start, "rows": seen}), encoding="utf-8")
    state = accelerator.get_state_dict(model)  # gathers ZeRO-3 partitions: every rank calls it
    out = run_dir / "final_params.json"
    if accelerator.is_main_process and stop == cfg.steps:
        flat = torch.cat([state[k].detach().float().flatten().cpu() for k in sorted(state)])
        out.write_text(json.dumps(flat.tolist()), encoding="utf-8")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"steps": stop, "params": str(out) if stop == cfg.steps else None}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print("usage: python -m diffalign.core.testing.toy_run RECIPE [--set KEY=VALUE ...]", file=sys.stderr)
        return 2
    recipe, rest = args[0], args[1:]
    overrides = [rest[i + 1] for i, a in enumerate(rest) if a == "--set" and i + 1 < len(rest)]
    return run_recipe(
        ToyRecipe,
        recipe,
        overrides,
        method="toy",
        train=train,
        fingerprint_ignore=("run_dir", "stop_after", "launch"),
        on_success=lambda result: print(f"toy: {result['steps']} steps, params at {result['params']}"),
    )


if __name__ == "__main__":
    sys.exit(main())
