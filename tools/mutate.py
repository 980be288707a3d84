"""Mutation testing of the code whose bugs would be silent: a catalogue of one-line bugs, each run against
the tests that cover its function.

    python tools/mutate.py                      # every mutant; a table of kill rates per file
    python tools/mutate.py --only apo.3,train.5 # some mutants, by id (--list shows them)
    python tools/mutate.py --json results.json  # also write each mutant's outcome

Each mutant is one change the way real bugs look (a sign, an index, a constant, a flipped comparison, a
missing line, swapped arguments), written as a snippet of one function and its replacement; its file is a
path from the repository root (clair_apo/logprobs.py), its id the file's name and a number (logprobs.1).
The checkout (clair_apo/, tests/, experiment/, pytest.ini and the rest) is copied once to a temporary
folder, beside a link to ../shared, and pytest runs there from its root; mutants are applied one at a
time, so the working tree never holds a mutant, and an interrupted run leaves nothing behind. Each mutant's
tests run under `nice -n 10` with a timeout (a hang counts as killed); a mutant that fails a test is killed,
and the table says whether by a wrong value (an assertion) or by a crash. A mutant named `equivalent`
changes no behaviour, for the reason given; if its tests fail anyway it counts as killed.

A developer tool, not run by CI: the whole catalogue takes about half an hour on 2 CPU cores.
"""

import argparse
import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
LEFT_OUT = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "runs", "out", "*.pyc")

