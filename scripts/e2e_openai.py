"""End-to-end check of `cardinal serve` with the official openai SDK.

Usage: python scripts/e2e_openai.py http://127.0.0.1:PORT/v1
Exercises chat (string and text-part content, streaming and not),
completions, include_usage, n=2, stop strings, a rejected request and the
prefix cache (a repeated long system prompt reports cached prompt tokens and
the same reply), and checks that the greedy API output equals `cardinal
generate` for the same prompt. Exits non-zero on the first failure.
"""
import json
import subprocess
import sys
import uuid

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base, api_key="unused")
model = client.models.list().data[0].id
print("model:", model)

msg = [{"role": "user", "content": "What is the capital of France?"}]
r = client.chat.completions.create(model=model, messages=msg, max_tokens=24, temperature=0)
text = r.choices[0].message.content
print("chat:", repr(text), r.usage)
# No content check: SmolLM2-135M's greedy answer here is not "Paris" (llama.cpp
# answers "L'Étoile, la Marseillaise, ..." with the same GGUF; its first token
# "L" beats "The" by 0.24 nats). Agreement with llama.cpp is tested by
# server/tests/smollm2_fixtures.rs; this script tests the API around it.
assert text.strip(), text
assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0

parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
r2 = client.chat.completions.create(model=model, messages=parts, max_tokens=24, temperature=0)
assert r2.choices[0].message.content == text, (r2.choices[0].message.content, text)
print("chat with text parts: same answer")

chunks = list(client.chat.completions.create(model=model, messages=msg, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}))
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert streamed == text, (streamed, text)
assert chunks[0].choices[0].delta.role == "assistant"
assert chunks[-1].usage is not None and not chunks[-1].choices
print("chat stream: same text,", len(chunks), "chunks, usage", chunks[-1].usage.completion_tokens)

c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
print("completion:", repr(c.choices[0].text))
assert c.choices[0].text

n2 = client.chat.completions.create(model=model, messages=msg, max_tokens=8, temperature=0.8, seed=1, n=2)
assert len(n2.choices) == 2 and {ch.index for ch in n2.choices} == {0, 1}
print("n=2:", [ch.message.content for ch in n2.choices])

# A stop string taken from the greedy answer itself: the stopped reply is the
# answer cut just before its first occurrence.
words = text.split()
assert len(words) >= 3, text
stop = words[2]
s = client.chat.completions.create(model=model, messages=msg, max_tokens=24, temperature=0, stop=[stop])
got = s.choices[0].message.content
assert s.choices[0].finish_reason == "stop", s
assert got == text[: text.index(stop)], (got, stop, text)
print("stop string", repr(stop) + ":", repr(got))

try:
    client.chat.completions.create(model=model, messages=msg, max_tokens=8, temperature=-1)
    raise SystemExit("temperature -1 was accepted")
except openai.BadRequestError as e:
    print("bad request rejected:", e.status_code, e.body.get("param") if isinstance(e.body, dict) else e.body)

# A long system prompt, twice: the second request reuses its cached KV blocks
# (usage.prompt_tokens_details.cached_tokens, as OpenAI reports it) and
# gives the same greedy reply.
# A fresh start per run, so a rerun against a warm server still starts cold.
system = f"Session {uuid.uuid4()}. " + "You are Cardinal's test assistant. Answer briefly and exactly. " * 20
long_msg = [{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}]
cold = client.chat.completions.create(model=model, messages=long_msg, max_tokens=12, temperature=0)
warm = client.chat.completions.create(model=model, messages=long_msg, max_tokens=12, temperature=0)
cached = warm.usage.prompt_tokens_details.cached_tokens
assert cold.usage.prompt_tokens_details.cached_tokens == 0, cold.usage
assert cached >= 128 and cached % 64 == 0 and cached < warm.usage.prompt_tokens, warm.usage
assert warm.choices[0].message.content == cold.choices[0].message.content, (warm, cold)
print("prefix cache:", cached, "of", warm.usage.prompt_tokens, "prompt tokens cached, same reply")

gen = subprocess.run(["./target/release/cardinal", "generate", "--prompt", "What is the capital of France?", "--chat", "--max-tokens", "24", "--json"], capture_output=True, text=True, check=True)
cli = json.loads(gen.stdout.strip().splitlines()[-1])["text"]
assert cli == text, (cli, text)
print("API greedy output equals `cardinal generate`")
print("openai SDK e2e: OK")
