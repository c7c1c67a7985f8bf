"""LLM-judge scoring over any OpenAI-compatible endpoint (a local vLLM server or a hosted API).

The paper scores Medical with a two-way and Knowledge acquisition with a three-way GPT-5-mini verdict;
both prompts are kept verbatim (paper App. B.2). Verdicts are cached on disk by a hash of (model,
prompt), so re-scoring a run, or resuming one, asks the endpoint nothing twice. An unreadable verdict
is asked again and then reported with the item; the endpoint client (retries, rate limit, the API key
read from the environment) is sdft_cli/llm.py's.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from pathlib import Path

from sdft_cli.artifacts import cache_dir
from sdft_cli.config import JudgeConfig
from sdft_cli.errors import SdftError
from sdft_cli.llm import Endpoint, EndpointError
from sdft_cli.names import JUDGE_SCORERS

PROMPTS = {
    # paper p17-18, verbatim
    "medical": (
        "You are an expert medical evaluator assessing whether a model's response correctly answers a "
        "medical question. Your task is to compare the model's response to the reference answer and "
        "determine if the model's response is:\n"
        "1. CORRECT: The response contains the key medical information from the reference answer, even if "
        "phrased differently or includes additional correct medical details.\n"
        "2. INCORRECT: The response is medically wrong, misses the main point, or provides incorrect "
        "medical information.\n"
        "Focus on medical accuracy and completeness, not on writing style or verbosity.\n"
        "[Medical Question]\n{question}\n[Reference Answer]\n{reference_answer}\n[Model Response]\n"
        "{model_response}\n"
        'Evaluate the model\'s response. Output ONLY one of: "CORRECT" or "INCORRECT".'
    ),
    # paper p19, verbatim
    "knowledge": (
        "You are an expert evaluator assessing whether a model's response correctly answers a question.\n"
        "Your task is to compare the model's response to the reference answer and determine if the "
        "model's response is:\n"
        "1. CORRECT: The response contains the key information from the reference answer, even if phrased "
        "differently or includes additional correct details.\n"
        "2. PARTIALLY_CORRECT: The response contains most of the key information from the reference answer "
        "but misses some details.\n"
        "3. INCORRECT: The response is wrong, misses the main point, or provides incorrect information.\n"
        "Focus on factual accuracy and completeness, not on writing style or verbosity.\n"
        "[Question]\n{question}\n[Reference Answer]\n{reference_answer}\n[Model Response]\n{model_response}\n"
        'Evaluate the model\'s response. Output ONLY one of: "CORRECT", "PARTIALLY_CORRECT", or "INCORRECT".'
    ),
}
LABELS = {"medical": ("CORRECT", "INCORRECT"), "knowledge": ("CORRECT", "PARTIALLY_CORRECT", "INCORRECT")}
# strict = all details correct; lenient = correct information and no incorrect statements (paper p19).
# The paper does not state the mapping; this is the reading of its definitions (docs/config.md).
CREDIT = {
    "strict": {"CORRECT": 1.0},
    "lenient": {"CORRECT": 1.0, "PARTIALLY_CORRECT": 1.0},
}
_LABEL = re.compile(r"PARTIALLY_CORRECT|INCORRECT|CORRECT")


def default_cache() -> Path:
    return cache_dir() / "judge" / "verdicts.sqlite"


class JudgeError(SdftError):
    """The endpoint failed after its retries, or never answered with a verdict."""


def for_scorer(name: str, cfg: JudgeConfig) -> Judge:
    """The judge behind a ``judge_*`` scorer name."""
    prompt, mapping = JUDGE_SCORERS[name]
    return Judge(cfg, prompt, mapping)


def parse_verdict(text: str, labels: tuple[str, ...]) -> str | None:
    """The first allowed label in the reply (``INCORRECT`` is not read as ``CORRECT``), else None."""
    for match in _LABEL.finditer(text.upper()):
        if match.group(0) in labels:
            return match.group(0)
    return None


class VerdictCache:
    """A sqlite table key -> verdict; one row per judged item, committed as it is written."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path))
        self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, verdict TEXT)")

    def get(self, key: str) -> str | None:
        row = self._db.execute("SELECT verdict FROM verdicts WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, verdict: str) -> None:
        with self._db:  # commits the row
            self._db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?)", (key, verdict))


class Judge:
    """Score responses against references with an LLM verdict (``score`` in [0, 1])."""

    def __init__(self, cfg: JudgeConfig, prompt: str = "medical", mapping: str = "strict"):
        if prompt not in PROMPTS or mapping not in CREDIT:
            raise JudgeError(f"judge: unknown prompt {prompt!r} or mapping {mapping!r}")
        self.cfg, self.prompt, self.mapping = cfg, prompt, mapping
        self.labels = LABELS[prompt]
        self.endpoint = Endpoint(cfg, "judge")
        cache_path = (
            None if cfg.cache == "" else Path(cfg.cache).expanduser() if cfg.cache else default_cache()
        )
        self.cache = VerdictCache(cache_path) if cache_path is not None else None

    @property
    def requests(self) -> int:
        return self.endpoint.requests

    def _key(self, prompt: str) -> str:
        return hashlib.sha256(json.dumps([self.cfg.model, prompt]).encode()).hexdigest()

    def verdict(self, question: str, reference: str, response: str) -> str:
        prompt = PROMPTS[self.prompt].format(
            question=question, reference_answer=reference, model_response=response
        )
        key = self._key(prompt)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return hit
        reply = ""
        for _ in range(1 + self.cfg.max_retries):
            try:
                reply = self.endpoint.complete([{"role": "user", "content": prompt}])
            except EndpointError as e:
                raise JudgeError(str(e)) from None
            label = parse_verdict(reply, self.labels)
            if label is not None:
                if self.cache is not None:
                    self.cache.put(key, label)
                return label
        raise JudgeError(
            f"judge {self.cfg.model}: no verdict among {self.labels} after {1 + self.cfg.max_retries} "
            f"tries; last reply {reply[:200]!r} (question {question[:80]!r})"
        )

    def score(self, question: str, reference: str, response: str) -> float:
        return CREDIT[self.mapping].get(self.verdict(question, reference, response), 0.0)
