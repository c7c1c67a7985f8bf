"""Tasks: where their rows come from, how they are scored, and the LLM endpoints some of them use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdft_cli.config.checks import _choice, _nonempty, _nonneg, _positive
from sdft_cli.config.credentials import check_env_name
from sdft_cli.errors import ConfigError
from sdft_cli.names import JUDGE_SCORERS, ROW_FORMATS, SCORERS, TASK_SOURCES, teacher_template


@dataclass
class ColumnsConfig:
    """Which dataset columns hold the prompt, the demonstration and the scorer's reference answer."""

    prompt: str = "prompt"
    demonstration: str = "demonstration"
    answer: str = "answer"
    # Optional: source text the teacher also reads (the article of a knowledge-acquisition question),
    # placed by a teacher template's {context}.
    context: str = "context"


@dataclass
class EndpointConfig:
    """An OpenAI-compatible chat endpoint (sdft_cli/llm.py): the judge, the knowledge QA writer."""

    # A local vLLM server (`vllm serve MODEL`) or a hosted API, e.g. https://api.openai.com/v1.
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "gpt-5-mini"
    # The environment variable holding the API key (read at run time, never stored).
    api_key_env: str | None = "OPENAI_API_KEY"
    # null = not sent (the endpoint's default; GPT-5 models accept only their default temperature).
    temperature: float | None = None
    max_tokens: int | None = None
    max_retries: int = 5
    timeout: float = 60.0
    # Client-side rate limit (null = none).
    requests_per_second: float | None = None

    def check(self, key: str) -> None:
        """Value checks; ``key`` is this endpoint's full config key (``eval.judge``)."""
        check_env_name(f"{key}.api_key_env", self.api_key_env)
        _nonneg(f"{key}.max_retries", self.max_retries)
        _positive(f"{key}.timeout", self.timeout)
        if self.requests_per_second is not None:
            _positive(f"{key}.requests_per_second", self.requests_per_second)
        if self.temperature is not None:
            _nonneg(f"{key}.temperature", self.temperature)
        if self.max_tokens is not None:
            _positive(f"{key}.max_tokens", self.max_tokens)


@dataclass
class JudgeConfig(EndpointConfig):
    """The LLM judge's endpoint (``eval.judge``), used by the ``judge_*`` scorers (sdft_cli/judge.py)."""

    # The verdict cache (sqlite); null = $SDFT_CACHE/judge/verdicts.sqlite; "" = no cache.
    cache: str | None = None


