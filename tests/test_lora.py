"""--use-peft: LoRA adapters on tiny random models of several families, trained alone, saved as a PEFT folder, resumed
exactly, loaded by evaluate.py; the reference and its cache as without them; DDP and FSDP against one process."""

import json
import shutil
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import diagnose
import evaluate
import train
from benchmarks.testbed import arithmetic_pairs, chat_token_pairs, make_tiny_model, write_jsonl
from clair_apo import batching, models
from clair_apo.adapters import Lora, add_adapters, frozen_weights_in_bf16
from clair_apo.fused_head import fused_sequence_logps
from tests.test_train import torchrun

pytest.importorskip("peft", reason="pip install peft")
LORA = ["--use-peft", "--lora-r", "4", "--lora-alpha", "8"]


def run(tmp_path, model, name, *flags):
    """train.main under --use-peft on 8 arithmetic pairs; (out folder, metrics lines)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs(8))
    eval_data = write_jsonl(tmp_path / "eval.jsonl", arithmetic_pairs(4, seed=1))
    out = tmp_path / name
    train.main(["--model", model, "--data", data, "--eval-data", eval_data, "--out", str(out), "--lr", "1e-2",
                "--warmup-ratio", "0", "--batch-size", "2", "--grad-accum", "1", *LORA, *flags])
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step0_gap(metrics):
    name = "ref_check/max_abs_diff_per_sqrt_token"
    return [m for m in metrics if name in m][0][name]


def test_only_the_adapters_train_and_the_checkpoint_is_a_peft_folder(tmp_path, tiny_model, ref_cache, capsys):
    """The step-0 check finds the model with its adapters equal to the reference, dropout 0.5 in them included; the
    reference log-probs are the initial model's, cached under its key (a run without adapters finds them); the
    checkpoint holds the adapters alone, and the model it loads to differs from the base only by them."""
    train.main(["--model", tiny_model, "--data", write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs(8)),
                "--eval-data", write_jsonl(tmp_path / "eval.jsonl", arithmetic_pairs(4, seed=1)),
                "--out", str(tmp_path / "full"), "--max-steps", "3", "--batch-size", "2", "--grad-accum", "1"])
    capsys.readouterr()
    out, metrics = run(tmp_path, tiny_model, "lora", "--max-steps", "3", "--lora-dropout", "0.5")
    assert "computed" not in capsys.readouterr().out  # every reference log-prob from the full run's cache
    assert step0_gap(metrics) == 0.0
    assert [m for m in metrics if "loss" in m][-1]["rewards/margins"] > 0
    files = {path.name for path in (out / "final").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "optimizer"} <= files
    assert "model.safetensors" not in files
    saved = load_file(out / "final" / "adapter_model.safetensors")
    assert saved and all(".lora_A." in name or ".lora_B." in name for name in saved)
    assert json.loads((out / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model
    _, base = models.load_model(tiny_model)
    _, trained = models.load_model(str(out / "final"))  # the base, the adapters merged in
    changed = {name for name, w in trained.state_dict().items() if not torch.equal(w, base.state_dict()[name])}
    adapted = {name.split(".lora_")[0].removeprefix("base_model.model.") + ".weight" for name in saved}
    assert changed == adapted and "lm_head.weight" not in changed  # every linear layer of the blocks, not the head


def test_a_resumed_lora_run_reproduces_the_uninterrupted_one(tmp_path, tiny_model, ref_cache):
    """Bit for bit: the adapters, their optimizer state and the RNG that drives their dropout come back."""
    flags = ["--max-steps", "4", "--save-every", "2"]
    full, metrics_full = run(tmp_path, tiny_model, "full", *flags)
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    shutil.rmtree(killed / "final")
    _, metrics_resumed = run(tmp_path, tiny_model, "killed", *flags, "--resume")
    timeless = lambda ms: [{k: v for k, v in m.items() if k != "tokens/s"} for m in ms]
    assert timeless(metrics_resumed) == timeless(metrics_full)
    a, b = (load_file(folder / "final" / "adapter_model.safetensors") for folder in (full, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_frozen_weights_in_bf16_change_nothing_but_memory(tmp_path, tiny_model, ref_cache, monkeypatch):
    """--dtype bf16 holds the frozen linear weights in bf16, as autocast rounds them anyway: the same run with them
    in float32 logs the same metrics and trains the same adapters, bit for bit."""
    flags = ["--max-steps", "3", "--dtype", "bf16"]
    halved, metrics_halved = run(tmp_path, tiny_model, "halved", *flags)
    monkeypatch.setattr(train, "frozen_weights_in_bf16", lambda model: None)
    full, metrics_full = run(tmp_path, tiny_model, "float32", *flags)
    timeless = lambda ms: [{k: v for k, v in m.items() if k != "tokens/s"} for m in ms]
    assert timeless(metrics_halved) == timeless(metrics_full)
    a, b = (load_file(folder / "final" / "adapter_model.safetensors") for folder in (halved, full))
    assert all(torch.equal(a[name], b[name]) for name in a)
    _, model = models.load_model(tiny_model)
    model = add_adapters(model, Lora(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]), base=tiny_model)
    frozen_weights_in_bf16(model)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {name for name, dtype in dtypes.items() if dtype == torch.bfloat16} == {
        name for name, p in model.named_parameters() if name.endswith("base_layer.weight") or "lm_head" in name}


def test_evaluate_loads_the_adapters_over_their_base(tmp_path, tiny_model, ref_cache):
    out, metrics = run(tmp_path, tiny_model, "run", "--max-steps", "3")
    results = evaluate.main(["--model", str(out / "final"), "--data", str(tmp_path / "eval.jsonl")])
    assert results["ref"] == tiny_model
    report = results["pairs"]["models"][str(out / "final")]
    for name in ("eval/loss", "eval/rewards/chosen", "eval/rewards/margins", "eval/logps/chosen"):
        assert report[name] == pytest.approx(metrics[-1][name], abs=1e-5), name  # merged, as against unmerged


def test_diagnose_measures_a_lora_run(tmp_path, tiny_model, ref_cache):
    """diagnose.py displacement loads the run's adapters over its base: the chosen log-probs moved."""
    out, _ = run(tmp_path, tiny_model, "run", "--max-steps", "4")
    results = diagnose.main(["displacement", str(out), "--out", str(tmp_path / "ches.png")])
    (label, result), = results.items()
    assert label == "apo_zero on pairs" and result["pairs"] == 8 and result["chosen_logp_change_mean"] != 0


