#!/usr/bin/env python3
"""How well llama.cpp agrees with its own greedy fixtures (issue 2).

Outside CI: needs llama-cpp-python (see bench/llama_cpp_bench.py and
shared/fixtures/README.md for how to get it on this machine).

    V/bin/python scripts/llama_cpp_self_agreement.py [MODEL.gguf] [FIXTURES.json]

The fixtures' greedy ids come from llama.cpp b4748's server, decoding one
token per step. For every prompt this prints how many leading ids llama.cpp
reproduces here in two ways:

- decode path: greedy generation one token per step, as the fixtures were made;
- batch path: the prompt and the fixture's ids evaluated in one batch, taking
  the argmax at every position (what a prefill computes).

Where a path diverges it also prints the fixture's top-2 log-prob gap there:
the size of the near-ties at which llama.cpp's own code paths (and builds)
disagree. Cardinal's divergences (server/tests/smollm2_fixtures.rs) are
judged against that yardstick in ARCHITECTURE.md.
"""

import json
import os
import sys

import numpy as np
from llama_cpp import Llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser(
    "~/.cache/cardinal/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
FIXTURES = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
    ROOT, "models/tests/fixtures/smollm2/smollm2_public.json")


def leading_equal(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main():
    fx = json.load(open(FIXTURES))
    llm = Llama(model_path=MODEL, n_threads=2, n_ctx=2048, logits_all=True, verbose=False)
    full_decode = full_batch = 0
    for e in fx:
        prompt, want = e["templated_ids"], e["greedy_ids"]
        # Decode path.
        got = []
        for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            got.append(tok)
            if tok == 2 or len(got) >= len(want):
                break
        dec = leading_equal(got, want)
        full_decode += dec == len(want)
        # Batch path: one evaluation of prompt + fixture ids.
        llm.reset()
        llm.eval(prompt + want)
        logits = np.array(llm.scores[len(prompt) - 1:len(prompt) - 1 + len(want)])
        argmax = list(logits.argmax(1))
        bat = leading_equal(argmax, want)
        full_batch += bat == len(want)
        def gap(i):
            if i >= len(want) or len(e["greedy_top2"]) != len(want):
                return ""
            return f" (fixture's top-2 gap there {e['greedy_top2'][i]['logprob_gap_top1_top2']:.4f})"
        print(f"{e['name']:15s} decode {dec}/{len(want)}{gap(dec)}  batch {bat}/{len(want)}{gap(bat)}")
    print(f"full matches: decode path {full_decode}/{len(fx)}, batch path {full_batch}/{len(fx)}")


if __name__ == "__main__":
    main()
