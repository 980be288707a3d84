"""Preference training with DPO, APO-zero or APO-down on precomputed reference log-probs.

    python train.py                                   # APO-zero, SmolLM2-135M-Instruct, bundled CLAIR data
    python train.py --loss apo_down --data pairs.jsonl --beta 0.1 --lr 1e-6
    torchrun --nproc_per_node 8 train.py --model meta-llama/Meta-Llama-3-8B-Instruct --data clair.jsonl --fsdp
    python train.py --use-peft --loss apo_zero sft --loss-weights 1.0 0.5 --report-to tensorboard  # LoRA, SFT term

The paper's procedure, top to bottom: read and tokenise the pairs; compute the reference model's
log-probs once (the reference is the initial model, so no second model stays in memory: docs/method.md);
check at step 0 that the policy reproduces them; then each optimizer step computes policy log-probs of
chosen and rejected in one forward and takes the loss of apo.py. The machinery is in clair_apo/.
"""

import argparse
import contextlib
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from clair_apo import reference_cache
from clair_apo.adapters import Lora, add_adapters, frozen_weights_in_bf16, peft_module
from clair_apo.batching import pairs_trained, plan_steps
from clair_apo.chat_tokens import tokenize_pairs
from clair_apo.checkpoints import checkpoint_to_resume, load_checkpoint, save_checkpoint, trim_metrics
from clair_apo.distributed import (broadcast_object, log0, max_over_processes, rank, rank0_first, setup, sharded,
                                   sum_over_processes, teardown, world_size, wrap_model)
from clair_apo.logprobs import LogprobPass, pairs_logps
from clair_apo.metrics import METRICS, means, pair_metrics, pair_stats
from clair_apo.models import (ModelError, autocast, default_device, default_dtype, disable_dropout, enable_checkpointing,
                              load_model, setting_error)
from clair_apo.objective import SFT, Objective, objective_error, sft_loss
from clair_apo.packing import choose_batching
from clair_apo.train_flags import (DEMO_STEPS, add_compute_flags, add_data_flags, add_output_flags,
                                   add_peft_flags, add_training_flags)
from clair_apo.tracking import check_installed, open_trackers
from preference_data import BUNDLED_EVAL, BUNDLED_TRAIN, DataError, load_pairs, write_reference_logps

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add_flags in (add_data_flags, add_training_flags, add_compute_flags, add_peft_flags, add_output_flags):
        add_flags(p)  # clair_apo/train_flags.py
    args = p.parse_args(argv)
    args.dtype, args.dtype_source = (args.dtype, "--dtype") if args.dtype else default_dtype(default_device())
    if why := objective_error(args.loss, args.loss_weights):
        p.error(why)
    if args.use_peft and not (args.lora_r >= 1 and 0 <= args.lora_dropout < 1):
        p.error(f"--lora-r ({args.lora_r}) must be at least 1 and --lora-dropout ({args.lora_dropout}) in [0, 1)")
    args.loss_weights = args.loss_weights or [1.0] * len(args.loss)
    args.out = args.out or f"runs/{'+'.join(args.loss)}"
    if args.max_steps is None and args.data is None:
        args.max_steps = DEMO_STEPS
    if why := setting_error(args.max_length, args.max_prompt_length, args.attn_implementation, args.dtype):
        p.error(why)
    if args.epochs < 1:
        p.error(f"--epochs ({args.epochs}) must be at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max-steps ({args.max_steps}) must be at least 1; leave it out to run every epoch")
    if Path(args.model).exists():  # saved absolute: evaluate.py finds the reference from any directory
        args.model = str(Path(args.model).resolve())
    return args


# ----------------------------------------------------------------------------- data and the step plan

def load_splits(args):
    """(train rows, eval rows, drop counts) from --data / --eval-data / --eval-fraction."""
    train, drops = load_pairs(args.data or BUNDLED_TRAIN)
    eval_path = args.eval_data or (BUNDLED_EVAL if args.data is None else None)
    if eval_path:
        held_out, eval_drops = load_pairs(eval_path)
        return train, held_out, drops + Counter({f"eval: {k}": v for k, v in eval_drops.items()})
    shuffled = random.Random(args.seed).sample(train, len(train))
    n_eval = max(1, round(args.eval_fraction * len(train)))
    return shuffled[n_eval:], shuffled[:n_eval], drops