@dataclass
class KnowledgeConfig:
    """Knowledge acquisition (``source: knowledge``): QA pairs an LLM writes from a corpus of articles
    with the paper's prompt, generated once and cached by a hash of the corpus and these settings."""

    # The paper used GPT-5 to write the questions.
    generator: EndpointConfig = field(default_factory=lambda: EndpointConfig(model="gpt-5"))
    questions_per_article: int = 100
    # Share of each article's QA pairs held out as the test split (the paper does not state its split).
    test_fraction: float = 0.2
    split_seed: int = 0

    def check(self, key: str) -> None:
        self.generator.check(f"{key}.generator")
        _positive(f"{key}.questions_per_article", self.questions_per_article)
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"{key}.test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclass
class TaskConfig:
    """One task: where its data lives, how it is scored, how long its answers are."""

    # bundled: a file set shipped in sdft_cli/data/tasks; json/csv/parquet: local files; hf: a hub dataset;
    # disk: a `save_to_disk` copy (the official SDFT data release: path/<split>);
    # toy: a skill of the toy world (docs/toy_world.md), rows generated; knowledge: a corpus of articles
    # (a directory of .txt/.md files, or a json/jsonl/csv/parquet file with title and text) turned into
    # QA pairs by `knowledge.generator`.
    source: str = "bundled"
    path: str = MISSING
    # hf dataset config name, or for local files a glob pattern per split: {split} is replaced.
    subset: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    # Validation rows (scored like test rows, never trained on), for periodic evaluation and
    # select=best_val: a split of the same source (``val_split``), or the share ``val_fraction`` of the
    # train rows chosen by a stable hash of the normalised prompt (so a question and its duplicates stay
    # on one side). At most one of the two; neither = no validation.
    val_split: str | None = None
    val_fraction: float = 0.0
    # The test split from another dataset than `path` (Medical: the verifiable problems), same source.
    test_path: str | None = None
    test_subset: str | None = None
    # Shuffle each split with this seed before the max_train/max_test caps (a random subset, e.g. the
    # paper's 1,000 random Medical test questions); null = the data's own order.
    sample_seed: int | None = None
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    # columns: read `columns`; toolalpaca / sciknoweval: the paper's released row formats (formats.py).
    format: str = "columns"
    scorer: str = "exact_match"
    max_new_tokens: int = 64
    # System message for both student and teacher contexts (null = the model's chat-template default).
    system_prompt: str | None = None
    # The teacher template this task was designed for (used unless method.teacher_template is set).
    teacher_template: str | None = None
    # Optional caps on the number of rows used.
    max_train: int | None = None
    max_test: int | None = None
    max_val: int | None = None
    # Leave out of the test pool every question that is also a training question (case, punctuation and
    # spacing ignored), before max_test draws from it; the count is printed and recorded.
    exclude_train_overlap: bool = False
    description: str = ""
    # source=knowledge only: how the QA pairs are written ({generator, questions_per_article, ...};
    # null there = the defaults). Untyped in the schema so that an override can set the whole block;
    # checked against KnowledgeConfig by `check`.
    knowledge: Any = None

    def check(self, key: str) -> None:
        """Value checks; ``key`` is this task's full config key (``task.facts``, ``eval.probes.capitals``)."""
        _choice(f"{key}.source", self.source, TASK_SOURCES)
        _choice(f"{key}.scorer", self.scorer, (*SCORERS, *JUDGE_SCORERS))
        _choice(f"{key}.format", self.format, ROW_FORMATS)
        _positive(f"{key}.max_new_tokens", self.max_new_tokens)
        for name in ("max_train", "max_test", "max_val"):
            if getattr(self, name) is not None:
                _positive(f"{key}.{name}", getattr(self, name))
        if self.source == "knowledge":
            self.knowledge = _knowledge(f"{key}.knowledge", self.knowledge)  # recorded as used
            self.knowledge.check(f"{key}.knowledge")
        elif self.knowledge is not None:
            raise ConfigError(f"{key}.knowledge applies to source=knowledge only (this task: {self.source})")
        _nonempty(f"{key}.path", self.path)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"{key}.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_split is not None:
            _nonempty(f"{key}.val_split", self.val_split)
            if self.val_fraction:
                raise ConfigError(f"{key}: set val_split or val_fraction, not both")
            if self.source == "knowledge":
                raise ConfigError(
                    f"{key}.val_split: a knowledge task's QA pairs have train and test only; "
                    "hold validation out of train with val_fraction"
                )
        for name in ("train_split", "test_split"):
            _nonempty(f"{key}.{name}", getattr(self, name))
        for name in ("prompt", "demonstration", "answer", "context"):
            _nonempty(f"{key}.columns.{name}", getattr(self.columns, name))
        if self.teacher_template is not None:
            teacher_template(self.teacher_template, f"{key}.teacher_template")

    @property
    def has_validation(self) -> bool:
        return self.val_split is not None or self.val_fraction > 0


def _knowledge(key: str, value: Any) -> KnowledgeConfig:
    """A task's knowledge block as the typed schema (the defaults for None), or one error naming the key."""
    if isinstance(value, KnowledgeConfig):
        return value
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping (generator, questions_per_article, ...), got {value!r}")
    try:
        node = OmegaConf.merge(OmegaConf.structured(KnowledgeConfig), value or {})
        return OmegaConf.to_object(node)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        where = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}.{where}: {msg}" if where else f"{key}: {msg}") from None
