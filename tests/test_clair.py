"""clair.py against a real HTTP server on loopback: parsing real reviser replies, faults, kills, secrets."""

import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import clair
from conftest import SHARED, fixture_rows, replay_reviser
from benchmarks.testbed import ChatServer, write_jsonl
from clair_apo import models

ROOT = Path(__file__).resolve().parents[1]
needs_fixtures = pytest.mark.skipif(not (SHARED / "fixtures").is_dir(),
                                    reason="the real reviser replies live in ../shared/fixtures beside the checkout")
SECRET = "sk-test-DO-NOT-LEAK-31337"


def read_out(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def fixture_samples(tmp_path):
    rows = fixture_rows()
    samples = [{"id": f"uf-{i}", "prompt": r["task"], "completion": r["student_solution"]} for i, r in enumerate(rows)]
    return rows, write_jsonl(tmp_path / "samples.jsonl", samples)


# ----------------------------------------------------------------------------- parsing

@needs_fixtures
def test_all_real_replies_parse_through_the_server(tmp_path):
    rows, samples = fixture_samples(tmp_path)
    out = tmp_path / "clair.jsonl"
    with ChatServer(replay_reviser(rows)) as server:
        counts = clair.main(["revise", "--in", samples, "--out", str(out), "--base-url", server.base_url,
                             "--model", "gpt-4-0125-preview", "--workers", "4"])
    assert counts["done"] == 20 and counts["dropped"] == 0
    pairs = {p["id"]: p for p in read_out(out)}
    for i, row in enumerate(rows):
        pair = pairs[f"uf-{i}"]
        assert pair["chosen"] and pair["chosen"] == pair["chosen"].strip()
        assert not any(marker in pair["chosen"] for marker in clair.REVISION_MARKERS + ["{teacher_reasoning}"])
        assert pair["rejected"] == row["student_solution"] and pair["prompt"] == row["task"]
        assert pair["rational"] and not pair["rational"].startswith(("{teacher_reasoning}", ":"))
        assert pair["chosen"] not in pair["rational"]
        reply = row["response"]["choices"][0]["message"]["content"]
        assert reply.rstrip().endswith(pair["chosen"])  # the revision is everything after the marker
        assert pair["reviser"] == "gpt-4-0125-preview"
    # The request: an empty system message and one user message, our prompt with the paper's identifiers.
    request = server.requests[0]
    assert request["messages"][0] == {"role": "system", "content": ""}
    text = request["messages"][1]["content"]
    for identifier in ["{task}", "{student_solution}", "{teacher_reasoning}", "{corrected_student_solution}",
                       "\n-----------------\n"]:
        assert identifier in text
    assert request["temperature"] == 0.7 and request["max_tokens"] == 2048
    assert "top_p" not in request and "seed" not in request  # sent only when given


def test_marker_priority_and_drops():
    both = "{teacher_reasoning}: why\n**Corrected Student Solution:** bold\n{corrected_student_solution}: plain"
    assert clair.parse_revision(both) == ("why", "bold\n{corrected_student_solution}: plain")
    assert clair.parse_revision("{teacher_reasoning}: r\n{corrected_student_solution}:\n  fixed  ") == ("r", "fixed")
    assert clair.parse_revision("{teacher_reasoning}\nr\n{corrected_student_solution}\nfixed") == ("r", "fixed")
    assert clair.parse_revision("why\n{worsened_student_solution}: worse") == ("why", "worse")
    assert clair.parse_revision("just an answer, no markers") is None
    assert clair.parse_revision("{teacher_reasoning}: r\n{corrected_student_solution}:   \n") is None
    # A marker twice: the revision ends where the marker comes again, as the authors' split takes it.
    twice = "{teacher_reasoning}: r\n{corrected_student_solution}: fixed\n{corrected_student_solution}: again"
    assert clair.parse_revision(twice) == ("r", "fixed")
    assert clair.parse_revision("{corrected_student_solution}:\n{corrected_student_solution}: late") is None


def test_unparseable_replies_are_dropped_counted_and_kept(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "prompt": "q", "completion": "x"},
                                                {"id": "b", "prompt": "q2", "completion": "y"}])
    reply = lambda body: "no marker here" if "x" in body["messages"][1]["content"].split("{student_solution}:")[-1] \
        else "{teacher_reasoning}: ok\n{corrected_student_solution}: better"
    with ChatServer(reply) as server:
        counts = clair.main(["revise", "--in", samples, "--out", str(tmp_path / "o.jsonl"),
                             "--base-url", server.base_url, "--model", "m"])
    assert (counts["done"], counts["dropped"]) == (1, 1)
    (reject,) = read_out(tmp_path / "o.rejects.jsonl")
    assert reject["id"] == "a" and reject["reply"] == "no marker here" and "marker" in reject["reason"]
    # A rerun sends nothing: both ids are accounted for.
    with ChatServer(reply) as server:
        clair.main(["revise", "--in", samples, "--out", str(tmp_path / "o.jsonl"), "--base-url", server.base_url,
                    "--model", "m"])
        assert server.requests == []


