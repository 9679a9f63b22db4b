"""Shared fixtures. Tiny random-init models live in tiny_models.py."""

import os
import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))  # tests import tiny_models by name

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # two xdist workers on two cores: one thread each is faster and steadier
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def minilm():
    import attnscope

    return attnscope.load("minilm")
