"""The reference log-probs on disk: log pi_ref(chosen) and log pi_ref(rejected) of each pair, computed once.

One file per model fingerprint (the weights, the config and how the log-probs were computed), keyed by
each pair's token ids, so any run or evaluation over the same tokens reuses it and computes only what it
lacks. Writers merge under a file lock and replace the file atomically. The lock is POSIX (fcntl); where
Python has no fcntl (Windows) one process at a time must write a cache folder.
"""

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from clair_apo.distributed import barrier, broadcast_object, log0, rank
from clair_apo.logprobs import pairs_logps
from clair_apo.models import CACHE_DIR

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

FOLDER = CACHE_DIR / "ref_logps"  # train.py's and evaluate.py's default


def compute_mode(dtype, fsdp, device):
    """How log-probs are computed: "fp32"; "bf16" (float32 weights under bf16 autocast: one process, DDP,
    evaluation); "bf16-fsdp" (FSDP's mixed precision makes the parameters themselves bf16, and with them the
    residual stream, norms and rotary tables). Each gives other log-probs, so each has its own cache file.
    So does each kind of accelerator, whose kernels round otherwise than the CPU's: "bf16 on cuda". The CPU's
    modes name no device, so CPU cache files keep their names."""
    mode = "bf16-fsdp" if dtype == "bf16" and fsdp else dtype
    kind = torch.device(device).type
    return mode if kind == "cpu" else f"{mode} on {kind}"


def weights_fingerprint(model, mode):
    """Which model made a log-prob: BLAKE2 of the compute mode, the attention implementation, the model
    config (its path aside) and every weight's bytes, tied ones once. The bytes go in 16 MiB chunks to one
    thread per core (hashlib releases the GIL); their digests are combined in order."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    weights = {}
    for name, tensor in model.state_dict().items():
        weights.setdefault(tensor.data_ptr(), (name, tensor.reshape(-1).view(torch.uint8)))
    chunks = [(name, data, i) for name, data in weights.values() for i in range(0, len(data), 2 ** 24)]

    def digest(chunk):  # only a chunk at a time leaves the device
        _, data, start = chunk
        return hashlib.blake2b(data[start:start + 2 ** 24].cpu().numpy(), digest_size=16).digest()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # Linux, else all
    with ThreadPoolExecutor(cores) as pool:
        digests = pool.map(digest, chunks)
    how = [mode, "float64 sums", model.config._attn_implementation, config]  # summed in float64 (logprobs.py)
    h = hashlib.blake2b(json.dumps(how, sort_keys=True, default=str).encode(), digest_size=8)
    for (name, _, _), chunk_digest in zip(chunks, digests):
        h.update(name.encode() + chunk_digest)
    return h.hexdigest()


def pair_key(pair):
    """A content hash of a tokenised pair, all three sides: the cache key of its reference log-probs."""
    ids = pair["prompt"] + [-1] + pair["chosen"] + [-1] + pair["rejected"]
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def read_cache(path):
    """{pair key: [log pi_ref(chosen), log pi_ref(rejected)]} from a cache file, empty if there is none."""
    if not path.exists():
        return {}
    saved = torch.load(path, weights_only=True)
    return dict(zip(saved["keys"], saved["logps"].tolist()))


def add_to_cache(path, entries):
    """Merge `entries` into the cache file. Under a file lock, what other runs wrote since is re-read and
    kept, and the file is replaced atomically: runs sharing the cache lose no entries, and readers never
    see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX)
        cache = read_cache(path) | entries
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"keys": list(cache), "logps": torch.tensor(list(cache.values()), dtype=torch.float64)}, tmp)
        tmp.replace(path)


def cache_file(fingerprint):
    """The cache file of the model with this fingerprint, in FOLDER."""
    return FOLDER / f"{fingerprint}.pt"


def reference_logps(model, pairs, how, path, desc="reference"):
    """[len(pairs), 2] log pi_ref(chosen), log pi_ref(rejected), float64: from the cache file `path`, else
    computed by pairs_logps as `how` (a LogprobPass) says, and added to it.

    Rank 0 alone reads and writes the cache and broadcasts what it found, so every process computes the
    same missing pairs, whatever its own disk holds.
    """
    keys = [pair_key(p) for p in pairs]
    cache = read_cache(path) if rank() == 0 else {}
    cache = broadcast_object({k: cache[k] for k in keys if k in cache})
    missing = sorted({k: i for i, k in enumerate(keys) if k not in cache}.values())
    if missing:
        todo = [pairs[i] for i in missing]
        start = time.time()
        logps = pairs_logps(model, todo, how)
        computed = dict(zip([keys[i] for i in missing], logps.tolist()))
        cache.update(computed)
        tokens = sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in todo)
        log0(f"{desc}: {len(missing)} pairs' log-probs computed, {tokens / (time.time() - start):.0f} tokens/s; "
             f"{len(pairs) - len(missing)} cached")
        if rank() == 0:
            add_to_cache(path, computed)
        barrier()
    return torch.tensor([cache[k] for k in keys], dtype=torch.float64)
