"""Shared fixtures: offline environment, a tiny random model built locally, tiny task files.

Nothing here downloads: the model is a random 2-layer Llama with a byte-level tokenizer, built once
per test session under a temporary SDFT_CACHE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SDFT = [sys.executable, "-m", "sdft_cli.cli"]
SMOKE = ["experiment=smoke", "logger.progress=false"]


def sdft(*args: str, cwd: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `sdft` entry point in a subprocess; fail with its output unless ``check=False``."""
    out = subprocess.run(
        [*SDFT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=os.environ
    )
    if check and out.returncode != 0:
        raise AssertionError(f"sdft {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    """Everything offline, caches under a temporary directory, no W&B network."""
    cache = tmp_path_factory.mktemp("sdft_cache")
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cache / "datasets"),
        "SDFT_CACHE": os.environ.get("SDFT_TEST_CACHE", str(cache)),
        "WANDB_MODE": "offline",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_model_dir(offline_env):
    from sdft_cli.config import TinyModelConfig
    from sdft_cli.models import build_tiny_model, cache_dir

    return build_tiny_model(cache_dir() / "models" / "tiny-test", TinyModelConfig(seed=0))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    import torch

    from sdft_cli.models import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def copy_task_dir(tmp_path) -> Path:
    """A tiny 'repeat the word' task as local JSONL files ({split}.jsonl)."""
    words = ["apple", "river", "stone", "cloud", "amber", "tiger", "maple", "ocean"]
    rows = [{"prompt": f"Repeat: {w}", "demonstration": w, "answer": w} for w in words]
    write_jsonl(tmp_path / "copy" / "train.jsonl", rows[:6])
    write_jsonl(tmp_path / "copy" / "test.jsonl", rows[6:])
    return tmp_path / "copy"