def test_prompt_file_replaces_the_template(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "prompt": "TASKTEXT", "completion": "[[TASK]] literal"}])
    (tmp_path / "p.txt").write_text("Fix: [[STUDENT_SOLUTION]] for [[TASK]]")
    with ChatServer(lambda body: "{corrected_student_solution}: x") as server:
        clair.main(["revise", "--in", samples, "--out", str(tmp_path / "o.jsonl"), "--base-url", server.base_url,
                    "--model", "m", "--prompt-file", str(tmp_path / "p.txt")])
    # Filled in one pass: the student's literal [[TASK]] is not substituted.
    assert server.requests[0]["messages"][1]["content"] == "Fix: [[TASK]] literal for TASKTEXT"


# ----------------------------------------------------------------------------- faults

@pytest.mark.parametrize("fault", ["429", "500", "slow", "badjson", "nochoices", "drop"])
def test_transient_faults_are_retried(fault):
    with ChatServer(lambda body: "fine", faults=[fault, fault], slow_seconds=1.5) as server:
        client = clair.ChatClient(server.base_url, "m", timeout=0.5)
        client.max_backoff = 0.01
        assert client.complete([{"role": "user", "content": "hi"}], 0.0, 8) == "fine"
        assert len(server.requests) == 3


def test_retry_after_is_honoured():
    with ChatServer(lambda body: "fine", faults=["429"]) as server:
        client = clair.ChatClient(server.base_url, "m")
        client.max_backoff = 0.0
        start = time.time()
        client.complete([{"role": "user", "content": "hi"}], 0.0, 8)
        assert time.time() - start >= 0.05  # the server's Retry-After, though max_backoff is 0


def test_retries_show_on_the_console_one_line_per_kind_per_interval(capsys):
    with ChatServer(lambda body: "fine", faults=["500", "500", "429", "500"]) as server:
        client = clair.ChatClient(server.base_url, "m")
        client.max_backoff = 0.0
        assert client.complete([{"role": "user", "content": "hi"}], 0.0, 8) == "fine"
        lines = capsys.readouterr().err.splitlines()
        assert lines == [f"retrying {server.base_url}/chat/completions: HTTP 500; attempt 1 of 9 failed, next in 0.0 s",
                         f"retrying {server.base_url}/chat/completions: HTTP 429; attempt 3 of 9 failed, next in 0.1 s"]
        client.notices.interval = 0.0  # the interval has passed: the next line counts the ones held back
        server.faults.append("500")
        client.complete([{"role": "user", "content": "hi"}], 0.0, 8)
    (line,) = capsys.readouterr().err.splitlines()
    assert "HTTP 500; attempt 1 of 9" in line and line.endswith("(and 2 more like it since the last such line)")


def test_401_fails_fast_naming_the_key_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", SECRET)
    with ChatServer(lambda body: "x", faults=["401"] * 5) as server:
        client = clair.ChatClient(server.base_url, "m", api_key_env="MY_KEY")
        with pytest.raises(clair.FatalRequestError, match=r"HTTP 401 \(check \$MY_KEY\)") as error:
            client.complete([{"role": "user", "content": "hi"}], 0.0, 8)
        assert len(server.requests) == 1 and SECRET not in str(error.value)


