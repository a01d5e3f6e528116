"""Stage 1: skill-specific prompt generation with a self-instruct loop (SELMA section 3.1).

The loop, per skill:

1. build a request: the skill instruction, then 3 in-context examples sampled from the seed prompts
   plus every prompt accepted so far, as a numbered list that the backend continues;
2. ask a backend (``template`` grammar, local ``hf`` causal LM, or any ``openai``-compatible server);
   a backend error is retried with exponential backoff and then raised as :class:`PromptBackendError`;
3. parse the reply as a numbered list, tolerantly (``4.``, ``4)``, ``4:``, bullets, one-line lists,
   quotes, markdown emphasis);
4. drop every candidate whose Rouge-L F-measure against any prompt of the pool (seeds + accepted) is
   above the threshold (paper: 0.8), or that is longer than the skill's word limit;
5. stop at ``n`` accepted prompts.

The whole state of a skill (accepted prompts, request counter, rejection counts) is written
atomically after each request, and the randomness of request ``k`` depends only on (seed, skill, k), so
a killed run resumes and ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# --------------------------------------------------------------------------------------------------
# Rouge-L
# --------------------------------------------------------------------------------------------------

_TOKEN_SPLIT = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Tokens as the reference Rouge scorer makes them without stemming: lowercase alphanumeric runs."""
    return [t for t in _TOKEN_SPLIT.split(text.lower()) if t]


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyro), O(|b|) big-int ops."""
    if not a or not b:
        return 0
    masks: dict = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(candidate: str | Sequence[str], reference: str | Sequence[str]) -> float:
    """Rouge-L F-measure (beta = 1) between two texts (or token lists)."""
    c = rouge_tokens(candidate) if isinstance(candidate, str) else list(candidate)
    r = rouge_tokens(reference) if isinstance(reference, str) else list(reference)
    if not c or not r:
        return 0.0
    lcs = lcs_length(r, c)
    if lcs == 0:
        return 0.0
    # 2PR/(P+R) with P = lcs/|c|, R = lcs/|r| simplifies to 2 lcs/(|c|+|r|), which is exact at ties
    return 2 * lcs / (len(c) + len(r))


class RougeFilter:
    """A growing pool of prompts; ``max_score(text)`` is the largest Rouge-L F against the pool.

    A bag-of-words bound (LCS <= multiset overlap) skips most exact LCS computations.
    """

    def __init__(self, pool: Sequence[str] = (), threshold: float = 0.8):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"rouge threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold
        self._tokens: list[list[str]] = []
        self._bags: list[Counter] = []
        for text in pool:
            self.add(text)

    def __len__(self) -> int:
        return len(self._tokens)

    def add(self, text: str) -> None:
        toks = rouge_tokens(text)
        self._tokens.append(toks)
        self._bags.append(Counter(toks))

    def max_score(self, text: str) -> float:
        toks = rouge_tokens(text)
        if not toks:
            return 0.0
        bag = Counter(toks)
        best = 0.0
        n = len(toks)
        for ref, ref_bag in zip(self._tokens, self._bags):
            if not ref:
                continue
            overlap = sum((bag & ref_bag).values())
            if overlap == 0 or 2 * overlap / (n + len(ref)) <= best:
                continue  # F <= 2*overlap/(n+m): cannot beat the current best
            lcs = lcs_length(ref, toks)
            if lcs:
                best = max(best, 2 * lcs / (n + len(ref)))
                if best >= 1.0:
                    break
        return best

    def is_duplicate(self, text: str) -> bool:
        """True if the text is too similar to the pool (score strictly above the threshold, as in SELMA)."""
        return self.max_score(text) > self.threshold


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------

_ITEM_START = re.compile(r"^\s*(?:\(?(\d{1,4})\s*[.):\-\]]+|[-*\u2022])\s*(.*)$")
_INLINE_SPLIT = re.compile(r"\s+(?=\(?\d{1,4}\s*[.)]\s+\S)")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019"


def _clean_item(text: str) -> str:
    text = text.strip()
    text = re.sub(r"^\*\*(.*)\*\*$", r"\1", text)  # markdown bold around the whole item
    text = text.strip().strip(_QUOTES).strip()
    text = re.sub(r"\s+", " ", text)
    return text


def parse_numbered_list(reply: str, continue_from: int | None = None) -> list[str]:
    """Items of a numbered (or bulleted) list in an LLM reply, in order.

    Tolerates ``4.``, ``4)``, ``(4)``, ``4:``, ``4 -``, bullets, several items on one line, quotes,
    markdown bold, blank lines and chatter before/after the list. Unnumbered lines directly after an item
    are treated as its continuation. If ``continue_from`` is given (the request ended with ``"{k}."``), an
    unnumbered first line is item ``k`` itself.
    """
    if not isinstance(reply, str):
        raise TypeError(f"reply must be a string, got {type(reply).__name__}")
    lines: list[str] = []
    for raw in reply.replace("\r\n", "\n").split("\n"):
        lines.extend(part for part in _INLINE_SPLIT.split(raw))
    items: list[str] = []
    current: list[str] | None = None
    first_content = True
    for line in lines:
        if not line.strip():
            if current is not None:
                items.append(" ".join(current))
                current = None
            first_content = False if items or current else first_content
            continue
        m = _ITEM_START.match(line)
        if m:
            if current is not None:
                items.append(" ".join(current))
            current = [m.group(2)]
        elif current is not None:
            current.append(line.strip())
        elif first_content and continue_from is not None and not line.rstrip().endswith(":"):
            current = [
                line.strip()
            ]  # the reply continues the open "k." item (a line ending in ':' is chatter)
        first_content = False
    if current is not None:
        items.append(" ".join(current))
    out = []
    for item in items:
        cleaned = _clean_item(item)
        if cleaned:
            out.append(cleaned)
    return out


# --------------------------------------------------------------------------------------------------
# Skills and requests
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkillSpec:
    """What the LLM is asked to write for one skill."""

    name: str
    instruction: str
    seeds: tuple[str, ...]
    max_words: int = 30
    rules: tuple[str, ...] = ()
    template: dict | None = (
        None  # optional grammar for the template backend: {"patterns": [...], "slots": {...}}
    )


SHAPES_INSTRUCTIONS = {
    "object": "a single object described by its colour and shape (for example 'a red circle')",
    "count": "a number (one to three) of identical coloured shapes (for example 'two blue squares')",
    "color": "two objects with different colours and shapes, so each colour must bind to the right shape",
    "spatial": "two coloured shapes and where one is relative to the other (left, right, above, below)",
}


def _shapes_module():
    from diffalign.core import shapes

    if hasattr(shapes, "sample_prompts"):
        return shapes
    from diffalign.core.shapes import grammar  # the grammar module itself, before the package re-exports it

    return grammar


def shapes_skill(name: str, n_seeds: int = 3, seed: int = 0) -> SkillSpec:
    """A shapes-world skill: instruction plus seed prompts from the grammar's *train* split."""
    grammar = _shapes_module()
    if name not in SHAPES_INSTRUCTIONS:
        raise ValueError(f"unknown shapes skill {name!r}; expected one of {sorted(SHAPES_INSTRUCTIONS)}")
    seeds = tuple(dict.fromkeys(grammar.sample_prompts(name, 8 * n_seeds, split="train", seed=seed)))[
        :n_seeds
    ]
    return SkillSpec(name=name, instruction=SHAPES_INSTRUCTIONS[name], seeds=seeds, max_words=12)


