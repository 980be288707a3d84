"""What of the CUDA path can be checked on a CPU: the flash-attention refusal, a cache file per compute mode,
float64 sequence sums, flash attention's varlen arguments, and bench.py's FLOP count."""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from clair_apo import batching
from benchmarks import bench
from clair_apo import logprobs
from clair_apo import reference_cache
import train
from benchmarks.testbed import arithmetic_pairs, write_jsonl
from clair_apo import generation
from clair_apo import models

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags", [["--dtype", "fp32"], []])
def test_flash_attention_without_bf16_is_refused_in_one_line(flags, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--attn-implementation", "flash_attention_2", *flags])  # no native bf16 reported: fp32
    assert "flash_attention_2 computes in bf16 or fp16 only: add --dtype bf16" in capsys.readouterr().err


def test_a_missing_flash_attn_package_is_one_line(tiny_model):
    with pytest.raises(models.ModelError, match=r"^--attn-implementation flash_attention_2: .*; pip install flash-attn$"):
        models.load_model(tiny_model, attn_implementation="flash_attention_2")


def test_the_fingerprint_names_the_compute_mode(tiny_model):
    _, model = models.load_model(tiny_model)
    modes = {reference_cache.compute_mode(dtype, fsdp, device) for dtype in ("fp32", "bf16") for fsdp in (False, True)
             for device in ("cpu", torch.device("cuda", 0))}
    # FSDP in fp32 computes as one process does; the CPU's names are the modes alone, as before the device counted
    assert modes == {"fp32", "bf16", "bf16-fsdp", "fp32 on cuda", "bf16 on cuda", "bf16-fsdp on cuda"}
    assert len({reference_cache.weights_fingerprint(model, mode) for mode in modes}) == 6


def test_bf16_autocast_and_fsdp_bf16_parameters_keep_separate_caches(tmp_path, tiny_model):
    """One process under bf16 autocast, then FSDP with bf16 parameters on the same data: the second computes
    its own reference log-probs, into a file of its own."""
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_pairs(4))
    common = ["--model", tiny_model, "--data", data, "--eval-data", data, "--max-steps", "1", "--batch-size", "2",
              "--grad-accum", "1", "--dtype", "bf16"]
    env = {**os.environ, "CLAIR_APO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = [[sys.executable, str(ROOT / "train.py"), *common, "--out", str(tmp_path / "one")],
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(port),
             str(ROOT / "train.py"), *common, "--fsdp", "--out", str(tmp_path / "fsdp")]]
    outputs = [subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=True)
               for command in runs]
    assert all("reference (train): 2 pairs' log-probs computed" in out.stdout for out in outputs)
    assert len(list((tmp_path / "cache" / "ref_logps").glob("*.pt"))) == 2


def test_sequence_sums_are_float64(tiny_model):
    """A 1,000-token completion sums to about -5,000 nats, where float32 steps by 5e-4: the sum must be
    the float64 sum of the float32 token log-probs."""
    _, model = models.load_model(tiny_model)
    model.eval()
    pairs = [{"prompt": [5, 6, 7], "chosen": [40 + i % 200 for i in range(1000)], "rejected": [60, 61]}]
    batch = batching.padded(pairs, [0], "cpu")
    with torch.no_grad():
        got = logprobs.sequence_logps(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tokens = logits[batch["targets"]].float().log_softmax(-1).gather(-1, batch["labels"][:, None])[:, 0]
    chosen = batch["sequence_of_target"] == 0
    assert got.dtype == torch.float64
    assert abs(got[0].item() - math.fsum(tokens[chosen].tolist())) < 1e-6
    assert abs(got[0].item() - tokens[chosen].sum(dtype=torch.float32).item()) < 0.1  # the same sum, roughly


def test_one_row_passes_the_varlen_arguments_transformers_would_derive():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    pairs = [{"prompt": [1] * 5, "chosen": [2] * n, "rejected": [3] * (n + 7)} for n in range(1, 5)]
    batch = batching.one_row(pairs, [0, 1, 2, 3], "cpu")
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert torch.equal(batch["cu_seq_lens_q"], cu_q) and torch.equal(batch["cu_seq_lens_k"], cu_k)
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == int(max_q) == int(max_k) == 5 + 4 + 7
    assert isinstance(batch["max_length_q"], int)  # an int, not a tensor: no host sync per layer


def test_generation_in_bf16_on_the_cpu(tiny_model):
    tokenizer, model = models.load_model(tiny_model)
    decoding = generation.Decoding(max_tokens=4, temperature=1.0, dtype="bf16")
    answers, reasons, _ = generation.generate(model.eval(), tokenizer, ["Hi", "What is 2 + 2?"], decoding, seeds=[1, 2])
    assert len(answers) == 2 and reasons == ["length", "length"]


def test_bench_counts_block_head_and_attention_flops():
    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    pairs = [{"prompt": [1, 2, 3], "chosen": [4, 5], "rejected": [6, 7, 8, 9]}]  # sequences of 5 and 7 tokens
    layer = 16 * 16 + 16 * 8 + 16 * 8 + 16 * 16 + 3 * 16 * 32 + 2 * 16  # q, k, v, o, MLP, two norms
    blocks = 2 * layer + 16  # and the final norm
    expected = 6 * blocks * 12 + 6 * 100 * 16 * 6 + 6 * (5 ** 2 + 7 ** 2) * 16 * 2  # head at 6 completion tokens
    assert bench.step_flops(model, pairs) == expected
    assert dict(bench.DENSE_BF16_FLOPS)["H100 PCIe"] == 756e12
    card_peak = lambda card: next(flops for name, flops in bench.DENSE_BF16_FLOPS if name in card)
    assert card_peak("NVIDIA H100 PCIe") == 756e12 and card_peak("NVIDIA H100 80GB HBM3") == 989e12


@pytest.mark.parametrize("flags, dtype", [({"fpu", "avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16", "amx_tile"}, "bf16"),
                                          ({"fp", "asimd", "bf16"}, "bf16"), ({"fpu", "avx2", "avx512f"}, "fp32"),
                                          (set(), "fp32")])
def test_the_default_dtype_follows_what_the_cpu_reports(flags, dtype):
    chosen, why = models.default_dtype(torch.device("cpu"), cpu_flags=flags)
    assert chosen == dtype and (("natively" in why) == (dtype == "bf16")), why
    assert models.default_dtype(torch.device("cuda"), cpu_flags=set())[0] == "bf16"


def test_train_says_which_dtype_it_chose_and_why(tmp_path, tiny_model, ref_cache, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_pairs(4))
    common = ["--model", tiny_model, "--data", data, "--eval-data", data, "--max-steps", "1", "--batch-size", "2"]
    for reported, line in (("avx2", "dtype: fp32 (this CPU reports no native bf16 arithmetic)"),
                           ("avx512f avx512_bf16", "dtype: bf16 (this CPU computes bf16 natively (avx512_bf16))")):
        monkeypatch.setenv("CLAIR_APO_CPU_FLAGS", reported)
        train.main([*common, "--out", str(tmp_path / reported.split()[-1])])
        assert line in capsys.readouterr().out
    train.main([*common, "--out", str(tmp_path / "given"), "--dtype", "fp32"])
    assert "dtype: fp32 (--dtype)" in capsys.readouterr().out
