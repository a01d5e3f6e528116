import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFALIGN_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).parent))


# Tiny models: one intra-op thread is fastest, and far faster on a loaded shared machine.
import torch  # noqa: E402

torch.set_num_threads(1)