def test_failed_rows_exit_nonzero_are_kept_with_their_error_and_retried(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": i, "prompt": "q", "completion": f"x{i}"} for i in "abc"])
    out, rejects = tmp_path / "o.jsonl", tmp_path / "o.rejects.jsonl"
    reply = lambda body: "no marker" if "xc" in body["messages"][1]["content"] else "{corrected_student_solution}: y"
    command = ["revise", "--in", samples, "--out", str(out), "--model", "m", "--workers", "1", "--max-retries", "1"]
    with ChatServer(reply, faults=["500", "500"]) as server:  # the first row's two tries fail
        with pytest.raises(SystemExit, match=r"1 of 3 rows failed after retries, each with its last error in "
                                             r".*o\.rejects\.jsonl; rerun the same command to retry them") as exit:
            clair.main([*command, "--base-url", server.base_url])
    assert exit.value.code != 0
    (done,) = read_out(out)
    failed, dropped = sorted(read_out(rejects), key=lambda r: "error" in r, reverse=True)
    assert failed == {"id": failed["id"], "error": f"{server.base_url}/chat/completions: gave up after 2 tries; "
                                                   "last: HTTP 500"}
    assert dropped["id"] == "c" and dropped["reason"].startswith("no revision marker")
    with ChatServer(reply) as server:  # the rerun retries the failed row only, and the dropped row stays dropped
        assert clair.main([*command, "--base-url", server.base_url])["done"] == 1
        assert len(server.requests) == 1
    assert sorted(r["id"] for r in read_out(out)) == ["a", "b"] and read_out(rejects) == [dropped]


@pytest.mark.parametrize("suffix, fault, message", [
    ("", None, r"HTTP 404 \(check --base-url: it should end in /v1, e\.g\. http://localhost:8000/v1; or the model\)"),
    ("/v1", "401", r"HTTP 401 \(check \$OPENAI_API_KEY\)"),
])
def test_a_fatal_error_before_the_first_row_writes_no_file(tmp_path, suffix, fault, message):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "prompt": "q", "completion": "x"}])
    with ChatServer(lambda body: "x", faults=[fault] * 5) as server:
        with pytest.raises(SystemExit, match=message):
            clair.main(["revise", "--in", samples, "--out", str(tmp_path / "new" / "o.jsonl"),
                        "--base-url", server.base_url.removesuffix("/v1") + suffix, "--model", "m"])
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "prompt": "q", "completion": "x"}\n{"id": "b", "prompt": "q"', "s.jsonl:2: not valid JSON"),
    ('{"id": "a", "prompt": "q", "completion": "x"}\n{"id": "b", "prompt": "q"}', "s.jsonl:2: field 'completion'"),
    ('{"id": "a", "prompt": "q", "completion": "x"}\n{"id": "a", "prompt": "q", "completion": "y"}',
     "s.jsonl:2: field 'id': duplicate id 'a' \\(first on line 1\\)"),
    ('{"id": "a", "prompt": 7, "completion": "x"}', "s.jsonl:1: field 'prompt'"),
])
def test_bad_input_fails_before_any_request(tmp_path, content, message):
    (tmp_path / "s.jsonl").write_text(content + "\n")
    with ChatServer(lambda body: "x") as server:
        with pytest.raises(SystemExit, match=message):
            clair.main(["revise", "--in", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                        "--base-url", server.base_url, "--model", "m"])
        assert server.requests == []