# The tests that cover each group of functions, fastest first (pytest -x stops at the first failure). Test ids
# are relative to the repository root, where pytest.ini puts the root on the path; all but test_losses.py are
# in tests/.
TRAIN, FAMILIES, CUDA = "tests/test_train.py::", "tests/test_families.py::", "tests/test_cuda_path.py::"
CLAIR, EVALUATE, EXPERIMENT = "tests/test_clair.py::", "tests/test_evaluate.py::", "tests/test_experiment.py::"
CHECKPOINTS, OBJECTIVE = "tests/test_checkpoints.py::", "tests/test_objective.py::"
TESTS = {
    "losses": ["test_losses.py"],
    "log-probs": [TRAIN + "test_pairs_logps_gives_every_pair_its_own_log_probs_in_any_batch_size",
                  TRAIN + "test_log_probs_in_chunks_with_or_without_grad_equal_one_chunk",
                  TRAIN + "test_token_log_probs_are_float32_from_the_heads_bf16_logits",
                  TRAIN + "test_sequence_logps_equals_naive_computation", CUDA + "test_sequence_sums_are_float64",
                  TRAIN + "test_step0_check_catches_a_whole_sequence_mismatch_at_any_length",
                  TRAIN + "test_pairs_that_differ_only_in_the_rejected_side_get_their_own_reference",
                  TRAIN + "test_reference_cache_is_reused_and_step0_check_catches_a_wrong_reference"],
    "metrics": [TRAIN + "test_pair_metrics_are_means_over_pairs_and_a_tie_is_not_accurate",
                TRAIN + "test_default_style_run_logs_trl_metrics_and_saves_a_loadable_model",
                EVALUATE + "test_held_out_metrics_agree_with_train"],
    "cache": [TRAIN + "test_pairs_that_differ_only_where_the_prompt_ends_get_their_own_key",
              TRAIN + "test_the_fingerprint_sees_every_byte_of_a_large_weight",
              TRAIN + "test_a_partly_cached_reference_gives_each_computed_value_to_its_own_pair",
              TRAIN + "test_pairs_that_differ_only_in_the_rejected_side_get_their_own_reference",
              CUDA + "test_the_fingerprint_names_the_compute_mode",
              TRAIN + "test_fingerprint_covers_config_and_attention_implementation",
              TRAIN + "test_reference_cache_is_reused_and_step0_check_catches_a_wrong_reference"],
    "step-0": [TRAIN + "test_step0_gap_divides_each_sequence_by_its_own_tokens",
               TRAIN + "test_step0_check_catches_a_whole_sequence_mismatch_at_any_length",
               TRAIN + "test_step0_check_fails_on_a_nan_reference",
               TRAIN + "test_reference_cache_is_reused_and_step0_check_catches_a_wrong_reference"],
    "step": [TRAIN + "test_the_plan_deals_each_epochs_pairs_once_in_steps_of_grad_accum_micro_batches",
             TRAIN + "test_the_step_takes_the_gradient_of_the_mean_loss_over_its_pairs",
             TRAIN + "test_grad_accumulation_does_not_change_the_update",
             TRAIN + "test_non_finite_loss_stops_with_the_step",
             TRAIN + "test_resume_reproduces_an_uninterrupted_run"],
    "resume": [CHECKPOINTS + "test_resume_takes_the_checkpoint_of_the_latest_step",
               CHECKPOINTS + "test_rng_state_round_trips_through_json",
               TRAIN + "test_resume_with_other_flags_is_refused",
               TRAIN + "test_resume_reproduces_an_uninterrupted_run"],
    "batching": [TRAIN + "test_batches_cover_every_pair", TRAIN + "test_rows_weigh_padding_against_attention",
                 TRAIN + "test_rows_pad_at_the_end",
                 CUDA + "test_one_row_passes_the_varlen_arguments_transformers_would_derive",
                 TRAIN + "test_tokenisation_is_positional_and_truncates",
                 TRAIN + "test_sequence_logps_equals_naive_computation"],
    "packing": [TRAIN + "test_packing_needs_both_measurements_exact",
                FAMILIES + "test_packing_on_refuses_a_family_that_mixes_sequences"],
    "tokens": [TRAIN + "test_a_prompt_of_exactly_max_prompt_length_is_kept", "tests/test_chat_templates.py",
               TRAIN + "test_tokenisation_is_positional_and_truncates",
               TRAIN + "test_template_that_rewrites_the_prompt_is_an_error"],
    "parser": [CLAIR + "test_the_last_verdict_counts_in_any_case",
               CLAIR + "test_fill_leaves_unknown_placeholders_and_filled_in_text_alone",
               CLAIR + "test_marker_priority_and_drops", CLAIR + "test_prompt_file_replaces_the_template",
               CLAIR + "test_all_real_replies_parse_through_the_server",
               CLAIR + "test_judge_keeps_only_pairs_both_orders_agree_on"],
    "jobs": [CLAIR + "test_each_row_is_on_disk_as_soon_as_it_is_written_and_a_rerun_appends",
             CLAIR + "test_unparseable_replies_are_dropped_counted_and_kept",
             CLAIR + "test_failed_rows_exit_nonzero_are_kept_with_their_error_and_retried",
             CLAIR + "test_a_torn_last_line_is_cut_and_redone",
             CLAIR + "test_a_bad_line_before_the_end_stops_the_run_and_keeps_the_file",
             CLAIR + "test_a_fatal_error_before_the_first_row_writes_no_file",
             CLAIR + "test_sigkill_mid_run_then_rerun_writes_every_id_once"],
    "judge": [EVALUATE + "test_the_grader_takes_the_last_verdict_in_any_case",
              EVALUATE + "test_a_tie_scores_one_half_in_both_orders",
              EVALUATE + "test_a_score_with_a_verdict_in_half_its_replies_is_kept",
              EVALUATE + "test_the_pairwise_judge_swaps_the_order",
              CLAIR + "test_judge_keeps_only_pairs_both_orders_agree_on",
              EVALUATE + "test_a_judge_without_verdicts_is_counted_and_its_scores_withheld",
              EVALUATE + "test_generation_with_answer_key_and_judge"],
    "head": [FAMILIES + "test_the_fused_head_gives_the_whole_heads_log_probs_and_gradients",
             FAMILIES + "test_the_fused_head_keeps_cohere_and_granite_scales",
             FAMILIES + "test_a_head_transform_the_fused_head_does_not_know_falls_back_to_the_whole_head",
             TRAIN + "test_two_processes_match_one[fsdp]"],
    "checkpointing": [TRAIN + "test_checkpointing_keeps_and_recomputes_what_it_says"],
    "experiment": [EXPERIMENT + "test_primary_metric_fails_cut_off_looping_and_wrong_answers",
                   EXPERIMENT + "test_revise_rewrites_what_is_wrong_in_place",
                   EXPERIMENT + "test_revise_is_exactly_minimal", EXPERIMENT + "test_the_canonical_form_succeeds",
                   EXPERIMENT + "test_injected_defects_fail_the_metric",
                   EXPERIMENT + "test_pairs_from_samples", EXPERIMENT + "test_seed_shares_are_disjoint_by_prompt",
                   EXPERIMENT + "test_bootstrap_known_answers", EXPERIMENT + "test_holm_known_answers",
                   EXPERIMENT + "test_an_effect_of_the_seeds_alone_widens_the_interval_to_cover_zero",
                   EXPERIMENT + "test_arms_of_one_pool_share_the_seed_resample",
                   EXPERIMENT + "test_success_needs_a_sentence_and_lowercase_needs_letters",
                   EXPERIMENT + "test_a_one_letter_key_is_not_the_word_a",
                   EXPERIMENT + "test_behaviour_no_pair_asks_for",
                   EXPERIMENT + "test_the_pilot_breakdown", EXPERIMENT + "test_prompts_are_split_by_question",
                   EXPERIMENT + "test_the_seeds_t_interval_of_a_contrast",
                   EXPERIMENT + "test_tuning_chooses_each_arms_best_validated_setting",
                   EXPERIMENT + "test_regrading_refreshes_the_checks_and_refuses_a_changed_success",
                   EXPERIMENT + "test_decision_rule_on_synthetic_arms",
                   EXPERIMENT + "test_the_decision_takes_holms_p_not_the_raw_one", EXPERIMENT + "test_t_interval"],
    "sft": [OBJECTIVE + "test_apo_zero_alone_is_the_plain_apo_zero_step_bit_for_bit",
            OBJECTIVE + "test_the_step_takes_the_gradient_of_the_pooled_sft_term",
            OBJECTIVE + "test_the_sft_term_is_the_mean_token_nll_of_the_chosen_completions",
            OBJECTIVE + "test_micro_batching_does_not_change_the_sft_step",
            OBJECTIVE + "test_sft_alone_raises_the_chosen_and_logs_its_loss"],
    "matcher": [EVALUATE + "test_answer_matching_of_separators_number_words_and_hyphens",
                EVALUATE + "test_answer_matching"],
}


