"""The SFT term mixed into a preference loss (clair_apo/objective.py): its definition, its logs, and what it does."""

import json

import pytest
import torch
import transformers

import evaluate
import train
from apo import apo_zero_loss
from benchmarks.testbed import arithmetic_pairs, chat_token_pairs, make_tiny_model, padded_pass, write_jsonl
from clair_apo import batching, logprobs, models
from clair_apo.metrics import METRICS


def run(tmp_path, model, name, *flags, rows=None):
    """train.main on 16 arithmetic pairs, held out as themselves: the eval metrics are the trained pairs'."""
    data = write_jsonl(tmp_path / "pairs.jsonl", rows or arithmetic_pairs(16))
    out = tmp_path / name
    train.main(["--model", model, "--data", data, "--eval-data", data, "--out", str(out), "--lr", "1e-3",
                "--warmup-ratio", "0", "--batch-size", "4", "--grad-accum", "1", *flags])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def chosen_change(metrics):
    """How far the held-out chosen log-prob moved from step 0 to the end, in nats."""
    evals = [m["eval/logps/chosen"] for m in metrics if "eval/logps/chosen" in m]
    return evals[-1] - evals[0]


@pytest.mark.parametrize("family, loss", [("Llama", "apo_zero"), ("Qwen2", "dpo")])
def test_the_sft_term_stops_the_fall_of_the_chosen_log_prob(tmp_path, tiny_model, ref_cache, family, loss):
    """On the same pairs, 4 steps: the preference loss alone lowers the chosen answers' log-prob, and with half the
    SFT term beside it the chosen log-prob rises, the margin still opening."""
    model = (tiny_model if family == "Llama"
             else make_tiny_model(tmp_path / family, config_class=transformers.Qwen2Config))
    alone = run(tmp_path, model, "alone", "--loss", loss, "--max-steps", "4")
    mixed = run(tmp_path, model, "mixed", "--loss", loss, "sft", "--loss-weights", "1.0", "0.5", "--max-steps", "4")
    print(f"{family} {loss}: chosen log-prob {chosen_change(alone):+.2f} nats alone, {chosen_change(mixed):+.2f} "
          f"with 0.5 sft; margin {alone[-1]['eval/rewards/margins']:.3f} / {mixed[-1]['eval/rewards/margins']:.3f}")
    assert chosen_change(alone) < 0 < chosen_change(mixed)
    assert mixed[-1]["eval/rewards/margins"] > 0


def test_the_sft_term_is_the_mean_token_nll_of_the_chosen_completions(tmp_path, tiny_model, ref_cache):
    """nll_loss, logged beside loss, is every chosen completion token's negative log-likelihood pooled over the
    pairs (not a mean of per-answer means), and loss is the weighted sum; step 0's held-out values, recomputed."""
    metrics = run(tmp_path, tiny_model, "run", "--loss", "apo_zero", "sft", "--loss-weights", "2.0", "0.25",
                  "--max-steps", "1")
    tokenizer, model = models.load_model(tiny_model)
    pairs = chat_token_pairs(tokenizer, 16)
    chosen = logprobs.pairs_logps(model, pairs, padded_pass(4))[:, 0]
    tokens = torch.tensor([len(p["chosen"]) for p in pairs], dtype=torch.float64)
    assert (tokens.min() < tokens.max()) and not torch.isclose(chosen.sum() / tokens.sum(), (chosen / tokens).mean())
    step0 = [m for m in metrics if m["step"] == 0 and "eval/loss" in m][0]
    assert step0["eval/nll_loss"] == pytest.approx((-chosen.sum() / tokens.sum()).item(), rel=1e-6)
    assert step0["eval/loss"] == pytest.approx(2.0 + 0.25 * step0["eval/nll_loss"], rel=1e-6)  # APO-zero is 1 at start
    trained = [m for m in metrics if "loss" in m][0]
    assert trained["loss"] == pytest.approx(2.0 + 0.25 * trained["nll_loss"], rel=1e-6)  # the step's rewards are 0


def test_evaluate_reports_the_training_objective(tmp_path, tiny_model, ref_cache):
    """evaluate.py takes the loss and its weights from the checkpoint, and agrees with train.py's last metrics."""
    metrics = run(tmp_path, tiny_model, "run", "--loss", "dpo", "sft", "--loss-weights", "1.0", "0.5",
                  "--max-steps", "2")
    results = evaluate.main(["--model", str(tmp_path / "run" / "final"), "--data", str(tmp_path / "pairs.jsonl")])
    report = results["pairs"]["models"][str(tmp_path / "run" / "final")]
    for name in ("eval/loss", "eval/nll_loss", "eval/rewards/margins"):
        assert report[name] == pytest.approx(metrics[-1][name], abs=1e-5), name