def tokenize_splits(tokenizer, splits, args):
    """Tokenised (train pairs, eval pairs) of load_splits' rows, every drop counted and printed."""
    train_rows, eval_rows, drops = splits
    train_pairs, train_drops = tokenize_pairs(tokenizer, train_rows, args.max_length, args.max_prompt_length)
    eval_pairs, eval_drops = tokenize_pairs(tokenizer, eval_rows, args.max_length, args.max_prompt_length)
    drops += train_drops + Counter({f"eval: {k}": v for k, v in eval_drops.items()})
    if not train_pairs or not eval_pairs:
        raise DataError("no pairs left after truncation; raise --max-prompt-length")
    log0(f"{len(train_pairs)} train pairs, {len(eval_pairs)} eval pairs"
         + "".join(f"; dropped {n}: {why}" for why, n in sorted(drops.items())))
    return train_pairs, eval_pairs


# ----------------------------------------------------------------------------- the model and its optimizer

def prepare_model(model, args, device):
    """(model, fingerprint of the initial model): dropout off, LoRA adapters added under --use-peft (after the
    fingerprint: at zero they change nothing the model computes; in bf16 the frozen weights held in bf16, which
    changes nothing either), wrapped for several processes."""
    disable_dropout(model)
    mode = reference_cache.compute_mode(args.dtype, fsdp=sharded(args.fsdp), device=device)
    fingerprint = broadcast_object(reference_cache.weights_fingerprint(model, mode) if rank() == 0 else None)
    if args.use_peft:
        model = add_adapters(model, Lora.of(args), base=args.model)
        if args.dtype == "bf16":
            frozen_weights_in_bf16(model)
    if args.gradient_checkpointing != "none":
        enable_checkpointing(model, args.gradient_checkpointing)
    return wrap_model(model, args.fsdp, args.dtype, device), fingerprint


