import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFALIGN_NO_PROGRESS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread_and_seeded():
    """Tiny models run fastest single-threaded on a shared machine; every test starts from the same seed."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def judge_models_dir(tmp_path_factory):
    """A directory laid out like listener-reward's shapes-world models, holding a tiny (untrained) judge
    VLM at ``judge/``: ``get_reward("listener-judge", source=<dir>/judge)`` loads it, and so does the
    default ``shapes/judge`` when ``DIFFALIGN_LISTENER_SHAPES_DIR`` points at the directory."""
    from diffalign.core.testing.vlm import save_tiny_vlm, tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("listener-models")
    model, processor = tiny_qwen2_5_vl(0)
    save_tiny_vlm(model, processor, root / "judge")
    return root


@pytest.fixture
def judge_calls(monkeypatch):
    """Spy on the listener-judge reward: every ``score`` call is recorded (prompts, number of images, scores)
    and otherwise runs unchanged."""
    from diffalign.listener_reward.judge import ListenerJudgeReward

    calls = []
    original = ListenerJudgeReward.score

    def spy(self, images, prompts):
        scores = original(self, images, prompts)
        calls.append({"prompts": list(prompts), "n": len(prompts), "scores": scores.detach().clone()})
        return scores

    monkeypatch.setattr(ListenerJudgeReward, "score", spy)
    return calls
