"""chat_tokens.tokenize_completion on chat templates as real model families ship them.

Each template is our own reduction of the family's published one (tokenizer_config.json or chat_template.jinja),
keeping the behaviour that matters for cutting a completion out of the rendered chat: a default system prompt,
a dated system header, a BOS written by the template, an empty think block, a missing system role, an answer
turn rewritten. The tokenizer is byte-level (a token per byte) plus the family's special tokens.
"""

import pytest
import torch

from preference_data import DataError
from benchmarks.testbed import byte_level_tokenizer
from clair_apo import chat_tokens
from clair_apo import generation

USER = [{"role": "user", "content": "Say hi."}]
SYSTEM = [{"role": "system", "content": "Be brief."}]
HISTORY = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]

# Qwen2.5: without a system turn the template injects its own.
QWEN25 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (loop.first and message.role == 'system') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama-3: the template writes BOS (and the tokenizer would add one too); contents trimmed.
LLAMA3 = (
    "{%- for message in messages %}"
    "{%- set content = '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim"
    " + '<|eot_id|>' %}{%- if loop.first %}{%- set content = bos_token + content %}{%- endif %}{{- content }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Llama-3.1: BOS, then always a system header with a knowledge cutoff and a date; Llama-3.2 takes today's date.
LLAMA31_DATE = "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
LLAMA32_DATE = ("{%- if not date_string is defined %}{%- if strftime_now is defined %}"
                "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}"
                "{%- endif %}{%- endif %}")
LLAMA3X_BODY = (
    "{{- bos_token }}{%- if messages[0].role == 'system' %}{%- set system_message = messages[0].content | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\nToday Date: '"
    " + date_string + '\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Qwen3: the answer after the last user turn gets a think block, empty when it has no reasoning; earlier
# answers are rendered without one; the generation prompt opens none unless enable_thinking=False.
QWEN3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- set ns = namespace(last_query_index=0) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n')"
    " + '\\n</think>\\n\\n' + content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# SmolLM3: a metadata system turn with today's date and the reasoning mode (/think by default, /no_think from
# the system prompt); in /no_think every answer, and the generation prompt, carries an empty think block.
SMOLLM3 = (
    "{%- set reasoning_mode = '/think' %}{%- set custom = '' %}"
    "{%- if messages[0].role == 'system' %}{%- set custom = messages[0].content %}"
    "{%- if '/no_think' in custom %}{%- set reasoning_mode = '/no_think' %}{%- endif %}"
    "{%- set custom = custom.replace('/no_think', '').replace('/think', '').rstrip() %}{%- endif %}"
    "{%- set empty_think = '' if reasoning_mode == '/think' else '<think>\\n\\n</think>\\n' %}"
    "{{- '<|im_start|>system\\n## Metadata\\n\\nKnowledge Cutoff Date: June 2025\\nToday Date: '"
    " + strftime_now('%d %B %Y') + '\\nReasoning Mode: ' + reasoning_mode + '\\n\\n## Custom Instructions\\n\\n'"
    " + (custom or 'You are a helpful AI assistant named SmolLM, trained by Hugging Face.') + '\\n\\n<|im_end|>\\n' }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + empty_think + message.content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' + empty_think }}{%- endif %}"
)

# Gemma: BOS in the template, no system role at all, the assistant is 'model'.
GEMMA = (
    "{{- bos_token }}{%- if messages[0].role == 'system' %}{{- raise_exception('System role not supported') }}"
    "{%- endif %}{%- for message in messages %}"
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- set role = 'model' if message.role == 'assistant' else message.role %}"
    "{{- '<start_of_turn>' + role + '\\n' + message.content | trim + '<end_of_turn>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

# Mistral: BOS, [INST] turns, the answer closed by EOS; no generation prompt and no system role.
MISTRAL = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message.role == 'user' %}{{- '[INST] ' + message.content + ' [/INST]' }}"
    "{%- elif message.role == 'assistant' %}{{- message.content + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}{%- endfor %}"
)

# Phi-3: <|role|> turns closed by <|end|>; a finished chat (no generation prompt) ends with EOS.
PHI3 = (
    "{%- for message in messages %}{{- '<|' + message.role + '|>\\n' + message.content + '<|end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)

# Phi-4: ChatML with <|im_sep|> and no newlines.
PHI4 = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '<|im_sep|>' + message.content + '<|im_end|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant<|im_sep|>' }}{%- endif %}"
)

# DeepSeek-R1: the generation prompt opens a think block that the rendered answer turn never has (the
# template strips any reasoning from answers): the prompt is no prefix of prompt + answer.
DEEPSEEK_R1 = (
    "{%- set ns = namespace(system='') %}{%- for message in messages %}{%- if message.role == 'system' %}"
    "{%- set ns.system = message.content %}{%- endif %}{%- endfor %}{{- bos_token + ns.system }}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{{- '<｜User｜>' + message.content }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}{%- endif %}"
)

