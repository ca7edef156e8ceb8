#!/usr/bin/env python3
"""Regenerate the llama.cpp reference fixtures in fixtures/reference/.

Usage (in a venv with `pip install llama-cpp-python numpy jinja2`):
    python3 scripts/reference/gen_fixtures.py MODEL.gguf NAME [OUT_DIR]

What it records, using llama.cpp through llama-cpp-python (never our own code):
  - tokenize: ids for a fixed multilingual/code/emoji string set (add_special / parse_special as listed);
  - greedy:   for fixed prompts, the prompt ids and the first 32 greedy tokens, chosen by argmax over
              the raw logits (no sampler), plus the top-10 logits at the first generated position;
  - chat_template: the GGUF's chat template rendered with jinja2 (trim_blocks, lstrip_blocks), as
              Hugging Face's apply_chat_template does.
"""
import hashlib
import json
import sys
from pathlib import Path

import jinja2
import llama_cpp
import numpy as np
from llama_cpp import Llama

N_GEN = 32

TOKENIZE_STRINGS = [
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "trailing space ",
    "multiple   spaces    here",
    "line one\nline two\n\nline four",
    "\ttabs\tand\ttabs",
    "1234567890",
    "3.14159 and 2026-11-25 and 1,000,000",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "fn main() -> Result<(), Box<dyn Error>> {\n    let v: Vec<u32> = std::iter::once(1).collect();\n}",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "https://example.com/path?query=1&b=two#frag",
    "!!! ??? ... --- *** ===",
    "it's I'M we'll they've don't",
    "Le café est très bon, naïve façade. Größe Übermaß straße.",
    "你好，世界！我们今天学习中文。",
    "日本語のテキストです。カタカナ、ひらがな。",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "emoji 🦀🚀 and ZWJ 👩‍💻 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "",
    " ",
    "   \n\n   ",
]

CHAT_CASES = [
    ([{"role": "user", "content": "What is the capital of France?"}], True),
    ([{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three primes."}], True),
    (
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke about compilers."},
        ],
        True,
    ),
    ([{"role": "user", "content": "Summarize: the cat sat on the mat."}, {"role": "assistant", "content": "A cat sat."}], False),
]

PLAIN_PROMPTS = {
    "smollm2-135m": [
        ("code", "def fibonacci(n):"),
        ("copy", "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox"),
        ("fact", "The capital of France is"),
    ],
    "gemma3-270m": [
        ("code", "def fibonacci(n):"),
        ("fact", "The capital of France is"),
        ("list", "Monday, Tuesday, Wednesday,"),
        ("story", "Once upon a time, in a small village by the sea,"),
        ("multilingual", "Bonjour! Je m'appelle"),
        ("json", '{"name": "Alice", "age": 30, "city":'),
    ],
}

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that checks whether a number is prime.",
    "Give me three tips for staying focused while working.",
]


def render(template: str, messages, add_generation_prompt: bool, bos: str, eos: str) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())

    def raise_exception(msg):
        raise jinja2.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
    )


def greedy(llm: Llama, prompt_ids):
    llm.reset()
    llm.eval(prompt_ids)
    out, top10 = [], None
    for i in range(N_GEN):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        tok = int(np.argmax(logits))
        if i == 0:
            idx = np.argsort(-logits)[:10]
            top10 = [[int(j), float(logits[j])] for j in idx]
        out.append(tok)
        llm.eval([tok])
    return out, top10


def main():
    model_path, name = sys.argv[1], sys.argv[2]
    out_dir = Path(sys.argv[3] if len(sys.argv) > 3 else Path(__file__).resolve().parents[2] / "fixtures" / "reference")
    sha = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    llm = Llama(model_path=model_path, n_ctx=1024, n_threads=2, n_batch=512, logits_all=True, verbose=False, seed=0)
    meta = llm.metadata
    add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
    tokens = llm._model.tokenizer_.encode if False else None  # noqa: F841 (keep the public API below)

    def tok(text, add_special, parse_special):
        return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    fixture = {
        "model": name,
        "gguf_sha256": sha,
        "llama_cpp_python_version": llama_cpp.__version__,
        "llama_cpp_commit": "vendored in llama-cpp-python " + llama_cpp.__version__,
        "generated_by": "scripts/reference/gen_fixtures.py (llama-cpp-python, greedy argmax over raw logits, n_threads=2)",
        "add_bos": add_bos,
        "tokenize": [],
        "greedy": [],
        "chat_template": [],
    }
    for s in TOKENIZE_STRINGS:
        fixture["tokenize"].append({"text": s, "add_special": False, "parse_special": False, "ids": tok(s, False, False)})
    for s in TOKENIZE_STRINGS:
        if "<" in s:
            fixture["tokenize"].append({"text": s, "add_special": False, "parse_special": True, "ids": tok(s, False, True)})
    for s in TOKENIZE_STRINGS[:3]:
        fixture["tokenize"].append({"text": s, "add_special": True, "parse_special": False, "ids": tok(s, True, False)})

    template = meta.get("tokenizer.chat_template")
    bos_text = llm.detokenize([llm.token_bos()]).decode("utf-8", "replace") if llm.token_bos() >= 0 else ""
    eos_text = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace") if llm.token_eos() >= 0 else ""
    prompts = []
    if template:
        for msgs, agp in CHAT_CASES:
            fixture["chat_template"].append(
                {"messages": msgs, "add_generation_prompt": agp, "rendered": render(template, msgs, agp, bos_text, eos_text)}
            )
        for i, p in enumerate(CHAT_PROMPTS):
            text = render(template, [{"role": "user", "content": p}], True, bos_text, eos_text)
            prompts.append((f"chat{i}", text, add_bos, True, p))
    for pname, p in PLAIN_PROMPTS[name]:
        prompts.append((pname, p, add_bos, False, None))
    for pname, text, bos, special, user in prompts:
        ids = tok(text, bos, special)
        gen, top10 = greedy(llm, ids)
        entry = {"name": pname, "prompt": text, "add_bos": bos, "parse_special": special, "prompt_ids": ids, "generated_ids": gen, "first_top10": top10}
        if user is not None:
            entry["chat_user_message"] = user
        fixture["greedy"].append(entry)
        print(pname, gen[:8], file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out_dir / (name + '.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
