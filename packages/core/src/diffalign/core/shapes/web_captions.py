"""A shapes base trained on web-like captions: ``shapes/unet-web``.

Web alt-text is systematically misaligned with its image: counts are dropped or wrong, relations are
missing or reversed, colours are omitted or bound to the wrong object. This module writes such
captions for exact renders at rates set in ``WebCaptionConfig``, adapts the committed ``shapes/unet``
teacher on them with a LoRA on its attention projections (the teacher's own loss, schedule and
caption dropout; text encoder frozen) and saves the adapter in the format diffusers'
``load_lora_weights`` reads. The committed adapter lives in ``assets/unet_web/`` with the config it
was trained with and its measured numbers; ``model_path("unet-web")`` fuses it into a copy of the
teacher in a cache folder, so every loader that takes a model id takes ``shapes/unet-web``.

Object captions stay correct (alt-text names the main object), so the object skill is kept while
count, spatial and colour binding degrade.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .grammar import NUMBER_WORDS, PLURALS, SKILLS, PromptSpec, sample_specs

WEB_ASSET = Path(__file__).parent / "assets" / "unet_web"
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_REL_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


@dataclass(frozen=True)
class WebCaptionConfig:
    """Rates of each caption error, per affected skill (the rest of the captions are correct).

    The defaults make the affected words carry no information about the image: a number word is as
    often wrong as right for each number (wrong 0.4 spread over two other numbers = 0.2 each = the 0.2
    correct), a stated relation is reversed as often as it is right (0.3 / 0.3), and two colours are
    bound to the wrong objects as often as to the right ones (0.35 / 0.35); the rest drop the words."""

    count_drop: float = 0.4  # "two red circles" -> "red circles" ("a red circle" for one)
    count_wrong: float = 0.4  # another number word
    relation_drop: float = 0.4  # "a red circle and a blue square": the relation is not said
    relation_swap: float = 0.3  # the relation reversed ("left of" for "right of")
    color_drop: float = 0.3  # colour words omitted ("a circle and a square")
    color_swap: float = 0.35  # the two objects' colours exchanged (a binding error)

    def __post_init__(self):
        for a, b in (
            ("count_drop", "count_wrong"),
            ("relation_drop", "relation_swap"),
            ("color_drop", "color_swap"),
        ):
            ra, rb = getattr(self, a), getattr(self, b)
            if min(ra, rb) < 0 or ra + rb > 1:
                raise ValueError(f"{a} + {b} must be rates in [0, 1] summing to <= 1, got {ra} and {rb}")

    @classmethod
    def from_dict(cls, d: dict) -> WebCaptionConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown web-caption rate(s) {unknown}; expected some of {sorted(names)}")
        return cls(**d)


def _pick(rng: random.Random, p_a: float, p_b: float) -> str:
    u = rng.random()
    return "a" if u < p_a else ("b" if u < p_a + p_b else "ok")


def _one(color: str | None, shape: str) -> str:
    return f"a {color} {shape}" if color else f"a {shape}"


def web_caption(spec: PromptSpec, prompt: str, rng: random.Random, cfg: WebCaptionConfig) -> tuple[str, str]:
    """(caption, error) for a render of ``spec`` whose exact prompt is ``prompt``; error is one of
    ``ok``, ``count_drop``, ``count_wrong``, ``relation_drop``, ``relation_swap``, ``color_drop``,
    ``color_swap``. Captions use only words of the world's vocabulary."""
    if spec.skill == "count":
        e, n = spec.entities[0], spec.count
        what = _pick(rng, cfg.count_drop, cfg.count_wrong)
        if what == "a":
            return (_one(e.color, e.shape) if n == 1 else f"{e.color} {PLURALS[e.shape]}"), "count_drop"
        if what == "b":
            m = rng.choice([k for k in NUMBER_WORDS if k != n])
            noun = e.shape if m == 1 else PLURALS[e.shape]
            return f"{NUMBER_WORDS[m]} {e.color} {noun}", "count_wrong"
        return prompt, "ok"
    if spec.skill == "spatial":
        (i, rel, j), ents = spec.relation, spec.entities
        a, b = ents[i], ents[j]
        if rng.random() < 0.5:  # say it either way round, as the grammar does
            a, b, rel = b, a, _OPPOSITE[rel]
        what = _pick(rng, cfg.relation_drop, cfg.relation_swap)
        if what == "a":
            return f"{_one(a.color, a.shape)} and {_one(b.color, b.shape)}", "relation_drop"
        if what == "b":
            rel = _OPPOSITE[rel]
            err = "relation_swap"
        else:
            err = "ok"
        return f"{_one(a.color, a.shape)} {_REL_WORDS[rel]} {_one(b.color, b.shape)}", err
    if spec.skill == "color":
        a, b = spec.entities
        if rng.random() < 0.5:
            a, b = b, a
        what = _pick(rng, cfg.color_drop, cfg.color_swap)
        if what == "a":
            return f"{_one(None, a.shape)} and {_one(None, b.shape)}", "color_drop"
        if what == "b":
            return f"{_one(b.color, a.shape)} and {_one(a.color, b.shape)}", "color_swap"
        return prompt, "ok"
    return prompt, "ok"


