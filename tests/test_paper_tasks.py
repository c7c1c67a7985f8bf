"""Medical and knowledge-acquisition loading, the official release's save_to_disk copies, random test
subsets, and the QA writer against a real OpenAI-compatible server on loopback."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import SMOKE, ChatServer, sdft, write_jsonl

from sdft_cli.config import EndpointConfig, KnowledgeConfig, TaskConfig
from sdft_cli.errors import DataError
from sdft_cli.knowledge import QA_PROMPT, dedupe, parse_pairs, read_corpus
from sdft_cli.llm import EndpointError
from sdft_cli.names import TEACHER_TEMPLATES
from sdft_cli.tasks import load_task

FIXTURES = Path(__file__).parent / "fixtures"
# paper.md Sec. 2.2, the official teacher string, written with explicit newlines
OFFICIAL_TEACHER = (
    "\n{orig}\n\nThis is an example for a response to the question:\n{output}\n\n"
    "Now answer with a response of your own, including the thinking process.\n"
)


def medical_cfg(**kw) -> TaskConfig:
    base = FIXTURES / "huatuo"
    return TaskConfig(
        source="json",
        path=str(base / "reasoning_sft"),
        train_split="train",
        test_path=str(base / "verifiable"),
        test_split="train",
        format="huatuo",
        scorer="judge_medical",
        teacher_template="paper",
        **kw,
    )


def test_medical_trains_on_the_final_response_and_tests_on_verifiable_problems():
    task = load_task("medical", medical_cfg())
    sft = [json.loads(x) for x in (FIXTURES / "huatuo/reasoning_sft/train.jsonl").read_text().splitlines()]
    ver = [json.loads(x) for x in (FIXTURES / "huatuo/verifiable/train.jsonl").read_text().splitlines()]
    assert [ex.prompt for ex in task.train] == [r["Question"] for r in sft]
    ex, row = task.train[0], sft[0]
    assert task.student(ex) == [{"role": "user", "content": row["Question"]}]
    assert task.teacher(ex, TEACHER_TEMPLATES["paper"]) == [
        {"role": "user", "content": OFFICIAL_TEACHER.format(orig=row["Question"], output=row["Response"])}
    ]
    assert row["Complex_CoT"] not in task.teacher(ex, TEACHER_TEMPLATES["paper"])[0]["content"]
    # the test split comes from the other dataset, although both splits are called "train"
    assert [(e.prompt, e.answer) for e in task.test] == [
        (r["Open-ended Verifiable Question"], r["Ground-True Answer"]) for r in ver
    ]


def test_a_random_test_subset_is_fixed_by_its_seed():
    ver = [json.loads(x) for x in (FIXTURES / "huatuo/verifiable/train.jsonl").read_text().splitlines()]
    picks = [
        [e.prompt for e in load_task("m", medical_cfg(max_test=4, sample_seed=s)).test] for s in (0, 0, 1)
    ]
    assert picks[0] == picks[1] and len(picks[0]) == 4 and len(set(picks[0])) == 4
    assert picks[0] != picks[2]
    head = [r["Open-ended Verifiable Question"] for r in ver[:4]]
    assert [e.prompt for e in load_task("m", medical_cfg(max_test=4)).test] == head  # no seed: file order
    full = load_task("m", medical_cfg(sample_seed=0))
    assert sorted(e.prompt for e in full.test) == sorted(r["Open-ended Verifiable Question"] for r in ver)


def test_a_medical_row_without_a_question_names_the_row(tmp_path):
    rows = [{"Question": "q", "Response": "r"}, {"Response": "orphan"}]
    write_jsonl(tmp_path / "sft" / "train.jsonl", rows)
    cfg = medical_cfg()
    cfg.path = str(tmp_path / "sft")
    with pytest.raises(DataError, match=r"task medical: .*train.jsonl row 1: format huatuo: no 'Question'"):
        load_task("medical", cfg)


def test_official_release_save_to_disk_copies_load_like_the_json(tmp_path):
    import datasets

    for split, name in (("train", "train_data"), ("test", "eval_data")):
        rows = [json.loads(x) for x in (FIXTURES / "toolalpaca" / f"{split}.jsonl").read_text().splitlines()]
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "tooluse_data" / name))
    disk = TaskConfig(
        source="disk",
        path=str(tmp_path / "tooluse_data"),
        train_split="train_data",
        test_split="eval_data",
        format="toolalpaca",
        scorer="tool_call",
    )
    plain = TaskConfig(
        source="json", path=str(FIXTURES / "toolalpaca"), format="toolalpaca", scorer="tool_call"
    )
    a, b = load_task("tooluse", disk), load_task("tooluse", plain)
    assert a.train == b.train and a.test == b.test
    disk.test_split = "validation"
    with pytest.raises(DataError, match="task tooluse: cannot read the saved dataset"):
        load_task("tooluse", disk)


def test_science_release_column_output_text_is_the_demonstration(tmp_path):
    rows = [json.loads(x) for x in (FIXTURES / "sciknoweval" / "train.jsonl").read_text().splitlines()]
    released = [{"messages": r["messages"], "output_text": r["demonstration"]} for r in rows]
    write_jsonl(tmp_path / "train.jsonl", released)
    (tmp_path / "test.jsonl").write_text((FIXTURES / "sciknoweval" / "test.jsonl").read_text())
    cfg = TaskConfig(source="json", path=str(tmp_path), format="sciknoweval", scorer="answer_tag")
    assert [e.demonstration for e in load_task("science", cfg).train] == [r["demonstration"] for r in rows]


# ----------------------------------------------------------------------------- knowledge acquisition

ARTICLES = {
    "Quake": "The Quake of 2025 struck Avalon on 3 March 2025. Its magnitude was 7.1. It damaged 400 homes.",
    "Storm": "Storm Bryn reached Caldera on 9 June 2025. Winds hit 180 km/h. About 12,000 people left.",
}


def qa_reply(body: dict) -> str:
    """An exam writer that reads the article in the request: one question per sentence, one repeated."""
    name, text = body["messages"][-1]["content"].split("Wiki article: ", 1)[1].split("\n\n", 1)
    sentences = [s.strip() for s in text.split(". ") if s.strip()]
    lines = ["Here are the questions:"]
    for i, s in enumerate(sentences + sentences[:1]):
        k = i % len(sentences) + 1
        lines += [f"{i + 1}. Question: What does the article on {name} say in sentence {k}?", f"Answer: {s}"]
    return "\n".join(lines)


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    """Each test generates into its own cache, so that no test reads another's QA set."""
    monkeypatch.setenv("SDFT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def writer():
    s = ChatServer(qa_reply)
    yield s
    s.close()


def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "wiki"
    d.mkdir()
    for title, text in ARTICLES.items():
        (d / f"{title}.txt").write_text(text + "\n")
    return d


def knowledge_cfg(path: Path, url: str, **kw) -> TaskConfig:
    return TaskConfig(
        source="knowledge",
        path=str(path),
        scorer="judge_knowledge_strict",
        teacher_template="knowledge",
        knowledge=KnowledgeConfig(
            generator=EndpointConfig(base_url=url, model="writer", max_retries=0), **kw
        ),
    )


def test_parse_and_dedupe_qa_replies():
    reply = (
        "Sure.\n\n**Question 1:** When did it strike?\n**Answer:** On 3 March 2025.\n\n"
        "2) Question: How strong was it?\nAnswer: Magnitude 7.1,\nthe strongest in a decade.\n"
        "- Question: A question left without its answer\n"
        "Question: when did it STRIKE\nAnswer: March.\n"
    )
    pairs = parse_pairs(reply)
    assert pairs == [
        ("When did it strike?", "On 3 March 2025."),
        ("How strong was it?", "Magnitude 7.1,\nthe strongest in a decade."),
        ("when did it STRIKE", "March."),
    ]
    assert dedupe(pairs) == pairs[:2]


def test_knowledge_task_from_a_corpus(tmp_path, writer):
    cfg = knowledge_cfg(corpus(tmp_path), writer.url, questions_per_article=7, test_fraction=0.5)
    task = load_task("wiki", cfg)
    # one request per article, the paper's prompt with the article after it
    assert len(writer.requests) == 2
    first = writer.requests[0]["messages"]
    assert first == [
        {"role": "user", "content": QA_PROMPT.format(n=7) + "\n\nWiki article: Quake\n\n" + ARTICLES["Quake"]}
    ]
    assert "write 7 question on the content of the wiki article" in first[0]["content"]
    # the repeated question is gone; every question is in exactly one split; each article in both
    questions = [e.prompt for e in task.train + task.test]
    assert len(questions) == len(set(questions)) == 3 + 3  # three sentences each, one repeat dropped
    assert len(task.test) == 4  # round(0.5 * 3) = 2 per article
    for text in ARTICLES.values():
        assert any(e.context == text for e in task.train) and any(e.context == text for e in task.test)
    ex = task.train[0]
    assert ex.demonstration == ex.answer and ex.demonstration in ex.context
    (teacher,) = task.teacher(ex, TEACHER_TEMPLATES["knowledge"])
    assert ex.context in teacher["content"] and ex.demonstration in teacher["content"]
    assert teacher["content"].index(ex.context) < teacher["content"].index(
        "This is an example for a response"
    )
    (text_only,) = task.teacher(ex, TEACHER_TEMPLATES["knowledge_text"])
    assert ex.context in text_only["content"] and "This is an example" not in text_only["content"]
    assert task.student(ex) == [{"role": "user", "content": ex.prompt}]


def test_generated_pairs_are_cached_and_the_split_changes_for_free(tmp_path, writer):
    path = corpus(tmp_path)
    a = load_task("wiki", knowledge_cfg(path, writer.url, test_fraction=0.5))
    b = load_task("wiki", knowledge_cfg(path, writer.url, test_fraction=0.5))
    assert len(writer.requests) == 2 and a.train == b.train and a.test == b.test
    c = load_task("wiki", knowledge_cfg(path, writer.url, test_fraction=0.2))
    assert len(writer.requests) == 2 and len(c.test) < len(a.test)
    load_task("wiki", knowledge_cfg(path, writer.url, questions_per_article=50))  # another set
    assert len(writer.requests) == 4


def test_an_interrupted_generation_resumes_with_the_missing_articles(tmp_path):
    down = {"Storm"}

    def flaky(body: dict) -> str:  # the second article's backend is down until it comes back
        if title(body) in down:
            raise RuntimeError("backend down")
        return qa_reply(body)

    server = ChatServer(flaky)
    try:
        cfg = knowledge_cfg(corpus(tmp_path), server.url, questions_per_article=3)
        with pytest.raises(EndpointError, match=r"knowledge QA generator .*\(writer\)"):
            load_task("wiki", cfg)
        down.clear()
        task = load_task("wiki", cfg)
    finally:
        server.close()
    assert [title(b) for b in server.requests] == ["Quake", "Storm", "Storm"]  # Quake was kept
    assert {e.context for e in task.train} == set(ARTICLES.values())


def title(body: dict) -> str:
    return body["messages"][-1]["content"].split("Wiki article: ", 1)[1].split("\n", 1)[0]


def test_a_reply_without_pairs_and_bad_corpora_are_named(tmp_path):
    silent = ChatServer(lambda body: "I cannot help with that.")
    try:
        with pytest.raises(DataError, match=r"no 'Question: ... Answer: ...' pairs for article 'Quake'"):
            load_task("wiki", knowledge_cfg(corpus(tmp_path), silent.url))
    finally:
        silent.close()
    with pytest.raises(DataError, match="task wiki: corpus not found"):
        read_corpus(tmp_path / "nowhere", "wiki")
    write_jsonl(tmp_path / "c.jsonl", [{"title": "a", "text": "x"}, {"title": "b", "text": " "}])
    with pytest.raises(DataError, match=r"c.jsonl row 1 has no 'text'"):
        read_corpus(tmp_path / "c.jsonl", "wiki")


def test_a_knowledge_task_runs_end_to_end_with_the_judge(tmp_path, writer, tiny_model_dir):
    """SDFT with the article in the teacher's context, judged by a loopback judge, via `sdft run`."""

    def verdict(body: dict) -> str:  # by the question asked, whatever the reply
        prompt = body["messages"][0]["content"]
        return (
            "CORRECT"
            if "sentence 1?" in prompt
            else "PARTIALLY_CORRECT"
            if "sentence 2?" in prompt
            else "INCORRECT"
        )

    judge = ChatServer(verdict)
    try:
        (tmp_path / "conf" / "task").mkdir(parents=True)
        (tmp_path / "conf" / "task" / "wiki.yaml").write_text(
            "wiki:\n  source: knowledge\n  path: " + str(corpus(tmp_path)) + "\n"
            "  scorer: judge_knowledge_lenient\n  max_new_tokens: 8\n  teacher_template: knowledge\n"
            "  knowledge:\n    generator: {base_url: '" + writer.url + "', model: writer}\n"
        )
        sdft(
            "run",
            *SMOKE,
            "task=[wiki]",
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            f"eval.judge.base_url={judge.url}",
            "eval.judge.model=judge",
            f"eval.judge.cache={tmp_path / 'verdicts.sqlite'}",
            f"run_dir={tmp_path / 'r'}",
            cwd=tmp_path,
        )
    finally:
        judge.close()
    assert len(writer.requests) == 2  # generated once, in the run's process
    # the same set, from the cache the run wrote: the expected score of every stage
    cfg = knowledge_cfg(tmp_path / "wiki", writer.url)
    test = load_task("wiki", cfg).test
    assert len(writer.requests) == 2
    expected = sum("sentence 1?" in e.prompt for e in test) / len(test)  # lenient: the task's scorer
    expected += sum("sentence 2?" in e.prompt for e in test) / len(test)
    data = json.loads((tmp_path / "r" / "matrix.json").read_text())
    assert data["columns"][0] == "wiki" and [row[0] for row in data["values"]] == [expected, expected]
    # the same verdicts under the strict mapping, in results.json (and matrix.csv), without asking again
    cells = json.loads((tmp_path / "r" / "t00_base" / "eval" / "results.json").read_text())
    (strict,) = [c for c in cells if c["eval_task"] == "wiki" and c["metric"] == "judge_knowledge_strict"]
    assert strict["value"] == sum("sentence 1?" in e.prompt for e in test) / len(test)
    preds = (tmp_path / "r" / "t00_base" / "eval" / "predictions" / "wiki.jsonl").read_text().splitlines()
    assert {json.loads(p)["verdict"] for p in preds} <= {"CORRECT", "PARTIALLY_CORRECT", "INCORRECT"}
    # the base model's answers to every test question went to the judge with the three-way prompt
    assert len(test) <= len(judge.requests) <= 2 * len(test)
    assert all("PARTIALLY_CORRECT" in r["messages"][0]["content"] for r in judge.requests)


def test_medical_test_questions_that_are_training_questions_are_left_out_before_the_draw(tmp_path):
    """Planted overlaps (a training question copied into the verifiable pool, once verbatim and once with
    other case, spacing and punctuation) leave the test split; the count is recorded and planned."""
    base = FIXTURES / "huatuo"
    sft = [json.loads(x) for x in (base / "reasoning_sft/train.jsonl").read_text().splitlines()]
    ver = [json.loads(x) for x in (base / "verifiable/train.jsonl").read_text().splitlines()]
    planted = [
        {"Open-ended Verifiable Question": sft[0]["Question"], "Ground-True Answer": "ECG"},
        {
            "Open-ended Verifiable Question": "  " + sft[1]["Question"].upper().rstrip("?") + " !",
            "Ground-True Answer": "x",
        },
    ]
    write_jsonl(tmp_path / "verifiable" / "train.jsonl", [planted[0], *ver[:3], planted[1], *ver[3:]])
    planted_pool = str(tmp_path / "verifiable")
    cfg = dataclasses.replace(medical_cfg(exclude_train_overlap=True), test_path=planted_pool)
    task = load_task("medical", cfg)
    from sdft_cli.scorers import normalize

    train_q = {normalize(ex.prompt) for ex in task.train}
    assert task.excluded == 2 and len(task.test) == len(ver)
    assert not any(normalize(ex.prompt) in train_q for ex in task.test)
    plain = dataclasses.replace(medical_cfg(), test_path=planted_pool)
    assert len(load_task("medical", plain).test) == len(ver) + 2
    # the cap draws from the clean pool: still max_test rows, none of them a training question
    capped = load_task("medical", dataclasses.replace(cfg, max_test=5, sample_seed=1))
    assert len(capped.test) == 5 and not any(normalize(ex.prompt) in train_q for ex in capped.test)
    assert capped.excluded == 2

    from sdft_cli.compose import compose
    from sdft_cli.plan import plan, render

    run = compose(["task=[medical]", "method=sft"])
    run.task["medical"] = cfg
    p = plan(run)
    assert p["tasks"][0]["test_excluded"] == 2
    assert "medical: 2 test-pool questions left out (training questions)" in render(p, 400.0)