def build_request(skill: SkillSpec, examples: Sequence[str], n_new: int) -> str:
    """The text sent to the LLM: task, rules, then the in-context examples as a list ending at ``k.``."""
    rules = [
        f"Every description must test this skill: {skill.instruction}.",
        "Use diverse subjects; do not repeat the examples.",
        f"Keep each description under {skill.max_words} words.",
        "Vary the wording and the style of the descriptions.",
        *skill.rules,
    ]
    lines = [f"Write {n_new} more diverse image descriptions for a text-to-image model.", "Rules:"]
    lines += [f"{i}. {rule}" for i, rule in enumerate(rules, start=1)]
    lines.append("Here are some image description examples:")
    lines += [f"{i}. {ex}" for i, ex in enumerate(examples, start=1)]
    lines.append(f"{len(examples) + 1}.")
    return "\n".join(lines)


@dataclass
class PromptRequest:
    skill: SkillSpec
    text: str
    examples: list[str]
    n_new: int
    seed: int  # derived from (run seed, skill, request index)


@dataclass
class BackendReply:
    text: str
    truncated: bool = False  # the backend stopped at its token limit: the last item may be cut


class PromptBackend(Protocol):
    name: str

    def complete(self, request: PromptRequest) -> BackendReply: ...


class PromptBackendError(RuntimeError):
    """A backend kept failing after all retries."""


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------


class PromptBackendFatalError(PromptBackendError):
    """A backend error that retrying cannot fix (a missing key, an HTTP 4xx answer): raised at once."""


