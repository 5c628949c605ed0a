-- Question: does it matter how many different adapters one batch uses? Every request
-- uses an adapter; the requests are spread over 1 to 16 distinct adapters (all of
-- rank 16), so the same tokens meet more adapter weights.
--
--   loramoe run examples/distinct_adapters.lua [out=DIR] [backend=cpu|cuda]
--                                              [adapters=1,4,16] [field=value ...]
--
-- CPU: the tiny preset, 2 layers, in seconds. GPU: qwen3-30b-a3b, 4 layers, M=4096.
-- Writes DIR/distinct_adapters.{json,csv,svg} (DIR defaults to out/distinct_adapters).

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
  out = "out/distinct_adapters",
  sweep = { "adapters" },
})
local counts = swept.adapters or { 1, 2, 4, 8, 16 }

local rows = exp.sweep(base, { { "adapters", counts } })
for _, r in ipairs(rows) do r.vs_one_pct = 100 * (r.time_ms - rows[1].time_ms) / rows[1].time_ms end
io.write(report.markdown(rows, {
  { "adapters", "distinct adapters" }, { "time_ms", "ms/forward", "%.3f" },
  { "tokens_per_s", "tokens/s", "%.0f" }, { "vs_one_pct", "vs first row", "%+.1f%%" },
  { "gbytes", "GB moved (floor model)", "%.3f" },
  { rows[1].floor_ms and "pct_floor" or "gflops", rows[1].floor_ms and "% of floor" or "GFLOP/s", "%.1f" },
}))
exp.save(out, "distinct_adapters", rows)
local s = { name = "time per forward", x = {}, y = {} }
for i, r in ipairs(rows) do s.x[i], s.y[i] = r.adapters, r.time_ms end
svg.write(out .. "/distinct_adapters.svg", svg.line {
  title = string.format("Time per forward vs distinct adapters in the batch (%s, %s)", rows[1].preset, rows[1].backend),
  xlabel = "distinct adapters", ylabel = "time per forward (ms)", logx = 2, series = { s },
  note = string.format("%d layers, M=%d, %d requests, all on adapters of rank %s, %s", rows[1].layers,
    rows[1].tokens, rows[1].requests, rows[1].ranks, rows[1].device) })
print("wrote " .. out .. "/distinct_adapters.{json,csv,svg}")