def test_a_torn_last_line_is_cut_and_redone(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": i, "prompt": "q", "completion": f"x{i}"} for i in "abc"])
    out = tmp_path / "o.jsonl"
    out.write_text(json.dumps({"id": "a", "chosen": "done"}) + '\n{"id": "b", "cho')
    with ChatServer(lambda body: "{corrected_student_solution}: fixed") as server:
        clair.main(["revise", "--in", samples, "--out", str(out), "--base-url", server.base_url, "--model", "m"])
        assert len(server.requests) == 2
    assert sorted(r["id"] for r in read_out(out)) == ["a", "b", "c"]


def test_a_bad_line_before_the_end_stops_the_run_and_keeps_the_file(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": i, "prompt": "q", "completion": f"x{i}"} for i in "abc"])
    out = tmp_path / "o.jsonl"
    content = json.dumps({"id": "a", "chosen": "done"}) + "\nnot json\n" + json.dumps({"id": "b", "chosen": "done"}) + "\n"
    out.write_text(content)
    with ChatServer(lambda body: "{corrected_student_solution}: fixed") as server:
        with pytest.raises(SystemExit, match=r"o\.jsonl:2: not valid JSON"):
            clair.main(["revise", "--in", samples, "--out", str(out), "--base-url", server.base_url, "--model", "m"])
        assert server.requests == []
    assert out.read_text() == content  # the rows after the bad line are still there


@needs_fixtures
def test_sigkill_mid_run_then_rerun_writes_every_id_once(tmp_path):
    rows, samples = fixture_samples(tmp_path)
    out = tmp_path / "clair.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    with ChatServer(replay_reviser(rows), delay=0.25) as server:
        command = [sys.executable, str(ROOT / "clair.py"), "revise", "--in", samples, "--out", str(out),
                   "--base-url", server.base_url, "--model", "gpt-4", "--workers", "2"]
        first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 6):
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        written = len(out.read_text().splitlines())
        assert 6 <= written < 20
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
    ids = [r["id"] for r in read_out(out)]
    assert sorted(ids) == sorted(f"uf-{i}" for i in range(20))  # each exactly once
    # The key went to the server, and nowhere else.
    assert all(h.get("Authorization") == f"Bearer {SECRET}" for h in server.headers)
    console = first.stdout.read().decode() + second.stdout + second.stderr
    assert SECRET not in console
    for path in tmp_path.iterdir():
        assert SECRET not in path.read_text(errors="replace")


# ----------------------------------------------------------------------------- the other datasets

def test_stronger_preferred(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "prompt": "Capital of France?", "completion": "Lyon."}])
    with ChatServer(lambda body: "  Paris.  ") as server:
        clair.main(["stronger", "--in", samples, "--out", str(tmp_path / "o.jsonl"), "--base-url", server.base_url,
                    "--model", "strong"])
    (pair,) = read_out(tmp_path / "o.jsonl")
    assert (pair["chosen"], pair["rejected"], pair["reviser"]) == ("Paris.", "Lyon.", "strong")
    assert server.requests[0]["messages"] == [{"role": "user", "content": "Capital of France?"}]


def test_judge_keeps_only_pairs_both_orders_agree_on(tmp_path):
    samples = []
    for pid, (x, y) in {"agree": ("good answer", "bad answer"), "reversed": ("bad answer", "good answer"),
                        "biased": ("meh one", "meh two"), "tie": ("tie one", "tie two")}.items():
        samples += [{"id": f"{pid}-{k}", "prompt_id": pid, "sample_index": k, "prompt": f"q {pid}", "completion": c}
                    for k, c in enumerate((x, y))]

    samples += [{"id": f"mute-{k}", "prompt_id": "mute", "sample_index": k, "prompt": "q", "completion": f"mute {k}"}
                for k in range(2)]

    def judge(body):
        text = body["messages"][0]["content"]
        a = text.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
        if "mute" in a:
            return "Both are fine."  # no verdict
        if "tie" in a:
            return "Equal. [[tie]]"
        if "meh" in a:
            return "The first one. [[A]]"  # position bias: both orders say A
        return "Reasoning... [[A]]" if "good" in a else "Reasoning... [[B]]"

    with ChatServer(judge) as server:
        counts = clair.main(["judge", "--in", write_jsonl(tmp_path / "s.jsonl", samples), "--out",
                             str(tmp_path / "o.jsonl"), "--base-url", server.base_url, "--model", "judge",
                             "--temperature", "0.3"])
    pairs = {p["id"]: p for p in read_out(tmp_path / "o.jsonl")}
    assert set(pairs) == {"agree", "reversed"}
    assert all(p["chosen"] == "good answer" and p["rejected"] == "bad answer" for p in pairs.values())
    rejects = {r["id"]: r for r in read_out(tmp_path / "o.rejects.jsonl")}
    assert {i: r["reason"] for i, r in rejects.items()} == {"biased": "orders disagree", "tie": "tie",
                                                           "mute": "no verdict"}
    assert rejects["mute"]["verdicts"] == [None, None] and rejects["mute"]["replies"] == ["Both are fine."] * 2
    assert counts["dropped"] == 3 and len(server.requests) == 10
    assert {r["temperature"] for r in server.requests} == {0.3}


def test_offpolicy_best_vs_worst_drops_ties(tmp_path, capsys):
    rows = [{"instruction": "q1", "completions": [{"response": "mid", "overall_score": 5},
                                                  {"response": "best", "overall_score": 9},
                                                  {"response": "worst", "overall_score": 2}]},
            {"prompt": "q2", "completions": [{"text": "a", "score": 3}, {"text": "b", "score": 3}]}]
    clair.main(["offpolicy", "--in", write_jsonl(tmp_path / "uf.jsonl", rows), "--out", str(tmp_path / "o.jsonl")])
    (pair,) = read_out(tmp_path / "o.jsonl")
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == ("q1", "best", "worst")
    assert "1 ties dropped" in capsys.readouterr().out


