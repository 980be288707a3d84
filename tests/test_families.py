"""The model families users fine-tune, as tiny random models: exact log-probs on the path each one takes.

For every family, train.py's batching decision (packed rows where packing is measured exact, else one padded
sequence per row) must give each sequence's log-prob as a forward of that sequence alone does, a training run
must pass its step-0 check, and its step-0 held-out log-probs must be those of one-sequence forwards. The
expected path is what these tests found with transformers 5.24; docs/training.md's family table copies it.
"""

import json

import pytest
import torch
import transformers

from clair_apo import batching, fused_head, packing
from clair_apo import logprobs
import train
from benchmarks.testbed import arithmetic_pairs, make_tiny_model, write_jsonl
from clair_apo import chat_tokens
from clair_apo import models

HYBRID = dict(head_dim=8, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
              linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)

# family: (transformers config class, what differs from the tiny Llama sizes, the path the tests find)
FAMILIES = {
    "Llama": ("LlamaConfig", {}, "packed"),
    "Mistral, sliding window 8": ("MistralConfig", dict(sliding_window=8), "packed"),
    "Qwen2": ("Qwen2Config", {}, "packed"),
    "Qwen3": ("Qwen3Config", dict(head_dim=8), "packed"),
    "Qwen3-Next, gated delta net + attention, MoE": (
        "Qwen3NextConfig", HYBRID | dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=16), "padded"),
    "Qwen3.5, gated delta net + attention": ("Qwen3_5TextConfig", HYBRID, "padded"),
    "Gemma-2, soft-capping, sliding window 8": (
        "Gemma2Config", dict(head_dim=8, sliding_window=8, final_logit_softcapping=0.5), "packed"),
    "Gemma-3, sliding window 8": ("Gemma3TextConfig", dict(head_dim=8, sliding_window=8), "packed"),
    "Phi-3": ("Phi3Config", {}, "packed"),
    "OLMo-2": ("Olmo2Config", {}, "packed"),
    "SmolLM3": ("SmolLM3Config", {}, "packed"),
    "GPT-NeoX": ("GPTNeoXConfig", {}, "packed"),
    "OPT": ("OPTConfig", dict(ffn_dim=64, word_embed_proj_dim=32), "padded"),
    "LFM2, short convolutions + attention": ("Lfm2Config", dict(layer_types=["conv", "full_attention"]), "packed"),
    "Mamba": ("MambaConfig", dict(state_size=4), "padded"),
    "Mamba-2": ("Mamba2Config", dict(state_size=4, num_heads=4, head_dim=16, n_groups=1, chunk_size=16), "padded"),
    "Falcon-H1, Mamba-2 + attention": (
        "FalconH1Config", dict(lm_head_multiplier=0.5, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=4, mamba_n_groups=1,
                               mamba_chunk_size=16), "packed"),
    "Jamba, Mamba + attention, MoE": (
        "JambaConfig", dict(num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
                            expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_dt_rank=4), "packed"),
}


def chat_pairs(n, seed):
    rows = arithmetic_pairs(n, seed)
    for row in rows:
        row["prompt"] = [{"role": "user", "content": row["prompt"]}]
    return rows


