-- Writes a small bf16 checkpoint (one Qwen MoE layer with a router) to arg[1], for the
-- `loramoe checkpoint quantize|info` tests (cli/CMakeLists.txt).
local lm = require "loramoe"
local ctx = assert(lm.context { backend = "cpu", threads = 1 })
local E, H, I = 2, 16, 8
local ts = {}
for e = 0, E - 1 do
  for _, nm in ipairs { "gate_proj", "up_proj", "down_proj" } do
    local data = {}
    for i = 1, H * I do data[i] = ((e * 31 + i * 7) % 23 - 11) / 32 end
    ts[#ts + 1] = { name = ("model.layers.0.mlp.experts.%d.%s.weight"):format(e, nm), dtype = "bf16",
                    shape = nm == "down_proj" and { H, I } or { I, H }, data = data }
  end
end
local router = {}
for i = 1, E * H do router[i] = i / 64 end
ts[#ts + 1] = { name = "model.layers.0.mlp.gate.weight", dtype = "f32", shape = { E, H }, data = router }
assert(ctx:write_safetensors(arg[1], ts))
print("checkpoint ok")
