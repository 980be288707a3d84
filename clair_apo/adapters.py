"""LoRA adapters under --use-peft: added to the initial model, the only parameters trained, saved as a PEFT folder.

LoRA adds to a frozen weight W the product s * B A of two small matrices (s = alpha / r); A starts random and B
at zero, so the model with its adapters computes exactly what the initial model computes. The reference is
that initial model: its log-probs, the reference cache's key (the fingerprint of the weights before the
adapters) and the step-0 check hold unchanged. peft is imported here only, only when asked for.
"""

import warnings
from dataclasses import dataclass

import torch

from clair_apo.distributed import unwrap
from preference_data import optional_import

ADAPTER = "default"  # peft's name for a model's one adapter


@dataclass(frozen=True)
class Lora:
    """--lora-r, --lora-alpha, --lora-dropout and --lora-target-modules, as TRL's ModelConfig names them."""
    r: int
    alpha: float
    dropout: float
    target_modules: list

    @classmethod
    def of(cls, args):
        return cls(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)


def peft_module():
    """peft, or a DataError naming it."""
    return optional_import("peft", "--use-peft")


def add_adapters(model, lora, base):
    """`model` as a peft model with `lora`'s adapters, every other parameter frozen; its adapter config names
    `base` (train.py's --model) as the model it applies to. Dropout in the adapters runs in training mode only,
    on their input: at step 0 their output is zero whatever it drops, so the step-0 check holds with it."""
    peft = peft_module()
    targets = lora.target_modules
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                             target_modules="all-linear" if targets == ["all-linear"] else targets)
    with warnings.catch_warnings():  # peft asks transformers whether checkpointing is on by a deprecated name
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = peft.get_peft_model(model, config)
    model.peft_config[ADAPTER].base_model_name_or_path = base
    return model


def frozen_weights_in_bf16(model):
    """Under --dtype bf16, each frozen linear layer's weight stored in bf16: autocast rounds a float32 weight to
    bf16 for every product anyway, so the log-probs and gradients are bit for bit the same, and the frozen
    weights take half the memory. A head tied to the embeddings stays float32: the embedding lookup is no
    product, and autocast leaves it in the weight's dtype."""
    embedding = unwrap(model).get_input_embeddings().weight
    for module in unwrap(model).modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and module.weight is not embedding:
            module.weight.data = module.weight.data.to(torch.bfloat16)


def has_adapters(model):
    """Whether `model` (wrapped for several processes or not) is a peft model."""
    return hasattr(unwrap(model), "peft_config")


def save_adapters(model, weights, folder):
    """The PEFT adapter folder of `model` in `folder`: adapter_config.json and adapter_model.safetensors, from
    `weights` (the adapters' full state dict, gathered on this process)."""
    unwrap(model).save_pretrained(folder, state_dict=weights, save_embedding_layers=False)


def saved_adapters(model, folder):
    """The adapters saved in `folder`, keyed as `model`'s state dict names them (peft leaves the adapter's name
    out of the file's keys)."""
    saved = peft_module().utils.load_peft_weights(str(folder), device="cpu")
    trained = [name for name, p in unwrap(model).named_parameters() if p.requires_grad]
    return {name: saved[name.replace(f".{ADAPTER}.", ".")] for name in trained}
