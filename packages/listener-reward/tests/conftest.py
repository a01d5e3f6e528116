import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """A tiny reasoner and an independent tiny listener (different seeds), saved to disk."""
    from diffalign.core.testing.vlm import save_tiny_vlm, tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("tiny-vlms")
    reasoner, processor = tiny_qwen2_5_vl(0)
    save_tiny_vlm(reasoner, processor, root / "reasoner")
    listener, processor = tiny_qwen2_5_vl(1)
    save_tiny_vlm(listener, processor, root / "listener")
    return {"reasoner": str(root / "reasoner"), "listener": str(root / "listener")}


@pytest.fixture(scope="session")
def pairs():
    from diffalign.listener_reward.data import make_shapes_pairs

    return make_shapes_pairs(8, "train", seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(1)
