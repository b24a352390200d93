import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("default", deadline=None, max_examples=60, derandomize=True)
settings.register_profile("ci", deadline=None, max_examples=60, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# one intra-op thread: on a shared 2-core machine two threads make small ops up to 1000x
# slower (spin-waiting), and test tensors are small. Set once for every test file (no per-file
# fixture): a test that changes the count restores it itself (tests/test_cli.py)
torch.set_num_threads(1)


@pytest.fixture
def gen():
    """A seeded CPU generator: tests take randomness only through it."""
    return torch.Generator().manual_seed(1234)
