import itertools
import json
import random
import threading
import types
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from diffalign.selma import prompts as P


def brute_lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, j in itertools.product(range(len(a)), range(len(b))):
        table[i + 1][j + 1] = table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_lcs_bitparallel_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 30))]
        assert P.lcs_length(a, b) == brute_lcs(a, b)


def test_rouge_l_analytic_and_negative_control():
    # "a red circle" vs "a single red circle": LCS 3, P = 3/3, R = 3/4 -> F = 6/7
    assert P.rouge_l("a red circle", "a single red circle") == pytest.approx(6 / 7)
    assert P.rouge_l("A red circle.", "a red circle") == pytest.approx(1.0)  # case and punctuation ignored
    assert P.rouge_l("", "a red circle") == 0.0
    # Negative control: a bag-of-words overlap (ignores order) would call a reversed sentence identical.
    rev = "circle red a"
    assert P.rouge_l(rev, "a red circle") == pytest.approx(2 * (1 / 3) * (1 / 3) / (2 / 3))
    bag_f1 = 1.0
    assert P.rouge_l(rev, "a red circle") != pytest.approx(bag_f1)


def test_rouge_filter_threshold_is_strict_and_bound_is_exact():
    pool = P.RougeFilter(["a red circle and a green square", "two blue squares"], threshold=0.8)
    assert pool.is_duplicate("a red circle and a green square.")
    assert not pool.is_duplicate("three yellow triangles")
    # exactly at the threshold is kept (the paper drops only scores > 0.8)
    base = "w1 w2 w3 w4 w5 w6 w7 w8"
    cand = "w1 w2 w3 w4 w5 w6 x y"  # LCS 6 of 8 and 8 -> F = 0.75
    assert P.rouge_l(cand, base) == pytest.approx(0.75)
    assert not P.RougeFilter([base], threshold=0.75).is_duplicate(cand)
    assert P.RougeFilter([base], threshold=0.74).is_duplicate(cand)
    # the pruned max equals the brute-force max over the pool
    rng = random.Random(1)
    words = "a red blue green circle square two of left the".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(60)]
    filt = P.RougeFilter(texts[:40])
    for t in texts[40:]:
        assert filt.max_score(t) == pytest.approx(max(P.rouge_l(t, r) for r in texts[:40]))
    with pytest.raises(ValueError, match="threshold"):
        P.RougeFilter([], threshold=1.5)


@pytest.mark.parametrize(
    "reply,expected",
    [
        ("4. a red circle\n5. two blue squares", ["a red circle", "two blue squares"]),
        (
            ' a red circle\n5) two blue squares\n6: "a green square"',
            ["a red circle", "two blue squares", "a green square"],
        ),
        (
            "Sure! Here are more:\n\n4. **a red circle**\n5. 'two blue\nsquares'\n\nHope this helps",
            ["a red circle", "two blue squares"],
        ),
        (
            "4. a red circle 5. a blue square 6. three green triangles",
            ["a red circle", "a blue square", "three green triangles"],
        ),
        (
            "- a red circle\n* a blue square\n\u2022 a green one",
            ["a red circle", "a blue square", "a green one"],
        ),
        ("(4) a red circle\n(5) a yellow square", ["a red circle", "a yellow square"]),
        ("4.\n5. \n6. a red circle", ["a red circle"]),
        ("", []),
    ],
)
def test_parse_numbered_list_tricky_replies(reply, expected):
    assert P.parse_numbered_list(reply, continue_from=4) == expected


def test_parse_does_not_treat_leading_chatter_as_item_without_continuation():
    assert P.parse_numbered_list("Here you go:\n1. a red circle") == ["a red circle"]
    # with continue_from the unnumbered first line is the continued item
    assert P.parse_numbered_list("a blue square\n5. a red circle", continue_from=4) == [
        "a blue square",
        "a red circle",
    ]
    # a number inside a prompt is not split
    assert P.parse_numbered_list("4. a photo of 3 dogs on a bench") == ["a photo of 3 dogs on a bench"]


def test_build_request_has_three_examples_and_open_item():
    skill = P.shapes_skill("count")
    text = P.build_request(skill, ["x one", "x two", "x three"], 5)
    assert text.endswith("1. x one\n2. x two\n3. x three\n4.")
    assert "count" not in skill.instruction or "number" in skill.instruction


