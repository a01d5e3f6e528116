import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFALIGN_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).parent))  # ecad_test_support for in-process and subprocess tests

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pixart_pipe():
    from ecad_test_support import tiny_pixart

    return tiny_pixart()


@pytest.fixture(scope="session")
def dit_pipe():
    from ecad_test_support import tiny_dit

    return tiny_dit()


@pytest.fixture(scope="session")
def flux_pipe():
    from ecad_test_support import tiny_flux

    return tiny_flux()
