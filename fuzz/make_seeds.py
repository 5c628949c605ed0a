#!/usr/bin/env python3
"""Writes PEFT seeds for fuzz_formats: adapter_config.json, a NUL byte, then
adapter_model.safetensors, for a tiny layer (E 4, H 16, I 8, r 2) in both layouts."""
import json
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")
E, H, I, R = 4, 16, 8, 2


def safetensors(tensors):
    header, data = {}, b""
    for name, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        # bf16 values 0.0625 * (i % 7 - 3): small, non-zero, exact
        blob = b"".join(struct.pack("<f", 0.0625 * (i % 7 - 3))[2:] for i in range(n))
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def config(**kw):
    c = {"peft_type": "LORA", "r": R, "lora_alpha": 4, "use_rslora": False, "use_dora": False,
         "bias": "none", "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None}
    c.update(kw)
    return json.dumps(c).encode()


per = []
for e in range(E):
    for p, (i, o) in {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}.items():
        m = f"base_model.model.model.layers.0.mlp.experts.{e}.{p}"
        per += [(m + ".lora_A.weight", [R, i]), (m + ".lora_B.weight", [o, R])]
fused = [("base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight", [E * R, H]),
         ("base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight", [2 * I, E * R]),
         ("base_model.model.model.layers.0.mlp.experts.lora_A.weight", [E * R, I]),
         ("base_model.model.model.layers.0.mlp.experts.lora_B.weight", [H, E * R])]
seeds = {
    "peft_per_expert": config(target_modules=["gate_proj", "up_proj", "down_proj"],
                              rank_pattern={"experts.1.down_proj": 2}) + b"\0" + safetensors(per),
    "peft_fused": config(target_modules=None,
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    + b"\0" + safetensors(fused),
    # pattern keys: a counted repetition that must be refused before regcomp expands it
    # (a fuzzer once grew one that took over 2 GB to compile), and one that must work
    "peft_pattern_blowup": config(target_modules=["gate_proj", "up_proj", "down_proj"],
                                  rank_pattern={"((a{255}){255}){255}": 2},
                                  alpha_pattern={r"experts\.[0-9]{1,3}\.down_proj": 4})
    + b"\0" + safetensors(per),
    # and one whose + signs each double glibc's tree (the fuzzer's next find)
    "peft_pattern_plus": config(target_modules=["gate_proj", "up_proj", "down_proj"],
                                rank_pattern={"experts.0.down_p" + "+" * 100 + "roj": 2})
    + b"\0" + safetensors(per),
}
os.makedirs(HERE, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)
