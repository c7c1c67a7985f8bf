"""String skills over a small alphabet, rendered as tasks, and the character tokenizer that reads them.

A skill is a named function from a string of letters to a string. The student prompt is
``"<skill>:<input>"``; the demonstration is the correct output, written in one of two styles: ``plain``
(``dcba``), the base model's own, or ``spaced`` (``d c b a``), a style pretraining never uses for an
answer. Spaced demonstrations are off-policy for the model the way an expert's demonstrations are for an
LLM: SFT has to learn the style along with the skill, while the teacher restates the content in its
own style. Answers are scored on content: either style is correct. Inputs are split once and for all by a
stable hash, so pretraining, training rows and test rows never share an input of the test partition:
a prior skill's probe and a new task's test split measure generalisation, not recall.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable

from sdft_cli.names import TEACHER_TEMPLATES

# The teacher template the base model learns in pretraining.
TEMPLATE = TEACHER_TEMPLATES["toy"]

LETTERS = "abcdefgh"
MIN_LEN, MAX_LEN = 3, 6
# Inputs are split by CRC32 modulo 16: residue 0 is the test partition, 8 the validation partition.
SPLIT_MOD = 16
# Rows per split when a task sets no max_train / max_test.
DEFAULT_ROWS = {"train": 256, "validation": 64, "test": 64}
# Everything a prompt, demonstration or template of the world can contain.
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 \n:.,;!?'-=|>()"


def _shift(s: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s)


def _swap(s: str) -> str:
    pairs = [s[i : i + 2][::-1] for i in range(0, len(s), 2)]
    return "".join(pairs)


SKILLS: dict[str, Callable[[str], str]] = {
    # prior skills: learned in pretraining, evaluated as prior-capability probes
    "rev": lambda s: s[::-1],
    "dup": lambda s: "".join(c * 2 for c in s),
    "sort": lambda s: "".join(sorted(s)),
    "first": lambda s: s[0],
    "last": lambda s: s[-1],
    "rot": lambda s: s[1:] + s[0],
    # new tasks: never shown in pretraining; the base model can only do them with a demonstration
    "shift": _shift,
    "swap": _swap,
    "odd": lambda s: s[::2],
    "mirror": lambda s: s + s[::-1],
    "drop": lambda s: s[1:],
}
PRIOR_SKILLS = ("rev", "dup", "sort", "first", "last", "rot")
NEW_SKILLS = ("shift", "swap", "odd", "mirror", "drop")


def partition(x: str) -> str:
    """train, validation or test: a fixed property of the input string."""
    r = zlib.crc32(x.encode()) % SPLIT_MOD
    return "test" if r == 0 else "validation" if r == SPLIT_MOD // 2 else "train"


def random_input(rng: random.Random, split: str = "train") -> str:
    """A random input of the given partition."""
    while True:
        x = "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
        if partition(x) == split:
            return x


STYLES = ("plain", "spaced")


def prompt(skill: str, x: str) -> str:
    return f"{skill}:{x}"


def styled(y: str, style: str) -> str:
    return " ".join(y) if style == "spaced" else y


def rows(skill: str, split: str, n: int, seed: int = 0, style: str = "plain") -> list[dict]:
    """``n`` distinct rows of ``skill`` (prompt, demonstration in ``style``, answer), deterministic in
    ``seed``. The answer is a JSON list of both styles (the scorers' "any of these").

    Test and validation rows carry the demonstration too, so the teacher's in-context accuracy can be
    measured on them.
    """
    if skill not in SKILLS:
        raise KeyError(skill)
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    if split not in DEFAULT_ROWS:
        raise ValueError(f"split must be one of {', '.join(DEFAULT_ROWS)}, got {split!r}")
    rng = random.Random(f"{skill}/{split}/{seed}")
    seen: set[str] = set()
    out = []
    while len(out) < n:
        x = random_input(rng, split)
        if x in seen:
            continue
        seen.add(x)
        y = SKILLS[skill](x)
        answer = json.dumps([y, styled(y, "spaced")]) if len(y) > 1 else y
        out.append({"prompt": prompt(skill, x), "demonstration": styled(y, style), "answer": answer})
    return out


def nonce_name(rng: random.Random) -> str:
    """A skill name that is not a skill: pretraining teaches the teacher template on names like these."""
    while True:
        name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 6)))
        if name not in SKILLS:
            return name


def build_tokenizer():
    """A character tokenizer over ALPHABET with a three-token chat template, built locally."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({c: len(specials) + i for i, c in enumerate(ALPHABET)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    fast.chat_template = (
        "{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}{{ '<|assistant|>' + m['content'] + '<|end|>' }}"
        "{% else %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    return fast
