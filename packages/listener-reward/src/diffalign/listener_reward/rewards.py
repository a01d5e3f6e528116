"""The three reward terms as TRL-compatible callables, and the listener-disagreement metric.

TRL's ``GRPOTrainer`` calls every reward function as
``f(prompts=..., completions=..., completion_ids=..., **dataset_columns, trainer_state=..., log_extra=...,
log_metric=...)`` and sums the returned lists with ``GRPOConfig.reward_weights``. The dataset built by
:func:`diffalign.listener_reward.data.grpo_rows` carries the columns ``label`` (1 or 2), ``t2i_prompt`` and
``images`` ([image 1, image 2]). ``r = 1 * r_fmt + 0.5 * r_acc + 0.5 * r_list`` by default.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.request
from collections.abc import Sequence

import torch

from diffalign.listener_reward.config import PromptsConfig, RewardConfig
from diffalign.listener_reward.modeling import answer_probabilities, answer_token_ids
from diffalign.listener_reward.prompts import (
    completion_text,
    extract_answer,
    is_well_formed,
    listener_messages,
    strip_answer,
)


def format_reward(completions, answer_format: str = "tags", **kwargs) -> list[float]:
    """1.0 if the completion is one ``<think>`` block then one answer, else 0.0."""
    return [1.0 if is_well_formed(completion_text(c), answer_format) else 0.0 for c in completions]


def accuracy_reward(completions, label, **kwargs) -> list[float]:
    """1.0 if the parsed choice equals the human-preferred image index (1 or 2), else 0.0."""
    if len(label) != len(completions):
        raise ValueError(f"got {len(label)} labels for {len(completions)} completions")
    return [1.0 if extract_answer(completion_text(c)) == int(y) else 0.0 for c, y in zip(completions, label)]


def combine_rewards(components: dict[str, Sequence[float]], weights: dict[str, float]) -> list[float]:
    """Weighted sum of reward terms (what TRL does with ``reward_weights``; NaN terms count as 0)."""
    missing = set(weights) - set(components)
    if missing:
        raise KeyError(f"no values for reward terms {sorted(missing)}")
    lengths = {len(v) for v in components.values()}
    if len(lengths) != 1:
        raise ValueError(f"reward terms have different lengths: {lengths}")
    n = lengths.pop()
    total = [0.0] * n
    for name, weight in weights.items():
        for i, value in enumerate(components[name]):
            if value == value:  # skip NaN
                total[i] += weight * float(value)
    return total


def contradiction_rate(reasoner_choices: Sequence[int | None], listener_probs: torch.Tensor) -> dict:
    """Share of samples whose listener argmax differs from the reasoner's own answer.

    Only samples with a parsed answer count; ``listener_probs`` is ``[N, 2]`` (image 1, image 2).
    """
    probs = torch.as_tensor(listener_probs, dtype=torch.float32)
    if probs.shape != (len(reasoner_choices), 2):
        raise ValueError(f"listener_probs must be [{len(reasoner_choices)}, 2], got {tuple(probs.shape)}")
    listener_choice = (probs[:, 1] > probs[:, 0]).long() + 1
    valid = [i for i, c in enumerate(reasoner_choices) if c in (1, 2)]
    if not valid:
        return {"contradiction_rate": float("nan"), "n": 0}
    disagree = sum(int(listener_choice[i]) != reasoner_choices[i] for i in valid)
    return {"contradiction_rate": disagree / len(valid), "n": len(valid)}


def ranking_changes(base: Sequence[float], shaped: Sequence[float], group_size: int) -> dict:
    """How a reward term changes the within-group ordering that GRPO's advantages follow.

    ``base`` and ``shaped`` are the summed rewards without and with the term, ``group_size`` consecutive
    completions per prompt (TRL's layout). A group ``changed`` if some pair of its completions is ordered
    differently (a tie broken or made counts); it ``flipped`` if some strictly ordered pair is reversed.
    Returns the shares of groups and the group count."""
    a = torch.as_tensor(list(base), dtype=torch.float64)
    b = torch.as_tensor(list(shaped), dtype=torch.float64)
    if a.shape != b.shape or group_size < 1 or a.numel() % group_size:
        raise ValueError(f"need two reward lists of equal length divisible by {group_size}")
    a, b = a.view(-1, group_size), b.view(-1, group_size)
    sa = torch.sign(a[:, :, None] - a[:, None, :])
    sb = torch.sign(b[:, :, None] - b[:, None, :])
    changed = (sa != sb).flatten(1).any(1)
    flipped = (sa * sb < 0).flatten(1).any(1)
    n = a.shape[0]
    return {
        "changed": float(changed.float().mean()) if n else float("nan"),
        "flipped": float(flipped.float().mean()) if n else float("nan"),
        "groups": n,
    }


# --------------------------------------------------------------------------------------------- listener


class LocalListener:
    """A frozen VLM scoring p(image 1), p(image 2) from (prompt, images, answer-free reasoning)."""

    def __init__(self, model, processor, prompts: PromptsConfig, batch_size: int = 16):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.processor = processor
        self.prompts = prompts
        self.batch_size = batch_size
        self.answer_ids = answer_token_ids(processor.tokenizer, prompts.answer_tokens)

    @torch.no_grad()
    def probabilities(
        self, t2i_prompts: Sequence[str], images: Sequence[Sequence], reasonings: Sequence[str]
    ):
        messages = [listener_messages(p, r, self.prompts) for p, r in zip(t2i_prompts, reasonings)]
        return answer_probabilities(
            self.model,
            self.processor,
            messages,
            [list(pair) for pair in images],
            self.answer_ids,
            suffix=self.prompts.listener_answer_prefix,
            batch_size=self.batch_size,
        )


def _png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _from_b64(text: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


class HTTPListener:
    """Remote listener: POSTs ``{"items": [{prompt, reasoning, image1, image2 (PNG base64)}]}`` to ``url``
    and expects ``{"probs": [[p1, p2], ...]}`` back (see :func:`serve_listener`)."""

    def __init__(self, url: str, timeout_s: float = 60.0):
        self.url = url
        self.timeout_s = timeout_s

    def probabilities(self, t2i_prompts, images, reasonings) -> torch.Tensor:
        items = [
            {"prompt": p, "reasoning": r, "image1": _png_b64(pair[0]), "image2": _png_b64(pair[1])}
            for p, pair, r in zip(t2i_prompts, images, reasonings)
        ]
        request = urllib.request.Request(
            self.url, data=json.dumps({"items": items}).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            payload = json.loads(response.read())
        probs = torch.tensor(payload["probs"], dtype=torch.float32)
        if probs.shape != (len(items), 2):
            raise ValueError(
                f"listener server returned probs of shape {tuple(probs.shape)} for {len(items)} items"
            )
        return probs


def serve_listener(listener: LocalListener, host: str = "127.0.0.1", port: int = 0):
    """Serve a listener over HTTP (for a separate scoring GPU); returns the ``ThreadingHTTPServer``.

    Call ``server.serve_forever()`` (or run it in a thread); ``server.server_address`` gives the port.
    """
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length", 0))
            try:
                items = json.loads(self.rfile.read(length))["items"]
                probs = listener.probabilities(
                    [it["prompt"] for it in items],
                    [(_from_b64(it["image1"]), _from_b64(it["image2"])) for it in items],
                    [it["reasoning"] for it in items],
                )
                body, code = json.dumps({"probs": probs.tolist()}).encode(), 200
            except Exception as err:  # report, never crash the server
                body, code = json.dumps({"error": str(err)}).encode(), 400
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return ThreadingHTTPServer((host, port), Handler)


class ListenerReward:
    """r_list = p_listener(correct image | prompt, images, reasoning without the answer).

    Batched and no-grad; the listener never sees the final answer (``strip_answer``). Also logs the
    listener-disagreement rate of the batch through TRL's ``log_metric`` when available.
    """

    __name__ = "listener_reward"

    def __init__(
        self,
        backend,
        group_size: int | None = None,
        weights: tuple[float, float, float] = (1.0, 0.5, 0.5),
        answer_format: str = "tags",
    ):
        self.backend = backend
        self.answer_format = answer_format
        self.group_size = group_size  # set: also log how often this term changes the group ranking
        self.weights = weights  # format, accuracy, listener (as in reward_weights)

    def __call__(self, completions, label, images, t2i_prompt, log_metric=None, **kwargs) -> list[float]:
        texts = [completion_text(c) for c in completions]
        reasonings = [strip_answer(t) for t in texts]
        probs = self.backend.probabilities(list(t2i_prompt), [list(pair) for pair in images], reasonings)
        labels = torch.tensor([int(y) for y in label]) - 1
        rewards = probs.gather(1, labels[:, None]).squeeze(1)
        if log_metric is not None:
            stats = contradiction_rate([extract_answer(t) for t in texts], probs)
            if stats["n"]:
                log_metric("listener_disagreement", stats["contradiction_rate"])
            if self.group_size and len(texts) % self.group_size == 0:
                w_fmt, w_acc, w_list = self.weights
                fmt = format_reward(texts, answer_format=self.answer_format)
                acc = accuracy_reward(texts, label)
                base = [w_fmt * f + w_acc * a for f, a in zip(fmt, acc)]
                shaped = [b + w_list * float(r) for b, r in zip(base, rewards)]
                change = ranking_changes(base, shaped, self.group_size)
                log_metric("listener_rank_change", change["changed"])
                log_metric("listener_rank_flip", change["flipped"])
        return [float(r) for r in rewards]


def make_listener_backend(cfg: RewardConfig, prompts: PromptsConfig, model=None, processor=None):
    if cfg.listener_backend == "http":
        return HTTPListener(cfg.listener_url, cfg.listener_timeout_s)
    if model is None or processor is None:
        raise ValueError("a local listener backend needs the listener model and processor")
    return LocalListener(model, processor, prompts, batch_size=cfg.listener_batch_size)


def reward_functions(
    cfg: RewardConfig, prompts: PromptsConfig, listener_backend=None, group_size: int | None = None
):
    """The TRL ``reward_funcs`` list and matching ``reward_weights`` for a recipe; with ``group_size`` the
    listener term also logs the share of groups whose ranking it changes (``listener_rank_change``/``_flip``).
    """

    def format_term(completions, **kwargs):
        return format_reward(completions, answer_format=prompts.answer_format)

    format_term.__name__ = "format_reward"
    funcs, weights = [format_term, accuracy_reward], [cfg.format_weight, cfg.accuracy_weight]
    if cfg.use_listener:
        if listener_backend is None:
            raise ValueError("reward.use_listener=true needs a listener backend")
        weights_all = (cfg.format_weight, cfg.accuracy_weight, cfg.listener_weight)
        term = ListenerReward(listener_backend, group_size, weights_all, prompts.answer_format)
        funcs.append(term)
        weights.append(cfg.listener_weight)
    return funcs, weights


__all__ = [
    "HTTPListener",
    "ListenerReward",
    "LocalListener",
    "accuracy_reward",
    "combine_rewards",
    "contradiction_rate",
    "format_reward",
    "make_listener_backend",
    "ranking_changes",
    "reward_functions",
    "serve_listener",
]