class TemplateBackend:
    """Offline, seeded grammar. Shapes-world skills use the core grammar's *train* split; any other skill
    needs ``SkillSpec.template = {"patterns": ["a {color} {thing}", ...], "slots": {"color": [...], ...}}``."""

    name = "template"

    def complete(self, request: PromptRequest) -> BackendReply:
        rng = random.Random(request.seed)
        skill = request.skill
        if skill.template is not None:
            items = [_fill_template(skill.template, rng, skill.name) for _ in range(request.n_new)]
        elif skill.name in SHAPES_INSTRUCTIONS:
            items = _shapes_module().sample_prompts(skill.name, request.n_new, split="train", seed=rng)
        else:
            raise PromptBackendError(
                f"the template backend has no grammar for skill {skill.name!r}: give the skill a "
                "'template' (patterns + slots) or use the 'hf' or 'openai' backend"
            )
        start = len(request.examples) + 1
        return BackendReply("\n".join(f"{start + i}. {t}" for i, t in enumerate(items)))


def _fill_template(template: dict, rng: random.Random, skill: str) -> str:
    patterns = template.get("patterns") or []
    slots = template.get("slots") or {}
    if not patterns:
        raise PromptBackendError(f"skill {skill!r}: template grammar has no 'patterns'")
    pattern = rng.choice(patterns)

    def fill(m: re.Match) -> str:
        key = m.group(1)
        if key not in slots or not slots[key]:
            raise PromptBackendError(f"skill {skill!r}: template slot {{{key}}} has no values")
        return str(rng.choice(slots[key]))

    return re.sub(r"\{(\w+)\}", fill, pattern)


class HFBackend:
    """A local causal LM through transformers ``generate`` (sampling, temperature/top_p as in the paper)."""

    name = "hf"

    def __init__(
        self,
        model: str,
        *,
        max_new_tokens: int = 512,
        temperature: float = 1.0,
        top_p: float = 1.0,
        device: str | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        model_obj=None,
        tokenizer=None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        if model_obj is None:
            kwargs = {"trust_remote_code": trust_remote_code}
            if dtype:
                kwargs["dtype"] = getattr(torch, dtype)
            try:
                model_obj = AutoModelForCausalLM.from_pretrained(model, **kwargs)
                tokenizer = tokenizer or AutoTokenizer.from_pretrained(
                    model, trust_remote_code=trust_remote_code
                )
            except OSError as err:
                raise PromptBackendError(
                    f"cannot load causal LM {model!r}: {err}. Give a local directory, or download it first "
                    "(with HF_HUB_OFFLINE=1 only local files are used)."
                ) from err
        self.model = model_obj.eval()
        if device:
            self.model.to(device)
        self.tokenizer = tokenizer

    def complete(self, request: PromptRequest) -> BackendReply:
        import torch

        tok = self.tokenizer
        enc = tok(request.text, return_tensors="pt").to(self.model.device)
        gen = torch.Generator(device="cpu").manual_seed(request.seed % (2**63))
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                **enc,
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=pad,
            )
        new = out[0, enc["input_ids"].shape[1] :]
        text = tok.decode(new, skip_special_tokens=True)
        truncated = tok.eos_token_id is None or int(new[-1]) != tok.eos_token_id if len(new) else False
        truncated = truncated and len(new) >= self.max_new_tokens
        return BackendReply(text, truncated=truncated)


