"""Shared helpers for trainer tests: a tiny differentiable reward with parameters, and recipe configs."""

from __future__ import annotations

import torch

from diffalign.di_star.config import DiStarConfig


class TinyPixelReward(torch.nn.Module):
    """A differentiable stand-in reward with its own (frozen) parameters: a seeded 1x1 conv, averaged."""

    name = "distar-test-reward"
    differentiable = True
    input_range = "[-1,1]"

    def __init__(self):
        super().__init__()
        torch.manual_seed(123)
        self.conv = torch.nn.Conv2d(3, 1, 1)

    def score(self, images, prompts):
        assert images.ndim == 4 and images.shape[1] == 3 and len(prompts) == images.shape[0]
        return self.conv(images).mean(dim=(1, 2, 3))


def tiny_config(run_dir=".", **overrides) -> DiStarConfig:
    data = {
        "run_dir": str(run_dir),
        "seed": 0,
        "generator": {"t_star": 399, "optimizer": {"lr": 1e-3}},
        "fake_score": {"updates_per_generator_step": 1, "optimizer": {"lr": 1e-3}},
        "loss": {"alpha_rew": 1.0, "cfg_scale": 7.5, "huber_c": 1.0},
        "reward": {"name": "distar-test-reward"},
        "data": {"prompts": "shapes", "num_prompts": 16, "batch_size": 2},
        "training": {"max_steps": 2, "checkpoint_every": 1, "log_every": 1},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    return DiStarConfig.model_validate(data)