@pytest.mark.parametrize("family", ["Qwen2, tied head", "Llama without a pad token"])
def test_lora_on_other_families(tmp_path, padless_model, ref_cache, family):
    """A head tied to the embeddings stays frozen with them, and in bf16 stays float32 with them; a tokenizer
    without a pad token trains as well."""
    model = (make_tiny_model(tmp_path / "qwen2", config_class=transformers.Qwen2Config, tie_word_embeddings=True)
             if family.startswith("Qwen2") else padless_model)
    out, metrics = run(tmp_path, model, "run", "--max-steps", "2", *(["--dtype", "bf16"] if "tied" in family else []))
    assert step0_gap(metrics) == 0.0 and [m for m in metrics if "loss" in m][-1]["rewards/margins"] > 0
    assert all(".lora_" in name for name in load_file(out / "final" / "adapter_model.safetensors"))


def test_the_frozen_head_computes_no_weight_gradient(tiny_model):
    """Through the fused head, under LoRA: no gradient for the head's weight, and no [vocabulary, hidden] matrix
    product in the backward; the adapters get theirs."""
    tokenizer, model = models.load_model(tiny_model)
    models.disable_dropout(model)
    pairs = chat_token_pairs(tokenizer, 2)
    model = add_adapters(model, Lora(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]), base=tiny_model)
    model.train()
    head = model.get_output_embeddings()
    vocabulary_by_hidden = tuple(head.weight.shape)
    logps = fused_sequence_logps(model, batching.padded(pairs, [0, 1], "cpu"))
    with OutputShapes() as backward:
        logps.sum().backward()
    assert head.weight.grad is None and not head.weight.requires_grad
    assert not {vocabulary_by_hidden, vocabulary_by_hidden[::-1]} & backward.products
    assert all(p.grad is not None for name, p in model.named_parameters() if ".lora_A." in name)


class OutputShapes(TorchDispatchMode):
    """The shapes of the matrix products computed while active."""

    def __init__(self):
        super().__init__()
        self.products = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "matmul", "linear"):
            self.products.add(tuple(out.shape))
        return out


def test_without_peft_the_flag_is_one_line_before_any_model_work(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(SystemExit, match=r"^error: --use-peft needs peft: pip install peft$"):
        run(tmp_path, tiny_model, "run", "--max-steps", "1")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_the_adapters_as_one(tmp_path, tiny_model, ref_cache, mode):
    """torchrun x2 (gloo): one step of the adapters equals one process's over the same four pairs."""
    common = ["--batch-size", "1", "--max-steps", "1", "--lora-dropout", "0", *LORA]
    sharding = ["--fsdp"] if mode == "fsdp" else []
    torchrun(tmp_path, tiny_model, tmp_path / "two", *common, "--grad-accum", "2", *sharding)
    train.main(["--model", tiny_model, "--data", str(tmp_path / "train.jsonl"), "--eval-data",
                str(tmp_path / "eval.jsonl"), "--out", str(tmp_path / "one"), "--lr", "1e-3", "--warmup-ratio", "0",
                *common, "--grad-accum", "4"])
    a, b = (load_file(tmp_path / name / "final" / "adapter_model.safetensors") for name in ("two", "one"))
    assert a.keys() == b.keys() and all(b[name].abs().max() > 1e-4 for name in b if ".lora_B." in name)  # moved
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