def test_sample_locally_and_from_an_endpoint(tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "p1", "prompt": "Hi"},
                                                 {"id": "p2", "prompt": [{"role": "user", "content": "Yo"}]}])
    clair.main(["sample", "--model", tiny_model, "--in", prompts, "--out", str(tmp_path / "local.jsonl"),
                "--n", "2", "--max-tokens", "6"])
    rows = read_out(tmp_path / "local.jsonl")
    assert sorted(r["id"] for r in rows) == ["p1-0", "p1-1", "p2-0", "p2-1"]
    assert all(r["prompt_id"] in ("p1", "p2") and r["sample_index"] in (0, 1) for r in rows)
    # Every row records its sampling settings (the defaults here) and why generation stopped.
    settings = {"model": tiny_model, "temperature": 0.7, "top_p": 1.0, "max_tokens": 6, "seed": 0}
    assert all({k: r[k] for k in settings} == settings and r["finish_reason"] in ("stop", "length") for r in rows)
    with ChatServer(lambda body: "an answer", finish_reason="length") as server:
        clair.main(["sample", "--base-url", server.base_url, "--model", "remote", "--in", prompts,
                    "--out", str(tmp_path / "remote.jsonl"), "--max-tokens", "9", "--seed", "3"])
    # Rows are written as requests complete, so in any order; each keeps the settings sent and the server's
    # finish reason.
    sent = {"model": "remote", "temperature": 0.7, "max_tokens": 9, "top_p": None, "seed": 3, "finish_reason": "length"}
    assert sorted((r["id"], r["completion"]) for r in read_out(tmp_path / "remote.jsonl")) == [("p1", "an answer"),
                                                                                               ("p2", "an answer")]
    assert all({k: r[k] for k in sent} == sent for r in read_out(tmp_path / "remote.jsonl"))
    assert not (tmp_path / "remote.rejects.jsonl").exists()  # nothing was dropped or failed


