"""Shared test fixtures: the tiny random Llama of testbed.py, a fresh reference cache, and the real reviser replies."""

import json
import os
from pathlib import Path

import pytest

from benchmarks.testbed import make_tiny_model

SHARED = Path(__file__).resolve().parents[2] / "shared"

# The CPU's report of native bf16, forced empty: every test computes in fp32 unless it asks for bf16, on any
# machine. Set before any test runs, so train.py's subprocesses (torchrun) inherit it.
os.environ["CLAIR_APO_CPU_FLAGS"] = ""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def padless_model(tmp_path_factory, tiny_model):
    """The tiny model as Llama-3 ships: no pad token in its tokenizer, config or generation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("padless")
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_model), AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer.pad_token = None
    model.config.pad_token_id = model.generation_config.pad_token_id = None
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def ref_cache(tmp_path, monkeypatch):
    """Point the reference-log-prob cache of train.py and evaluate.py at a fresh folder."""
    from clair_apo import reference_cache

    monkeypatch.setattr(reference_cache, "FOLDER", tmp_path / "ref_cache")
    return tmp_path / "ref_cache"


def fixture_rows():
    """The 20 real gpt-4-0125-preview replies to the CLAIR prompt (../shared/fixtures)."""
    path = SHARED / "fixtures" / "clair_gpt4_responses.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def replay_reviser(rows):
    """A server reply function: the real reply whose student answer appears in the request."""
    def reply(body):
        text = body["messages"][-1]["content"]
        for row in rows:
            if row["student_solution"] in text:
                return row["response"]["choices"][0]["message"]["content"]
        return "no fixture matches"
    return reply
