import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFALIGN_NO_PROGRESS", "1")

import torch  # noqa: E402

torch.set_num_threads(2)