def test_template_loop_dedups_stops_at_n_and_resumes_identically(tmp_path):
    skill = P.shapes_skill("spatial")
    backend = P.TemplateBackend()
    full = P.generate_skill_prompts(skill, backend, 25, tmp_path / "a", seed=3)
    assert full.done and len(full.prompts) == 25
    recs = [json.loads(line) for line in (tmp_path / "a" / "spatial.jsonl").read_text().splitlines()]
    assert [r["text"] for r in recs] == full.prompts
    # every accepted prompt is <= 0.8 Rouge-L against everything before it (seeds included)
    earlier = list(skill.seeds)
    for p in full.prompts:
        assert max(P.rouge_l(p, q) for q in earlier) <= 0.8
        earlier.append(p)
    assert full.rejected_similar > 0  # the grammar repeats itself, so the filter must have worked
    # held-out grammar prompts never appear
    from diffalign.core.shapes import grammar

    assert all(grammar.prompt_split(p) == "train" for p in full.prompts)
    # interrupted after 2 requests, then resumed: same result
    part = P.generate_skill_prompts(skill, backend, 25, tmp_path / "b", seed=3, stop_after_requests=2)
    assert not part.done and 0 < len(part.prompts) < 25
    resumed = P.generate_skill_prompts(skill, backend, 25, tmp_path / "b", seed=3)
    assert resumed.prompts == full.prompts and resumed.next_request == full.next_request


def test_loop_reports_when_pool_is_exhausted(tmp_path):
    skill = P.SkillSpec(
        "tiny", "anything", seeds=("a cat",), template={"patterns": ["a {x}"], "slots": {"x": ["cat", "dog"]}}
    )
    with pytest.raises(RuntimeError, match=r"only 1/5 distinct prompts"):
        P.generate_skill_prompts(skill, P.TemplateBackend(), 5, tmp_path, max_requests=6)


def test_length_limit_and_truncated_reply(tmp_path):
    class Fixed:
        name = "fixed"

        def complete(self, request):
            return P.BackendReply(
                "4. a short prompt here\n5. " + " ".join(["word"] * 40) + "\n6. a cut off promp",
                truncated=True,
            )

    skill = P.SkillSpec("s", "x", seeds=("alpha beta",), max_words=10)
    st = P.generate_skill_prompts(skill, Fixed(), 1, tmp_path)
    assert st.prompts == ["a short prompt here"]
    assert st.rejected_truncated == 1


def test_retry_with_backoff_then_report():
    calls, sleeps = [], []

    class Flaky:
        name = "flaky"

        def __init__(self, fail):
            self.fail = fail

        def complete(self, request):
            calls.append(1)
            if len(calls) <= self.fail:
                raise ConnectionError("boom")
            return P.BackendReply("4. a red circle")

    skill = P.shapes_skill("object")
    req = P.PromptRequest(skill, "t", [], 1, 0)
    out = P.call_with_retry(Flaky(2), req, retries=3, backoff_s=1.0, sleep=sleeps.append)
    assert out.text == "4. a red circle" and sleeps == [1.0, 2.0]
    calls.clear()
    sleeps.clear()
    with pytest.raises(P.PromptBackendError, match="failed 3 times.*boom"):
        P.call_with_retry(Flaky(99), req, retries=2, backoff_s=1.0, max_backoff_s=1.5, sleep=sleeps.append)
    assert sleeps == [1.0, 1.5]


class _StubHandler(BaseHTTPRequestHandler):
    requests: list = []
    failures_left = 0
    failure_status = 503

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body, self.headers.get("Authorization")))
        if type(self).failures_left > 0:
            type(self).failures_left -= 1
            self.send_response(type(self).failure_status)
            self.end_headers()
            self.wfile.write(b"overloaded")
            return
        rng = random.Random(body.get("seed", 0))
        nouns = "dog cat bus tree lamp chair kite boat horse apple clock vase bird train cake sofa".split()
        items = [" ".join(["a", *rng.sample(nouns, 2), "near", rng.choice(nouns)]) for _ in range(3)]
        text = "\n".join(f"{4 + i}. {t}" for i, t in enumerate(items))
        if self.path.endswith("/chat/completions"):
            payload = {
                "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]
            }
        else:
            payload = {"choices": [{"text": " " + text.split(". ", 1)[1], "finish_reason": "stop"}]}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def stub_server():
    server = HTTPServer(("127.0.0.1", 0), _StubHandler)
    _StubHandler.requests = []
    _StubHandler.failures_left = 0
    _StubHandler.failure_status = 503
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _StubHandler
    server.shutdown()


@pytest.mark.parametrize("mode", ["completions", "chat"])
def test_openai_backend_against_stub_server(tmp_path, stub_server, mode, monkeypatch):
    pytest.importorskip("openai")
    url, handler = stub_server
    monkeypatch.setenv("SELMA_TEST_KEY", "sk-test")
    handler.failures_left = 1
    backend = P.OpenAIBackend(
        "stub-model", base_url=url, mode=mode, api_key_env="SELMA_TEST_KEY", max_tokens=64
    )
    skill = P.SkillSpec("general", "everyday scenes", seeds=("a dog on a sofa", "a cup of tea", "a red bus"))
    st = P.generate_skill_prompts(skill, backend, 4, tmp_path, backoff_s=0.0)
    assert len(st.prompts) == 4
    path, body, auth = handler.requests[0]
    assert path == ("/v1/completions" if mode == "completions" else "/v1/chat/completions")
    assert auth == "Bearer sk-test" and body["model"] == "stub-model" and body["temperature"] == 1.0
    text = body["prompt"] if mode == "completions" else body["messages"][0]["content"]
    assert text.rstrip().endswith("4.") and text.count("\n1. ") == 2  # rules list and example list
    assert len(handler.requests) >= 2  # the 503 was retried