@dataclass(frozen=True)
class Mutant:
    """`before` -> `after` inside `function` ("Class.method" for a method) of `file`, tested by TESTS[tests]."""
    file: str
    function: str
    before: str
    after: str
    tests: str
    equivalent: str = ""  # why no behaviour changes, for a mutant that cannot be killed


M = Mutant
MUTANTS = [
    # apo.py: the losses and their hand-written gradients
    M("apo.py", "_compute_dtype", "else torch.float32", "else torch.float64", "losses"),
    M("apo.py", "_rewards", "policy_chosen_logps.to(dtype) - ref_chosen_logps.to(dtype)",
      "ref_chosen_logps.to(dtype) - policy_chosen_logps.to(dtype)", "losses"),
    M("apo.py", "_rewards", "- ref_rejected_logps.to(dtype)", "- ref_chosen_logps.to(dtype)", "losses"),
    M("apo.py", "_delta", "torch.sigmoid(-u)", "torch.sigmoid(u)", "losses"),
    M("apo.py", "_input_grads", "-grad_chosen, -grad_rejected", "grad_chosen, -grad_rejected", "losses"),
    M("apo.py", "_input_grads", "return grad_chosen, grad_rejected,", "return grad_rejected, grad_chosen,", "losses"),
    M("apo.py", "_PairLoss.setup_context", "logps[1].dtype", "logps[0].dtype", "losses"),
    M("apo.py", "_DPO.forward", "F.softplus(r_l - r_w)", "F.softplus(r_w - r_l)", "losses"),
    M("apo.py", "_DPO.backward", "torch.sigmoid(r_l - r_w)", "torch.sigmoid(r_w - r_l)", "losses"),
    M("apo.py", "_DPO.backward", "grad_loss * ctx.beta *", "ctx.beta *", "losses"),
    M("apo.py", "_DPO.backward", "_input_grads(ctx, -weight, weight)", "_input_grads(ctx, weight, -weight)", "losses"),
    M("apo.py", "_APOZero.forward", "+ torch.sigmoid(r_l)", "- torch.sigmoid(r_l)", "losses"),
    M("apo.py", "_APOZero.backward", "-weight * _delta(r_w)", "weight * _delta(r_w)", "losses"),
    M("apo.py", "_APOZero.backward", "weight * _delta(r_l)", "weight * _delta(r_w)", "losses"),
    M("apo.py", "_APODown.forward", "torch.sigmoid(r_w - r_l)", "torch.sigmoid(r_l - r_w)", "losses"),
    M("apo.py", "_APODown.backward", "_delta(r_w) - margin", "_delta(r_w) + margin", "losses"),
    M("apo.py", "_APODown.backward", "_delta(r_w - r_l)", "_delta(r_w)", "losses"),
    M("apo.py", "apo_zero_loss", "beta=0.1", "beta=1.0", "losses"),
    M("apo.py", "apo_zero_unpaired_loss", "1 - torch.sigmoid(reward), torch.sigmoid(reward)",
      "torch.sigmoid(reward), 1 - torch.sigmoid(reward)", "losses"),
    M("apo.py", "apo_zero_unpaired_loss", "policy_logps.to(dtype) - ref_logps", "policy_logps.to(dtype) + ref_logps",
      "losses"),
    # clair_apo/logprobs.py: the definition of sequence log-probs, and the no-grad pass over many pairs
    M("clair_apo/logprobs.py", "token_logps", "logits[rows, cols]", "logits[rows, cols - 1]", "log-probs"),
    M("clair_apo/logprobs.py", "token_logps", ".float().log_softmax(-1)", ".log_softmax(-1)", "log-probs"),
    M("clair_apo/logprobs.py", "token_logps", 'batch["labels"].unsqueeze(-1)', 'batch["labels"].flip(0).unsqueeze(-1)',
      "log-probs"),
    M("clair_apo/logprobs.py", "sum_per_sequence", "dtype=torch.float64, device", "dtype=torch.float32, device",
      "log-probs"),
    M("clair_apo/logprobs.py", "pairs_logps", "min(i + size, len(pairs))", "min(i + size, len(pairs) - 1)",
      "log-probs"),
    M("clair_apo/logprobs.py", "pairs_logps", ".view(2, -1).T", ".view(-1, 2)", "log-probs"),
    # clair_apo/fused_head.py: the fused head against the definition and the model's own logits
    M("clair_apo/fused_head.py", "token_logps_of_logits", "logits = logits.float()", "logits = logits", "log-probs"),
    M("clair_apo/fused_head.py", "token_logps_of_logits", "- logits.logsumexp(-1)", "+ logits.logsumexp(-1)",
      "log-probs"),
    M("clair_apo/fused_head.py", "fused_head.forward", "hidden_states[rows, cols]", "hidden_states[rows, cols - 1]",
      "log-probs"),
    M("clair_apo/fused_head.py", "fused_head.forward", "labels, chunk=chunk", "labels.flip(0), chunk=chunk",
      "log-probs"),
    M("clair_apo/fused_head.py", "fused_head.chunk_logps", "token_logps_of_logits(transform(own_forward(hidden)), "
      "chunk_labels)", "token_logps_of_logits(own_forward(hidden), chunk_labels)", "head"),
    M("clair_apo/fused_head.py", "logit_transform.transform", "torch.tanh(logits / cap) * cap",
      "torch.tanh(logits) * cap", "head"),
    M("clair_apo/fused_head.py", "logit_transform.transform", "logits * multiplier", "logits / multiplier", "head"),
    M("clair_apo/fused_head.py", "logit_transform.transform", "logits * scale", "logits / scale", "head"),
    M("clair_apo/fused_head.py", "logit_transform.transform", "logits / divisor", "logits * divisor", "head"),
    M("clair_apo/fused_head.py", "fused_token_logps", "captured[0] + empty.sum()", "captured[0]", "head"),
    # clair_apo/packing.py: the fused head where it reproduces the definition, packing where it is exact
    M("clair_apo/packing.py", "choose_head", "gap <= FUSED_HEAD_TOL[dtype]", "gap > FUSED_HEAD_TOL[dtype]", "head"),
    M("clair_apo/packing.py", "choose_layout", "gaps[0] <= PACKING_TOL[dtype] and gaps[1]",
      "gaps[0] <= PACKING_TOL[dtype] or gaps[1]", "packing"),
    # clair_apo/metrics.py: TRL's metrics
    M("clair_apo/metrics.py", "pair_stats", "(r_w > r_l).float()", "(r_w >= r_l).float()", "metrics"),
    M("clair_apo/metrics.py", "pair_stats", "r_w, r_l, r_w - r_l", "r_w, r_l, r_l - r_w", "metrics"),
    M("clair_apo/metrics.py", "pair_metrics", "objective.pair_losses(pc, pr, rc, rr)",
      "objective.pair_losses(pc, pr, rr, rc)", "metrics"),
    # clair_apo/reference_cache.py: the cache and its key
    M("clair_apo/reference_cache.py", "compute_mode", 'dtype == "bf16" and fsdp', 'dtype == "bf16" or fsdp', "cache"),
    M("clair_apo/reference_cache.py", "weights_fingerprint", 'if k != "_name_or_path"', "", "cache"),
    M("clair_apo/reference_cache.py", "weights_fingerprint.digest", "data[start:start + 2 ** 24]",
      "data[start:start + 2 ** 23]", "cache"),
    M("clair_apo/reference_cache.py", "pair_key", ' + [-1] + pair["rejected"]', "", "cache"),
    M("clair_apo/reference_cache.py", "pair_key", 'pair["prompt"] + [-1] + pair["chosen"]',
      'pair["prompt"] + pair["chosen"]', "cache"),
    M("clair_apo/reference_cache.py", "add_to_cache", "read_cache(path) | entries", "entries", "cache"),
    M("clair_apo/reference_cache.py", "add_to_cache", "read_cache(path) | entries", "entries | read_cache(path)",
      "cache",
      equivalent="a key is a content hash under one fingerprint: an entry on disk and a new one hold the same value"),
    M("clair_apo/reference_cache.py", "reference_logps", "dict(zip([keys[i] for i in missing], logps.tolist()))",
      "dict(zip(keys, logps.tolist()))", "cache"),
    M("clair_apo/reference_cache.py", "reference_logps", "add_to_cache(path, computed)", "add_to_cache(path, cache)",
      "cache",
      equivalent="the extra entries were read from that file under the same keys: rewriting them changes nothing"),
    # train.py: the step-0 check, gradient accumulation
    M("train.py", "reference_gap", "/ tokens.sqrt()", "/ tokens", "step-0"),
    M("train.py", "reference_gap", "(policy - ref.to(policy)).abs()", "(policy - ref.to(policy))", "step-0"),
    M("train.py", "reference_gap", 'minlength=batch["num_sequences"]).view(2, -1).T',
      'minlength=batch["num_sequences"]).view(-1, 2)', "step-0"),
    M("train.py", "reference_gap", ', minlength=batch["num_sequences"]', "", "step-0",
      equivalent="every completion keeps at least one token (its end of turn), so no count is missing at the end"),
    M("train.py", "step_zero", "if not gap <= tol:", "if gap > tol:", "step-0"),
    M("train.py", "step_zero", "REF_CHECK_TOL[args.dtype]", 'REF_CHECK_TOL["bf16"]', "step-0"),
    M("train.py", "train_step", "losses.sum() * world_size() / step.pairs_in_step", "losses.sum() * world_size()",
      "step"),
    M("train.py", "train_step", "losses.sum() * world_size() / step.pairs_in_step",
      "losses.sum() * world_size() / len(indices)", "step"),
    M("train.py", "train_step", "means(totals, step.pairs_in_step,", "means(totals, len(step.micro_batches),", "step"),
    M("train.py", "train_step", "optimizer.step()\n    optimizer.zero_grad(set_to_none=True)", "optimizer.step()",
      "step"),
    # clair_apo/checkpoints.py: exact resume, and which flags may change on it (moved from train.py: last, so
    # the ids of those that were here keep their numbers)
    M("clair_apo/checkpoints.py", "set_rng_state",
      'torch.set_rng_state(torch.tensor(saved["torch"], dtype=torch.uint8))', "pass", "resume"),
    M("clair_apo/checkpoints.py", "set_rng_state", "dtype=np.uint32", "dtype=np.int64", "resume",
      equivalent="numpy converts the keys to uint32 itself, and every saved key is below 2 ** 32"),
    M("clair_apo/checkpoints.py", "latest_checkpoint", "max(steps)[1]", "min(steps)[1]", "resume"),
    M("clair_apo/checkpoints.py", "trim_metrics", 'record.get("step", 0) <= step', 'record.get("step", 0) < step',
      "resume"),
    M("clair_apo/checkpoints.py", "load_checkpoint", 'set_rng_state(state["rng"])', "pass", "resume",
      equivalent="training draws no random number after seeding: dropout is off, shuffles use their own Random"),
    M("clair_apo/checkpoints.py", "checkpoint_to_resume", "if k not in RESUME_MAY_CHANGE", "if k in RESUME_MAY_CHANGE",
      "resume"),
    # clair_apo/batching.py: layouts, targets, position ids, rows; the step plan (moved from train.py: last)
    M("clair_apo/batching.py", "train_batches", "seed * 1_000_003 + epoch", "seed * 1_000_003", "batching"),
    M("clair_apo/batching.py", "sequences_of", 'for side in ("chosen", "rejected") for i in indices]',
      'for i in indices for side in ("chosen", "rejected")]', "batching"),
    M("clair_apo/batching.py", "layout", "range(start + prompts[n] - 1, end - 1)",
      "range(start + prompts[n] - 2, end - 2)", "batching"),
    M("clair_apo/batching.py", "layout", "torch.arange(lengths[n])", "torch.arange(start, end)", "batching"),
    M("clair_apo/batching.py", "layout", "position_ids[r, start:] = torch.arange(width - start)", "pass", "batching"),
    M("clair_apo/batching.py", "layout", "attention_mask[r, :start] = 1", "attention_mask[r, :start - 1] = 1",
      "batching"),
    M("clair_apo/batching.py", "layout", "targets[1] + 1]", "targets[1]]", "batching"),
    M("clair_apo/batching.py", "one_row", '"max_length_q": max(lengths)', '"max_length_q": sum(lengths)', "batching"),
    M("clair_apo/batching.py", "pack_rows", "key=lambda n: -lengths[n]", "key=lambda n: lengths[n]", "batching"),
    M("clair_apo/batching.py", "pack_rows", "filled.index(min(filled))", "filled.index(max(filled))", "batching"),
    M("clair_apo/batching.py", "pack_rows", ">= best_cost:", "> best_cost:", "batching",
      equivalent="at equality k rows can only tie the best, and a tie is not kept: the next k breaks"),
    M("clair_apo/batching.py", "pack_rows", "if cost < best_cost:", "if cost <= best_cost:", "batching",
      equivalent="a tie in modelled work keeps the later row count: the same work, and log-probs that do "
      "not depend on the rows (packing.choose_batching measures it)"),
    M("clair_apo/batching.py", "plan_steps", "share[i:i + args.grad_accum]", "share[i:i + args.grad_accum - 1]",
      "step"),
    # clair_apo/chat_tokens.py: tokenisation and truncation
    M("clair_apo/chat_tokens.py", "chat_ids", ", date_string=TEMPLATE_DATE", "", "tokens"),
    M("clair_apo/chat_tokens.py", "tokenize_completion", "prompt, add_generation_prompt=True",
      "prompt, add_generation_prompt=False", "tokens"),
    M("clair_apo/chat_tokens.py", "tokenize_completion", "full_ids[len(prompt_ids):]", "full_ids[len(prompt_ids) - 1:]",
      "tokens"),
    M("clair_apo/chat_tokens.py", "tokenize_pairs", "len(prompt_ids) > max_prompt_length",
      "len(prompt_ids) >= max_prompt_length", "tokens"),
    M("clair_apo/chat_tokens.py", "tokenize_pairs", "room = max_length - len(prompt_ids)",
      "room = max_length - len(prompt_ids) - 1", "tokens"),
    M("clair_apo/chat_tokens.py", "tokenize_pairs", "chosen_ids[:room], rejected_ids[:room]",
      "chosen_ids[:room], rejected_ids", "tokens"),
    # clair_apo/models.py: activation checkpointing
    M("clair_apo/models.py", "enable_checkpointing", 'if which == "selective":', 'if which == "full":',
      "checkpointing"),
    M("clair_apo/models.py", "keep_products",
      "CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE",
      "CheckpointPolicy.PREFER_RECOMPUTE if keep else CheckpointPolicy.MUST_SAVE", "checkpointing"),
    # experiment/controlled.py: the primary metric, the minimal reviser, the defect injector, pairs, seeds, the decision
    M("experiment/controlled.py", "looping", r'r"(.)\1{7}"', r'r"(.)\1{8}"', "experiment"),
    M("experiment/controlled.py", "looping", "for n in range(1, 9)", "for n in range(2, 9)", "experiment"),
    M("experiment/controlled.py", "looping", " == tokens[i + 2 * n:i + 3 * n]", "", "experiment"),
    M("experiment/controlled.py", "answer_at_end", "words[-len(key):] == key", "words[:len(key)] == key", "experiment"),
    M("experiment/controlled.py", "allowed", "char != char.lower()", "char != char.upper()", "experiment"),
    M("experiment/controlled.py", "grade", '"no_loop": not looping(text)', '"no_loop": True', "experiment"),
    M("experiment/controlled.py", "grade", '"success": all(checks.values())', '"success": checks["answer_at_end"]',
      "experiment"),
    M("experiment/controlled.py", "tie_break", 'SPLIT if written == " "', '0 if written == " "', "experiment"),
    M("experiment/controlled.py", "revise", "key=lambda result: result[0]", "key=lambda result: -result[0]",
      "experiment"),
    M("experiment/controlled.py", "inject", 'wrong = prompt["distractors"][0]', "wrong = answer", "experiment"),
    M("experiment/controlled.py", "inject", '" ".join([answer] * 3)', '" ".join([answer] * 2)', "experiment"),
    M("experiment/controlled.py", "pairs_of", 'if sample["finish_reason"] != "stop":', "if False:", "experiment"),
    M("experiment/controlled.py", "seed_shares", "k % seeds", "k % (seeds - 1)", "experiment"),
    M("experiment/controlled.py", "bootstrap", "np.sum(means <= 0)", "np.sum(means < 0)", "experiment"),
    M("experiment/controlled.py", "bootstrap", "if pools[arm] not in seed_counts:", "if True:", "experiment"),
    M("experiment/controlled.py", "bootstrap", "seed_counts[pools[arm]], tables[arm]",
      "np.ones_like(seed_counts[pools[arm]]), tables[arm]", "experiment"),
    M("experiment/controlled.py", "sentence", ">= MIN_WORDS", ">= 1", "experiment"),
    M("experiment/controlled.py", "all_lowercase", "any(c.isalpha() for c in text) and ", "", "experiment"),
    M("experiment/controlled.py", "correct_anywhere", "not one_letter(key) and ", "", "experiment"),
    M("experiment/controlled.py", "one_letter", " and key.isalpha()", "", "experiment"),
    M("experiment/controlled.py", "build_prompts", "(rank[q[\"id\"]] + kinds.index(q[\"kind\"])) % 2",
      "rank[q[\"id\"]] % 2", "experiment"),
    M("experiment/controlled.py", "fixed_by_lowercasing", 'record["answer"].lower()', 'record["answer"]', "experiment"),
    M("experiment/controlled.py", "regraded", 'old["success"] != new["success"]', "False", "experiment"),
    M("experiment/controlled.py", "tune", "key=lambda row: grid.index(row[\"setting\"])", "key=lambda row: 0",
      "experiment"),
    M("experiment/controlled.py", "seed_t_interval", "tables[arm].mean(axis=1)", "tables[arm].mean()", "experiment"),
    M("experiment/controlled.py", "holm", "running = max(running,", "running = min(running,", "experiment"),
    M("experiment/controlled.py", "holm", "(len(p_values) - i)", "(len(p_values) - i - 1)", "experiment"),
    M("experiment/controlled.py", "decide", "adjusted[name] < ALPHA", 'test["p_one_sided"] < ALPHA', "experiment"),
    M("experiment/controlled.py", "decide", 'test["effect"] >= MIN_EFFECT', 'test["effect"] >= 0', "experiment"),
    M("experiment/controlled.py", "mean_interval", "T975[len(values) - 2]", "T975[len(values) - 1]", "experiment"),
    # clair.py: the parser, the judge, exactly-once bookkeeping
    M("clair.py", "fill", "m.group(1).lower(), m.group(0)", 'm.group(1).lower(), ""', "parser"),
    M("clair.py", "parse_revision", "tail.partition(marker)[0].strip()", "tail.partition(marker)[0]", "parser"),
    M("clair.py", "parse_revision", r"\{teacher_reasoning\}\s*:?", r"\{teacher_reasoning\}", "parser"),
    M("clair.py", "parse_revision", "return (rationale, revision) if revision else None", "return (rationale, revision)",
      "parser"),
    M("clair.py", "parse_verdict", "verdicts[-1]", "verdicts[0]", "parser"),
    M("clair.py", "parse_verdict", ", flags=re.IGNORECASE", "", "parser"),
    M("clair.py", "parse_verdict", '.replace("TIE", "tie")', "", "parser"),
    M("clair.py", "judge", "task=task, a=a, b=b", "task=task, a=b, b=a", "judge"),
    M("clair.py", "cmd_judge.work", '("B", "A"): second', '("B", "A"): first', "judge"),
    M("clair.py", "written_rows", "    cut_torn_line(path)\n", "", "jobs"),
    M("clair.py", "JsonlAppender.write", 'open(self.path, "a"', 'open(self.path, "w"', "jobs"),
    M("clair.py", "JsonlAppender.write", "        self.file.flush()\n", "", "jobs"),
    M("clair.py", "rows_to_skip", 'if "error" not in row]', 'if "error" in row]', "jobs"),
    M("clair.py", "rows_to_skip", " | {row[\"id\"] for row in dropped}", "", "jobs"),
    M("clair.py", "rows_to_skip", "            temporary.replace(rejects_path)\n", "", "jobs"),
    M("clair.py", "run_jobs", 'rejects_file.write({"id": job_id, "error": str(e)})', "pass", "jobs"),
    M("clair.py", "run_jobs", "(rows_file if row is not None else rejects_file)", "(rows_file if row is None else rejects_file)",
      "jobs"),
    # evaluate.py: the judge's order swapping and verdicts, the answer matcher
    M("evaluate.py", "pairwise", "judge(client, task, theirs, mine)", "judge(client, task, mine, theirs)", "judge"),
    M("evaluate.py", "pairwise", "1.0 - wins[second]", "wins[second]", "judge"),
    M("evaluate.py", "pairwise", '"tie": 0.5', '"tie": 0.0', "judge"),
    M("evaluate.py", "grade", "verdicts[-1].lower()", "verdicts[0].lower()", "judge"),
    M("evaluate.py", "grade", ", flags=re.IGNORECASE", "", "judge"),
    M("evaluate.py", "judge_generations", "2 * len(parsed) >= len(results)", "2 * len(parsed) > len(results)", "judge"),
    M("evaluate.py", "normalise", r"(?<=\d),(?=\d{3})", r"(?<=\d),(?=\d)", "matcher"),
    M("evaluate.py", "normalise", "UNITS[1:10]", "UNITS[1:9]", "matcher"),
    M("evaluate.py", "normalise", r"|-(?!\d)", "", "matcher"),
    M("evaluate.py", "normalise", '.decode().lower()', '.decode()', "matcher"),
    M("evaluate.py", "matches", 'f" {normalise(answer)} " in f" {normalise(response)} "',
      "normalise(answer) in normalise(response)", "matcher"),
    # clair_apo/objective.py, and the SFT term in the step and the metrics
    M("clair_apo/objective.py", "sft_loss", "-policy_chosen_logps.sum() / chosen_tokens",
      "policy_chosen_logps.sum() / chosen_tokens", "sft"),
    M("clair_apo/objective.py", "Objective.pair_losses", "weight * LOSSES[name]", "LOSSES[name]", "sft"),
    M("clair_apo/metrics.py", "means", 'objective.terms[SFT] * metrics["nll_loss"]', 'metrics["nll_loss"]', "sft"),
    M("clair_apo/metrics.py", "means", '-totals[METRICS.index("logps/chosen")]',
      '-totals[METRICS.index("logps/rejected")]', "sft"),
    M("train.py", "chosen_tokens_in_step", 'len(pairs[i]["chosen"])', 'len(pairs[i]["rejected"])', "sft"),
    M("train.py", "train_step", "world_size() * sft_loss(policy_chosen, chosen_tokens)",
      "world_size() * sft_loss(policy_chosen, len(indices))", "sft"),
]


