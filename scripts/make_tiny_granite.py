#!/usr/bin/env python3
"""Generate the tiny random Granite test fixture in models/tests/fixtures/tiny-granite/.

What it makes (all deterministic, torch.manual_seed(0)):
  tokenizer.json         byte-level BPE (~512 vocab) trained on built-in English text with the
                         `tokenizers` library; special tokens <|end_of_text|> (id 0),
                         <|start_of_role|>, <|end_of_role|>, <|tool_call|>.
  tokenizer_config.json  bos/eos = <|end_of_text|> and a Granite-style chat_template.
  config.json            GraniteConfig: hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads,
                         tied embeddings and non-default Granite multipliers.
  model.safetensors      random weights, stored in bfloat16.
  logits.json            reference outputs from `transformers`: the bf16 checkpoint reloaded in
                         float32 (exact float32 math on bf16-rounded weights), eager attention.

No model hub is contacted: everything is built from scratch.

How to run (needs torch, transformers, safetensors, tokenizers; e.g. in a throwaway venv):
    python3 -m venv /tmp/granite-venv
    /tmp/granite-venv/bin/pip install torch transformers safetensors tokenizers
    /tmp/granite-venv/bin/python scripts/make_tiny_granite.py [--out DIR]

The default output directory is models/tests/fixtures/tiny-granite relative to the repo root.
"""

import argparse
import json
import os
import sys

import torch
import tokenizers
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GraniteConfig, GraniteForCausalLM, PreTrainedTokenizerFast

SEED = 0
VOCAB_TARGET = 512
SPECIAL_TOKENS = ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)
# "The cat ..." (capital T): with lowercase "the cat sat on the mat" the first greedy step
# has a top-1 margin of only 0.005, too close for a cross-implementation argmax check.
PROMPTS = ["hello world", "The cat sat on the mat", "granite is a rock", "1 2 3 4 5"]
GREEDY_STEPS = 16
# Every top-1 margin recorded (prompt positions and greedy steps) must be at least this,
# so an independent float32 implementation reproduces all argmaxes. Checked, not tuned per run.
MIN_MARGIN = 0.02

# Random-init scales. The HF default (initializer_range=0.02) gives near-uniform logits on a
# 64-wide model (especially after logits_scaling=8), and with tied embeddings a large
# embedding std makes greedy decoding just repeat the last token. These values were picked
# so that: attention is not flat despite attention_multiplier=1/128 (large q/k), the
# attention and MLP branches move the residual stream as much as the embedding does (greedy
# output is varied, so attention/MLP/RoPE bugs change it), and the final norm weight is
# large enough that every top-1 margin (greedy steps and prompt positions) is far above
# float32 accumulation-order noise.
EMBED_STD = 0.3
QK_STD = 0.7  # q_proj, k_proj
PROJ_STD = 0.6  # v_proj, o_proj, gate_proj, up_proj, down_proj
NORM_JITTER = 0.2  # RMSNorm weights = 1 + N(0, 0.2), so a loader that ignores them fails
FINAL_NORM_SCALE = 30.0  # model.norm.weight = 30 * (1 + N(0, 0.2)); scales logits linearly

