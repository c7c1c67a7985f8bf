"""Shared fixtures: offline environment, a tiny random model built locally, tiny task files.

Nothing here downloads: the model is a random 2-layer Llama with a byte-level tokenizer, built once
per test session under a temporary SDFT_CACHE.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SDFT = [sys.executable, "-m", "sdft_cli.cli"]
SMOKE = ["experiment=smoke", "logger.progress=false"]


def sdft(
    *args: str, cwd: Path, check: bool = True, timeout: int = 600, process: bool = False
) -> subprocess.CompletedProcess:
    """Run the real `sdft` command line, in this process (the Typer app, as the console script calls it)
    or, with ``process=True``, in a subprocess; fail with its output unless ``check=False``.

    In-process runs save a Python start and the imports per run. The command line, the working
    directory and the logging handlers Hydra installs are restored afterwards.
    """
    if process:
        out = subprocess.run(
            [*SDFT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=os.environ
        )
    else:
        from typer.testing import CliRunner

        from sdft_cli.cli import app

        root = logging.getLogger()
        saved = (os.getcwd(), sys.argv[:], root.handlers[:], root.level)
        os.chdir(cwd)
        try:
            res = CliRunner().invoke(app, list(args))
        finally:
            os.chdir(saved[0])
            sys.argv, root.handlers[:] = saved[1], saved[2]
            root.setLevel(saved[3])
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception  # a traceback is a bug, not an exit code
        out = subprocess.CompletedProcess([*SDFT, *args], res.exit_code, res.stdout, res.stderr)
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
    from sdft_cli.artifacts import cache_dir
    from sdft_cli.builders import build_tiny_model
    from sdft_cli.config import TinyModelConfig

    return build_tiny_model(cache_dir() / "models" / "tiny-test", TinyModelConfig(seed=0))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    import torch

    from sdft_cli.models import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def train_context(
    model, tok, cfg, layout, task: str = "copy", seed: int = 0, stage: int = 1, rollout=None, **fields
):
    """A ``TrainContext`` for calling a method directly: fp32 rollouts, no autocast, a quiet logger."""
    from sdft_cli.config import LoggerConfig, RolloutConfig
    from sdft_cli.engines import Engines
    from sdft_cli.logger import RunLogger
    from sdft_cli.methods.context import TrainContext

    rollout = rollout or RolloutConfig(dtype="float32")
    eos = [tok.eos_token_id]
    return TrainContext(
        model=model,
        tokenizer=tok,
        method=cfg,
        rollout=rollout,
        autocast_dtype=None,
        eos_ids=eos,
        seed=seed,
        stage=stage,
        train_dir=layout.train(stage, task),
        logger=RunLogger(LoggerConfig(), layout, {}, "t"),
        engines=Engines(rollout, tokenizer=tok, eos_ids=eos, autocast_dtype=None, seed=seed),
        progress=False,
        **fields,
    )


def hf_engine(model, tok, eos=None, autocast_dtype=None, decoder: str = "auto"):
    """The in-place engine over ``model`` (what evaluation decodes with)."""
    from sdft_cli.engines import HFEngine

    return HFEngine(model, tok, list(eos or [tok.eos_token_id]), autocast_dtype, decoder=decoder)


def assert_names(err: pytest.ExceptionInfo, *parts: str) -> str:
    """The error's message is one line and names every part (a key, a file, a row)."""
    text = str(err.value)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, (part, text)
    return text


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


class ChatServer:
    """A real OpenAI-compatible chat-completions endpoint on loopback; ``respond(body)`` writes each reply
    (an exception there is a 500). It can fail the next ``fail`` requests with ``status``; it records
    every request and its headers."""

    def __init__(self, respond: Callable[[dict], str]):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.fail, self.status = 0, 500
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                if server.fail > 0:
                    server.fail -= 1
                    self._send(server.status, {"error": {"message": "try again"}})
                    return
                try:
                    message = {"role": "assistant", "content": respond(body)}
                except Exception as e:  # a failing backend: a 500 with its message
                    self._send(500, {"error": {"message": str(e)}})
                    return
                self._send(
                    200,
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                    },
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