def mutant_ids():
    """{id: mutant}, the ids numbered per file in catalogue order: apo.1, apo.2, ..., fused_head.1, ..."""
    numbers, ids, files = Counter(), {}, {}
    for mutant in MUTANTS:
        stem = Path(mutant.file).stem
        if files.setdefault(stem, mutant.file) != mutant.file:  # ids name a file by its name alone
            raise ValueError(f"{mutant.file} and {files[stem]} would share the ids {stem}.N")
        numbers[stem] += 1
        ids[f"{stem}.{numbers[stem]}"] = mutant
    return ids


# ----------------------------------------------------------------------------- applying a mutant

def function_span(source, qualified):
    """(start, end) character offsets of the function or class `qualified` ("f", "Class.method", "f.inner")."""
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))

    def find(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if name == qualified:
                    return line_starts[child.lineno - 1], line_starts[child.end_lineno]
                if qualified.startswith(name + "."):
                    return find(child, name + ".")
        return None

    span = find(ast.parse(source), "")
    if span is None:
        raise ValueError(f"no function {qualified}")
    return span


def mutated_source(source, mutant):
    """`source` with the mutant's one change; a ValueError unless `before` occurs once in its function."""
    start, end = function_span(source, mutant.function)
    body = source[start:end]
    if body.count(mutant.before) != 1:
        raise ValueError(f"{mutant.file} {mutant.function}: {mutant.before!r} occurs {body.count(mutant.before)} times")
    changed = source[:start] + body.replace(mutant.before, mutant.after) + source[end:]
    ast.parse(changed)  # a catalogue entry must leave valid Python
    return changed


def copy_checkout(scratch):
    """The checkout copied to scratch/main, beside a link to ../shared (the tests read it from there)."""
    tree = scratch / "main"
    shutil.copytree(ROOT, tree, ignore=LEFT_OUT)
    if SHARED.is_dir():
        (scratch / "shared").symlink_to(SHARED)
    return tree


# ----------------------------------------------------------------------------- running the tests

def run_tests(tree, nodes, timeout):
    """(outcome, what failed) of pytest -x on `nodes` in `tree`: "passed", "timeout", or the name of the first
    exception a test raised (AssertionError, Failed, SystemExit: a value checked; anything else: a crash)."""
    scratch = tree.parent
    command = ["nice", "-n", "10", sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               "--basetemp", str(scratch / "pytest"), *nodes]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "CLAIR_APO_CACHE": str(scratch / "cache"),
           "COLUMNS": "1000"}  # summary lines whole: the exception name is at their end
    process = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"over {timeout} s"
    finally:
        if process.poll() is None:  # timed out or interrupted: the tests and all they started
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process.returncode == 0:
        return "passed", ""
    failed = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - (\w+(?:\.\w+)*)\b.*)?$", output, flags=re.MULTILINE)
    if failed is None:
        return "error", output.strip().splitlines()[-1] if output.strip() else f"exit status {process.returncode}"
    return (failed[2] or "error").rsplit(".", 1)[-1], failed[1]


