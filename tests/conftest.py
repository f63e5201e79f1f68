"""Test-wide settings.

Without CUDA, Triton kernels run under the interpreter; TRITON_INTERPRET must be set before
any kernel module is imported, so it is set here, first.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = os.environ.get(
    "FASTSWAV_SHARED_DATA",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"),
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data():
    """Path of ../shared/data (override with FASTSWAV_SHARED_DATA)."""
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.fail(f"shared data folder not found at {path}; set FASTSWAV_SHARED_DATA")
    return path
