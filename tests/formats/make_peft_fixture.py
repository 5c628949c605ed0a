#!/usr/bin/env python3
"""Makes the real-PEFT fixture that tests/formats/test_fixture.c consumes.

For each model family (Qwen3-MoE, Mixtral) it builds a tiny model with transformers
(hidden 64, 4 experts, intermediate 32, 2 layers, every layer MoE), saves it as a base
checkpoint, applies LoRA to the experts with peft in every layout the installed
transformers supports:
  - per_expert: target_modules on each expert's projections (experts as a ModuleList),
    with a rank_pattern and an alpha_pattern so the real PEFT semantics are exercised;
  - fused: target_parameters on experts.gate_up_proj / experts.down_proj (experts as
    3-D parameters), with rsLoRA;
and writes the expected output of one MoE layer (layer 1) for fixed inputs, computed
by the real modules in float64: expected.safetensors holds x, the router logits,
top-k, out_base and out_<layout> for each adapter written.

All weights and inputs are rounded to bf16 values first, so the library (which stores
bf16) sees exactly the numbers the float64 computation used.

Usage: python3 tests/formats/make_peft_fixture.py [OUT_DIR]   (default: fixtures/ next
to this script). Needs torch, transformers, peft, safetensors; CPU is enough.
"""
import copy
import json
import os
import sys

import torch
import transformers
import peft
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

LAYER = 1   # the layer the test loads
M = 16      # tokens
HIDDEN, EXPERTS, INTER, TOPK = 64, 4, 32, 2


def bf16_(t):
    with torch.no_grad():
        t.copy_(t.to(torch.bfloat16).to(t.dtype))


def uniform_bf16_(t, scale):
    with torch.no_grad():
        t.uniform_(-scale, scale)
    bf16_(t)


def make_config(family):
    common = dict(vocab_size=32, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                  tie_word_embeddings=False, num_experts_per_tok=TOPK)
    if family == "qwen":
        return transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=INTER,
                                           num_experts=EXPERTS, norm_topk_prob=True,
                                           decoder_sparse_step=1, mlp_only_layers=[], **common)
    return transformers.MixtralConfig(intermediate_size=INTER, num_local_experts=EXPERTS, **common)


def moe_block(model, layer):
    dec = model.model.layers[layer]
    return getattr(dec, "block_sparse_moe", None) or dec.mlp


def experts_layout(model):
    experts = moe_block(model, 0).experts
    if isinstance(experts, torch.nn.ModuleList):
        return "per_expert"
    if hasattr(experts, "gate_up_proj"):
        return "fused"
    raise SystemExit(f"unknown experts layout: {type(experts).__name__}")


def router_weight(block):
    gate = block.gate
    return gate.weight if hasattr(gate, "weight") else gate.linear.weight


def run_block(block, x):
    out = block(x.unsqueeze(0))
    if isinstance(out, tuple):
        out = out[0]
    return out.reshape(x.shape).detach().clone()


def routing(block, x, renormalize=True):
    logits = x @ router_weight(block).detach().to(torch.float64).T
    probs = torch.softmax(logits, dim=-1)
    w, ids = torch.topk(probs, TOPK, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return logits, ids, w, probs


def lora_configs(family, layout, block_name):
    names = {"qwen": ["gate_proj", "up_proj", "down_proj"], "mixtral": ["w1", "w3", "w2"]}[family]
    if layout == "per_expert":
        return LoraConfig(r=4, lora_alpha=8, target_modules=names, init_lora_weights=False,
                          rank_pattern={f"experts.1.{names[2]}": 2},
                          alpha_pattern={names[1]: 16})
    return LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=[], init_lora_weights=False,
                      target_parameters=[f"{block_name}.experts.gate_up_proj", f"{block_name}.experts.down_proj"])


def make_family(family, out_dir):
    torch.manual_seed(1234 if family == "qwen" else 5678)
    cfg = make_config(family)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float32).eval()
    if hasattr(model, "set_experts_implementation"):
        # transformers 5: plain loops, which also run in float64 on the CPU
        model.set_experts_implementation("eager")
    # Weights of a useful size, exactly representable in bf16.
    for name, p in model.named_parameters():
        uniform_bf16_(p, 0.5 if name.endswith("gate.weight") or "router" in name else 0.1)
    layout = experts_layout(model)
    os.makedirs(out_dir, exist_ok=True)
    base = copy.deepcopy(model)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    model.to(torch.float32)

    # Inputs with a clear top-k margin, so float32 and float64 routing agree.
    block = moe_block(base, LAYER)
    rows = []
    g = torch.Generator().manual_seed(99)
    while len(rows) < M:
        x = (torch.rand(1, HIDDEN, generator=g, dtype=torch.float64) * 2 - 1)
        x = x.to(torch.bfloat16).to(torch.float64)
        _, _, _, probs = routing(block.double(), x)
        p = torch.sort(probs[0], descending=True).values
        if p[TOPK - 1] - p[TOPK] > 0.02:
            rows.append(x)
    x = torch.cat(rows)
    base.double()
    block = moe_block(base, LAYER)
    logits, ids, w, _ = routing(block, x)
    tensors = {"x": x.contiguous(), "router_logits": logits.contiguous(),
               "topk_ids": ids.to(torch.int32).contiguous(), "topk_weights": w.contiguous()}
    with torch.no_grad():
        tensors["out_base"] = run_block(block, x)

    made = []
    for lay in [layout]:
        m = copy.deepcopy(base).to(torch.float32)
        block_name = "block_sparse_moe" if hasattr(m.model.layers[0], "block_sparse_moe") else "mlp"
        pm = get_peft_model(m, lora_configs(family, lay, block_name))
        pm.eval()
        lora = [(n, p) for n, p in pm.named_parameters() if "lora_" in n]
        bad = [n for n, _ in lora if "experts" not in n]
        if bad:
            raise SystemExit(f"LoRA landed outside the experts: {bad[:3]}")
        for _, p in lora:
            uniform_bf16_(p, 0.2)
        adir = os.path.join(out_dir, lay)
        pm.save_pretrained(adir)
        pm.double()
        with torch.no_grad():
            out = run_block(moe_block(pm.base_model.model, LAYER), x)
        effect = ((out - tensors["out_base"]).norm() / tensors["out_base"].norm()).item()
        if effect < 0.05:
            raise SystemExit(f"{family} {lay}: the adapter changes the layer by {effect:.3g} only")
        tensors["out_" + lay] = out
        made.append((lay, effect))
    save_file(tensors, os.path.join(out_dir, "expected.safetensors"),
              metadata={"layer": str(LAYER), "family": family, "top_k": str(TOPK),
                        "renormalize": "1", "transformers": transformers.__version__,
                        "peft": peft.__version__, "torch": torch.__version__})
    # What the test does not need: keep the fixture small.
    for f in ("generation_config.json",):
        p = os.path.join(out_dir, f)
        if os.path.exists(p):
            os.remove(p)
    return made


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "fixtures")
    summary = {}
    for family in ("qwen", "mixtral"):
        summary[family] = make_family(family, os.path.join(out, family))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(json.dumps({"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                   "peft": peft.__version__},
                      "adapters": summary, "bytes": total}, indent=1))
    if total > 1 << 20:
        raise SystemExit(f"fixture is {total} bytes, over 1 MB")


if __name__ == "__main__":
    main()
