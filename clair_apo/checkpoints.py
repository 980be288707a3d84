"""Checkpoints: a train.py folder that any tool can open without running code from it, and exact resume.

A checkpoint folder holds:
- `model.safetensors`, `config.json` and the tokenizer: save_pretrained's files, which any transformers
  model loads (`--model FOLDER` in train.py and evaluate.py reads only these); under --use-peft, in their place,
  the PEFT adapter folder's `adapter_config.json` and `adapter_model.safetensors` (the adapters alone, over the
  base model that adapter_config.json names);
- `trainer_state.json`: the training args, the step, the scheduler state and the Python, numpy and torch
  RNG states, as plain JSON;
- `optimizer/`: the optimizer state, sharded, in PyTorch's distributed-checkpoint format. Its metadata is a
  pickle, so only `--resume` opens it: resume only runs you made yourself.
A folder is written under a temporary name and renamed, so a killed save leaves the last one whole.
"""

import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from clair_apo.adapters import has_adapters, save_adapters, saved_adapters
from clair_apo.distributed import barrier, rank, unwrap
from preference_data import DataError, cut_torn_line, read_jsonl

# torch.distributed.checkpoint saving and loading in one process is intended here (optimizer/).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

STATE = "trainer_state.json"
PICKLED_STATE = "trainer_state.pt"  # a pickled state: refused, never unpickled


def save_checkpoint(model, tokenizer, optimizer, scheduler, state, folder):
    """save_pretrained weights + tokenizer + trainer_state.json (`state` with the scheduler and RNG states) +
    optimizer/, written to a temporary folder then renamed.

    The optimizer state stays sharded: each process writes its own part to optimizer/ with
    torch.distributed.checkpoint. The weights are gathered on rank 0 alone, one tensor at a time: under LoRA the
    adapters alone, the frozen weights being --model's.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=tmp / "optimizer")
    adapters = has_adapters(model)
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                   ignore_frozen_params=adapters))
    if rank() == 0:
        # gathered one key at a time, a tied weight comes back as two tensors: keep the key save_pretrained keeps
        unique = {name for name, _ in unwrap(model).named_parameters()} | set(dict(unwrap(model).named_buffers()))
        weights = {k: v for k, v in weights.items() if k in unique}
        if adapters:
            save_adapters(model, weights, tmp)
        else:
            unwrap(model).save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        saved = {**state, "scheduler": scheduler.state_dict(), "rng": rng_state()}
        (tmp / STATE).write_text(json.dumps(saved) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    barrier()


def rng_state():
    """The Python, numpy, torch and CUDA generators' states as JSON values."""
    version, python, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(python), gauss],
            "numpy": [name, keys.tolist(), position, has_gauss, cached],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None}


def set_rng_state(saved):
    version, python, gauss = saved["python"]
    random.setstate((version, tuple(python), gauss))
    name, keys, position, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(saved["torch"], dtype=torch.uint8))
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in saved["cuda"]])


def read_state(folder):
    """The trainer_state.json of a train.py checkpoint, or None for a model train.py did not save. A pickled
    trainer_state.pt is refused: loading it could run any code its author put in it."""
    folder = Path(folder)
    if (folder / STATE).exists():
        try:
            return json.loads((folder / STATE).read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{folder / STATE}: not valid JSON ({e})") from None
    if (folder / PICKLED_STATE).exists():
        raise DataError(f"{folder / PICKLED_STATE}: a pickled training state, not loaded "
                        "because unpickling can run code; to evaluate the weights, delete it and give --ref, "
                        "--loss and --beta; such a run cannot be resumed")
    return None


def checkpoint_state(folder):
    """read_state of a folder that must be a train.py checkpoint."""
    state = read_state(folder)
    if state is None:
        raise DataError(f"{folder}: no {STATE}; not a train.py checkpoint")
    return state


def latest_checkpoint(out):
    steps = [(int(p.name.split("-")[1]), p) for p in Path(out).glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps)[1] if steps else None


def trim_metrics(path, step):
    """On resume: keep the metrics logged up to `step`; drop what the killed run logged after its checkpoint,
    and a torn last line (a kill mid-write)."""
    path.touch()
    cut_torn_line(path)
    kept = [record for _, record in read_jsonl(path) if record.get("step", 0) <= step]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def load_checkpoint(model, optimizer, scheduler, folder):
    """Restore weights, optimizer, scheduler and RNG from `folder`; return its trainer state.

    Rank 0 reads the weights (under LoRA the adapters alone) and broadcasts them as in distributed.wrap_model;
    each process reads only its own part of the optimizer state."""
    from transformers import AutoModelForCausalLM

    state = checkpoint_state(folder)
    adapters, weights = has_adapters(model), {}
    if rank() == 0:
        weights = (saved_adapters(model, folder) if adapters
                   else AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict())
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, ignore_frozen_params=adapters,
                                                                  broadcast_from_rank0=dist.is_initialized()))
    del weights  # rank 0's full copy, freed before the optimizer state is allocated
    optim = get_optimizer_state_dict(model, optimizer)  # this process's part, allocated, to be filled in place
    dcp.load(optim, checkpoint_id=Path(folder) / "optimizer")
    set_optimizer_state_dict(model, optimizer, optim)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


# Flags that may change on --resume: they do not change what is computed (a copied run folder is resumable;
# checkpointing recomputes the same activations).
RESUME_MAY_CHANGE = {"resume", "out", "log_every", "eval_every", "save_every", "write_ref_logps",
                     "gradient_checkpointing", "dtype_source", "report_to"}


def checkpoint_to_resume(args):
    """The latest checkpoint in --out under --resume, else None; refused when it was trained with other flags."""
    if not args.resume:
        return None
    checkpoint = latest_checkpoint(args.out)
    if checkpoint is None:
        raise DataError(f"--resume: no checkpoint-* folder in {args.out}")
    saved = checkpoint_state(checkpoint)["args"]
    changed = sorted(k for k in saved.keys() | vars(args).keys()
                     if k not in RESUME_MAY_CHANGE and saved.get(k) != vars(args).get(k))
    if changed:
        raise DataError(f"--resume: {checkpoint} was trained with other " + ", ".join(
            f"--{k.replace('_', '-')} ({saved.get(k)!r}, now {vars(args).get(k)!r})" for k in changed))
    return checkpoint
