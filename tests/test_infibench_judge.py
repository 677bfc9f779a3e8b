"""The judge client against a real HTTP server on 127.0.0.1 (http.server in a thread)."""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from viscodex_lite.infibench import cases as C
from viscodex_lite.infibench import runner as R
from viscodex_lite.infibench.judge import JudgeClient, JudgeError, StandInJudge, parse_verdict, rubric_messages

KEY = "sk-test-DO-NOT-LEAK-1234567890"


class FakeServer:
    """Answers chat completions; fails the first ``fail_first`` requests with ``fail_status``."""

    def __init__(self, fail_first=0, fail_status=503, reply='{"correctness": 40, "completeness": 30, "rationale": "ok"}',
                 delay=0.0):
        self.requests, self.auth, self.lock = [], [], threading.Lock()
        self.in_flight = self.max_in_flight = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append(body)
                    outer.auth.append(self.headers.get("Authorization"))
                    n = len(outer.requests)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                time.sleep(delay)
                with outer.lock:
                    outer.in_flight -= 1
                if n <= fail_first:
                    self.send_response(fail_status)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                data = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def judge_case(tmp_path):
    (tmp_path / "eval_j.yaml").write_text(
        "id: j\nlang: javascript\nprompt: Why does my counter stay at 1?\nreference_answer: stale closure; use setCount(c => c + 1)\n"
        "grading:\n  keywords: [setCount]\n  judge:\n    rubric: must mention the stale closure\n    weight: 2.0\n")
    return C.load_case(tmp_path / "eval_j.yaml")


def test_verdict_request_and_key_in_header_only(server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    client = JudgeClient(server.url, "gpt-4o", api_key=KEY, cache_dir=tmp_path / "cache")
    case = judge_case(tmp_path)
    verdict = client.grade(case, "use setCount(c => c + 1) because of a stale closure")
    assert verdict.score == 70 and not verdict.cached
    body = server.requests[0]
    assert body["model"] == "gpt-4o" and body["temperature"] == 0.0
    assert "must mention the stale closure" in body["messages"][1]["content"]
    assert "## Reference answer\nstale closure" in body["messages"][1]["content"]
    assert server.auth == [f"Bearer {KEY}"]
    for path in (tmp_path / "cache").iterdir():
        assert KEY not in path.read_text()
    assert KEY not in caplog.text and KEY not in repr(client)


def test_cache_hit_skips_the_server(server, tmp_path):
    client = JudgeClient(server.url, "m", cache_dir=tmp_path / "c")
    msgs = rubric_messages("q", "r", "a")
    first, second = client.complete(msgs), client.complete(msgs)
    assert first == (second[0], False) and second[1] is True and len(server.requests) == 1
    other = JudgeClient(server.url, "other-model", cache_dir=tmp_path / "c")
    other.complete(msgs)                       # a different request is a different key
    assert len(server.requests) == 2


def test_retries_with_backoff_then_succeeds(tmp_path):
    flaky = FakeServer(fail_first=2, fail_status=503)
    try:
        client = JudgeClient(flaky.url, "m", retries=3, backoff_s=0.01)
        assert client.complete(rubric_messages("q", None, "a"))[0].startswith("{")
        assert len(flaky.requests) == 3
    finally:
        flaky.close()


def test_gives_up_after_retries_and_does_not_retry_auth_errors(tmp_path):
    down = FakeServer(fail_first=100, fail_status=429)
    auth = FakeServer(fail_first=100, fail_status=401)
    try:
        with pytest.raises(JudgeError, match="gave up after 3 attempts"):
            JudgeClient(down.url, "m", api_key=KEY, retries=2, backoff_s=0.01).complete([{"role": "user", "content": "x"}])
        with pytest.raises(JudgeError, match="HTTP 401") as err:
            JudgeClient(auth.url, "m", api_key=KEY, retries=5, backoff_s=0.01).complete([{"role": "user", "content": "x"}])
        assert len(auth.requests) == 1 and KEY not in str(err.value)
    finally:
        down.close()
        auth.close()


def test_connection_refused_is_a_clear_error():
    with pytest.raises(JudgeError, match="Is the server up"):
        JudgeClient("http://127.0.0.1:9/v1", "m", retries=1, backoff_s=0.01, timeout_s=2).complete([{"role": "user", "content": "x"}])


def test_concurrency_is_bounded(tmp_path):
    slow = FakeServer(delay=0.15)
    try:
        case = judge_case(tmp_path)
        client = JudgeClient(slow.url, "m", max_concurrency=2)
        verdicts = client.grade_many([(case, f"answer {i}") for i in range(6)])
        assert len(verdicts) == 6 and slow.max_in_flight == 2
    finally:
        slow.close()


def test_judge_component_in_case_score(server, tmp_path):
    """judge adds weight * score/100 to the case, after the official components."""
    case = judge_case(tmp_path)
    client = JudgeClient(server.url, "m", api_key=KEY)
    [r] = R.score_responses([case], {"j": ["setCount(c => c + 1)"]}, judge=client)
    assert r.score == pytest.approx((1.0 + 2.0 * 0.7) / 3.0)
    assert r.details["judge_detail"]["score"] == 70
    assert KEY not in json.dumps(r.to_json())
    [no_judge] = R.score_responses([case], {"j": ["setCount(c => c + 1)"]})
    assert no_judge.score == 1.0 and no_judge.details["skipped"] == ["skipped: no judge configured"]


def test_malformed_reply_is_an_error():
    with pytest.raises(JudgeError):
        parse_verdict("I think it is good")
    assert parse_verdict('{"correctness": 80, "completeness": -5}').score == 50


def test_stand_in_judge_grades_by_overlap(tmp_path):
    case = judge_case(tmp_path)
    with StandInJudge() as judge:
        client = JudgeClient(judge.url, "stand-in")
        good = client.grade(case, "stale closure; use setCount(c => c + 1)")
        bad = client.grade(case, "restart the computer")
    assert good.score > bad.score


def test_cli_reads_the_key_through_config_and_never_writes_it(server, tmp_path, monkeypatch, capsys, caplog):
    from viscodex_lite.cli import main

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("VL_TEST_JUDGE_KEY", KEY)
    cases = tmp_path / "cases"
    cases.mkdir()
    judge_case(cases)
    responses, out, html, cache = tmp_path / "r.jsonl", tmp_path / "s.jsonl", tmp_path / "r.html", tmp_path / "cache"
    responses.write_text(json.dumps({"case_id": "j", "response": "stale closure: setCount(c => c + 1)"}) + "\n")
    assert main(["score", "--cases", str(cases), "--responses", str(responses), "-o", str(out), "--report", str(html),
                 "--judge-url", server.url, "--judge-api-key-env", "VL_TEST_JUDGE_KEY", "--judge-cache", str(cache)]) == 0
    assert server.auth == [f"Bearer {KEY}"]                       # the key reached the server ...
    [row] = [json.loads(l) for l in out.read_text().splitlines()]
    assert row["details"]["judge_detail"]["score"] == 70
    written = [out.read_text(), html.read_text(), *(p.read_text() for p in cache.iterdir())]
    assert all(KEY not in text for text in written)              # ... and nothing on disk
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err + caplog.text  # ... or in the logs
