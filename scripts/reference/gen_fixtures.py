#!/usr/bin/env python3
"""Generate independent reference fixtures from llama.cpp (via llama-cpp-python).

Usage:
    python gen_fixtures.py MODEL.gguf NAME [--out-dir fixtures/reference] [--llama-cpp-commit SHA]

Writes <out-dir>/<NAME>.json containing:
  * tokenize: token ids from llama.cpp's tokenizer for a fixed set of strings;
  * greedy:   32 greedily generated token ids per prompt. This is a pure argmax over
              the raw logits returned by llama_decode (no sampler, no penalties, no
              early stop on EOS/EOG), plus the top-10 (id, logit) pairs at the first
              generated position;
  * chat_template: renderings of the GGUF's tokenizer.chat_template with jinja2
              (trim_blocks=True, lstrip_blocks=True, as HF apply_chat_template does).

and <out-dir>/<NAME>.margins.json: per prompt, the top1-top2 logit gap at every
generated step (small gaps are places where another implementation may legitimately
pick a different token because of float rounding).

Requires: llama-cpp-python, numpy, jinja2. Not part of the build or of CI.
The model family is detected from the GGUF metadata (general.architecture):
  llama  -> SmolLM2 prompts (chat template rendered, add_bos = model setting = False)
  gemma3 -> Gemma 3 base prompts (plain completions, add_bos = True)
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

import llama_cpp
from llama_cpp import Llama

N_GEN = 32
N_THREADS = 2

# ---------------------------------------------------------------------------
# Tokenizer strings (shared by both models).
# ---------------------------------------------------------------------------
TOKENIZE_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "multiple   spaces    between     words",
    "  two leading and two trailing  ",
    "line one\nline two\n\nline four\r\nwindows line",
    "tab\tseparated\tvalues\n\tindented with tab",
    "1234567890",
    "3.14159",
    "2026-11-25",
    "Numbers: 7, 42, 1000, 123456789012345, -0.001, 1e-9",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "fn main() -> Result<(), Box<dyn std::error::Error>> {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n    Ok(())\n}\n",
    "{\"name\": \"specswarm\", \"version\": [0, 1, 2], \"ok\": true, \"nested\": {\"k\": null}}",
    "https://example.com/path/to/page?query=1&lang=en#section-2",
    "Wait... what?!?! (really) [yes] {no} <maybe> -- ~~ ** ## @@ $$ %% ^^ && ||",
    "it's I'M we'll they're can't WON'T you'd I've",
    "Fran\u00e7ais: o\u00f9 est la biblioth\u00e8que? Deutsch: Stra\u00dfe, \u00fcber, Gr\u00f6\u00dfe, \u00c4rger.",
    "\u4e2d\u6587\uff1a\u4eca\u5929\u5929\u6c14\u5f88\u597d\u3002",
    "\u65e5\u672c\u8a9e\uff1a\u3053\u3093\u306b\u3061\u306f\u3001\u4e16\u754c\uff01\u30ab\u30bf\u30ab\u30ca",
    "\u0420\u0443\u0441\u0441\u043a\u0438\u0439: \u041f\u0440\u0438\u0432\u0435\u0442, \u043a\u0430\u043a \u0434\u0435\u043b\u0430?",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629: \u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u0939\u093f\u0928\u094d\u0926\u0940: \u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "Emoji: \U0001F600 \U0001F44D\U0001F3FD \u2764\ufe0f",
    "ZWJ family \U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466 and flags \U0001F1EB\U0001F1F7\U0001F1EF\U0001F1F5",
    "",
    " ",
    "\n",
    "a",
]

# Strings that contain special-token text; tokenized with parse_special false AND true.
SPECIAL_STRINGS = {
    "llama": [
        "<|im_start|>user\nHi<|im_end|>\n",
        "text <|endoftext|> more <|im_start|>",
    ],
    "gemma3": [
        "<start_of_turn>user\nHi<end_of_turn>\n",
        "text <bos> more <eos> <start_of_turn>",
    ],
}

# A couple of strings also recorded with add_special=true (BOS per the model's setting).
ADD_SPECIAL_STRINGS = ["Hello, world!", "", " leading space"]

# ---------------------------------------------------------------------------
# Prompts.
# ---------------------------------------------------------------------------
SMOL_CHATS = [
    ("chat_capital", [{"role": "user", "content": "What is the capital of France?"}]),
    ("chat_system", [
        {"role": "system", "content": "You are a concise assistant that answers in one sentence."},
        {"role": "user", "content": "Explain what a CPU cache is."},
    ]),
    ("chat_multiturn", [
        {"role": "user", "content": "Give me a number between 1 and 10."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Now double it and explain."},
    ]),
    ("chat_haiku", [{"role": "user", "content": "Write a haiku about autumn leaves."}]),
    ("chat_code", [{"role": "user", "content": "Write a Python function that returns the largest element of a list."}]),
    ("chat_tips", [{"role": "user", "content": "Give me three tips for better sleep."}]),
]
SMOL_PLAIN = [
    ("code_fibonacci", "def fibonacci(n):"),
    ("copy_repeat", "one two three four five six seven eight nine ten. one two three four five six seven eight nine ten. one two three"),
    ("fact_water", "The chemical formula of water is"),
    ("code_rust", "fn main() {\n    let numbers = vec![1, 2, 3, 4, 5];\n"),
    ("list_colors", "Red, orange, yellow, green,"),
    ("story_fox", "The quick brown fox"),
]
GEMMA_PLAIN = [
    ("code_fibonacci", "def fibonacci(n):"),
    ("fact_capital", "The capital of France is"),
    ("list_days", "Monday, Tuesday, Wednesday,"),
    ("multilingual_fr", "Traduction en fran\u00e7ais : \"Good morning\" ->"),
    ("story", "Once upon a time, in a small village,"),
    ("json_obj", "{\"name\": \"Alice\", \"age\": 30, \"city\":"),
    ("code_rust", "fn main() {\n    let numbers = vec![1, 2, 3, 4, 5];\n"),
    ("fact_water", "The chemical formula of water is"),
    ("list_colors", "Red, orange, yellow, green,"),
    ("chat_turns", "<start_of_turn>user\nWhat is the capital of Japan?<end_of_turn>\n<start_of_turn>model\n"),
    ("copy_repeat", "one two three four five six seven eight nine ten. one two three four five six seven eight nine ten. one two three"),
    ("science", "Photosynthesis is the process by which"),
]

SMOL_TEMPLATE_CASES = [
    ([{"role": "user", "content": "Hello!"}], True),
    ([{"role": "system", "content": "You are a pirate."},
      {"role": "user", "content": "Where is the treasure?"}], True),
    ([{"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Tell me a joke."}], True),
    ([{"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"}], False),
]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_renderer(template_src, bos_token, eos_token):
    """Render like transformers' apply_chat_template (jinja2, trim/lstrip blocks)."""

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    tmpl = env.from_string(template_src)

    def render(messages, add_generation_prompt):
        return tmpl.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )

    return render