def test_local_samples_are_seeded_per_answer_so_a_resumed_run_repeats_them(tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": f"Prompt number {i}"} for i in range(4)])
    command = ["sample", "--model", tiny_model, "--in", prompts, "--max-tokens", "8", "--seed", "5", "--n", "2"]
    clair.main([*command, "--out", str(tmp_path / "whole.jsonl"), "--batch-size", "3"])
    whole = read_out(tmp_path / "whole.jsonl")
    # A run killed after its first batch, resumed with other batches: the same rows.
    (tmp_path / "resumed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in whole[:3]))
    clair.main([*command, "--out", str(tmp_path / "resumed.jsonl"), "--batch-size", "2"])
    assert read_out(tmp_path / "resumed.jsonl") == whole
    assert len({r["completion"] for r in whole}) == 8  # each answer its own seed: the two samples of a prompt differ


def test_local_finish_reason_is_stop_at_end_of_sequence_and_length_at_the_limit(tiny_model):
    import torch

    from clair_apo.chat_tokens import chat_ids
    from clair_apo.generation import Decoding, generate
    from clair_apo.models import load_model

    tokenizer, model = load_model(tiny_model)
    ids = chat_ids(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    first = model(torch.tensor([ids])).logits[0, -1].argmax().item()  # the greedy first token
    prompts = ["Hi", "Tell me a long story about a cat and a dog, please."]  # the second starts otherwise
    assert generate(model, tokenizer, prompts, Decoding(4))[1] == ["length", "length"]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first]  # now "Hi" ends the turn at once
    answers, reasons, _ = generate(model, tokenizer, prompts, Decoding(4))
    assert reasons == ["stop", "length"] and len(answers[1]) > len(answers[0])


def test_import_clair_needs_neither_torch_nor_transformers():
    code = "import sys, clair; print(sorted({'torch', 'transformers', 'requests'} & set(sys.modules)))"
    imported = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"  # requests, too, only once a request is sent: --help answers at once


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit:
        clair.main(["revise", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert exit.value.code == 0
    for default in ["(default: 2048)", "(default: 600.0)", "(default: 0.7)", "(default: 16)", "(default: 8)"]:
        assert default in help_text


# ----------------------------------------------------------------------------- a real server

@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    """`transformers serve` with the embedded SmolLM2 on a free loopback port: (base URL, model name)."""
    missing = [name for name in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"transformers serve needs {', '.join(missing)}: pip install fastapi uvicorn openai")
    
    try:
        model = models.resolve_model(models.DEFAULT_MODEL)
    except SystemExit as e:
        pytest.skip(f"the embedded model is missing: {e}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", model, "--host",
                                   "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                  stdout=log, stderr=subprocess.STDOUT,
                                  # One thread: on a busy machine torch's spinning threads slow each reply tenfold.
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while server.poll() is None and time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.skip(f"transformers serve did not start: {log_path.read_text()[-500:]}")
        yield f"http://127.0.0.1:{port}/v1", model
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_sample_revise_and_judge_against_a_real_server(tmp_path, real_server):
    base_url, model = real_server
    common = ["--base-url", base_url, "--model", model, "--max-tokens", "8"]  # 4 short requests in all
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "p1", "prompt": "What is 2 + 2?"}])
    clair.main(["sample", "--in", prompts, "--out", str(tmp_path / "s.jsonl"), "--top-p", "0.9", "--seed", "1",
                *common])
    (sample,) = read_out(tmp_path / "s.jsonl")
    assert sample["id"] == "p1" and sample["completion"].strip()
    # At 8 tokens SmolLM2 writes no revision marker: the row is revised, or dropped with the reply kept.
    counts = clair.main(["revise", "--in", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "r.jsonl"), *common])
    assert counts["done"] + counts["dropped"] == 1
    if counts["dropped"]:
        assert read_out(tmp_path / "r.rejects.jsonl")[0]["reply"]
    two = [{"id": f"p1-{k}", "prompt_id": "p1", "prompt": sample["prompt"], "completion": c}
           for k, c in enumerate((sample["completion"], "I do not know."))]
    counts = clair.main(["judge", "--in", write_jsonl(tmp_path / "two.jsonl", two), "--out", str(tmp_path / "j.jsonl"),
                         *common])
    assert counts["done"] + counts["dropped"] == 1
    if counts["dropped"]:
        (reject,) = read_out(tmp_path / "j.rejects.jsonl")
        assert len(reject["replies"]) == 2 and all(reject["replies"])


def test_a_real_server_refuses_a_wrong_model_or_url_at_once(tmp_path, real_server):
    base_url, model = real_server
    clair.ChatClient(base_url, model).check()  # evaluate.py's judge check passes
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "prompt": "q", "completion": "x"}])
    for url, name, message in [(base_url, "no-such-model", "HTTP 400"),
                               (base_url.removesuffix("/v1"), model, "HTTP 404 \\(check --base-url")]:
        with pytest.raises(SystemExit, match=message):
            clair.main(["stronger", "--in", samples, "--out", str(tmp_path / "o.jsonl"), "--base-url", url,
                        "--model", name, "--max-tokens", "2"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["s.jsonl"]  # no empty output files


def test_local_generation_without_a_pad_token(tmp_path, padless_model):
    """Llama-3 style: no pad token. Left padding under the attention mask: a batch answers as each prompt alone."""
    from clair_apo.generation import Decoding, generate
    from clair_apo.models import load_model

    tokenizer, model = load_model(padless_model)
    assert tokenizer.pad_token_id is None
    prompts = ["Hi", [{"role": "user", "content": "Tell me a long story about a cat and a dog, please."}]]
    alone = [generate(model, tokenizer, [p], Decoding(8))[0][0] for p in prompts]
    assert generate(model, tokenizer, prompts, Decoding(8))[0] == alone and alone[0] != alone[1]
    prompts_file = write_jsonl(tmp_path / "p.jsonl", [{"id": "p", "prompt": "Hi"}])
    clair.main(["sample", "--model", padless_model, "--in", prompts_file,
                "--out", str(tmp_path / "s.jsonl"), "--max-tokens", "8", "--temperature", "0"])
    assert read_out(tmp_path / "s.jsonl")[0]["completion"] == alone[0]


# ----------------------------------------------------------------------------- contrastiveness

def test_levenshtein_equals_dynamic_programming():
    rng = random.Random(0)
    cases = [("", ""), ("", "abc"), ("kitten", "sitting"), ("flaw", "lawn"), ("é✓x", "e✓"), ("a" * 70, "b" * 65)]
    assert [clair.levenshtein(a, b) for a, b in cases[:4]] == [0, 3, 3, 2]  # the textbook values
    for _ in range(300):
        alphabet = rng.choice(["ab", "abcd", "abcdefghij éü"])
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90)))
        b = list(a) if rng.random() < 0.5 else [rng.choice(alphabet) for _ in range(rng.randint(0, 90))]
        for _ in range(rng.randint(0, 6)):  # a few edits, as in a minimal revision
            if b:
                b[rng.randrange(len(b))] = rng.choice(alphabet)
        cases.append((a, "".join(b)))
    for a, b in cases:
        assert clair.levenshtein_bit_parallel(a, b) == clair.levenshtein(a, b) == clair.levenshtein_bit_parallel(b, a), (a, b)