def make_optimizer(model, args, total_steps):
    """AdamW or RMSprop, with linear warmup to --lr then linear or cosine decay to 0 at `total_steps`.
    Built before any forward: FSDP2 swaps root parameters on its first. AdamW is torch's fused kernel, as
    transformers' Trainer defaults to: one pass over each parameter, where the for-loop version allocates
    two temporaries the size of the largest at the step's peak."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    else:
        optimizer = torch.optim.RMSprop(params, lr=args.lr, weight_decay=args.weight_decay)
    warmup = int(args.warmup_ratio * total_steps)

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 1 - progress if args.lr_scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- the step-0 check

# The step-0 check's default tolerances: above bf16's rounding between differently packed batches, below
# what a stale cache scores (15 nats off on a 300-token answer: 15 / sqrt(300) = 0.87).
REF_CHECK_TOL = {"fp32": 1e-3, "bf16": 0.25}


def reference_gap(model, batch, ref, *, logps, dtype):
    """Max |log pi_theta - log pi_ref| / sqrt(completion tokens) over the sequences of one collated `batch`,
    in training mode, no grad, by `logps` (the Batching's log-prob function); `ref` holds the batch's pairs'
    reference log-probs, [pairs, 2].

    At step 0 the policy is the reference, so this must be ~0: it catches dropout left on, truncation
    or masking that differs from the precompute, and a stale cache. Rounding differences add up like
    sqrt(tokens), a wrong log-prob like tokens: so a whole-sequence mismatch is caught at any length."""
    with torch.no_grad(), autocast(batch["input_ids"].device, dtype):
        policy = logps(model, batch).view(2, -1).T
    tokens = torch.bincount(batch["sequence_of_target"], minlength=batch["num_sequences"]).view(2, -1).T
    gap = ((policy - ref.to(policy)).abs() / tokens.sqrt()).max().reshape(1)
    return max_over_processes(gap).item()


# ----------------------------------------------------------------------------- one optimizer step

@dataclass(frozen=True)
class PairSet:
    """Tokenised pairs and their reference log-probs: row i of `ref_logps`, [pairs, 2] float64, is pair i's
    log pi_ref of (chosen, rejected), NaN where the run needs none."""
    tokens: list
    ref_logps: torch.Tensor


def train_step(model, optimizer, step, *, data, batching, args):
    """One optimizer step over this process's micro-batches of `step`: its metrics.

    `batching` collates a micro-batch of `data` (a PairSet, its reference log-probs on the device) and
    computes its log-probs. Chosen and rejected of a micro-batch share one forward. The
    loss is the mean over the step's pairs on all processes, so 1 x 4 and 4 x 1 micro-batches give the same
    update; DDP and FSDP average gradients over processes, hence the world_size(). An SFT term divides by the
    chosen completion tokens of the step on all processes (objective.py). Raises FloatingPointError, before the
    update, when the loss or the gradient is not finite.
    """
    objective = Objective.of(args)
    ref, device = data.ref_logps, data.ref_logps.device
    chosen_tokens = chosen_tokens_in_step(data.tokens, step, device) if objective.sft else None
    totals = torch.zeros(len(METRICS), dtype=torch.float64, device=device)
    tokens, start = 0, time.time()
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    for k, indices in enumerate(step.micro_batches):
        batch = batching.collate(data.tokens, indices, device)
        sync = not ddp or k == len(step.micro_batches) - 1  # DDP: all-reduce gradients on the last one only
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast(device, args.dtype):
            policy_chosen, policy_rejected = batching.sequence_logps(model, batch).view(2, -1)
            ref_chosen, ref_rejected = ref[batch["pair_indices"]].T
            losses = objective.pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
            loss = losses.sum() * world_size() / step.pairs_in_step
            if objective.sft:
                loss = loss + objective.terms[SFT] * world_size() * sft_loss(policy_chosen, chosen_tokens)
            loss.backward()
        totals += pair_stats(losses, policy_chosen, policy_rejected, ref_chosen, ref_rejected, args.beta)
        tokens += batch["tokens"]
    sum_over_processes(totals)
    grad_norm = clip_gradients(optimizer, args.max_grad_norm)
    if not (torch.isfinite(totals[0]) and torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError("non-finite loss or gradient")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = means(totals, step.pairs_in_step, objective, chosen_tokens)
    metrics.update({"grad_norm": grad_norm.item(), "tokens/s": tokens * world_size() / (time.time() - start)})
    return metrics


def chosen_tokens_in_step(pairs, step, device):
    """The chosen completion tokens of `step`'s pairs on all processes: the SFT term's denominator."""
    tokens = torch.tensor([sum(len(pairs[i]["chosen"]) for i in step.pair_indices)], dtype=torch.float64,
                          device=device)
    return sum_over_processes(tokens).item()


def clip_gradients(optimizer, max_norm):
    """The gradients' global norm, over every process, after clipping them to `max_norm` (0: measured only)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor


# ----------------------------------------------------------------------------- the run

@dataclass
class Run:
    """What the loop works on: the model and its optimizer, the train pairs with their reference log-probs
    (on the device), the held-out pairs with theirs (on the CPU), and the output folder's metrics log,
    evaluation and checkpoints, and the trackers that show the metrics live (rank 0's)."""
    args: argparse.Namespace
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    how: LogprobPass
    train: PairSet
    held_out: PairSet
    step: int = 0
    trackers: list = field(default_factory=list)

    @property
    def out(self):
        return Path(self.args.out)

    def log(self, record):
        if rank() == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **record}) + "\n")
        for tracker in self.trackers:
            tracker.log(record, self.step)

    def evaluate(self):
        """Held-out metrics against the eval pairs' reference log-probs, logged as eval/*."""
        policy = pairs_logps(self.model, self.held_out.tokens, self.how)
        chosen_tokens = sum(len(pair["chosen"]) for pair in self.held_out.tokens)
        metrics = pair_metrics(policy, self.held_out.ref_logps, Objective.of(self.args), chosen_tokens)
        self.log({f"eval/{k}": v for k, v in metrics.items()})
        return metrics

    def save(self, name):
        save_checkpoint(self.model, self.tokenizer, self.optimizer, self.scheduler,
                        {"step": self.step, "args": vars(self.args)}, self.out / name)

    def start_or_resume(self, checkpoint):
        """A fresh metrics log, or `checkpoint`'s state with the metrics logged after it dropped."""
        if checkpoint:
            self.step = load_checkpoint(self.model, self.optimizer, self.scheduler, checkpoint)["step"]
            log0(f"resumed from {checkpoint} at step {self.step}")
            if rank() == 0:
                trim_metrics(self.out / "metrics.jsonl", self.step)
        elif rank() == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.jsonl").write_text("")
        if rank() == 0:
            (self.out / "args.json").write_text(json.dumps(vars(self.args), indent=2) + "\n")
            self.trackers = open_trackers(self.args.report_to, self.out, first_step=self.step + 1 if checkpoint else 0)

    def close(self):
        for tracker in self.trackers:
            tracker.close()


def reference_pass(model, train_pairs, used, eval_pairs, cache_file, how):
    """log pi_ref of the train pairs `used` and of every eval pair: from the cache file, else computed by the
    initial model in one no-grad pass. [pairs, 2] each, float64; the train pairs' on the device, for
    train_step, with NaN for the pairs not used; the eval pairs' on the CPU, for pair_metrics."""
    ref_train = torch.full((len(train_pairs), 2), math.nan, dtype=torch.float64)
    ref_train[used] = reference_cache.reference_logps(model, [train_pairs[i] for i in used], how, cache_file,
                                                      desc="reference (train)")
    ref_eval = reference_cache.reference_logps(model, eval_pairs, how, cache_file, desc="reference (eval)")
    return ref_train.to(how.device), ref_eval


