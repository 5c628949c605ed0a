-- Question: how does the time per forward scale with the tokens in a batch, with and
-- without adapters, and how close does it come to the floor (on a known GPU)?
--
--   loramoe run examples/tokens_sweep.lua [out=DIR] [backend=cpu|cuda]
--                                         [tokens=128,1024] [field=value ...]
--
-- CPU: the tiny preset, 1 layer, M = 32..1024, in seconds. GPU: qwen3-30b-a3b, 1 layer,
-- M = 128..16384 (PERFORMANCE.md's reference shapes: 4 adapters of rank 16, 8 requests).
-- Writes DIR/tokens_sweep.{json,csv,svg} (DIR defaults to out/tokens_sweep).

local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/../lua/?.lua;" .. here .. "/../lua/?/init.lua;" .. here ..
  "/../build/lua/?.lua;" .. package.path
package.cpath = package.cpath .. ";" .. here .. "/../build/lua/?.so"

local exp = require "loramoe.experiment"
local report = require "loramoe.report"
local svg = require "loramoe.svg"

local base, out, swept = exp.setup(arg, {
  cuda = { preset = "qwen3-30b-a3b", layers = 1, requests = 8, reps = 50, warmup = 5,
           default_tokens = { 128, 512, 2048, 8192, 16384 } },
  cpu = { preset = "tiny", layers = 1, requests = 8, reps = 5, warmup = 1,
          default_tokens = { 32, 128, 512, 1024 } },
  out = "out/tokens_sweep",
  sweep = { "tokens" },
})
local tokens = swept.tokens or base.default_tokens
base.default_tokens = nil

local rows = exp.sweep(base, { { "adapter_fraction", { 0, 1 } }, { "tokens", tokens } })
for _, r in ipairs(rows) do r.case = r.adapter_fraction == 0 and "no adapter" or "all on adapters" end
local gpu = rows[1].floor_ms ~= nil
io.write(report.markdown(rows, {
  { "case", "batch" }, { "tokens", "M" }, { "time_ms", "ms/forward", "%.3f" },
  { "tokens_per_s", "tokens/s", "%.0f" },
  gpu and { "tflops", "TFLOP/s", "%.1f" } or { "gflops", "GFLOP/s", "%.2f" },
  gpu and { "floor_ms", "floor ms", "%.3f" } or nil,
  gpu and { "pct_floor", "% of floor", "%.1f" } or nil,
}))
exp.save(out, "tokens_sweep", rows)
local series = {}
for ci, case in ipairs({ "all on adapters", "no adapter" }) do
  local s = { name = case, x = {}, y = {}, color = svg.palette[ci] }
  local f = { name = case .. ", floor", x = {}, y = {}, color = svg.palette[ci], dash = "2,3" }
  for _, r in ipairs(rows) do
    if r.case == case then
      s.x[#s.x + 1], s.y[#s.y + 1] = r.tokens, r.time_ms
      if gpu then f.x[#f.x + 1], f.y[#f.y + 1] = r.tokens, r.floor_ms end
    end
  end
  series[#series + 1] = s
  if gpu then series[#series + 1] = f end
end
svg.write(out .. "/tokens_sweep.svg", svg.line {
  title = string.format("Time per forward vs tokens (%s, %s)", rows[1].preset, rows[1].backend),
  xlabel = "tokens per batch (M)", ylabel = "time per forward (ms)", logx = 2, logy = true,
  series = series, legend_width = 200,
  note = string.format("%d layer(s), %d requests, %d adapters of rank %s, %s", rows[1].layers,
    rows[1].requests, rows[1].adapters, rows[1].ranks, rows[1].device) })
print("wrote " .. out .. "/tokens_sweep.{json,csv,svg}")
