"""train.py's flags, named as TRL and transformers users know them, each documented where it is declared.

train.parse_args builds its parser from these groups and checks what one flag alone cannot.
"""

from clair_apo.models import DEFAULT_MODEL, MAX_LENGTH, MAX_PROMPT_LENGTH
from clair_apo.objective import TERMS
from clair_apo.tracking import REPORT_TO
from preference_data import BUNDLED_TRAIN

DEMO_STEPS = 12  # python train.py with no --data: a short demonstration on the bundled pairs


def add_data_flags(p):
    """The model, the pairs and their lengths."""
    p = p.add_argument_group("data")
    p.add_argument("--model", default=DEFAULT_MODEL, help="local path or hub id; default: the embedded SmolLM2")
    p.add_argument("--data", default=None, help="train pairs: JSONL, .parquet or a Hub dataset id "
                   f"(default: the bundled demo, {BUNDLED_TRAIN.relative_to(BUNDLED_TRAIN.parents[1])})")
    p.add_argument("--eval-data", default=None, help="held-out pairs, as --data (default: bundled, or --eval-fraction)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="held out from --data without --eval-data")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH, help="prompt + completion tokens")
    p.add_argument("--max-prompt-length", type=int, default=MAX_PROMPT_LENGTH,
                   help="a longer prompt drops its pair (default: %(default)s)")
    p.add_argument("--write-ref-logps", help="also write every train pair to this JSONL file in TRL's format, with "
                   "its reference log-prob in TRL's ref_chosen_logps / ref_rejected_logps columns, for diagnose.py "
                   "(TRL 1.16 computes these columns itself under precompute_ref_log_probs)")


def add_training_flags(p):
    """The loss, the optimizer and the step plan."""
    p = p.add_argument_group("loss and optimizer")
    p.add_argument("--loss", nargs="+", choices=TERMS, default=["apo_zero"],
                   help="apo_zero when chosen answers beat the model's own (CLAIR), apo_down when the model's "
                        "beat them; dpo to compare; sft, alone or beside one of them, for TRL's SFT term: the "
                        "chosen answers' mean token negative log-likelihood (default: apo_zero)")
    p.add_argument("--loss-weights", nargs="+", type=float, default=None,
                   help="one weight per --loss, e.g. --loss apo_zero sft --loss-weights 1.0 0.5 (default: 1 each)")
    p.add_argument("--beta", type=float, default=0.1, help="scale of the implicit reward beta * (log pi - log "
                   "pi_ref) (default: 0.1)")
    p.add_argument("--lr", type=float, default=5e-6, help="peak learning rate (default: 5e-6)")
    p.add_argument("--optimizer", choices=["adamw", "rmsprop"], default="adamw", help="default: adamw (fused)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (default: 0)")
    p.add_argument("--lr-scheduler", choices=["linear", "cosine"], default="linear",
                   help="decay to 0 after the warmup (default: linear)")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="share of the steps spent warming up linearly "
                   "to --lr (default: 0.1)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping (grad_norm is still logged)")
    p.add_argument("--epochs", type=int, default=1, help="at least 1")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (default: "
                   f"{DEMO_STEPS} on the bundled demo data, otherwise every step of --epochs)")
    p.add_argument("--batch-size", type=int, default=2, help="pairs per micro-batch, per process")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--seed", type=int, default=0, help="the data order, the eval split and torch's generators")


def add_compute_flags(p):
    """How the steps are computed: dtype, memory, attention, sharding."""
    p = p.add_argument_group("compute")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="bf16: autocast over float32 weights "
                   "(default: bf16 on CUDA and on a CPU with native bf16, AVX512-BF16, AMX or Arm's BF16; else fp32)")
    p.add_argument("--gradient-checkpointing", nargs="?", choices=["none", "selective", "full"], default="none",
                   const="full", help="recompute activations in the backward: full (the flag alone) keeps each "
                   "block's input only; selective keeps its matrix products and attention, recomputing the "
                   "element-wise parts (docs/benchmarks.md: what each costs and saves)")
    p.add_argument("--packing", choices=["auto", "on", "off"], default="auto",
                   help="pack sequences into shared rows: auto packs where measured exact on the model")
    p.add_argument("--attn-implementation", default=None,
                   help="transformers' attention kernel, e.g. flash_attention_2 (needs --dtype bf16 and "
                        "pip install flash-attn; default: sdpa)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state")
    p.add_argument("--ref-check-tol", type=float, default=None,
                   help="step-0 check: max |policy - reference| summed log-prob per sqrt(completion tokens) "
                        "(default 1e-3 in fp32, 0.25 in bf16)")


def add_peft_flags(p):
    """LoRA adapters, named as TRL's ModelConfig names them."""
    p = p.add_argument_group("LoRA adapters (pip install peft)")
    p.add_argument("--use-peft", action="store_true", help="train LoRA adapters only, the model frozen; checkpoints "
                   "are PEFT adapter folders")
    p.add_argument("--lora-r", type=int, default=16, help="the adapters' rank (default: 16)")
    p.add_argument("--lora-alpha", type=float, default=32, help="their scale is alpha / r (default: 32)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapters' input, in training "
                   "only (default: 0.05)")
    p.add_argument("--lora-target-modules", nargs="+", default=["all-linear"], help="module names to adapt "
                   "(default: all-linear, every linear layer of the blocks, not the LM head)")


def add_output_flags(p):
    """The run folder: metrics, evaluation, checkpoints."""
    p = p.add_argument_group("output")
    p.add_argument("--out", default=None, help="the run's folder: metrics.jsonl, args.json, checkpoints "
                   "(default: runs/LOSS)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out; it reads the optimizer/ state, PyTorch "
                        "distributed-checkpoint files whose metadata is a pickle: resume only runs you made yourself")
    p.add_argument("--log-every", type=int, default=1, help="write train metrics every N steps (default: 1)")
    p.add_argument("--eval-every", type=int, default=0, help="0: evaluate at step 0 and at the end only")
    p.add_argument("--save-every", type=int, default=0, help="0: save only at the end")
    p.add_argument("--report-to", choices=REPORT_TO, default="none", help="also write every metric to "
                   "OUT/tensorboard as the run goes (pip install tensorboard; default: none, metrics.jsonl only)")
