"""Test helpers: tiny pipelines (eval mode) and a stand-in reward usable by name or import path."""

from __future__ import annotations


def tiny_pixart():
    from diffalign.core.testing import tiny_pixart_pipeline

    pipe = tiny_pixart_pipeline()
    pipe.transformer.eval()
    return pipe


def tiny_dit():
    from diffusers import DDIMScheduler, DiTPipeline

    from diffalign.core.testing import tiny_dit_transformer, tiny_vae

    pipe = DiTPipeline(
        transformer=tiny_dit_transformer().eval(), vae=tiny_vae().eval(), scheduler=DDIMScheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux():
    from diffalign.core.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    pipe.transformer.eval()
    return pipe


class ColourBalanceReward:
    """Stand-in for shapes-faithfulness: a fixed smooth function of the pixels, higher = redder and brighter.

    Deterministic and sensitive to every pixel, so any caching that changes the image changes the score.
    """

    name = "test-colour-balance"
    differentiable = True
    input_range = "[-1,1]"

    def score(self, images, prompts):
        assert images.ndim == 4 and images.shape[1] == 3 and len(prompts) == images.shape[0]
        x = images.float()
        return 0.5 + 0.25 * (x[:, 0] - x[:, 2]).mean(dim=(1, 2)) + 0.1 * x.mean(dim=(1, 2, 3))


def make_reward(**kwargs):
    return ColourBalanceReward()


def register():
    from diffalign.core.rewards import register_reward

    register_reward("test-colour-balance", make_reward, overwrite=True)


def tiny_recipe(run_dir, source="unused", **search):
    from diffalign.ecad.config import EcadRecipe

    return EcadRecipe.model_validate(
        {
            "run_dir": str(run_dir),
            "model": {"source": source},
            "sampling": {
                "num_inference_steps": 3,
                "guidance_scale": 4.5,
                "height": 16,
                "width": 16,
                "batch_size": 4,
            },
            "calibration": {
                "prompts": ["a red circle", "two blue squares"],
                "num_prompts": 2,
                "num_seeds": 1,
            },
            "validation": {"prompts": ["a green square", "a blue circle"], "num_prompts": 2, "num_seeds": 1},
            "quality": {"reward": "ecad_test_support:make_reward"},
            "search": {
                "population_size": 4,
                "generations": 3,
                "seed": 0,
                "seed_builtin_recordings": False,
                **search,
            },
        }
    )