def test_openai_backend_reports_persistent_error(tmp_path, stub_server):
    pytest.importorskip("openai")
    url, handler = stub_server
    handler.failures_left = 100
    backend = P.OpenAIBackend("m", base_url=url, api_key_env=None)
    skill = P.SkillSpec("general", "x", seeds=("a dog",))
    with pytest.raises(P.PromptBackendError, match="HTTP 503"):
        P.generate_skill_prompts(skill, backend, 2, tmp_path, retries=1, backoff_s=0.0)
    # nothing was accepted, and no state claims progress
    assert not (tmp_path / "general.jsonl").exists()


def test_openai_backend_does_not_retry_4xx(tmp_path, stub_server, monkeypatch):
    """A 401 is answered once and reported; the same run with a 503 would be retried (control above)."""
    pytest.importorskip("openai")
    url, handler = stub_server
    monkeypatch.setenv("SELMA_TEST_KEY", "sk-wrong")
    handler.failures_left = 100
    handler.failure_status = 401
    backend = P.OpenAIBackend("m", base_url=url, api_key_env="SELMA_TEST_KEY")
    skill = P.SkillSpec("general", "x", seeds=("a dog",))
    with pytest.raises(P.PromptBackendFatalError, match="HTTP 401"):
        P.generate_skill_prompts(skill, backend, 2, tmp_path, retries=3, backoff_s=0.0)
    assert len(handler.requests) == 1


class _FakeStatusError(Exception):
    def __init__(self, status_code):
        super().__init__(f"status {status_code}")
        self.status_code = status_code


class _FakeClient:
    """Stands in for openai.OpenAI: fails with the given statuses, then answers."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.calls = 0
        self.completions = self

    def create(self, **kwargs):
        self.calls += 1
        if self.statuses:
            raise _FakeStatusError(self.statuses.pop(0))
        choice = types.SimpleNamespace(text=" a dog near a cat\n5. a kite on a boat", finish_reason="stop")
        return types.SimpleNamespace(choices=[choice])


@pytest.mark.parametrize(
    ("statuses", "retried"),
    [([429, 500], True), ([408], True), ([400], False), ([403], False), ([404], False)],
)
def test_openai_backend_retry_policy(statuses, retried):
    client = _FakeClient(statuses)
    backend = P.OpenAIBackend("m", api_key_env=None, client=client)
    skill = P.SkillSpec("general", "x", seeds=("a dog",))
    request = P.PromptRequest(skill, "1. a dog\n2.", ["a dog"], 2, seed=0)
    if retried:
        reply = P.call_with_retry(backend, request, retries=3, sleep=lambda s: None)
        assert "kite" in reply.text and client.calls == len(statuses) + 1
    else:
        with pytest.raises(P.PromptBackendFatalError, match=f"HTTP {statuses[0]}"):
            P.call_with_retry(backend, request, retries=3, sleep=lambda s: None)
        assert client.calls == 1


def test_openai_backend_refuses_to_start_without_key(monkeypatch):
    monkeypatch.delenv("SELMA_MISSING_KEY", raising=False)
    with pytest.raises(P.PromptBackendFatalError, match="SELMA_MISSING_KEY"):
        P.OpenAIBackend("m", api_key_env="SELMA_MISSING_KEY", client=_FakeClient([]))
    monkeypatch.setenv("SELMA_MISSING_KEY", "sk-x")
    P.OpenAIBackend("m", api_key_env="SELMA_MISSING_KEY", client=_FakeClient([]))  # starts with a key


def test_hf_backend_plumbing_with_tiny_local_lm(tmp_path):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {
        w: i
        for i, w in enumerate(["<eos>", "<unk>", "\n", "4.", "5.", "a", "red", "blue", "circle", "square"])
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(vocab), n_positions=512, n_embd=16, n_layer=1, n_head=2)
    )
    backend = P.HFBackend("local", model_obj=model, tokenizer=hf_tok, max_new_tokens=12)
    skill = P.SkillSpec("s", "x", seeds=("a red circle",))
    req = P.PromptRequest(skill, P.build_request(skill, ["a red circle"], 2), ["a red circle"], 2, seed=5)
    a, b = backend.complete(req), backend.complete(req)
    assert isinstance(a.text, str) and a.text == b.text  # seeded sampling is reproducible
