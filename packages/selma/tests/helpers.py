"""Shared fixtures' builders for selma's tests."""


def tiny_image_folder(out, records):
    """An imagefolder of ``records`` drawn by the tiny SD pipeline (seed 1, 2 steps, one process)."""
    from diffalign.core.testing import tiny_sd_pipeline
    from diffalign.selma import images

    images.generate_images(
        tiny_sd_pipeline(),
        records,
        out,
        seed=1,
        batch_size=2,
        call_kwargs={"num_inference_steps": 2},
        process_index=0,
        num_processes=1,
    )
    return out