def alone(model, pair, side):
    """log pi(completion | prompt) from a forward of this one sequence: no batch, no padding, no packing."""
    ids = torch.tensor([pair["prompt"] + pair[side]])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    token_logps = logps[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
    return token_logps[len(pair["prompt"]) - 1:].sum().item()


@pytest.fixture(params=FAMILIES)
def family(request, tmp_path):
    config_class, sizes, expected = FAMILIES[request.param]
    folder = make_tiny_model(tmp_path / "model", config_class=getattr(transformers, config_class), **sizes)
    return request.param, folder, expected


def test_log_probs_equal_one_sequence_forwards(family):
    name, folder, expected = family
    tokenizer, model = models.load_model(folder)
    models.disable_dropout(model)
    model.eval()
    pairs, _ = chat_tokens.tokenize_pairs(tokenizer, chat_pairs(6, seed=0), 512, 256)
    chosen = packing.choose_batching(model, pairs, [0, 1], "auto", torch.device("cpu"), "fp32")
    assert (chosen.collate is batching.padded) == (expected == "padded"), chosen.description
    truth = torch.tensor([[alone(model, p, side) for p in pairs] for side in ("chosen", "rejected")])
    tokens = torch.tensor([[len(p[side]) for p in pairs] for side in ("chosen", "rejected")])
    for layout in {batching.padded, chosen.collate}:  # the padded path always, and the packed one where chosen
        batch = layout(pairs, list(range(6)), "cpu")
        assert layout is batching.padded or batch["input_ids"].shape[0] > 1  # several rows of several sequences
        with torch.no_grad():
            got = chosen.sequence_logps(model, batch).view(2, -1).double()
        assert ((got - truth).abs() / tokens).max() < 1e-5, (name, layout)


def test_training_passes_the_step0_check_and_evaluates_exactly(family, tmp_path, ref_cache, capsys):
    name, folder, expected = family
    data = write_jsonl(tmp_path / "train.jsonl", chat_pairs(8, seed=0))
    eval_rows = chat_pairs(4, seed=1)
    out = tmp_path / "run"
    train.main(["--model", folder, "--data", data, "--eval-data", write_jsonl(tmp_path / "eval.jsonl", eval_rows),
                "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3"])
    assert f"batching: {'padded' if expected == 'padded' else 'packed'}" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["ref_check/max_abs_diff_per_sqrt_token"] < 1e-4 and metrics[-2]["step"] == 2
    tokenizer, model = models.load_model(folder)
    pairs, _ = chat_tokens.tokenize_pairs(tokenizer, eval_rows, 384, 192)
    for side in ("chosen", "rejected"):
        truth = sum(alone(model, p, side) for p in pairs) / len(pairs)
        assert metrics[0][f"eval/logps/{side}"] == pytest.approx(truth, abs=1e-4), name


def logps_and_gradients(model, batch, whole_head):
    """The log-probs of `batch` and every parameter's gradient of their sum, by the definition (whole_head) or
    through the fused head."""
    model.zero_grad()
    logps = (logprobs.sequence_logps if whole_head else fused_head.fused_sequence_logps)(model, batch)
    logps.sum().backward()
    return logps.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_fused_equals_whole(name, folder, monkeypatch):
    """Over several chunks (of the hidden size, 32 targets, here), on padded and packed batches: log-probs to 1e-6 per token,
    every gradient to 1e-5 of its largest entry; and the measurement keeps the head fused."""
    tokenizer, model = models.load_model(folder)
    models.disable_dropout(model)
    vocabulary, hidden = model.get_output_embeddings().weight.shape
    assert hidden < 7 * 6  # the chunks below: 7 targets' logits, but at least the hidden size
    monkeypatch.setattr(fused_head, "CHUNK_LOGITS", 7 * vocabulary)
    pairs, _ = chat_tokens.tokenize_pairs(tokenizer, chat_pairs(4, seed=2), 512, 256)
    chosen = packing.choose_batching(model, pairs, [0, 1], "auto", torch.device("cpu"), "fp32")
    assert chosen.sequence_logps is fused_head.fused_sequence_logps, chosen.description
    assert "LM head fused" in chosen.description
    for layout in {batching.padded, chosen.collate}:
        batch = layout(pairs, list(range(4)), "cpu")
        assert len(batch["labels"]) > 7
        fused, fused_grads = logps_and_gradients(model, batch, whole_head=False)
        whole, whole_grads = logps_and_gradients(model, batch, whole_head=True)
        assert ((fused - whole).abs() / torch.bincount(batch["sequence_of_target"])).max() < 1e-6, name
        assert fused_grads.keys() == whole_grads.keys()
        # A gradient that is 0 in exact arithmetic (a key bias: softmax ignores it) is rounding noise, so each is
        # held to 1e-5 of its own largest entry, or 1e-7 of the model's largest gradient where that is more.
        largest = max(grad.abs().max() for grad in whole_grads.values())
        for key, grad in whole_grads.items():
            assert (fused_grads[key] - grad).abs().max() <= 1e-5 * max(grad.abs().max(), 1e-2 * largest), (name, key)


def test_the_fused_head_gives_the_whole_heads_log_probs_and_gradients(family, monkeypatch):
    """On every family; Gemma-2's soft-capping at 0.5 and Falcon-H1's multiplier of 0.5 change its logits."""
    name, folder, _ = family
    assert_fused_equals_whole(name, folder, monkeypatch)


@pytest.mark.parametrize("config_class, scale", [("CohereConfig", dict(logit_scale=0.5)),
                                                 ("GraniteConfig", dict(logits_scaling=2.0))])
def test_the_fused_head_keeps_cohere_and_granite_scales(config_class, scale, tmp_path, monkeypatch):
    folder = make_tiny_model(tmp_path / "model", config_class=getattr(transformers, config_class), **scale)
    assert_fused_equals_whole(config_class, folder, monkeypatch)


def test_a_head_transform_the_fused_head_does_not_know_falls_back_to_the_whole_head(tmp_path, monkeypatch):
    """Gemma-2 soft-caps its logits; told nothing of it, the fused head is measured wrong and the model's own
    logits are used, exact again."""
    config_class, sizes, _ = FAMILIES["Gemma-2, soft-capping, sliding window 8"]
    folder = make_tiny_model(tmp_path / "model", config_class=getattr(transformers, config_class), **sizes)
    tokenizer, model = models.load_model(folder)
    models.disable_dropout(model)
    monkeypatch.setattr(fused_head, "logit_transform", lambda model: lambda logits: logits)
    pairs, _ = chat_tokens.tokenize_pairs(tokenizer, chat_pairs(4, seed=0), 512, 256)
    chosen = packing.choose_batching(model, pairs, [0, 1], "auto", torch.device("cpu"), "fp32")
    assert "LM head whole" in chosen.description and chosen.sequence_logps is logprobs.sequence_logps
    with torch.no_grad():
        got = chosen.sequence_logps(model, batching.padded(pairs, [0, 1, 2, 3], "cpu")).view(2, -1)
    truth = torch.tensor([[alone(model, p, side) for p in pairs] for side in ("chosen", "rejected")])
    assert (got - truth).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["Gemma-2, soft-capping, sliding window 8", "Mamba-2",
                                  "Qwen3-Next, gated delta net + attention, MoE", "Jamba, Mamba + attention, MoE"])
