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


def fp8_checkpoint():
    """An FP8 expert as HF publishes it: F8_E4M3 codes [I, H] (every code, NaN 0x7f
    included) and its float32 weight_scale_inv [1, 1]; then a scale of the wrong shape."""
    codes = bytes(i % 256 for i in range(I * H))
    scale = struct.pack("<f", 0.01)
    header = {
        "model.layers.0.mlp.experts.0.gate_proj.weight": {"dtype": "F8_E4M3", "shape": [I, H],
                                                          "data_offsets": [0, I * H]},
        "model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv": {"dtype": "F32", "shape": [1, 1],
                                                                    "data_offsets": [I * H, I * H + 4]},
        "model.layers.0.mlp.experts.0.down_proj.weight_scale_inv": {"dtype": "F32", "shape": [1, 2],
                                                                    "data_offsets": [I * H + 4, I * H + 12]},
    }
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + codes + scale + scale + scale


seeds["st_fp8_expert"] = fp8_checkpoint()
os.makedirs(HERE, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)