def check_baseline(tree, groups, timeout):
    """Every test group passes on the unmutated copy; else no mutant could be judged by it."""
    for group in groups:
        outcome, where = run_tests(tree, TESTS[group], timeout)
        if outcome != "passed":
            sys.exit(f"error: the unmutated checkout fails test group {group!r}: {outcome} in {where}")
        print(f"baseline {group}: passed", flush=True)


# A test, or the program's own check, saw a wrong value: gradcheck raises GradcheckError, and pytest's summary
# names a failed assert statement by its text, "assert ...".
VALUE_CHECKS = {"AssertionError", "assert", "Failed", "GradcheckError", "SystemExit"}


def judge_mutant(tree, mutant, timeout):
    """One mutant's result: {"outcome": killed | survived | equivalent, "by": what failed, "seconds"}."""
    path = tree / mutant.file
    original = path.read_text()
    start = time.time()
    try:
        path.write_text(mutated_source(original, mutant))
        outcome, where = run_tests(tree, TESTS[mutant.tests], timeout)
    finally:
        path.write_text(original)
    if outcome == "passed":
        verdict, by = ("equivalent" if mutant.equivalent else "survived"), ""
    else:
        kind = "value" if outcome in VALUE_CHECKS else "timeout" if outcome == "timeout" else "crash"
        verdict, by = "killed", f"{kind}: {outcome} in {where}"
    return {"file": mutant.file, "function": mutant.function, "before": mutant.before, "after": mutant.after,
            "outcome": verdict, "by": by, "seconds": round(time.time() - start, 1)}