CHATML = ["<|im_start|>", "<|im_end|>"]
LLAMA3_TOKENS = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                     additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"])
# family: (template, tokenizer's special tokens, how the answer "Hi!" is rendered after the prompt)
FAMILIES = {
    "qwen2.5": (QWEN25, dict(eos_token="<|im_end|>", additional_special_tokens=CHATML), "Hi!<|im_end|>\n"),
    "llama-3": (LLAMA3, LLAMA3_TOKENS, "Hi!<|eot_id|>"),
    "llama-3.1": (LLAMA31_DATE + LLAMA3X_BODY, LLAMA3_TOKENS, "Hi!<|eot_id|>"),
    "llama-3.2": (LLAMA32_DATE + LLAMA3X_BODY, LLAMA3_TOKENS, "Hi!<|eot_id|>"),
    "qwen3": (QWEN3, dict(eos_token="<|im_end|>", additional_special_tokens=CHATML + ["<think>", "</think>"]),
              "<think>\n\n</think>\n\nHi!<|im_end|>\n"),
    "smollm3": (SMOLLM3, dict(eos_token="<|im_end|>", additional_special_tokens=CHATML + ["<think>", "</think>"]),
                "Hi!<|im_end|>\n"),
    "gemma": (GEMMA, dict(bos_token="<bos>", eos_token="<eos>",
                          additional_special_tokens=["<start_of_turn>", "<end_of_turn>"]), "Hi!<end_of_turn>\n"),
    "mistral": (MISTRAL, dict(bos_token="<s>", eos_token="</s>", additional_special_tokens=["[INST]", "[/INST]"]),
                "Hi!</s>"),
    "phi-3": (PHI3, dict(eos_token="<|endoftext|>",
                         additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
              "Hi!<|end|>\n<|endoftext|>"),
    "phi-4": (PHI4, dict(eos_token="<|im_end|>", additional_special_tokens=CHATML + ["<|im_sep|>"]), "Hi!<|im_end|>"),
    "deepseek-r1": (DEEPSEEK_R1, dict(bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>",
                                      additional_special_tokens=["<｜User｜>", "<｜Assistant｜>"]), None),
}
NO_SYSTEM_ROLE = {"gemma", "mistral"}


def family_tokenizer(family):
    template, special_tokens, _ = FAMILIES[family]
    tokenizer = byte_level_tokenizer(**special_tokens)
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "deepseek-r1"])
@pytest.mark.parametrize("prompt", ["user", "system", "history"])
def test_the_completion_is_the_answer_turn_with_its_end_of_turn(family, prompt):
    if prompt == "system" and family in NO_SYSTEM_ROLE:
        pytest.skip("the template has no system role")
    tokenizer = family_tokenizer(family)
    messages = {"user": USER, "system": SYSTEM + USER, "history": HISTORY + USER}[prompt]
    prompt_ids, completion_ids = chat_tokens.tokenize_completion(tokenizer, messages, "Hi!")
    assert tokenizer.decode(completion_ids) == FAMILIES[family][2]
    ids = prompt_ids + completion_ids
    rendered = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "Hi!"}], tokenize=False,
                                             date_string=chat_tokens.TEMPLATE_DATE)
    assert tokenizer.decode(ids) == rendered  # nothing added, nothing lost
    if tokenizer.bos_token_id is not None:  # written once, by the template, though plain tokenizer() adds one
        assert tokenizer("x").input_ids[0] == tokenizer.bos_token_id
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_what_each_family_writes_around_the_prompt():
    def prompt_text(family, messages=USER):
        tokenizer = family_tokenizer(family)
        return tokenizer.decode(chat_tokens.tokenize_completion(tokenizer, messages, "Hi!")[0])

    assert "You are Qwen, created by Alibaba Cloud." in prompt_text("qwen2.5")
    assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024" in prompt_text("llama-3.1")
    # Today's date would change the token ids (and the reference cache key) every day: pinned to 3.1's.
    assert prompt_text("llama-3.2") == prompt_text("llama-3.1")
    assert "\nReasoning Mode: /think\n" in prompt_text("smollm3")  # and today's date: see README
    no_think = prompt_text("smollm3", [{"role": "system", "content": "Be brief. /no_think"}] + USER)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n")  # the empty block is the prompt's
    assert prompt_text("mistral").endswith("[INST] Say hi. [/INST]")
    assert prompt_text("phi-3").endswith("<|user|>\nSay hi.<|end|>\n<|assistant|>\n")


def test_a_template_without_a_system_role_names_the_pair():
    rows = [{"id": "row-7", "prompt": SYSTEM + USER, "chosen": "Hi!", "rejected": "Hello."}]
    with pytest.raises(DataError, match="^pair 'row-7': System role not supported$"):
        chat_tokens.tokenize_pairs(family_tokenizer("gemma"), rows, 512, 256)


def test_a_template_that_rewrites_the_answer_turn_is_refused():
    with pytest.raises(DataError, match="completion boundary would be wrong"):
        chat_tokens.tokenize_completion(family_tokenizer("deepseek-r1"), USER, "<think>\nHm.\n</think>\nHi!")
    rows = [{"id": "row-3", "prompt": USER, "chosen": "Hi!", "rejected": "Hello."}]
    with pytest.raises(DataError, match="^pair 'row-3': the chat template renders the prompt differently"):
        chat_tokens.tokenize_pairs(family_tokenizer("deepseek-r1"), rows, 512, 256)


def test_generation_writes_one_bos_and_pads_without_a_pad_token():
    """Llama-3: the template writes BOS, the tokenizer adds one too, and there is no pad token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = family_tokenizer("llama-3")
    assert tokenizer.pad_token_id is None
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    seen = []
    generate = model.generate
    model.generate = lambda input_ids, **kwargs: seen.append(input_ids) or generate(input_ids=input_ids, **kwargs)
    answers, _, _ = generation.generate(model.eval(), tokenizer, ["Hi", "A longer prompt than the first."],
                                           generation.Decoding(max_tokens=4))
    assert len(answers) == 2
    (input_ids,) = seen
    starts = [row.tolist().index(tokenizer.bos_token_id) for row in input_ids]
    assert starts[0] > 0 and starts[1] == 0  # the shorter prompt is left-padded
    assert [row.tolist().count(tokenizer.bos_token_id) for row in input_ids] == [1, 1]