def prepare_run(args, device):
    """The Run and its step plan: data read and tokenised, the model loaded and wrapped, its batching measured,
    the reference log-probs computed or read from the cache, and the checkpoint to resume from loaded."""
    check_installed(args.report_to)
    if args.use_peft:
        peft_module()  # a missing peft stops the run before any long work
    checkpoint = checkpoint_to_resume(args)
    splits = load_splits(args)
    with rank0_first():  # only rank 0 reads the weights; the others build the model empty and receive them
        tokenizer, model = load_model(args.model, attn_implementation=args.attn_implementation, weights=rank() == 0)
    train_pairs, eval_pairs = tokenize_splits(tokenizer, splits, args)
    steps = plan_steps(len(train_pairs), args)
    if not steps:
        raise DataError("fewer train pairs than processes x --batch-size")
    model, fingerprint = prepare_model(model, args, device)
    optimizer, scheduler = make_optimizer(model, args, total_steps=len(steps))
    batching = choose_batching(model, train_pairs, indices=steps[0].micro_batches[0], packing=args.packing,
                               device=device, dtype=args.dtype)
    log0(f"dtype: {args.dtype} ({args.dtype_source})")
    log0(f"batching: {batching.description}")
    how = LogprobPass(batching, batch_size=2 * args.batch_size, device=device, dtype=args.dtype)
    used = range(len(train_pairs)) if args.write_ref_logps else pairs_trained(len(train_pairs), args)
    ref_train, ref_eval = reference_pass(model, train_pairs, used, eval_pairs,
                                         cache_file=reference_cache.cache_file(fingerprint), how=how)
    if args.write_ref_logps and rank() == 0:
        by_id = {row["id"]: row for row in splits[0]}
        write_reference_logps([by_id[pair["id"]] for pair in train_pairs], ref_train.tolist(), args.write_ref_logps)
        log0(f"wrote {args.write_ref_logps}: {len(train_pairs)} train pairs with their reference log-probs")
    run = Run(args=args, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler, how=how,
              train=PairSet(train_pairs, ref_train), held_out=PairSet(eval_pairs, ref_eval))
    run.start_or_resume(checkpoint)
    return run, steps


def step_zero(run, first):
    """Before any update: the initial model's held-out metrics, and the step-0 check on this process's first
    micro-batch `first`; raises StepZeroError when the policy does not reproduce the reference."""
    args, batching = run.args, run.how.batching
    run.evaluate()
    batch = batching.collate(run.train.tokens, first, run.how.device)
    gap = reference_gap(run.model, batch, run.train.ref_logps[first], logps=batching.sequence_logps, dtype=args.dtype)
    run.log({"ref_check/max_abs_diff_per_sqrt_token": gap})
    tol = args.ref_check_tol or REF_CHECK_TOL[args.dtype]
    if not gap <= tol:  # NaN fails too
        raise StepZeroError(f"step-0 check failed: policy and cached reference log-probs differ by {gap:.2e} per "
                            f"sqrt(token) (> {tol:g}); dropout, truncation or masking differ, or the cache is stale")


class StepZeroError(RuntimeError):
    """The policy does not reproduce the reference log-probs before any update."""


def train_loop(run, steps):
    """From run.step to the last step: update, log, evaluate and save as the flags say."""
    args = run.args
    bar = tqdm(total=len(steps), initial=run.step, disable=rank() != 0, dynamic_ncols=True)
    while run.step < len(steps):
        step, lr = steps[run.step], run.scheduler.get_last_lr()[0]
        try:
            metrics = train_step(run.model, run.optimizer, step, data=run.train, batching=run.how.batching, args=args)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} at step {run.step + 1}; the last checkpoint in {run.out} is kept") from None
        run.scheduler.step()
        run.step += 1
        metrics.update({"lr": lr, "epoch": step.epoch})
        bar.update()
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margins']:.3f}")
        if run.step % args.log_every == 0:
            run.log(metrics)
        if args.eval_every and run.step % args.eval_every == 0 and run.step < len(steps):
            run.evaluate()
        if args.save_every and run.step % args.save_every == 0 and run.step < len(steps):
            run.save(f"checkpoint-{run.step}")
    bar.close()


def main(argv=None):
    args = parse_args(argv)
    device = setup()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    try:
        run, steps = prepare_run(args, device)
        run.model.train()
        if run.step == 0:
            step_zero(run, first=steps[0].micro_batches[0])
        train_loop(run, steps)
    except (DataError, ModelError, StepZeroError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    final = run.evaluate()
    run.save("final")
    run.close()
    done = f"done: {run.step} steps of {Objective.of(args)}, beta {args.beta}; checkpoint in {run.out / 'final'}"
    log0("\n".join([done, *(f"  eval/{k:<20} {v:+.4f}" for k, v in final.items())]))
    teardown()


if __name__ == "__main__":
    main()
