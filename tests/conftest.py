"""Test-wide setup: one torch thread, offline hub, tiny models cached once per machine."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PRISM_NO_PROGRESS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_path():
    from stages.common import tiny

    return tiny.ensure("tiny")


@pytest.fixture(scope="session")
def tiny_moe_path():
    from stages.common import tiny

    return tiny.ensure("tiny-moe")
