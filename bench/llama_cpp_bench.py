"""Times llama.cpp (through llama-cpp-python) on the same GGUF as `cardinal bench`.

Usage: python bench/llama_cpp_bench.py MODEL.gguf THREADS PROMPT_TOKENS GEN_TOKENS
Prints one JSON line: prefill tokens/s on a PROMPT_TOKENS-token prompt
(one llm.eval of the whole prompt from an empty cache) and decode tokens/s
for GEN_TOKENS greedy tokens, one at a time. Prompt ids are drawn like
`cardinal bench` draws them (ids >= 100), so both engines do the same work.
"""
import json
import random
import sys
import time

from llama_cpp import Llama

model, threads, n_prompt, n_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=512, verbose=False)
rng = random.Random(0)
prompt = [rng.randrange(100, llm.n_vocab()) for _ in range(n_prompt)]

llm.reset()
t0 = time.perf_counter()
llm.eval(prompt)
prefill = n_prompt / (time.perf_counter() - t0)

llm.reset()
llm.eval(prompt[:16])
tok = prompt[15]
t0 = time.perf_counter()
for _ in range(n_gen):
    # One forward pass per token over a growing cache, as in decoding.
    llm.eval([tok])
decode = n_gen / (time.perf_counter() - t0)
print(json.dumps({"engine": "llama.cpp", "threads": threads, "prefill_tokens_per_second": prefill, "decode_tokens_per_second": decode}))
