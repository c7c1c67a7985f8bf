"""The LLM judge against a real OpenAI-compatible HTTP server on loopback: verdicts, cache, retries,
rate limit, the API key kept out of everything written."""

from __future__ import annotations

import time

import pytest
from conftest import ChatServer, hf_engine

from sdft_cli.config import JudgeConfig
from sdft_cli.judge import PROMPTS, Judge, JudgeError, parse_verdict


class JudgeServer(ChatServer):
    """Answers like a judge: CORRECT when the model response contains the reference answer,
    PARTIALLY_CORRECT when it contains its first word, else INCORRECT; or ``garbage`` text."""

    def __init__(self):
        self.garbage = 0
        super().__init__(self.verdict)

    def verdict(self, body: dict) -> str:
        prompt = body["messages"][0]["content"]
        ref = prompt.split("[Reference Answer]\n")[1].split("\n[Model Response]")[0]
        resp = prompt.split("[Model Response]\n")[1].rsplit("\nEvaluate the model", 1)[0]
        if self.garbage > 0:
            self.garbage -= 1
            return "Verdict: I am not sure."
        if ref in resp:
            return "Verdict: CORRECT"
        if ref.split()[0] in resp and "PARTIALLY_CORRECT" in prompt:
            return "Verdict: PARTIALLY_CORRECT"
        return "Verdict: INCORRECT"


@pytest.fixture
def server():
    s = JudgeServer()
    yield s
    s.close()


def config(server, tmp_path, **kw) -> JudgeConfig:
    kw.setdefault("cache", str(tmp_path / "verdicts.sqlite"))
    return JudgeConfig(base_url=server.url, model="judge-model", **kw)


def test_verdicts_credit_and_the_paper_prompt_sent_verbatim(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    judge = Judge(config(server, tmp_path), "medical", "strict")
    assert judge.verdict("Which drug?", "aspirin", "Give aspirin twice daily.") == "CORRECT"
    assert judge.score("Which drug?", "aspirin", "Give ibuprofen.") == 0.0
    sent = server.requests[0]
    assert sent["model"] == "judge-model" and "temperature" not in sent
    assert sent["messages"] == [
        {
            "role": "user",
            "content": PROMPTS["medical"].format(
                question="Which drug?", reference_answer="aspirin", model_response="Give aspirin twice daily."
            ),
        }
    ]
    assert server.headers[0]["authorization"] == "Bearer sk-test-secret"
    # the key is read from the environment, never written
    assert b"sk-test-secret" not in (tmp_path / "verdicts.sqlite").read_bytes()


def test_three_way_strict_and_lenient(server, tmp_path):
    strict = Judge(config(server, tmp_path), "knowledge", "strict")
    lenient = Judge(config(server, tmp_path), "knowledge", "lenient")
    q, ref = "Where did it strike?", "Kyushu island"
    assert strict.verdict(q, ref, "It hit Kyushu.") == "PARTIALLY_CORRECT"
    assert strict.score(q, ref, "It hit Kyushu.") == 0.0
    assert lenient.score(q, ref, "It hit Kyushu.") == 1.0
    assert strict.score(q, ref, "On Kyushu island.") == lenient.score(q, ref, "On Kyushu island.") == 1.0
    assert lenient.score(q, ref, "In Chile.") == 0.0


def test_verdicts_are_cached_across_judges(server, tmp_path):
    cfg = config(server, tmp_path)
    first = Judge(cfg, "medical")
    items = [("q1", "aspirin", "aspirin it is"), ("q2", "insulin", "metformin")]
    verdicts = [first.verdict(*it) for it in items]
    assert len(server.requests) == 2
    again = Judge(cfg, "medical")  # a new process would open the same file
    assert [again.verdict(*it) for it in items] == verdicts
    assert len(server.requests) == 2 and again.requests == 0
    # another model is another key
    Judge(JudgeConfig(**{**cfg.__dict__, "model": "other"}), "medical").verdict(*items[0])
    assert len(server.requests) == 3
    # no cache: asks every time
    nocache = Judge(JudgeConfig(**{**cfg.__dict__, "cache": ""}), "medical")
    nocache.verdict(*items[0])
    nocache.verdict(*items[0])
    assert len(server.requests) == 5


def test_server_errors_are_retried_then_reported(server, tmp_path):
    server.fail, server.status = 2, 500
    judge = Judge(config(server, tmp_path, max_retries=3, timeout=5), "medical")
    assert judge.verdict("q", "aspirin", "aspirin") == "CORRECT"
    assert len(server.requests) == 3  # two 500s, then the answer
    server.fail, server.status = 10, 503
    failing = Judge(config(server, tmp_path, max_retries=1, timeout=5), "medical")
    with pytest.raises(JudgeError, match="judge-model"):
        failing.verdict("q", "insulin", "insulin")


def test_a_reply_without_a_verdict_is_asked_again_then_named(server, tmp_path):
    server.garbage = 1
    judge = Judge(config(server, tmp_path, max_retries=2), "medical")
    assert judge.verdict("q", "aspirin", "aspirin") == "CORRECT" and judge.requests == 2
    server.garbage = 10
    with pytest.raises(JudgeError, match=r"no verdict .* last reply 'Verdict: I am not sure.'"):
        judge.verdict("which one?", "insulin", "no idea")


def test_rate_limit_spaces_requests(server, tmp_path):
    judge = Judge(config(server, tmp_path, requests_per_second=20, cache=""), "medical")
    t0 = time.monotonic()
    for i in range(4):
        judge.verdict(f"q{i}", "a", "b")
    assert time.monotonic() - t0 >= 3 / 20


def test_parse_verdict_does_not_read_incorrect_as_correct():
    labels = ("CORRECT", "PARTIALLY_CORRECT", "INCORRECT")
    assert parse_verdict("INCORRECT", labels) == "INCORRECT"
    assert parse_verdict("**partially_correct**: misses the year", labels) == "PARTIALLY_CORRECT"
    assert parse_verdict("The answer is CORRECT.", labels) == "CORRECT"
    assert parse_verdict("PARTIALLY_CORRECT", ("CORRECT", "INCORRECT")) is None
    assert parse_verdict("maybe", labels) is None


def test_a_judged_task_scores_through_evaluate_many(server, tmp_path, tiny_model, copy_task_dir):
    """The judge_* scorers run inside the ordinary evaluation (the tiny model's outputs are judged)."""
    from sdft_cli.config import TaskConfig
    from sdft_cli.evaluate import evaluate_many
    from sdft_cli.tasks import load_task

    model, tok = tiny_model
    task = load_task("copy", TaskConfig(source="json", path=str(copy_task_dir), scorer="judge_medical"))
    res = evaluate_many(hf_engine(model, tok), tok, [task], judge=config(server, tmp_path))[0]
    assert len(server.requests) == len(task.test) == res.n
    for p in res.predictions:
        assert p["score"] == float(p["answer"] in p["prediction"])