# ----------------------------------------------------------------------------- the report

def print_table(results):
    """Per file: mutants, killed (of them by a crash or a timeout), equivalent, survived, kill rate."""
    print("\n| file | mutants | killed | by a crash or timeout | equivalent | survived | kill rate |")
    print("|---|---|---|---|---|---|---|")
    files = sorted({r["file"] for r in results.values()}) + ["all"]
    for file in files:
        rows = [r for r in results.values() if file in ("all", r["file"])]
        count = Counter(r["outcome"] for r in rows)
        crashed = sum(r["by"].startswith(("crash", "timeout")) for r in rows)
        judged = len(rows) - count["equivalent"]
        rate = f"{100 * count['killed'] / judged:.0f}%" if judged else "-"
        print(f"| {file} | {len(rows)} | {count['killed']} | {crashed} | {count['equivalent']} | "
              f"{count['survived']} | {rate} |")
    for outcome in ("survived", "equivalent"):
        for name, r in results.items():
            if r["outcome"] == outcome:
                print(f"{outcome}: {name} {r['function']}: {r['before']!r} -> {r['after']!r}")


def interrupted(signum, frame):
    raise KeyboardInterrupt  # unwinds through the restores and the temporary folder's removal


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated mutant ids (default: all)")
    p.add_argument("--list", action="store_true", help="print the catalogue and exit")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's tests; over it: killed")
    p.add_argument("--json", help="write each mutant's result here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    catalogue = mutant_ids()
    chosen = args.only.split(",") if args.only else list(catalogue)
    unknown = [name for name in chosen if name not in catalogue]
    if unknown:
        sys.exit(f"error: no mutant {', '.join(unknown)} (see --list)")
    selected = {name: catalogue[name] for name in chosen}
    for name, mutant in selected.items():  # every entry applies cleanly before any test runs
        mutated_source((ROOT / mutant.file).read_text(), mutant)
        if args.list:
            print(f"{name:<22} {mutant.function}: {mutant.before!r} -> {mutant.after!r}  [{mutant.tests}]")
    if args.list:
        return
    signal.signal(signal.SIGTERM, interrupted)
    results, start = {}, time.time()
    with tempfile.TemporaryDirectory(prefix="mutate-") as scratch:
        tree = copy_checkout(Path(scratch))
        check_baseline(tree, sorted({m.tests for m in selected.values()}), args.timeout)
        for name, mutant in selected.items():
            results[name] = judge_mutant(tree, mutant, args.timeout)
            print(f"{name}: {results[name]['outcome']} {results[name]['by']} ({results[name]['seconds']} s)",
                  flush=True)
    print_table(results)
    print(f"\n{len(results)} mutants in {(time.time() - start) / 60:.1f} minutes")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