def test_stats_table(tmp_path, capsys):
    close = write_jsonl(tmp_path / "close.jsonl", [{"prompt": "q", "chosen": "The cat sat.", "rejected": "The cat sit."}])
    far = write_jsonl(tmp_path / "far.jsonl", [{"prompt": "q", "chosen": "Dogs run fast.", "rejected": "The cat sit."}])
    columns = clair.main(["stats", close, far])
    assert columns["close"]["levenshtein (lower = more contrastive)"] == 1
    assert columns["close"]["jaccard (higher = more contrastive)"] > columns["far"]["jaccard (higher = more contrastive)"]
    out = capsys.readouterr().out
    assert "close" in out and "far" in out and "pairs" in out


def test_stats_prints_every_readable_file_and_names_the_others(tmp_path, capsys):
    close = write_jsonl(tmp_path / "close.jsonl", [{"prompt": "q", "chosen": "The cat sat.", "rejected": "The cat sit."}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}])
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(SystemExit) as exit:
        clair.main(["stats", close, bad, empty, str(tmp_path / "missing.jsonl")])
    out = capsys.readouterr().out
    assert "close" in out and "| pairs" in out and "bad" not in out
    message = str(exit.value.code)
    assert message.startswith("error: stats: 3 of 4 files left out:")
    for problem in ["bad.jsonl:2: field 'rejected': expected a string", "empty.jsonl: no pairs",
                    "missing.jsonl: cannot read"]:
        assert problem in message


def test_local_generation_counts_the_tokens_it_generated(tiny_model):
    import torch

    from clair_apo.chat_tokens import chat_ids
    from clair_apo.generation import Decoding, generate
    from clair_apo.models import load_model

    tokenizer, model = load_model(tiny_model)
    _, reasons, counts = generate(model, tokenizer, ["Hi", "Tell me a long story, please."], Decoding(6))
    assert reasons == ["length", "length"] and counts == [6, 6]
    ids = torch.tensor([chat_ids(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)])
    greedy = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    model.generation_config.eos_token_id = [greedy[2]]  # the third greedy token now ends the turn
    _, reasons, counts = generate(model, tokenizer, ["Hi"], Decoding(6))
    assert reasons == ["stop"] and counts == [greedy.index(greedy[2]) + 1]


def test_the_last_verdict_counts_in_any_case():
    assert clair.parse_verdict("[[A]] looks better at first; on reflection, [[B]]") == "B"
    assert clair.parse_verdict("Verdict: [[b]]") == "B"
    assert clair.parse_verdict("[[Tie]]") == "tie"
    assert clair.parse_verdict("[[C]], or [A]") is None


def test_fill_leaves_unknown_placeholders_and_filled_in_text_alone():
    filled = clair.fill("[[TASK]] / [[OTHER]] / [[STUDENT_SOLUTION]]", task="[[STUDENT_SOLUTION]]", student_solution="x")
    assert filled == "[[STUDENT_SOLUTION]] / [[OTHER]] / x"


def test_each_row_is_on_disk_as_soon_as_it_is_written_and_a_rerun_appends(tmp_path):
    path = tmp_path / "new" / "o.jsonl"
    with clair.JsonlAppender(path):
        pass
    assert not path.parent.exists()  # nothing written, nothing left behind
    with clair.JsonlAppender(path) as out:
        out.write({"id": "a"})
        assert read_out(path) == [{"id": "a"}]  # flushed: a kill from here on loses nothing
    with clair.JsonlAppender(path) as out:
        out.write({"id": "b"})
    assert read_out(path) == [{"id": "a"}, {"id": "b"}]
