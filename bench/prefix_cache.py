"""Prefix-cache effect on a running `cardinal serve`: time to first token of
a 1,100-token chat prompt sent cold and then again, and a 6-turn
conversation that re-sends its history each turn. Standard library only.

Usage: python3 bench/prefix_cache.py PORT
(start the server with `cardinal serve --port PORT`; add `--no-prefix-cache`
to see the cold figures every time).
"""
import json, urllib.request, time, sys
port=sys.argv[1]
model=json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models"))["data"][0]["id"]
def chat(msgs, mt=16):
    body=json.dumps({"model":model,"messages":msgs,"max_tokens":mt,"temperature":0}).encode()
    t=time.time()
    r=json.load(urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",body,{"Content-Type":"application/json"})))
    return r, time.time()-t
system = "You are a meticulous research assistant for a team that builds emulated dataflow accelerators. " * 60
for q in ["What is a card?", "What is a card?", "What is a link?", "Name a colour."]:
    r,dt=chat([{"role":"system","content":system},{"role":"user","content":q}])
    u=r["usage"]
    print(q, "prompt", u["prompt_tokens"], "cached", u["prompt_tokens_details"]["cached_tokens"], "ttft %.3f s"%u["cardinal"]["time_to_first_token_seconds"], "total %.3f"%dt)
# multi-turn: 6 turns, each re-sending the conversation
msgs=[{"role":"system","content":"You are a helpful assistant."}]
for turn in range(6):
    msgs.append({"role":"user","content":f"Tell me one fact about the number {turn+3}, in two sentences."})
    r,dt=chat(msgs, 64)
    u=r["usage"]
    msgs.append({"role":"assistant","content":r["choices"][0]["message"]["content"]})
    print("turn", turn, "prompt", u["prompt_tokens"], "cached", u["prompt_tokens_details"]["cached_tokens"], "ttft %.3f s"%u["cardinal"]["time_to_first_token_seconds"])