def last_logits(llm):
    """Raw logits of the last evaluated token (logits_all=False => only the last row
    is produced by llama_decode; note llm.scores is NOT filled in that mode)."""
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float32).copy()


def greedy(llm, prompt_ids, eog_ids):
    llm.reset()
    llm.eval(prompt_ids)
    out, top10, margins, eog_hits = [], None, [], []
    for step in range(N_GEN):
        logits = last_logits(llm)
        tok = int(np.argmax(logits))  # first index on ties, like llama.cpp's greedy sampler
        order = np.argsort(-logits, kind="stable")[:10]
        if step == 0:
            top10 = [[int(j), float(logits[j])] for j in order]
        margins.append(float(logits[order[0]] - logits[order[1]]))
        if tok in eog_ids:
            eog_hits.append(step)  # recorded, generation continues
        out.append(tok)
        llm.eval([tok])
    return out, top10, margins, eog_hits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("name")
    ap.add_argument("--out-dir", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "fixtures", "reference"))
    ap.add_argument("--llama-cpp-commit", default="0c1e57098bba43ac29e6e3b677cdceebdd22334f",
                    help="commit of the llama.cpp copy vendored in the llama-cpp-python sdist")
    args = ap.parse_args()

    llm = Llama(
        model_path=args.model, n_ctx=1024, n_threads=N_THREADS, n_batch=512,
        logits_all=False, verbose=False,
    )
    md = llm.metadata
    arch = md.get("general.architecture")
    if arch not in SPECIAL_STRINGS:
        sys.exit(f"unsupported architecture {arch!r}")

    eog_ids = {i for i in range(llm.n_vocab())
               if llama_cpp.llama_vocab_is_eog(llm._model.vocab, i)}

    def tok(text, add_special, parse_special):
        return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    tokenize = []
    for s in TOKENIZE_STRINGS:
        tokenize.append({"text": s, "add_special": False, "parse_special": False,
                         "ids": tok(s, False, False)})
    for s in SPECIAL_STRINGS[arch]:
        for ps in (False, True):
            tokenize.append({"text": s, "add_special": False, "parse_special": ps,
                             "ids": tok(s, False, ps)})
    for s in ADD_SPECIAL_STRINGS:
        tokenize.append({"text": s, "add_special": True, "parse_special": False,
                         "ids": tok(s, True, False)})

    template_src = md.get("tokenizer.chat_template")
    render = None
    if template_src:
        bos_tok = llm.detokenize([llm.token_bos()], special=True).decode("utf-8")
        eos_tok = llm.detokenize([llm.token_eos()], special=True).decode("utf-8")
        render = make_renderer(template_src, bos_tok, eos_tok)

    if arch == "llama":
        add_bos = False  # tokenizer.ggml.add_bos_token = false for SmolLM2
        prompts = [(n, render(m, True)) for n, m in SMOL_CHATS] + SMOL_PLAIN
    else:
        add_bos = True  # tokenizer.ggml.add_bos_token = true for Gemma 3
        prompts = GEMMA_PLAIN

    greedy_cases, margin_cases = [], []
    for name, prompt in prompts:
        ids = tok(prompt, add_bos, True)
        gen, top10, margins, eog_hits = greedy(llm, ids, eog_ids)
        greedy_cases.append({
            "name": name, "prompt": prompt, "add_bos": add_bos, "parse_special": True,
            "prompt_ids": ids, "generated_ids": gen, "first_top10": top10,
        })
        margin_cases.append({"name": name, "top1_minus_top2": margins,
                             "min_margin": min(margins), "eog_steps": eog_hits})
        print(f"{name:24s} n_prompt={len(ids):3d} min_margin={min(margins):.4f} "
              f"eog_steps={eog_hits} gen={gen[:10]}...", file=sys.stderr)

    chat_cases = []
    if arch == "llama":
        for msgs, agp in SMOL_TEMPLATE_CASES:
            chat_cases.append({"messages": msgs, "add_generation_prompt": agp,
                               "rendered": render(msgs, agp)})

    out = {
        "model": args.name,
        "gguf_sha256": sha256_file(args.model),
        "llama_cpp_python_version": llama_cpp.__version__,
        "llama_cpp_commit": args.llama_cpp_commit,
        "generated_by": "scripts/reference/gen_fixtures.py (llama-cpp-python, greedy argmax over raw logits, n_threads=2)",
        "tokenize": tokenize,
        "greedy": greedy_cases,
        "chat_template": chat_cases,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"{args.name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    mpath = os.path.join(args.out_dir, f"{args.name}.margins.json")
    with open(mpath, "w", encoding="utf-8") as f:
        json.dump({"model": args.name, "eog_ids": sorted(eog_ids), "greedy": margin_cases},
                  f, indent=1)
        f.write("\n")
    print(f"wrote {path} and {mpath}", file=sys.stderr)


if __name__ == "__main__":
    main()
