import logging
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*bos_token_id.*")
warnings.filterwarnings("ignore", message=".*eos_token_id.*")
logging.getLogger("transformers").setLevel(logging.ERROR)
if os.environ.get("INRUN_TEST_DEVICE", "cpu").startswith("cuda"):
    # float32 tolerances assume float32 products (TF32 convolutions would miss them by design)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: one thread is faster, and immune to a shared machine's load
    (two spinning OpenMP threads on busy cores made such modules several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