class OpenAIBackend:
    """Any OpenAI-compatible server (OpenAI, vLLM, Ollama, llama.cpp) through the ``openai`` client library
    (``pip install 'diffalign-selma[openai]'``).

    ``mode="completions"`` is the paper's legacy completions call (the reply continues the list);
    ``mode="chat"`` sends the request as one user message. The API key is read from the environment
    variable named by ``api_key_env`` (never stored in a recipe); when that variable is empty the backend
    refuses to start. ``api_key_env=None`` is for local servers without authentication. The client's own
    retries are off: :func:`call_with_retry` retries network errors, 408, 409, 429 and 5xx answers, and
    stops at once on any other 4xx answer (a wrong key, model or request never succeeds on retry).
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "https://api.openai.com/v1",
        mode: str = "completions",
        api_key_env: str | None = "OPENAI_API_KEY",
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 3072,
        timeout_s: float = 60.0,
        client: Any = None,
    ):
        if mode not in ("completions", "chat"):
            raise ValueError(f"openai backend mode must be 'completions' or 'chat', got {mode!r}")
        api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        if api_key_env and not api_key:
            raise PromptBackendFatalError(
                f"the openai backend needs an API key in the environment variable {api_key_env}: export it, "
                "or set prompts.openai.api_key_env to the variable holding it (null for a local server "
                "without authentication)"
            )
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.mode = mode
        self.temperature = temperature
        self.top_p = top_p
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        if client is None:
            try:
                import openai
            except ImportError:
                raise PromptBackendFatalError(
                    "the openai backend needs the openai client library: pip install 'diffalign-selma[openai]'"
                ) from None
            # a local server without authentication still needs a non-empty key in the client
            client = openai.OpenAI(
                base_url=self.base_url, api_key=api_key or "none", timeout=timeout_s, max_retries=0
            )
        self.client = client

    def complete(self, request: PromptRequest) -> BackendReply:
        kwargs: dict = {
            "model": self.model,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": request.seed % (2**31),
        }
        where = f"{self.base_url}/{'completions' if self.mode == 'completions' else 'chat/completions'}"
        try:
            if self.mode == "completions":
                reply = self.client.completions.create(prompt=request.text, **kwargs)
            else:
                messages = [{"role": "user", "content": request.text}]
                reply = self.client.chat.completions.create(messages=messages, **kwargs)
        except Exception as err:  # noqa: BLE001 - classified below, the library's types are optional
            raise _classify_error(err, where) from err
        try:
            choice = reply.choices[0]
            text = choice.text if self.mode == "completions" else choice.message.content
        except (AttributeError, IndexError, TypeError) as err:
            raise PromptBackendError(f"{where} answered without choices[0] text: {str(reply)[:300]}") from err
        return BackendReply(text or "", truncated=getattr(choice, "finish_reason", None) == "length")


RETRYABLE_STATUS = frozenset({408, 409, 429})


def _classify_error(err: Exception, where: str) -> PromptBackendError:
    """A client error as a (fatal for 4xx other than 408/409/429, else retryable) backend error."""
    status = getattr(err, "status_code", None)
    if isinstance(status, int):
        detail = str(getattr(err, "message", "") or err)[:300]
        message = f"{where} answered HTTP {status}: {detail}"
        if 400 <= status < 500 and status not in RETRYABLE_STATUS:
            return PromptBackendFatalError(message)
        return PromptBackendError(message)
    return PromptBackendError(f"cannot reach {where}: {type(err).__name__}: {err}")


def call_with_retry(
    backend: PromptBackend,
    request: PromptRequest,
    *,
    retries: int = 5,
    backoff_s: float = 2.0,
    max_backoff_s: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] | None = None,
) -> BackendReply:
    """Call the backend; on error wait backoff_s * 2**k (capped) and retry; after ``retries`` retries raise
    :class:`PromptBackendError` naming the skill, the attempts and the last error."""
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            return backend.complete(request)
        except PromptBackendFatalError:
            raise  # a 4xx answer or a missing key: retrying cannot help
        except Exception as err:  # noqa: BLE001 - any other backend failure is retried, then reported
            last = err
            if attempt == retries:
                break
            wait = min(max_backoff_s, backoff_s * (2**attempt))
            if log:
                log(
                    f"[{backend.name}] skill {request.skill.name}: attempt {attempt + 1} failed ({err}); retry in {wait:.1f}s"
                )
            sleep(wait)
    raise PromptBackendError(
        f"backend {backend.name!r} failed {retries + 1} times for skill {request.skill.name!r}: {last}"
    ) from last


# --------------------------------------------------------------------------------------------------
# The self-instruct loop
# --------------------------------------------------------------------------------------------------


@dataclass
class SkillPromptState:
    skill: str
    prompts: list[str] = field(default_factory=list)
    next_request: int = 0
    rejected_similar: int = 0
    rejected_length: int = 0
    rejected_truncated: int = 0
    parsed: int = 0
    done: bool = False

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _request_seed(seed: int, skill: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{skill}:{index}".encode()).hexdigest()
    return int(digest[:15], 16)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def state_path(out_dir: str | Path, skill: str) -> Path:
    return Path(out_dir) / f"{skill}.state.json"


def prompts_path(out_dir: str | Path, skill: str) -> Path:
    return Path(out_dir) / f"{skill}.jsonl"


def load_state(out_dir: str | Path, skill: str) -> SkillPromptState:
    path = state_path(out_dir, skill)
    if not path.exists():
        return SkillPromptState(skill=skill)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        state = SkillPromptState(**data)
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(
            f"prompt state {path} is corrupt ({err}); delete it to start this skill again"
        ) from err
    if state.skill != skill:
        raise ValueError(f"prompt state {path} belongs to skill {state.skill!r}, not {skill!r}")
    return state


def generate_skill_prompts(
    skill: SkillSpec,
    backend: PromptBackend,
    n: int,
    out_dir: str | Path,
    *,
    seed: int = 0,
    threshold: float = 0.8,
    num_examples: int = 3,
    prompts_per_request: int = 5,
    max_requests: int | None = None,
    retries: int = 5,
    backoff_s: float = 2.0,
    max_backoff_s: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] | None = None,
    stop_after_requests: int | None = None,
) -> SkillPromptState:
    """Run (or resume) the self-instruct loop for one skill until ``n`` prompts are accepted.

    Writes ``{skill}.state.json`` after every request and ``{skill}.jsonl`` (one ``{"skill", "text"}``
    per line) when done. ``max_requests`` bounds the requests (default ``max(20, 10 * n)``); reaching it
    with fewer than ``n`` prompts raises a ``RuntimeError`` that says how many were kept.
    ``stop_after_requests`` stops early (for tests of resumption).
    """
    if n < 1:
        raise ValueError(f"n (prompts per skill) must be >= 1, got {n}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if not skill.seeds:
        raise ValueError(f"skill {skill.name!r} has no seed prompts; give at least one")
    max_requests = max_requests if max_requests is not None else max(20, 10 * n)
    state = load_state(out_dir, skill.name)
    if state.done and len(state.prompts) >= n:
        _write_prompts(out_dir, skill.name, state.prompts[:n])
        return state
    state.done = False
    pool = RougeFilter(list(skill.seeds) + state.prompts, threshold=threshold)
    requests_this_call = 0
    from diffalign.core.training import progress  # lazy: core may be imported without torch in light uses

    bar = progress(total=n, desc=f"prompts[{skill.name}]", initial=len(state.prompts))
    while len(state.prompts) < n:
        if state.next_request >= max_requests:
            raise RuntimeError(
                f"skill {skill.name!r}: only {len(state.prompts)}/{n} distinct prompts after {max_requests} "
                f"requests (rejected: {state.rejected_similar} too similar, {state.rejected_length} too long); "
                "raise max_requests, lower n, or relax rouge_threshold"
            )
        if stop_after_requests is not None and requests_this_call >= stop_after_requests:
            break
        rseed = _request_seed(seed, skill.name, state.next_request)
        rng = random.Random(rseed)
        candidates = list(skill.seeds) + state.prompts
        examples = rng.sample(candidates, min(num_examples, len(candidates)))
        request = PromptRequest(
            skill=skill,
            text=build_request(skill, examples, prompts_per_request),
            examples=examples,
            n_new=prompts_per_request,
            seed=rseed,
        )
        reply = call_with_retry(
            backend,
            request,
            retries=retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            sleep=sleep,
            log=log,
        )
        items = parse_numbered_list(reply.text, continue_from=len(examples) + 1)
        if reply.truncated and items:
            items = items[:-1]
            state.rejected_truncated += 1
        state.parsed += len(items)
        for item in items:
            if len(state.prompts) >= n:
                break
            if len(rouge_tokens(item)) > skill.max_words or len(item.split()) > skill.max_words:
                state.rejected_length += 1
                continue
            if pool.is_duplicate(item):
                state.rejected_similar += 1
                continue
            pool.add(item)
            state.prompts.append(item)
            bar.update(1)
        state.next_request += 1
        requests_this_call += 1
        state.done = len(state.prompts) >= n
        _atomic_write_text(state_path(out_dir, skill.name), json.dumps(state.to_json(), indent=1))
    bar.close()
    if state.done:
        _write_prompts(out_dir, skill.name, state.prompts[:n])
    return state


def _write_prompts(out_dir: str | Path, skill: str, prompts: list[str]) -> None:
    text = "".join(json.dumps({"skill": skill, "text": p}) + "\n" for p in prompts)
    _atomic_write_text(prompts_path(out_dir, skill), text)


def read_prompts(path: str | Path) -> list[dict]:
    """Records ``{"skill", "text"}`` of a prompts ``.jsonl`` (or a directory of them, sorted by name)."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files or not all(f.exists() for f in files):
        raise FileNotFoundError(f"no prompt files at {path}")
    out: list[dict] = []
    for f in files:
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{f}:{lineno}: not JSON ({err})") from err
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or not rec["text"].strip():
                raise ValueError(f"{f}:{lineno}: each line needs a non-empty 'text' string")
            rec.setdefault("skill", f.stem)
            out.append(rec)
    if not out:
        raise ValueError(f"prompt files at {path} are empty")
    return out
