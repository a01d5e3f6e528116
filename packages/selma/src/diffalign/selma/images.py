"""Stage 2: self-generated images, written as an ``imagefolder`` (``metadata.jsonl`` + image files).

Any diffusers text-to-image pipeline draws one (or more) images per prompt. Work is cut into fixed
batches of consecutive jobs; batch ``b`` goes to process ``b % num_processes`` and each image has its
own generator seeded from (seed, job index), so the set written by N processes is the set written by
one, byte for byte. Each process appends its finished records to its own shard
(``shards/shard-<rank>.jsonl``); after all processes finish, the main process writes ``metadata.jsonl``
in job order. A killed run resumes: jobs whose image and record both exist are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

METADATA = "metadata.jsonl"


def job_seed(seed: int, index: int) -> int:
    return int(hashlib.sha256(f"selma-image:{seed}:{index}".encode()).hexdigest()[:15], 16)


def pipeline_call_kwargs(
    pipe, num_inference_steps=None, guidance_scale=None, height=None, width=None
) -> dict:
    """Sampling arguments; ``None`` leaves the pipeline's default (the paper calls ``pipe(prompts)`` bare).

    PixArt pipelines bin resolutions only for their released sizes; other sizes sample unbinned."""
    kwargs: dict = {}
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    if height is not None:
        kwargs["height"] = height
    if width is not None:
        kwargs["width"] = width
    from diffalign.core.models import detect_family, network_of

    if detect_family(pipe) == "pixart" and network_of(pipe).config.sample_size not in (32, 64, 128):
        kwargs.setdefault("use_resolution_binning", False)
    return kwargs


def make_jobs(records: Sequence[dict], images_per_prompt: int = 1) -> list[dict]:
    jobs = []
    for rec in records:
        for k in range(images_per_prompt):
            jobs.append({"index": len(jobs), "text": rec["text"], "skill": rec.get("skill", ""), "sample": k})
    return jobs


def _read_shards(out_dir: Path) -> dict[int, dict]:
    done: dict[int, dict] = {}
    shard_dir = out_dir / "shards"
    if not shard_dir.exists():
        return done
    for shard in sorted(shard_dir.glob("shard-*.jsonl")):
        for line in shard.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: that job is redone
            if (out_dir / rec["file_name"]).exists():
                done[int(rec["index"])] = rec
    return done


def _save_image(img: Image.Image, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    img.save(tmp)
    os.replace(tmp, path)


def to_pixels(images) -> torch.Tensor:
    """PIL list or [0,1] tensor -> [-1, 1] float tensor [B,3,H,W]."""
    if isinstance(images, torch.Tensor):
        return images.float().clamp(0, 1) * 2 - 1
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) * 2 - 1


def generate_images(
    pipe,
    records: Sequence[dict],
    out_dir: str | Path,
    *,
    seed: int = 0,
    batch_size: int = 8,
    images_per_prompt: int = 1,
    call_kwargs: dict | None = None,
    image_format: str = "png",
    process_index: int | None = None,
    num_processes: int | None = None,
    reward=None,
    reward_threshold: float | None = None,
    finalize: bool = True,
    barrier: Callable[[], None] | None = None,
    stop_after_batches: int | None = None,
) -> Path | None:
    """Generate this process's share of the images; the main process then writes ``metadata.jsonl``.

    ``process_index``/``num_processes`` default to core's ``process_state()`` (1 process when not
    launched). ``reward`` (a core ``RewardModel``) scores each image; with ``reward_threshold`` the
    final metadata keeps only images scoring at least that (DreamSync-style filtering).
    Returns the metadata path on the main process when finalised, else None.
    """
    from diffalign.core.training import progress

    if not records:
        raise ValueError("no prompts to generate images for")
    if process_index is None or num_processes is None:
        from diffalign.core.launch import process_state

        state = process_state()
        process_index, num_processes = state.process_index, state.num_processes
        barrier = barrier or state.wait_for_everyone
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} out of range for {num_processes} processes")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    jobs = make_jobs(records, images_per_prompt)
    done = _read_shards(out_dir)
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    mine = [b for bi, b in enumerate(batches) if bi % num_processes == process_index]
    todo = [b for b in mine if not all(j["index"] in done for j in b)]
    kwargs = dict(call_kwargs or {})
    device = getattr(pipe, "device", torch.device("cpu"))
    shard_path = out_dir / "shards" / f"shard-{process_index:03d}.jsonl"
    bar = progress(
        total=sum(len(b) for b in mine),
        desc=f"images[{process_index}]",
        initial=sum(len(b) for b in mine) - sum(len(b) for b in todo),
    )
    for n_batches, batch in enumerate(todo):
        if stop_after_batches is not None and n_batches >= stop_after_batches:
            break
        gens = [torch.Generator(device="cpu").manual_seed(job_seed(seed, j["index"])) for j in batch]
        with torch.no_grad():
            out = pipe(prompt=[j["text"] for j in batch], generator=gens, output_type="pil", **kwargs)
        images = out.images
        scores = None
        if reward is not None:
            imgs_in = (
                images if getattr(reward, "input_range", "[-1,1]") == "pil" else to_pixels(images).to(device)
            )
            with torch.no_grad():
                scores = reward.score(imgs_in, [j["text"] for j in batch]).float().cpu().tolist()
        lines = []
        for i, (job, img) in enumerate(zip(batch, images)):
            name = f"images/{job['index']:07d}.{image_format}"
            _save_image(img, out_dir / name)
            rec = {"index": job["index"], "file_name": name, "text": job["text"], "skill": job["skill"]}
            if scores is not None:
                rec["reward"] = scores[i]
            lines.append(json.dumps(rec) + "\n")
        with open(shard_path, "a", encoding="utf-8") as fh:
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
        bar.update(len(batch))
    bar.close()
    if stop_after_batches is not None:
        return None
    if barrier is not None:
        barrier()
    if finalize and process_index == 0:
        return finalize_metadata(out_dir, len(jobs), reward_threshold)
    return None


def finalize_metadata(out_dir: str | Path, n_jobs: int, reward_threshold: float | None = None) -> Path:
    """Merge the shards into ``metadata.jsonl`` (job order); refuse if any job is missing."""
    out_dir = Path(out_dir)
    done = _read_shards(out_dir)
    missing = [i for i in range(n_jobs) if i not in done]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {n_jobs} images are missing in {out_dir} (first: {missing[:5]}); rerun the images stage"
        )
    kept = []
    for i in range(n_jobs):
        rec = done[i]
        if reward_threshold is not None and rec.get("reward", float("inf")) < reward_threshold:
            continue
        kept.append(rec)
    if not kept:
        raise RuntimeError(
            f"the reward filter (threshold {reward_threshold}) rejected every image in {out_dir}"
        )
    target = out_dir / METADATA
    tmp = out_dir / (METADATA + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in kept:
            fh.write(
                json.dumps({k: rec[k] for k in ("file_name", "text", "skill", "index", "reward") if k in rec})
                + "\n"
            )
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    return target


def read_imagefolder(folder: str | Path, skills: Sequence[str] | None = None) -> list[dict]:
    """Records of an imagefolder's ``metadata.jsonl`` (``file_name`` made absolute), optionally one skill set."""
    folder = Path(folder)
    meta = folder / METADATA
    if not meta.exists():
        raise FileNotFoundError(f"no {METADATA} in {folder}: run the images stage first")
    out = []
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "file_name" not in rec or "text" not in rec:
            raise ValueError(f"{meta}:{lineno}: needs 'file_name' and 'text'")
        if skills is not None and rec.get("skill") not in skills:
            continue
        rec["path"] = str(folder / rec["file_name"])
        out.append(rec)
    if not out:
        which = f" for skills {list(skills)}" if skills is not None else ""
        raise ValueError(f"{meta} has no images{which}")
    return out


