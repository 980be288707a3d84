"""Stand-ins for what this machine cannot reach: tiny random models, small pair files and a loopback chat server.

The benchmarks build their models and servers from here, and so do the tests (conftest.py): a tiny random
causal LM of any transformers family with a byte-level chat tokenizer, arithmetic preference pairs in TRL's
format, and an OpenAI-compatible /v1/chat/completions server on 127.0.0.1 with scripted replies and faults.
"""

import http.server
import json
import random
import socket
import threading
import time

import torch

from clair_apo.batching import padded
from clair_apo.chat_tokens import tokenize_pairs
from clair_apo.logprobs import Batching, LogprobPass, sequence_logps

# SmolLM2's chat template: a default system turn, then <|im_start|>role\ncontent<|im_end|>\n per message.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_tokenizer(bos_token=None, **special_tokens):
    """A byte-level BPE tokenizer without merges (a token per byte) and `special_tokens`. With a `bos_token`,
    plain tokenizer() calls prepend it (its post-processor), as Llama-3's and Gemma's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if bos_token:
        backend.add_special_tokens([bos_token])
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", special_tokens=[(bos_token, backend.token_to_id(bos_token))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos_token, **special_tokens)


def make_tiny_model(folder, seed=0, config_class=None, **config):
    """Save a random 2-layer model, a Llama unless `config_class` (a transformers config class, with `config`
    overriding the tiny sizes) says otherwise, and a byte-level BPE tokenizer (no merges) with a chat template."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = byte_level_tokenizer(eos_token="<|im_end|>", pad_token="<|im_end|>",
                                     additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
    config = (config_class or LlamaConfig)(**{"vocab_size": len(tokenizer)} | sizes | config,
                                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                           bos_token_id=None)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def arithmetic_pairs(n, seed=0):
    """Short preference pairs in TRL's string format: a right and a wrong sum."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        rows.append({"id": f"sum-{i}", "prompt": f"What is {a} + {b}?",
                     "chosen": f"{a} + {b} = {a + b}.", "rejected": f"{a} + {b} is {a + b + rng.randint(1, 9)}, I think."})
    return rows


class ChatHandler(http.server.BaseHTTPRequestHandler):
    """One request to a ChatServer (`self.server.chat`): recorded, then answered, or failed by its next fault."""
    protocol_version = "HTTP/1.1"
    FAULTS = {"429": (429, '{"error": "rate limited"}', [("Retry-After", "0.05")]), "500": (500, '{"error": "boom"}', []),
              "401": (401, '{"error": "invalid api key"}', []), "badjson": (200, "<html>not json", []),
              "nochoices": (200, '{"choices": []}', [])}

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()  # headers and body go out in two writes: no 40 ms Nagle/delayed-ACK stall
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, status, body, headers=()):
        data = body.encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        chat = self.server.chat
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with chat.lock:
            chat.requests.append(body)
            chat.headers.append(dict(self.headers))
            fault = chat.faults.pop(0) if chat.faults else None
        if self.path != "/v1/chat/completions":
            return self.send(404, '{"error": "not found"}')
        if fault in self.FAULTS:
            return self.send(*self.FAULTS[fault])
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault == "slow":
            time.sleep(chat.slow_seconds)
        time.sleep(chat.delay)
        content = chat.reply(body)
        self.send(200, json.dumps({"object": "chat.completion", "model": body["model"],
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                                "finish_reason": chat.finish_reason}]}))


class ChatServer:
    """A real HTTP server on loopback serving /v1/chat/completions, with scripted replies and faults.

    `reply(request_json) -> str` makes the answer text. `faults` is a list consumed one per request before
    normal answers: "429" (with Retry-After), "500", "slow" (sleeps past the client's timeout),
    "badjson" (a 200 that is not JSON), "nochoices" (a 200 without choices), "drop" (closes the
    connection unanswered), "401". `delay` sleeps before every answer; every answer carries `finish_reason`.
    Every request is recorded.
    """

    def __init__(self, reply, faults=(), delay=0.0, slow_seconds=2.0, finish_reason="stop"):
        self.reply, self.faults, self.delay, self.slow_seconds = reply, list(faults), delay, slow_seconds
        self.finish_reason = finish_reason
        self.requests, self.headers, self.lock = [], [], threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ChatHandler)
        self.httpd.daemon_threads = True
        self.httpd.chat = self
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def chat_token_pairs(tokenizer, n, seed=0):
    """The token ids of `n` arithmetic_pairs, each prompt one user turn, as train.py tokenises them."""
    rows = arithmetic_pairs(n, seed=seed)
    for row in rows:
        row["prompt"] = [{"role": "user", "content": row["prompt"]}]
    return tokenize_pairs(tokenizer, rows, 512, 256)[0]


def padded_pass(batch_size, logps=sequence_logps, device="cpu", dtype="fp32"):
    """A LogprobPass with one padded sequence per row and `logps` (default: the plain definition): what the
    tests compare train.py's measured Batching against."""
    batching = Batching(collate=padded, sequence_logps=logps, description="padded")
    return LogprobPass(batching, batch_size=batch_size, device=torch.device(device), dtype=dtype)
