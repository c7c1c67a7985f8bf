"""Knowledge acquisition (paper Sec. 4.2): a corpus of articles -> QA pairs written by an LLM -> splits.

An LLM (GPT-5 in the paper) writes questions and answers per article with the paper's prompt. The
pairs are generated once and cached under ``$SDFT_CACHE/knowledge/<hash>``, keyed by the corpus and the
generator settings, so every method and seed of a study trains and is tested on the same questions;
each article's reply is kept as it arrives, so an interrupted generation resumes. The split is drawn
per article from the cached pairs (the paper does not state its split), so changing it asks the
generator nothing. Rows carry the article as ``context``: the ``knowledge`` teacher template shows the
teacher the article plus the answer, the paper's default teacher context (App. A.2).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from sdft_cli.artifacts import atomic_write_json, atomic_write_text, cache_dir, write_jsonl
from sdft_cli.config import TaskConfig
from sdft_cli.errors import DataError
from sdft_cli.llm import Endpoint

# paper p18, verbatim apart from the question count, which follows knowledge.questions_per_article
QA_PROMPT = (
    "You are a helpful assistant that helps me write questions for an exam. You will be given a wiki "
    "article and you will need to write {n} question on the content of the wiki article. The question "
    "should require recalling multiple pieces of information from the wiki article. Do not repeat the "
    "same question\n"
    "The questions should be in the following format:\n"
    "Question: <question>\n"
    "Answer: <answer>"
)
# How the article follows the prompt in the one user message (the paper does not show it).
ARTICLE = "\n\nWiki article: {title}\n\n{text}"
# Bump when parsing or deduplication changes: the cache key includes it.
VERSION = 1
_PAIR = re.compile(
    r"^[\s*#>\-]*(?:\d+[.)]\s*)?\**Question\**\s*\d*\s*[:：]\**[ \t]*(?P<q>[^\n]+?)\s*\n"
    r"^[\s*>\-]*\**Answer\**\s*[:：]\**\s*(?P<a>.+?)\s*"
    r"(?=^[\s*#>\-]*(?:\d+[.)]\s*)?\**Question\**\s*\d*\s*[:：]|\Z)",
    re.MULTILINE | re.DOTALL | re.IGNORECASE,
)


@dataclass(frozen=True)
class Article:
    title: str
    text: str


def read_corpus(path: str | Path, task: str) -> list[Article]:
    """A directory of ``.txt``/``.md`` files (title = file name), or a json/jsonl/csv/parquet file with
    ``title`` and ``text`` columns."""
    root = Path(path).expanduser()
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix in (".txt", ".md"))
        articles = [Article(p.stem, p.read_text(encoding="utf-8").strip()) for p in files]
    elif root.is_file():
        import datasets

        builder = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(root.suffix)
        if builder is None:
            raise DataError(
                f"task {task}: corpus {root}: expected a directory or a json/jsonl/csv/parquet file"
            )
        rows = datasets.load_dataset(builder, data_files=str(root), split="train").to_list()
        for i, r in enumerate(rows):
            if not str(r.get("text") or "").strip():
                raise DataError(f"task {task}: corpus {root} row {i} has no 'text' (columns: {sorted(r)})")
        articles = [
            Article(str(r.get("title") or f"article {i}"), str(r["text"]).strip()) for i, r in enumerate(rows)
        ]
    else:
        raise DataError(f"task {task}: corpus not found: {root}")
    empty = [a.title for a in articles if not a.text]
    if empty:
        raise DataError(f"task {task}: corpus {root}: empty article(s) {empty}")
    if not articles:
        raise DataError(f"task {task}: corpus {root} has no articles (.txt or .md files)")
    return articles


def parse_pairs(reply: str) -> list[tuple[str, str]]:
    """``Question: ... / Answer: ...`` pairs from a reply; numbering, bold and bullets are tolerated.
    A question is one line; its answer runs until the next question. A question without an answer is
    dropped."""
    return [
        (m["q"].strip(), m["a"].strip()) for m in _PAIR.finditer(reply) if m["q"].strip() and m["a"].strip()
    ]


def _norm(question: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", question.lower()).strip()


def dedupe(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop repeated questions (same words, ignoring case and punctuation); the first one stays."""
    seen, out = set(), []
    for q, a in pairs:
        if _norm(q) not in seen:
            seen.add(_norm(q))
            out.append((q, a))
    return out


