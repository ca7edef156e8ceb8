"""The official `openai` and `anthropic` Python SDKs, unchanged, against a running gateway.

Usage: python sdk_check.py BASE_URL API_KEY MODEL
Prints one line per check and a closing 'N passed, N failed' line; exits 1 on any failure.
Greedy (temperature 0) or seeded settings make the assertions exact.
"""

import json
import sys
import traceback

import anthropic
import openai

BASE, KEY, MODEL = sys.argv[1], sys.argv[2], sys.argv[3]
oa = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0, timeout=120)
an = anthropic.Anthropic(base_url=BASE, api_key=KEY, max_retries=0, timeout=120)

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


PROMPT = [{"role": "user", "content": "Name three colors of the rainbow."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}
# SmolLM2-135M is too small to decide on tool use by itself; with the call forced by tool_choice
# (the gateway then starts the answer with the opening of a call) and this wording, greedy decoding
# fills in the arguments, which exercises rendering, generation and parsing for real.
TOOL_PROMPT = [{"role": "user", "content": 'Get the weather for the city of Paris. Use {"city": "Paris"}.'}]


@check
def models_list():
    models = oa.models.list().data
    ids = [m.id for m in models]
    assert MODEL in ids, ids
    m = next(m for m in models if m.id == MODEL)
    assert m.model_extra["available"] is True, m
    assert oa.models.retrieve(MODEL).id == MODEL


@check
def chat_nonstream_equals_stream():
    r = oa.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert text and len(text) > 5, text
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 5, r.usage
    pieces, usage, finish = [], None, None
    stream = oa.chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert "".join(pieces) == text, ("".join(pieces), text)
    assert len(pieces) > 3, pieces  # really streamed, token by token
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage
    assert finish == r.choices[0].finish_reason, (finish, r.choices[0].finish_reason)
    print(f"   chat text: {text!r}")


@check
def seeded_sampling_is_reproducible():
    kw = dict(model=MODEL, messages=PROMPT, max_tokens=20, temperature=0.9, top_p=0.95)
    a = oa.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = oa.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert a == b, (a, b)
    texts = {oa.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (1, 2, 3, 4)}
    assert len(texts) > 1, texts  # the seed really changes the draw


@check
def stop_sequences_and_max_tokens():
    full = oa.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    words = text.split()
    stop = words[len(words) // 2]
    r = oa.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop", r
    assert r.choices[0].message.content == text[: text.index(stop)], (r.choices[0].message.content, stop)
    r = oa.chat.completions.create(model=MODEL, messages=PROMPT, max_completion_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3, r


@check
def chat_logprobs():
    r = oa.chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens, (len(lp), r.usage)
    for t in lp:
        assert len(t.top_logprobs) == 3
        assert t.logprob <= 0.0
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6, t
    assert "".join(t.token for t in lp).strip() == r.choices[0].message.content.strip()


@check
def tools_round_trip():
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = oa.chat.completions.create(
        model=MODEL, messages=TOOL_PROMPT, tools=[WEATHER], tool_choice=choice, max_tokens=40, temperature=0
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather", call
    args = json.loads(call.function.arguments)
    assert args == {"city": "Paris"}, args
    print(f"   tool call: {call.function.name}({call.function.arguments})")
    # The same call, streamed.
    deltas = []
    for chunk in oa.chat.completions.create(
        model=MODEL, messages=TOOL_PROMPT, tools=[WEATHER], tool_choice=choice, max_tokens=40, temperature=0, stream=True
    ):
        for ch in chunk.choices:
            deltas.extend(ch.delta.tool_calls or [])
            if ch.finish_reason:
                assert ch.finish_reason == "tool_calls", ch
    assert [d.function.name for d in deltas] == ["get_weather"], deltas
    assert json.loads(deltas[0].function.arguments) == args
    # Send the result back: the SDK's own message object goes into the history unchanged.
    messages = TOOL_PROMPT + [c.message, {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    r2 = oa.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=30, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls"), r2
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens, (r2.usage, r.usage)
    print(f"   after the tool result: {r2.choices[0].message.content!r} ({r2.choices[0].finish_reason})")


@check
def tool_call_on_auto_from_the_models_own_text():
    # tool_choice "auto": nothing is forced; the model itself writes the call (asked to repeat
    # it), and the gateway must recognise it: held back while streaming, parsed into tool_calls.
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    msgs = [{"role": "user", "content": "Repeat exactly:\n" + call}]
    r = oa.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=40, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None, c
    assert c.message.tool_calls[0].function.name == "get_weather", c
    assert json.loads(c.message.tool_calls[0].function.arguments) == {"city": "Paris"}, c
    content, calls = [], []
    for chunk in oa.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=40, temperature=0, stream=True):
        for ch in chunk.choices:
            content.append(ch.delta.content or "")
            calls.extend(ch.delta.tool_calls or [])
    assert "".join(content) == "", content  # the call's text never leaks as content
    assert len(calls) == 1 and json.loads(calls[0].function.arguments) == {"city": "Paris"}, calls
    # tool_choice "none": the same prompt (tools still rendered), but nothing is parsed, so the
    # model's text comes back as plain content.
    plain = oa.chat.completions.create(
        model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="none", max_tokens=40, temperature=0
    ).choices[0]
    assert plain.message.tool_calls is None and plain.message.content.startswith(call), plain


@check
def completions_endpoint():
    kw = dict(model=MODEL, prompt="def fibonacci(n):", max_tokens=16, temperature=0)
    r = oa.completions.create(**kw)
    text = r.choices[0].text
    assert text and r.object == "text_completion", r
    streamed = "".join(c.choices[0].text for c in oa.completions.create(stream=True, **kw) if c.choices)
    assert streamed == text, (streamed, text)
    e = oa.completions.create(echo=True, logprobs=2, **kw)
    assert e.choices[0].text == kw["prompt"] + text
    assert len(e.choices[0].logprobs.tokens) == e.usage.completion_tokens
    assert all(len(t) == 2 for t in e.choices[0].logprobs.top_logprobs)


@check
def openai_errors():
    bad = openai.OpenAI(base_url=BASE + "/v1", api_key="sk-wrong", max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401 and e.body["type"] == "authentication_error", e.body
    try:
        oa.chat.completions.create(model="no-such-model", messages=PROMPT, max_tokens=2)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404, e
    try:
        oa.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=2, extra_body={"bogus_field": 1})
        raise AssertionError("an unknown field was accepted")
    except openai.BadRequestError as e:
        assert "bogus_field" in e.message, e.message


@check
def anthropic_messages():
    # Greedy: newer SDKs no longer expose `temperature`, so it goes in the body as an extra field.
    kw = dict(model=MODEL, max_tokens=24, extra_body={"temperature": 0}, system="You are a concise assistant.",
              messages=[{"role": "user", "content": "Name three colors of the rainbow."}])
    m = an.messages.create(**kw)
    assert m.type == "message" and m.role == "assistant" and m.content[0].type == "text", m
    text = m.content[0].text
    assert text, m
    assert m.stop_reason in ("end_turn", "max_tokens") and m.usage.output_tokens > 0 and m.usage.input_tokens > 5, m
    with an.messages.stream(**kw) as s:
        pieces = [t for t in s.text_stream]
        final = s.get_final_message()
    assert "".join(pieces) == text, ("".join(pieces), text)
    assert len(pieces) > 3
    assert final.usage.output_tokens == m.usage.output_tokens and final.stop_reason == m.stop_reason, final
    assert final.usage.input_tokens == m.usage.input_tokens, (final.usage, m.usage)
    # Stop sequences.
    stop = text.split()[len(text.split()) // 2]
    s = an.messages.create(stop_sequences=[stop], **kw)
    assert s.stop_reason == "stop_sequence" and s.stop_sequence == stop, s
    assert s.content[0].text == text[: text.index(stop)], s
    print(f"   messages text: {text!r}")


@check
def anthropic_tools():
    tools = [{"name": "get_weather", "description": "Get the current weather in a city",
              "input_schema": WEATHER["function"]["parameters"]}]
    kw = dict(model=MODEL, max_tokens=40, extra_body={"temperature": 0}, tools=tools, tool_choice={"type": "tool", "name": "get_weather"},
              messages=[{"role": "user", "content": TOOL_PROMPT[0]["content"]}])
    m = an.messages.create(**kw)
    assert m.stop_reason == "tool_use", m
    use = [b for b in m.content if b.type == "tool_use"]
    assert len(use) == 1 and use[0].name == "get_weather" and use[0].input == {"city": "Paris"}, m.content
    with an.messages.stream(**kw) as s:
        final = s.get_final_message()
    su = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and su[0].name == "get_weather" and su[0].input == use[0].input, final
    # The result goes back as a tool_result block.
    follow = an.messages.create(
        model=MODEL, max_tokens=20, extra_body={"temperature": 0}, tools=tools,
        messages=[kw["messages"][0], {"role": "assistant", "content": m.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use[0].id, "content": "18 degrees"}]}],
    )
    assert follow.usage.input_tokens > m.usage.input_tokens, follow
    try:
        anthropic.Anthropic(base_url=BASE, api_key="sk-wrong", max_retries=0).messages.create(**kw)
        raise AssertionError("a wrong key was accepted")
    except anthropic.AuthenticationError as e:
        assert e.status_code == 401


@check
def hundred_concurrent_streams():
    import asyncio
    import urllib.request

    async def main():
        client = openai.AsyncOpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0, timeout=300)

        async def one(i):
            pieces, usage = [], None
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=4,
                temperature=0, stream=True, stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if chunk.usage:
                    usage = chunk.usage
                pieces.extend(c.delta.content or "" for c in chunk.choices)
            return "".join(pieces), usage

        results = await asyncio.gather(*(one(i) for i in range(100)))
        await client.close()
        return results

    results = asyncio.run(main())
    assert len(results) == 100
    assert all(u is not None and u.completion_tokens == 4 for _, u in results), results
    assert all(t for t, _ in results), results
    with urllib.request.urlopen(BASE + "/v1/swarm") as r:
        state = json.load(r)
    assert state["active_sessions"] == 0, state


passed = failed = 0
for fn in CHECKS:
    try:
        fn()
        passed += 1
        print(f"PASS {fn.__name__}", flush=True)
    except Exception:  # noqa: BLE001 - report every failure and go on
        failed += 1
        print(f"FAIL {fn.__name__}", flush=True)
        traceback.print_exc(file=sys.stdout)
print(f"sdk: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