@dataclass
class WebBaseConfig:
    """Adaptation of ``shapes/unet`` on web-like captions (LoRA on the UNet's attention)."""

    captions: WebCaptionConfig = field(default_factory=WebCaptionConfig)
    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 20
    rank: int = 16
    caption_dropout: float = 0.1
    snr_clamp: float = 5.0
    seed: int = 0
    checkpoint_minutes: float = 3.0
    export_every: int = 100
    log_every: int = 25

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WebBaseConfig:
        d = dict(d)
        caps = WebCaptionConfig.from_dict(d.pop("captions", {}))
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown web-base setting(s) {unknown}")
        return cls(captions=caps, **d)


def add_unet_lora(unet, rank: int, targets=LORA_TARGETS, alpha: float | None = None):
    """Add a trainable LoRA (peft) to ``unet``'s ``targets``; everything else frozen."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(targets)
        )
    )
    return [p for p in unet.parameters() if p.requires_grad]


def save_unet_lora(
    unet, out_dir: str | Path, metadata: dict | None = None, dtype: torch.dtype = torch.float16
) -> Path:
    """Write ``unet``'s LoRA as ``pytorch_lora_weights.safetensors`` (read by ``load_lora_weights``),
    stored in ``dtype`` (fp16 by default, like the teachers' weights)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(str(tmp), unet_lora_layers=state, safe_serialization=True)
    if metadata is not None:
        (tmp / "config.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out_dir / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / ADAPTER_FILE


def _encode(pipe, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return pipe.text_encoder(tok.input_ids)[0]


def train_web_base(
    cfg: WebBaseConfig,
    run_dir: str | Path,
    base: str | Path | None = None,
    log=print,
    max_minutes: float | None = None,
) -> Path:
    """Adapt ``base`` (default: the committed ``shapes/unet``) on web-like captions; resumable from
    ``run_dir``. Writes ``run_dir/adapter`` (the latest adapter) and ``run_dir/adapter_step_N`` every
    ``export_every`` steps; returns the adapter folder."""
    from diffalign.core.training import CheckpointManager

    from .evaluate import load_shapes_pipeline
    from .render import render_scenes, scene_for_spec
    from .teachers import diffusion_loss, make_scheduler

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    base_path = Path(base) if base is not None else _clean_unet_path()
    torch.manual_seed(cfg.seed)
    pipe = load_shapes_pipeline(base_path)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    unet = pipe.unet
    params = add_unet_lora(unet, cfg.rank)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    alphas = make_scheduler().alphas_cumprod.float()
    sf = pipe.vae.config.scaling_factor
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = CheckpointManager(run_dir, keep_last=2)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    start = 0
    state = ckpt.load_latest()
    if state is not None:
        unet.load_state_dict(state["lora"], strict=False)
        opt.load_state_dict(state["opt"])
        rng.setstate(state["py_rng"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        log(f"web base: resumed from step {start}")
    meta = {"base": "shapes/unet", "config": cfg.to_dict()}

    def save(done: int) -> None:
        lora = {n: p.detach().clone() for n, p in unet.named_parameters() if n in trainable}
        ckpt.save(
            done,
            {
                "lora": lora,
                "opt": opt.state_dict(),
                "py_rng": rng.getstate(),
                "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "step": done,
            },
        )

    t0, last = time.time(), time.time()
    counts: dict[str, int] = {}
    run_loss = None
    unet.train()
    done = start
    for step in range(start, cfg.steps):
        specs = []
        for _ in range(cfg.batch_size):
            specs.append(sample_specs(rng.choice(SKILLS), 1, "train", rng)[0])
        captions = []
        for spec, prompt in specs:
            cap, err = web_caption(spec, prompt, rng, cfg.captions)
            counts[err] = counts.get(err, 0) + 1
            captions.append("" if rng.random() < cfg.caption_dropout else cap)
        images = render_scenes([scene_for_spec(s, rng) for s, _ in specs], gen)
        with torch.no_grad():
            x0 = pipe.vae.encode(images).latent_dist.sample(generator=gen) * sf
            emb = _encode(pipe, captions)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        loss = diffusion_loss(
            lambda x, t, e=emb: unet(x, t, encoder_hidden_states=e).sample, x0, alphas, gen, cfg.snr_clamp
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run_loss = loss.item() if run_loss is None else 0.95 * run_loss + 0.05 * loss.item()
        done = step + 1
        if done % cfg.log_every == 0:
            log(f"web base step {done} loss {run_loss:.4f} elapsed {time.time() - t0:.0f}s captions {counts}")
        if cfg.export_every and done % cfg.export_every == 0:
            save_unet_lora(unet, run_dir / f"adapter_step_{done}", {**meta, "steps": done})
        if time.time() - last > cfg.checkpoint_minutes * 60 or done == cfg.steps:
            save(done)
            last = time.time()
        if max_minutes is not None and time.time() - t0 > max_minutes * 60:
            save(done)
            log(f"web base: stopping after {max_minutes} minutes at step {done}")
            break
    save_unet_lora(unet, run_dir / "adapter", {**meta, "steps": done})
    return run_dir / "adapter"


def _clean_unet_path() -> Path:
    from . import model_path

    return model_path("unet")


def _cache_root() -> Path:
    root = os.environ.get("DIFFALIGN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "diffalign"
    )
    return Path(root) / "shapes"


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def fuse_adapter(base: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a diffusers folder = ``base`` with the LoRA in ``adapter_dir`` fused into its UNet (fp32)."""
    from .evaluate import load_shapes_pipeline

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_FILE).exists():
        raise FileNotFoundError(f"no LoRA adapter at {adapter_dir / ADAPTER_FILE}")
    pipe = load_shapes_pipeline(base)
    pipe.load_lora_weights(str(adapter_dir), weight_name=ADAPTER_FILE)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    if (adapter_dir / "config.json").exists():
        shutil.copy2(adapter_dir / "config.json", tmp / "web_captions.json")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def web_base_path(adapter_dir: str | Path | None = None) -> Path:
    """Folder of ``shapes/unet-web``: the committed teacher with the committed web-caption adapter
    fused in, materialised once in the cache (``$DIFFALIGN_CACHE``, default ~/.cache/diffalign)."""
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else WEB_ASSET
    if not (adapter_dir / ADAPTER_FILE).exists():
        raise FileNotFoundError(
            f"shapes/unet-web: no adapter at {adapter_dir / ADAPTER_FILE}; train one with "
            "`python -m diffalign.core.shapes.web_captions --run-dir DIR`"
        )
    base = _clean_unet_path()
    key = _digest(adapter_dir / ADAPTER_FILE, *sorted(base.glob("*/*.safetensors")))
    out = _cache_root() / f"unet-web-{key}"
    if not (out / "model_index.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fuse_adapter(base, adapter_dir, out)
    return out


def load_web_pipeline(adapter_dir: str | Path | None = None, base: str | Path | None = None):
    """The clean UNet teacher with a web-caption adapter loaded and fused (in memory, float32)."""
    from .evaluate import load_shapes_pipeline

    adapter_dir = Path(adapter_dir) if adapter_dir is not None else WEB_ASSET
    if not (adapter_dir / ADAPTER_FILE).exists():
        raise FileNotFoundError(f"no LoRA adapter at {adapter_dir / ADAPTER_FILE}")
    pipe = load_shapes_pipeline(base if base is not None else _clean_unet_path())
    pipe.load_lora_weights(str(adapter_dir), weight_name=ADAPTER_FILE)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


def _measure(pipe, prompts, steps, guidance, seed, verifiers, log) -> dict:
    from .scoring import faithfulness, fid
    from .teachers import sample_pipeline

    out = {"n_prompts": len(prompts), "guidance": guidance, "seed": seed, "steps": {}}
    for s in steps:
        t0 = time.process_time()
        images = sample_pipeline(pipe, prompts, steps=s, guidance=guidance, seed=seed)
        row = faithfulness(images, prompts).as_dict()
        row["fid"] = fid(images)
        for name, v in verifiers.items():
            row[f"by_{name}"] = faithfulness(images, prompts, v).as_dict()
        row["cpu_seconds"] = round(time.process_time() - t0, 1)
        out["steps"][str(s)] = row
        log(
            f"{s} steps: overall {row['overall']:.3f} "
            + " ".join(f"{k} {v:.2f}" for k, v in row["per_skill"].items())
        )
    return out


def measure_web_base(
    adapter_dir: str | Path | None = None,
    n_per_skill: int = 50,
    steps: tuple[int, ...] = (50,),
    guidance: float = 4.0,
    seed: int = 0,
    log=print,
    clean: dict | None = None,
) -> dict:
    """Per-skill faithfulness of the clean teacher and of the web-caption base on the same held-out
    prompts and seeds (``eval_prompts(n_per_skill)``), scored by the reward's verifier (``per_skill``)
    and by the evaluation verifier (``by_eval_verifier``), plus FID. ``clean``: the clean teacher's
    entry of an earlier measurement with the same prompts, steps and seed (sampling is deterministic)."""
    from .evaluate import load_shapes_pipeline
    from .grammar import eval_prompts
    from .verifier import eval_verifier_path, load_eval_verifier

    adapter_dir = Path(adapter_dir) if adapter_dir is not None else WEB_ASSET
    prompts = eval_prompts(n_per_skill)
    verifiers = {"eval_verifier": load_eval_verifier()} if eval_verifier_path().exists() else {}
    res = {}
    if clean is not None:
        same = clean.get("n_prompts") == len(prompts) and clean.get("seed") == seed
        if not same or set(clean.get("steps", {})) != {str(x) for x in steps}:
            raise ValueError("the clean measurement to reuse has other prompts, seed or steps")
        res["clean"] = clean
    for name, pipe in (
        ("clean", lambda: load_shapes_pipeline(_clean_unet_path())),
        ("web", lambda: load_web_pipeline(adapter_dir)),
    ):
        if name in res:
            continue
        res[name] = _measure(
            pipe(), prompts, steps, guidance, seed, verifiers, lambda m, n=name: log(f"{n}: {m}")
        )
    cfg_path = adapter_dir / "config.json"
    if cfg_path.exists():
        meta = json.loads(cfg_path.read_text())
        caps = meta.get("config", {}).get("captions", {})
        res["captions"] = ", ".join(f"{k} {v:g}" for k, v in caps.items())
        res["adapter_steps"] = meta.get("steps")
    res["adapter_bytes"] = (adapter_dir / ADAPTER_FILE).stat().st_size
    res["protocol"] = (
        f"eval_prompts({n_per_skill}) held-out, DDIM CFG {guidance}, seed {seed}; per_skill by the reward's "
        "verifier, by_eval_verifier by the evaluation verifier"
    )
    return res


def main(argv=None) -> None:
    """Train the web-caption adapter (resumable) or measure one against the clean teacher:
    ``python -m diffalign.core.shapes.web_captions train --run-dir runs/unet_web [--steps N]``;
    ``python -m diffalign.core.shapes.web_captions measure --adapter DIR --out info.json``."""
    import argparse

    from ._util import write_json

    ap = argparse.ArgumentParser(description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--run-dir", required=True)
    tr.add_argument("--config", default=None, help="JSON file with WebBaseConfig fields (captions: rates).")
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("--max-minutes", type=float, default=None)
    me = sub.add_parser("measure")
    me.add_argument("--adapter", default=None, help="Adapter folder (default: the committed one).")
    me.add_argument("--out", required=True, help="JSON to write.")
    me.add_argument("--n-per-skill", type=int, default=50)
    me.add_argument("--steps", default="50", help="Comma-separated sampling steps.")
    me.add_argument(
        "--clean-from", default=None, help="Reuse the clean teacher's entry of this earlier JSON."
    )
    for p in (tr, me):
        p.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if args.cmd == "train":
        cfg = (
            WebBaseConfig.from_dict(json.loads(Path(args.config).read_text()))
            if args.config
            else WebBaseConfig()
        )
        if args.steps is not None:
            cfg = _with_steps(cfg, args.steps)
        train_web_base(cfg, args.run_dir, log=log, max_minutes=args.max_minutes)
    else:
        steps = tuple(int(s) for s in args.steps.split(","))
        clean = json.loads(Path(args.clean_from).read_text())["clean"] if args.clean_from else None
        write_json(measure_web_base(args.adapter, args.n_per_skill, steps, log=log, clean=clean), args.out)
        log(f"wrote {args.out}")


def _with_steps(cfg: WebBaseConfig, steps: int) -> WebBaseConfig:
    d = cfg.to_dict()
    d["steps"] = steps
    return WebBaseConfig.from_dict(d)


if __name__ == "__main__":
    main()