TRAIN_TEXT = """
The quick brown fox jumps over the lazy dog. Hello world, this is a tiny model.
The cat sat on the mat and looked at the dog. The dog sat on the rug near the door.
Granite is a rock that forms from slowly cooling magma deep under the ground.
It is hard, it is grey or pink, and people use it for kitchen counters and buildings.
One, two, three, four, five. 1 2 3 4 5 6 7 8 9 10. 11 12 13 14 15 16 17 18 19 20.
A language model reads text as tokens and predicts the next token, one at a time.
The server answers requests, streams tokens back, and keeps a cache of keys and values.
What is the weather like today? It is sunny in the morning and rainy in the evening.
Please write a short story about a robot who learns to paint pictures of the sea.
The robot painted the sea, the sky, the sand, and the small boats on the water.
She said hello to her friend, and her friend said hello back with a smile.
We need to test the tokenizer, the model, the sampler and the chat template together.
user: how are you? assistant: I am fine, thank you. system: you are a helpful assistant.
Numbers like 42, 100, 2024 and 3.14 appear in text; so do words like hello and world.
In the beginning there was nothing, and then there was a small model with random weights.
Rocks, stones, granite, marble, sand and clay are all found in the earth under our feet.
The mat was red, the cat was black, and the hat on the cat was a tall green hat.
""".strip()


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,  # ids 0..3, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes reachable
        show_progress=False,
    )
    # Repeat the lines so merge counts are well above ties-at-1 and training is stable.
    lines = TRAIN_TEXT.splitlines() * 3
    tok.train_from_iterator(lines, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def init_weights(model: GraniteForCausalLM) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.normal_(0.0, EMBED_STD)
            elif name == "model.norm.weight":
                p.copy_(FINAL_NORM_SCALE * (1.0 + NORM_JITTER * torch.randn_like(p)))
            elif "norm" in name:
                p.copy_(1.0 + NORM_JITTER * torch.randn_like(p))
            elif "q_proj" in name or "k_proj" in name:
                p.normal_(0.0, QK_STD)
            elif p.dim() == 2:
                p.normal_(0.0, PROJ_STD)
            else:
                raise ValueError(f"unexpected parameter {name}")
    # Tied: lm_head shares the embedding tensor.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@torch.no_grad()
def forward_logits(model, ids):
    return model(torch.tensor([ids], dtype=torch.long), use_cache=False).logits[0]


@torch.no_grad()
def greedy(model, ids, steps):
    """Manual argmax loop, full recompute each step (no KV cache), no EOS stopping."""
    ids = list(ids)
    out, margins = [], []
    for _ in range(steps):
        last = forward_logits(model, ids)[-1]
        top2 = torch.topk(last, 2)
        margins.append(float(top2.values[0] - top2.values[1]))
        nxt = int(top2.indices[0])
        out.append(nxt)
        ids.append(nxt)
    return out, margins


def main() -> int:
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(repo_root, "models", "tests", "fixtures", "tiny-granite"))
    args = ap.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)

    torch.manual_seed(SEED)

    # ---- tokenizer -------------------------------------------------------------------------
    tok = build_tokenizer()
    tok.save(os.path.join(out, "tokenizer.json"))
    vocab_size = tok.get_vocab_size()
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|end_of_text|>",
        "eos_token": "<|end_of_text|>",
        "unk_token": None,
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
        f.write("\n")

    # ---- model -----------------------------------------------------------------------------
    config = GraniteConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        embedding_multiplier=12.0,
        attention_multiplier=0.0078125,  # NOT 1/sqrt(head_dim) = 0.25
        residual_multiplier=0.22,
        logits_scaling=8.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
        attention_bias=False,
        mlp_bias=False,
        dtype="float32",
    )
    model = GraniteForCausalLM(config).eval()
    init_weights(model)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)
    # Drop generation_config.json (not part of the fixture; greedy params are in logits.json).
    gen_cfg = os.path.join(out, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)

    # transformers>=5 writes RoPE as {"rope_parameters": {"rope_theta", "rope_type"}} and
    # "dtype"; checkpoints written by transformers 4.x (all published Granite 3.x) use a
    # top-level "rope_theta" and "torch_dtype". Write both spellings so a loader that knows
    # either one reads this config; transformers itself loads it identically (checked below).
    cfg_path = os.path.join(out, "config.json")
    with open(cfg_path) as f:
        cfg_json = json.load(f)
    cfg_json["rope_theta"] = cfg_json["rope_parameters"]["rope_theta"]
    cfg_json["torch_dtype"] = cfg_json.get("dtype", "bfloat16")
    with open(cfg_path, "w") as f:
        json.dump(cfg_json, f, indent=2, sort_keys=True)
        f.write("\n")

    # ---- reference: reload bf16 checkpoint in float32 -------------------------------------
    ref = GraniteForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert ref.config.rope_parameters["rope_theta"] == 10000.0
    assert ref.config.attention_multiplier == 0.0078125
    # Weights must be exactly the bf16-rounded values.
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a.float(), b), n

    saved_tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    hf_tok = PreTrainedTokenizerFast.from_pretrained(out)

    results = []
    for prompt in PROMPTS:
        ids = saved_tok.encode(prompt, add_special_tokens=False).ids
        assert hf_tok(prompt, add_special_tokens=False)["input_ids"] == ids
        assert saved_tok.decode(ids) == prompt
        logits = forward_logits(ref, ids)
        last = logits[-1]
        greedy_ids, margins = greedy(ref, ids, GREEDY_STEPS)
        # Cross-check with transformers' own generate() (KV cache path).
        gen = ref.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=GREEDY_STEPS,
            min_new_tokens=GREEDY_STEPS,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(ids):].tolist()
        assert gen == greedy_ids, (prompt, gen, greedy_ids)
        top2 = torch.topk(logits, 2, dim=-1).values
        results.append(
            {
                "prompt": prompt,
                "ids": ids,
                "last_logits": [round(float(x), 5) for x in last],
                "all_argmax": logits.argmax(-1).tolist(),
                "all_top1_margin_min": round(float((top2[:, 0] - top2[:, 1]).min()), 5),
                "greedy_ids": greedy_ids,
                "greedy_text": saved_tok.decode(greedy_ids),
                "greedy_top1_margins": [round(x, 5) for x in margins],
            }
        )
        assert min(margins) >= MIN_MARGIN and float((top2[:, 0] - top2[:, 1]).min()) >= MIN_MARGIN, prompt
        print(f"{prompt!r}: ids={ids} greedy={greedy_ids} margin_min={min(margins):.4f} "
              f"logit_std={float(last.std()):.3f}")

    # Chat template reference (rendered by transformers' jinja, then tokenized).
    messages = [{"role": "system", "content": "You are a rock."}, {"role": "user", "content": "hello world"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_ids = saved_tok.encode(rendered, add_special_tokens=False).ids

    # Sensitivity: how much the last logits move if a multiplier is implemented wrongly.
    # (Documents that the fixture actually discriminates each multiplier.)
    sens = {}
    base = forward_logits(ref, results[1]["ids"])[-1]
    for attr, wrong in [("embedding_multiplier", 1.0), ("attention_multiplier", 0.25),
                        ("residual_multiplier", 1.0), ("logits_scaling", 1.0)]:
        alt_cfg = GraniteConfig.from_pretrained(out)
        setattr(alt_cfg, attr, wrong)
        alt_cfg._attn_implementation = "eager"
        alt = GraniteForCausalLM(alt_cfg).eval()
        alt.load_state_dict(ref.state_dict())
        sens[f"{attr}={wrong}"] = round(float((forward_logits(alt, results[1]["ids"])[-1] - base).abs().max()), 4)
    # RoPE layout: applying the HF->GGUF q/k row permutation but keeping HF's rotate_half
    # (i.e. permuting without switching to interleaved RoPE, or vice versa) must also show.
    def gguf_permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    for k in sd:
        if k.endswith("q_proj.weight"):
            sd[k] = gguf_permute(sd[k], config.num_attention_heads)
        elif k.endswith("k_proj.weight"):
            sd[k] = gguf_permute(sd[k], config.num_key_value_heads)
    alt = GraniteForCausalLM(ref.config).eval()
    alt.load_state_dict(sd)
    sens["rope_layout_mismatch"] = round(float((forward_logits(alt, results[1]["ids"])[-1] - base).abs().max()), 4)
    print("max |dlogit| if a multiplier / RoPE layout is wrong:", sens)

    doc = {
        "description": (
            "Reference outputs of transformers' GraniteForCausalLM for the bf16 checkpoint in this "
            "directory, reloaded in float32 (eager attention, CPU). Prompts tokenized with tokenizer.json, "
            "no special tokens added. last_logits: full-vocab logits at the last prompt position "
            "(after division by logits_scaling), rounded to 5 decimals. all_argmax: argmax at every prompt "
            "position; *_margin* fields: top-1 minus top-2 logit. greedy_ids: 16 tokens from a manual "
            "argmax loop (full recompute each step, EOS ignored); verified equal to model.generate(do_sample=False, max_new_tokens=16, min_new_tokens=16, "
            "eos_token_id=None)."
        ),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "python": sys.version.split()[0],
        },
        "seed": SEED,
        "vocab_size": vocab_size,
        "greedy_steps": GREEDY_STEPS,
        "greedy_method": "manual argmax loop, no KV cache, EOS ignored (matches model.generate)",
        "prompts": results,
        "chat_example": {
            "messages": messages,
            "add_generation_prompt": True,
            "rendered": rendered,
            "ids": chat_ids,
        },
        "multiplier_sensitivity_max_abs_dlogit": sens,
    }
    with open(os.path.join(out, "logits.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")

    for name in sorted(os.listdir(out)):
        print(f"{os.path.getsize(os.path.join(out, name)):>9}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
