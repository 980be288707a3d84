"""The machinery beneath train.py, evaluate.py, diagnose.py and `clair.py sample`, one concept a file.

In the order data flows through it:
    train_flags.py      train.py's flags, in groups, each documented where it is declared
    models.py           loading a causal LM (the embedded SmolLM2 included), its settings, dtype and device
    chat_tokens.py      prompt and completion token ids through the chat template, truncation
    batching.py         which pairs form a micro-batch; padded, packed and one-row layouts
    logprobs.py         log pi(y|x), the one definition; pairs_logps, the no-grad pass over many pairs
    fused_head.py       the same log-probs with the LM head fused into the log-softmax: a speed-up
    packing.py          the measurements that choose a model's layout and head (a Batching)
    objective.py        the loss a step minimises: a preference loss, optionally with an SFT term
    metrics.py          the metrics TRL logs, from log-probs
    reference_cache.py  the reference log-probs on disk, keyed by a fingerprint of the initial model
    adapters.py         LoRA adapters (--use-peft): added, saved and loaded over their base model
    checkpoints.py      save, load and exact resume
    distributed.py      torchrun: the process group, DDP and FSDP2, collectives
    tracking.py         live curves (--report-to tensorboard) beside metrics.jsonl
    generation.py       local, seeded generation
"""
