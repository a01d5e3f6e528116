"""DI* trained with a differentiable reward that no diffalign package ships: a third-party distribution
registers ``plugin-brightness`` in the ``diffalign.rewards`` entry-point group, and the DI* recipe finds
it by name (``reward.name: plugin-brightness``) like any built-in reward.

The plugin is "installed" the way pip would leave it, without touching the venv: a ``.dist-info`` folder
with ``entry_points.txt`` next to the plugin module on a temporary ``sys.path`` entry, removed afterwards.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

PLUGIN_MODULE = "plugin_mod"
PLUGIN_REWARD = "plugin-brightness"

PLUGIN_SOURCE = '''
"""A third-party differentiable reward: mean brightness of [-1, 1] pixels (times ``sign``)."""

CALLS = []


class Brightness:
    name = "plugin-brightness"
    differentiable = True
    input_range = "[-1,1]"

    def __init__(self, sign=1.0):
        self.sign = float(sign)

    def score(self, images, prompts):
        CALLS.append({"n": len(prompts), "requires_grad": bool(images.requires_grad), "sign": self.sign})
        return self.sign * images.mean(dim=(1, 2, 3))


def make(sign=1.0, **kwargs):
    return Brightness(sign)
'''


@pytest.fixture
def brightness_plugin(tmp_path):
    """Install the plugin distribution on a temporary path entry; uninstall it (and check) afterwards."""
    from diffalign.core.rewards import list_rewards

    site = tmp_path / "plugin-site"
    site.mkdir()
    (site / f"{PLUGIN_MODULE}.py").write_text(textwrap.dedent(PLUGIN_SOURCE), encoding="utf-8")
    dist_info = site / "diffalign_plugin_brightness-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: diffalign-plugin-brightness\nVersion: 0.1.0\n", encoding="utf-8"
    )
    (dist_info / "entry_points.txt").write_text(
        f"[diffalign.rewards]\n{PLUGIN_REWARD} = {PLUGIN_MODULE}:make\n", encoding="utf-8"
    )
    (dist_info / "top_level.txt").write_text(f"{PLUGIN_MODULE}\n", encoding="utf-8")
    assert PLUGIN_REWARD not in list_rewards()
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        sys.modules.pop(PLUGIN_MODULE, None)
        importlib.invalidate_caches()
        assert PLUGIN_REWARD not in list_rewards(), "the plugin outlived its test"


def _recipe(run_dir, teacher_dir, sign: float):
    from diffalign.di_star.config import DiStarConfig

    return DiStarConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "seed": 0,
            "model": {"teacher": str(teacher_dir)},
            "generator": {"t_star": 399, "optimizer": {"lr": 1e-3}},
            "fake_score": {"updates_per_generator_step": 1, "optimizer": {"lr": 1e-3}},
            "loss": {"regulariser": "score", "alpha_rew": 100.0, "cfg_scale": 1.0},
            "reward": {"name": PLUGIN_REWARD, "kwargs": {"sign": sign}},
            "data": {"prompts": "shapes", "skills": ["object", "color"], "num_prompts": 8, "batch_size": 2},
            "training": {"max_steps": 3, "checkpoint_every": 3, "log_every": 1},
        }
    )


def _brightness(pipe, t_star: int, latents: torch.Tensor) -> float:
    """Mean brightness of the one-step samples of fixed latents, through the pipeline's own ``__call__``."""
    from diffalign.di_star.inference import sample_one_step

    prompts = ["a red circle", "two blue squares", "a green triangle"]
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = sample_one_step(pipe, prompts, t_star, latents=latents.clone())
    return float(images.float().mean())


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    from diffalign.core.testing import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("teacher") / "tiny-sd"
    tiny_sd_pipeline(seed=0).save_pretrained(path)
    return path


def test_distar_trains_on_an_entry_point_reward_from_outside(brightness_plugin, tiny_teacher_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffalign.core.rewards import get_reward, list_rewards
    from diffalign.di_star.inference import read_metadata, to_one_step_pipeline
    from diffalign.di_star.train import train

    assert PLUGIN_REWARD in list_rewards()
    reward = get_reward(PLUGIN_REWARD)
    assert type(reward).__module__ == PLUGIN_MODULE and reward.differentiable
    plugin = sys.modules[PLUGIN_MODULE]

    teacher = StableDiffusionPipeline.from_pretrained(tiny_teacher_dir)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    before = _brightness(to_one_step_pipeline(teacher), 399, latents)

    after = {}
    for sign in (1.0, -1.0):
        plugin.CALLS.clear()
        out = train(_recipe(tmp_path / f"sign{sign:+.0f}", tiny_teacher_dir, sign))
        # the recipe resolved the reward by name through the entry point, with the recipe's kwargs, and
        # scored differentiable decoded pixels once per generator step
        assert [c["sign"] for c in plugin.CALLS] == [sign] * 3
        assert all(c["requires_grad"] and c["n"] == 2 for c in plugin.CALLS)
        t_star = read_metadata(out)["t_star"]
        after[sign] = _brightness(StableDiffusionPipeline.from_pretrained(out), t_star, latents)

    # the reward's gradient drove the generator: maximising brightness brightens the one-step samples and
    # maximising darkness darkens them, from the same start, seeds and regulariser
    assert after[1.0] > before > after[-1.0], (before, after)
    assert after[1.0] - after[-1.0] > 0.005, (before, after)