class ImageTextDataset(torch.utils.data.Dataset):
    """Images resized to ``resolution`` (shorter side), cropped (random or centre), maybe flipped, in [-1,1]."""

    def __init__(
        self,
        records: Sequence[dict],
        resolution: int | None = None,
        center_crop: bool = False,
        random_flip: bool = True,
    ):
        self.records = list(records)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.records)

    def load(
        self, i: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, str, tuple[int, int, int, int]]:
        """(pixels [3,H,W] in [-1,1], caption, (orig_h, orig_w, crop_top, crop_left))."""
        rec = self.records[i]
        try:
            img = Image.open(rec["path"]).convert("RGB")
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read training image {rec['path']}: {err}") from err
        w, h = img.size
        res = self.resolution or min(w, h)
        if min(w, h) != res:
            scale = res / min(w, h)
            img = img.resize((max(res, round(w * scale)), max(res, round(h * scale))), Image.BILINEAR)
        w2, h2 = img.size
        if self.center_crop:
            top, left = (h2 - res) // 2, (w2 - res) // 2
        else:
            top = int(torch.randint(0, h2 - res + 1, (1,), generator=generator)) if h2 > res else 0
            left = int(torch.randint(0, w2 - res + 1, (1,), generator=generator)) if w2 > res else 0
        img = img.crop((left, top, left + res, top + res))
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        if self.random_flip and float(torch.rand((), generator=generator)) < 0.5:
            arr = arr.flip(-1)
        return arr, rec["text"], (h, w, top, left)

    def __getitem__(self, i: int):
        return self.load(i)
