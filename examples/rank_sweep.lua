-- Question: what does the LoRA rank cost? Sweeps the rank of every adapter from 4 to 64
-- with all requests on adapters, and compares each with the same batch without any
-- adapter (the base MoE alone).
--
--   loramoe run examples/rank_sweep.lua [out=DIR] [backend=cpu|cuda] [rank=4,16,64]
--                                       [field=value ...]
--
-- CPU: the tiny preset, 2 layers, in seconds. GPU: qwen3-30b-a3b, 4 layers, M=4096.
-- Writes DIR/rank_sweep.{json,csv,svg} (DIR defaults to out/rank_sweep).

local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/../lua/?.lua;" .. here .. "/../lua/?/init.lua;" .. here ..
  "/../build/lua/?.lua;" .. package.path
package.cpath = package.cpath .. ";" .. here .. "/../build/lua/?.so"

local exp = require "loramoe.experiment"
local report = require "loramoe.report"
local svg = require "loramoe.svg"

local base, out, swept = exp.setup(arg, {
  cuda = { preset = "qwen3-30b-a3b", layers = 4, tokens = 4096, requests = 16, reps = 20, warmup = 3 },
  cpu = { preset = "tiny", layers = 2, tokens = 256, requests = 16, reps = 5, warmup = 1 },
  out = "out/rank_sweep",
  sweep = { "rank" },
})
local ranks = swept.rank or { 4, 8, 16, 32, 64 }

-- One sweep, so the layers are built once: the first point is the baseline.
local rows = exp.sweep(base, { { "adapter_fraction", { 0, 1 } }, { "rank", ranks } })
local none = rows[1]
local with = {}
for i = #ranks + 1, #rows do
  local r = rows[i]
  r.lora_overhead_pct = 100 * (r.time_ms - none.time_ms) / none.time_ms
  r.lora_flop_pct = 100 * r.lora_gflop / r.gflop
  with[#with + 1] = r
end
print(string.format("without adapters: %.3f ms per forward", none.time_ms))
io.write(report.markdown(with, {
  { "rank", "rank" }, { "time_ms", "ms/forward", "%.3f" }, { "tokens_per_s", "tokens/s", "%.0f" },
  { "lora_overhead_pct", "vs no adapter", "%+.1f%%" }, { "lora_flop_pct", "LoRA share of FLOPs", "%.1f%%" },
  { none.floor_ms and "pct_floor" or "gflops", none.floor_ms and "% of floor" or "GFLOP/s", "%.1f" },
}))
exp.save(out, "rank_sweep", rows)
local s = { name = "all requests on adapters", x = {}, y = {} }
local b = { name = "no adapter", x = {}, y = {}, dash = "6,3" }
for i, r in ipairs(with) do
  s.x[i], s.y[i] = r.rank, r.time_ms
  b.x[i], b.y[i] = r.rank, none.time_ms
end
svg.write(out .. "/rank_sweep.svg", svg.line {
  title = string.format("Time per forward vs LoRA rank (%s, %s)", none.preset, none.backend),
  xlabel = "LoRA rank", ylabel = "time per forward (ms)", logx = 2, series = { s, b },
  note = string.format("%d layers, M=%d, %d requests on %d adapters (gate, up, down), %s",
    none.layers, none.tokens, none.requests, none.adapters, none.device) })
print("wrote " .. out .. "/rank_sweep.{json,csv,svg}")
