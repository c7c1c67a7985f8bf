"""Models and tokenizers: which directory a ``model`` config means, loading it, and the run's cache of
loaded students.

Every source resolves to a plain Hugging Face directory first (``resolve_model_dir``), so the same
checkpoint format flows through training, evaluation, vLLM and lm-eval. A local ``model.path`` is
checked before anything loads it, so a typo is one line naming the key, not a hub error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from sdft_cli.artifacts import cache_dir
from sdft_cli.builders import build_tiny_model, convert_smollm2
from sdft_cli.config import ModelConfig
from sdft_cli.errors import ConfigError
from sdft_cli.precision import DTYPES
from sdft_cli.toy import pretrain

# Files of which a model directory holds at least one (transformers' tokenizer formats).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ----------------------------------------------------------------------------- sources


def resolve_model_dir(cfg: ModelConfig) -> Path | str:
    """Return a directory (or hub id) that ``from_pretrained`` can load for ``cfg``."""
    if cfg.source == "hf":
        return check_model_path(cfg.path)  # type: ignore[arg-type]
    if cfg.source == "smollm2":
        return convert_smollm2(cache_dir() / "models" / "smollm2-135m-instruct-hf")
    if cfg.source == "tiny_random":
        key = hashlib.sha1(json.dumps(asdict(cfg.tiny), sort_keys=True).encode()).hexdigest()[:12]
        return build_tiny_model(cache_dir() / "models" / f"tiny-random-{key}", cfg.tiny)
    if cfg.source == "toy_world":
        return pretrain.build(cache_dir() / "models" / f"toy-world-{pretrain.cache_key(cfg.toy)}", cfg.toy)
    raise ConfigError(f"model.source={cfg.source!r} is not supported")


def is_local(path: str) -> bool:
    """Whether ``model.path`` names a directory rather than a hub id (``org/name``): it exists, or it is
    written as a path (absolute, ``./``, ``~``, or more than one ``/``)."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).exists()


def check_model_path(path: str) -> Path | str:
    """A local ``model.path`` must be a model directory with a config, safetensors weights and a
    tokenizer; each miss is one line naming the key and the path. A hub id is returned as it is."""
    if not is_local(path):
        return path
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"model.path={path}: no such directory")
    if not p.is_dir():
        raise ConfigError(f"model.path={path}: not a directory (name the model's directory)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path={path}: not a model directory (no config.json)")
    if not any(p.glob("*.safetensors")):
        raise ConfigError(f"model.path={path}: no safetensors weights (*.safetensors); convert .bin weights")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"model.path={path}: no tokenizer ({', '.join(TOKENIZER_FILES)})")
    return p


# ----------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _load_errors(path: Path | str):
    """One line for what transformers reports at length: a model whose config names Python code to run
    (refused unless trusted), and a hub id that cannot be fetched or is not cached offline."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ConfigError(
            f"{path} ships Python code that loading it would run (config.json auto_map); set "
            "model.trust_remote_code=true only if you trust that code"
        ) from None
    except OSError as e:
        if isinstance(path, Path) or is_local(str(path)):
            raise
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ConfigError(f"model.path={path}: cannot load it from the hub or its cache: {first}") from None


def load_config(path: Path | str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    with _load_errors(path):
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_tokenizer(path: Path | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    with _load_errors(path):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    # Prompts are left-padded so every completion starts at the same position in a batch.
    tok.padding_side = "left"
    return tok


def load_model(
    path: Path | str,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
):
    """The causal LM at ``path``. Weights load from safetensors only (a pickled ``.bin`` checkpoint is
    refused); Python code shipped with the model runs only when trusted."""
    from transformers import AutoModelForCausalLM

    with _load_errors(path):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True
        )
    return model.to(device)


def generation_config(path: Path | str):
    """The model directory's generation config, or None when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def eos_ids(tokenizer, config) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS plus the generation config's
    (``config`` is a GenerationConfig, a model carrying one, or None)."""
    ids = {tokenizer.eos_token_id}
    config = getattr(config, "generation_config", config)
    gen_eos = getattr(config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


class ModelCache:
    """The one student a run holds in memory: loaded from a directory on a device, or adopted after
    training (the trained model is the checkpoint just saved), so consecutive stages share it."""

    def __init__(self, dtype: str, trust_remote_code: bool = False):
        self.dtype, self.trust = dtype, trust_remote_code
        self.key: tuple[str, str] | None = None
        self.model: torch.nn.Module | None = None

    def get(self, path: Path | str, device: torch.device) -> torch.nn.Module:
        """The model at ``path`` on ``device``; reuses the one in memory when it holds those weights."""
        if self.key != (str(path), str(device)) or self.model is None:
            self.model = None  # freed before the next one loads
            self.model = load_model(path, self.dtype, device, self.trust)
            self.key = (str(path), str(device))
        return self.model

    def adopt(self, path: Path | str, device: torch.device) -> None:
        """The model in memory now holds the weights saved at ``path``."""
        self.key = (str(path), str(device))

    def drop(self) -> None:
        self.key, self.model = None, None