def cache_key(articles: list[Article], cfg: TaskConfig) -> str:
    gen = cfg.knowledge.generator
    spec = {
        "articles": [asdict(a) for a in articles],
        "model": gen.model,
        "temperature": gen.temperature,
        "max_tokens": gen.max_tokens,
        "n": cfg.knowledge.questions_per_article,
        "prompt": QA_PROMPT + ARTICLE,
        "version": VERSION,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def qa_dir(articles: list[Article], cfg: TaskConfig) -> Path:
    return cache_dir() / "knowledge" / cache_key(articles, cfg)


def generate(articles: list[Article], cfg: TaskConfig, out: Path, task: str) -> Path:
    """Ask the generator for each article's QA pairs (resuming from the replies kept so far), then write
    ``qa.jsonl`` and the manifest, the marker that the set is complete."""
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "manifest.json").is_file():
            return out / "qa.jsonl"
        endpoint = Endpoint(cfg.knowledge.generator, "knowledge QA generator")
        prompt = QA_PROMPT.format(n=cfg.knowledge.questions_per_article)
        rows, repeated = [], 0
        for i, article in enumerate(articles):
            reply_file = out / "replies" / f"{i:04d}.txt"
            if not reply_file.is_file():
                message = prompt + ARTICLE.format(title=article.title, text=article.text)
                print(f"[sdft] task {task}: writing QA pairs for {article.title!r} ({i + 1}/{len(articles)})")
                atomic_write_text(reply_file, endpoint.complete([{"role": "user", "content": message}]))
            parsed = parse_pairs(reply_file.read_text(encoding="utf-8"))
            pairs = dedupe(parsed)
            repeated += len(parsed) - len(pairs)
            if not pairs:
                raise DataError(
                    f"task {task}: the generator wrote no 'Question: ... Answer: ...' pairs for article "
                    f"{article.title!r} (reply kept in {reply_file}; delete it to ask again)"
                )
            rows += [{"article": i, "title": article.title, "question": q, "answer": a} for q, a in pairs]
        write_jsonl(out / "qa.jsonl", rows)
        atomic_write_json(
            out / "manifest.json",
            {
                "articles": len(articles),
                "pairs": len(rows),
                "repeated_questions_dropped": repeated,
                "generator": cfg.knowledge.generator.model,
            },
        )
        if repeated:
            print(f"[sdft] task {task}: dropped {repeated} repeated question(s); {len(rows)} QA pairs kept")
    return out / "qa.jsonl"


def split_of(title: str, question: str, seed: int) -> float:
    """A stable number in [0, 1) per question: the per-article split orders questions by it."""
    digest = hashlib.sha256(f"{seed}\0{title}\0{question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def rows(cfg: TaskConfig, kind: str, task: str, generate_missing: bool = True) -> list[dict]:
    """The ``train`` or ``test`` rows of a knowledge task: prompt = question, demonstration = answer
    (also the judge's reference), context = the article. Each article with two or more pairs gives at
    least one to each split."""
    articles = read_corpus(cfg.path, task)
    out = qa_dir(articles, cfg)
    if not (out / "manifest.json").is_file():
        if not generate_missing:
            raise DataError(f"task {task}: QA pairs not generated yet ({out})")
        generate(articles, cfg, out, task)
    by_article: dict[int, list[dict]] = {}
    for line in (out / "qa.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        by_article.setdefault(r["article"], []).append(r)
    frac, seed = cfg.knowledge.test_fraction, cfg.knowledge.split_seed
    selected = []
    for i, pairs in sorted(by_article.items()):
        pairs = sorted(pairs, key=lambda r: split_of(r["title"], r["question"], seed))
        n_test = min(len(pairs) - 1, max(1, round(frac * len(pairs)))) if len(pairs) > 1 else 0
        part = pairs[:n_test] if kind == "test" else pairs[n_test:]
        selected += [
            {
                "prompt": r["question"],
                "demonstration": r["answer"],
                "answer": r["answer"],
                "context": articles[i].text,
                "title": r["title"],
            }
            for r in part
        ]
    return selected