def test_selective_checkpointing_gives_the_same_gradients(name, tmp_path):
    """On families with other kernels (gated delta nets, Mamba's scans, MoE routing, soft-capped attention):
    keeping the matrix products and recomputing the rest changes no gradient."""
    config_class, sizes, _ = FAMILIES[name]
    folder = make_tiny_model(tmp_path / "model", config_class=getattr(transformers, config_class), **sizes)
    tokenizer, model = models.load_model(folder)
    models.disable_dropout(model)
    pairs, _ = chat_tokens.tokenize_pairs(tokenizer, chat_pairs(4, seed=0), 512, 256)
    batch = batching.padded(pairs, [0, 1, 2, 3], "cpu")
    plain, plain_grads = logps_and_gradients(model, batch, whole_head=False)
    models.enable_checkpointing(model, "selective")
    model.train()
    checkpointed, grads = logps_and_gradients(model, batch, whole_head=False)
    torch.testing.assert_close(checkpointed, plain, atol=1e-9, rtol=0)
    for key, grad in plain_grads.items():
        assert (grads[key] - grad).abs().max() <= 1e-5 * grad.abs().max(), (name, key)


@pytest.mark.parametrize("name", [n for n, (_, _, path) in FAMILIES.items() if path == "padded"][:1])
def test_packing_on_refuses_a_family_that_mixes_sequences(name, tmp_path, ref_cache):
    config_class, sizes, _ = FAMILIES[name]
    folder = make_tiny_model(tmp_path / "model", config_class=getattr(transformers, config_class), **sizes)
    data = write_jsonl(tmp_path / "train.jsonl", chat_pairs(4, seed=0))
    with pytest.raises(SystemExit, match="--packing on refused: padded: packed sequences mix on qwen3_next"):
        train.main(["--model", folder, "--data", data, "--eval-data", data, "--out", str(tmp_path / "run"),
                    "--packing", "on", "--max-steps", "1", "--batch-size", "2"])
