-- Question: how does the time per forward grow as more of the batch uses an adapter?
-- Sweeps the share of requests with an adapter from 0 to 100% (the rest run the base
-- MoE only) and reports time, tokens/s and the LoRA overhead against 0%.
--
--   loramoe run examples/adapter_fraction.lua [out=DIR] [backend=cpu|cuda]
--                                             [adapter_fraction=0,0.5,1] [field=value ...]
--
-- CPU: the tiny preset, 2 layers, in seconds. GPU: qwen3-30b-a3b, 4 layers, M=4096.
-- Writes DIR/adapter_fraction.{json,csv,svg} (DIR defaults to out/adapter_fraction).

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
  out = "out/adapter_fraction",
  sweep = { "adapter_fraction" },
})
local fractions = swept.adapter_fraction or { 0, 0.125, 0.25, 0.5, 0.75, 1 }

local rows = exp.sweep(base, { { "adapter_fraction", fractions } })
local zero = rows[1]
for _, r in ipairs(rows) do
  r.percent_with_adapter = 100 * r.requests_with_adapter / r.requests
  r.overhead_pct = 100 * (r.time_ms - zero.time_ms) / zero.time_ms
end

io.write(report.markdown(rows, {
  { "percent_with_adapter", "% requests with adapter", "%.1f" },
  { "time_ms", "ms/forward", "%.3f" }, { "tokens_per_s", "tokens/s", "%.0f" },
  { "overhead_pct", "vs first row", "%+.1f%%" },
  { "lora_launches_per_forward", "LoRA launches/forward" },
  { rows[1].floor_ms and "pct_floor" or "gflops", rows[1].floor_ms and "% of floor" or "GFLOP/s", "%.1f" },
}))
exp.save(out, "adapter_fraction", rows)
local s = { name = "time per forward", x = {}, y = {} }
for i, r in ipairs(rows) do s.x[i], s.y[i] = r.percent_with_adapter, r.time_ms end
svg.write(out .. "/adapter_fraction.svg", svg.line {
  title = string.format("Time per forward vs share of requests with an adapter (%s, %s)", zero.preset, zero.backend),
  xlabel = "requests with an adapter (%)", ylabel = "time per forward (ms)", series = { s },
  note = string.format("%d layers, M=%d, %d requests, %d adapters of rank %s, %s", zero.layers,
    zero.tokens, zero.requests, zero.adapters, zero.ranks, zero.device) })
print("wrote " .. out .. "/adapter_fraction.{json,csv,svg}")
