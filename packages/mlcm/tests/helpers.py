from pathlib import Path

from diffalign.mlcm.config import MLCMRecipe

PROMPTS = [
    "a red circle",
    "two blue squares",
    "a green triangle",
    "a yellow circle to the left of a red square",
]


def tiny_recipe(run_dir: Path, **sections) -> MLCMRecipe:
    prompts = Path(run_dir).parent / f"{Path(run_dir).name}_prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    data = {
        "run_dir": str(run_dir),
        "model": {"source": "tiny"},
        "student": {"lora_rank": 4},
        "data": {"prompts_file": str(prompts)},
        "distill": {"batch_size": 2, "guidance_scale": 4.0},
        "stage1": {"iterations": 2},
        "stage2": {"iterations": 1, "sample_steps": 2},
        "checkpoint": {"every": 1},
        "log_every": 1,
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return MLCMRecipe.model_validate(data)
