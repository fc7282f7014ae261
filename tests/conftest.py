"""Shared test setup: deterministic, single-threaded torch, offline Hugging Face libraries."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """``LYCOTRAIN_HOME`` inside the test's folder: latent, text-encoder and scan caches of this test only."""
    home = tmp_path / "home"
    monkeypatch.setenv("LYCOTRAIN_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def image_assets(tmp_path_factory):
    """(tiny SD1 model folder, two-image demo dataset), built once per test module."""
    from _image_runs import build_assets

    return build_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture
def as_other_rank():
    """Wraps an ``Accelerator`` so that a task sees itself on a non-main process (everything else passes through)."""

    class OtherRank:
        is_main_process = False

        def __init__(self, accelerator):
            self._accelerator = accelerator

        def __getattr__(self, name):
            return getattr(self._accelerator, name)

    return OtherRank