def test_sft_alone_raises_the_chosen_and_logs_its_loss(tmp_path, tiny_model, ref_cache, capsys):
    metrics = run(tmp_path, tiny_model, "sft", "--loss", "sft", "--max-steps", "2")
    assert "done: 2 steps of sft, beta 0.1" in capsys.readouterr().out
    assert chosen_change(metrics) > 0
    assert all(m["loss"] == m["nll_loss"] for m in metrics if "loss" in m)
    assert [m["step"] for m in metrics if "eval/nll_loss" in m] == [0, 2]


def test_micro_batching_does_not_change_the_sft_step(tmp_path, tiny_model, ref_cache):
    """The SFT term pools the step's chosen tokens, so 1 x 4 and 4 x 1 micro-batches take the same step."""
    rows, flags = arithmetic_pairs(4), ["--loss", "apo_zero", "sft", "--max-steps", "1"]
    steps = []
    for name, batch_size, grad_accum in (("1x4", "4", "1"), ("4x1", "1", "4")):
        data = write_jsonl(tmp_path / "pairs.jsonl", rows)
        train.main(["--model", tiny_model, "--data", data, "--eval-data", data, "--out", str(tmp_path / name),
                    "--lr", "1e-3", "--batch-size", batch_size, "--grad-accum", grad_accum, *flags])
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        steps.append([json.loads(line) for line in lines if '"nll_loss"' in line][0])
    assert steps[0]["nll_loss"] == pytest.approx(steps[1]["nll_loss"], rel=1e-9)
    assert steps[0]["grad_norm"] == pytest.approx(steps[1]["grad_norm"], rel=1e-5)


class Captured(torch.optim.SGD):
    """An optimizer that only records the gradients it is asked to step with."""

    def step(self):
        self.grads = [p.grad.clone() for group in self.param_groups for p in group["params"]]


def captured_step(model, pairs, ref, loss):
    """train.train_step on two micro-batches of two pairs, fp32, no clipping: its logged metrics and the
    gradients it handed the optimizer."""
    args = train.parse_args(["--loss", loss, "--dtype", "fp32", "--max-grad-norm", "0"])
    optimizer = Captured(model.parameters(), lr=0.0)
    step = batching.Step(epoch=0, micro_batches=[[0, 1], [2, 3]], pairs_in_step=4)
    logged = train.train_step(model, optimizer, step, data=train.PairSet(pairs, ref), batching=padded_pass(2).batching,
                              args=args)
    return logged, optimizer.grads


def test_apo_zero_alone_is_the_plain_apo_zero_step_bit_for_bit(tiny_model):
    """--loss apo_zero (weight 1) takes the gradient of apo.apo_zero_loss's mean over the step, bit for bit."""
    tokenizer, model = models.load_model(tiny_model)
    models.disable_dropout(model)
    pairs = chat_token_pairs(tokenizer, 4)
    ref = logprobs.pairs_logps(model, pairs, padded_pass(4)) - 0.5  # rewards away from 0
    model.train()
    for micro_batch in ([0, 1], [2, 3]):
        batch = batching.padded(pairs, micro_batch, "cpu")
        policy_chosen, policy_rejected = logprobs.sequence_logps(model, batch).view(2, -1)
        ref_chosen, ref_rejected = ref[micro_batch].T
        (apo_zero_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.1).sum() * 1 / 4).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    logged, grads = captured_step(model, pairs, ref, loss="apo_zero")
    assert all(torch.equal(a, b) for a, b in zip(grads, expected))
    assert list(logged)[:len(METRICS)] == METRICS and "nll_loss" not in logged


def test_the_step_takes_the_gradient_of_the_pooled_sft_term(tiny_model):
    """Two micro-batches of two pairs under --loss sft: nll_loss and the gradient are those of every chosen token's
    negative log-likelihood over the four pairs' chosen tokens together."""
    tokenizer, model = models.load_model(tiny_model)
    models.disable_dropout(model)
    pairs = chat_token_pairs(tokenizer, 4)
    ref = logprobs.pairs_logps(model, pairs, padded_pass(4))
    model.train()
    chosen = logprobs.sequence_logps(model, batching.padded(pairs, [0, 1, 2, 3], "cpu")).view(2, -1)[0]
    nll = -chosen.sum() / sum(len(pair["chosen"]) for pair in pairs)
    nll.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    logged, grads = captured_step(model, pairs, ref, loss="sft")
    assert logged["nll_loss"] == pytest.approx(nll.item(), rel=1e-9) and logged["loss"] == logged["nll_loss"]
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("flags, message", [
    (["--loss", "apo_zero", "apo_zero"], "--loss names a loss twice"),
    (["--loss", "apo_zero", "sft", "--loss-weights", "1.0"], "--loss-weights takes one weight per --loss: 1 given"),
    (["--loss", "ipo"], "argument --loss: invalid choice: 'ipo'"),
])
def test_bad_loss_flags_are_refused_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert message in capsys.readouterr().err
