-- The synchronisation study.
--
-- Question: what does it cost to ask the device "is any adapter active?" once per MoE
-- layer and wait for the answer (guard device_sync: what a serving engine's
-- `.any().item()` did), against deciding it on the host from the batch (guard host,
-- loramoe's default) or enqueuing the LoRA work unconditionally (guard always, as a
-- CUDA graph must)? Measured on a whole stack of MoE layers, for batches where no,
-- half or all requests use an adapter: host waits per forward, time per forward,
-- tokens/s, and each guard's difference from `host` in percent.
--
-- GPU: qwen3-30b-a3b, 48 layers (random weights; a few distinct weight sets are
-- repeated, see the printed note). CPU: the tiny preset, 8 layers, where the waits are
-- the ones the CPU backend emulates and counts in device_sync mode.
--
--   loramoe run examples/sync_study.lua [out=DIR] [backend=cpu|cuda] [reps=N]
--                 [tokens=M1,M2,...] [pipeline=1,4] [mode=eager|graph]
--                 [any scenario field=value]
--
-- mode=graph (cuda only) replays the stack as one CUDA graph per forward; the guard
-- device_sync cannot be captured (it waits for the device), so only host and always
-- are measured then. Run it once per mode to compare eager and graph.
--
-- Writes a markdown table to stdout, and DIR/sync_study.{json,csv} and the plots
-- DIR/sync_study_{syncs,time,host}.svg (plus _throughput.svg with several pipeline
-- depths and _vs_tokens.svg with several M); DIR defaults to out/sync_study.

local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/../lua/?.lua;" .. here .. "/../lua/?/init.lua;" .. here ..
  "/../build/lua/?.lua;" .. package.path
package.cpath = package.cpath .. ";" .. here .. "/../build/lua/?.so"

local exp = require "loramoe.experiment"
local report = require "loramoe.report"
local svg = require "loramoe.svg"

local base, out, swept = exp.setup(arg, {
  cuda = { preset = "qwen3-30b-a3b", layers = 48, requests = 32, adapters = 4, rank = 16,
           warmup = 2, reps = 10, tokens = { 256, 4096 }, pipeline = { 1, 4 } },
  cpu = { preset = "tiny", layers = 8, requests = 16, adapters = 4, rank = 16,
          warmup = 1, reps = 5, tokens = { 256 }, pipeline = { 1 } },
  out = "out/sync_study",
  sweep = { "tokens", "pipeline" },
})
-- Two ways to time a forward: alone (pipeline 1: enqueue, then wait for it), and
-- in a steady stream (pipeline 4: four forwards enqueued back to back per wait, as a
-- serving loop runs ahead of the device). On the CPU the work is done inside the
-- calls, so only the first applies.
local tokens_list = swept.tokens or base.tokens
local pipelines = swept.pipeline or base.pipeline
base.tokens, base.pipeline = nil, nil

local cases = { { "no adapters", 0 }, { "half with adapters", 0.5 }, { "all with adapters", 1 } }
local guards = { "host", "device_sync", "always" }
if base.mode == "graph" then guards = { "host", "always" } end
local fractions = {}
for i, c in ipairs(cases) do fractions[i] = c[2] end

local rows = exp.sweep(base, {
  { "pipeline", pipelines },
  { "tokens", tokens_list },
  { "adapter_fraction", fractions },
  { "guard", guards },
})

-- Name each row by its case, and compare it with `host` in the same case.
local by = {}
for _, r in ipairs(rows) do
  for _, c in ipairs(cases) do
    if c[2] == r.adapter_fraction then r.case = c[1] end
  end
  by[r.pipeline .. "|" .. r.tokens .. "|" .. r.case .. "|" .. r.guard] = r
end
for _, r in ipairs(rows) do
  local h = by[r.pipeline .. "|" .. r.tokens .. "|" .. r.case .. "|host"]
  r.time_vs_host_pct = 100 * (r.time_ms - h.time_ms) / h.time_ms
  r.throughput_vs_host_pct = 100 * (r.tokens_per_s - h.tokens_per_s) / h.tokens_per_s
end

local r1 = rows[1]
local note = string.format("%s backend%s, preset %s: %d layers from %d distinct weight sets, " ..
  "%d requests, %d adapters of rank %s, medians of %d", r1.backend,
  r1.backend == "cpu" and "" or (" on " .. r1.device), r1.preset,
  r1.layers, r1.distinct_layers, r1.requests, r1.adapters, r1.ranks, r1.reps)

print("# Synchronisation study\n")
print(note .. ".")
if r1.distinct_layers < r1.layers then
  print(string.format("The %d layers cycle through %d distinct sets of expert weights (and adapters) " ..
    "so the stack fits in memory; each set is %.2f GB, far larger than the L2 cache, so the repeat " ..
    "does not flatter the timing.", r1.layers, r1.distinct_layers,
    3 * r1.experts * r1.hidden * r1.intermediate * 2 / 1e9))
end
if r1.mode == "graph" then
  print("Each forward is one replay of a CUDA graph that holds the whole stack, captured " ..
    "once per scenario; the batch is set before each replay. device_sync is left out: its " ..
    "wait cannot be captured.")
end
if r1.backend == "cpu" then
  print("On the CPU the waits in device_sync mode are emulated (the backend counts the wait " ..
    "it would make); their cost is not a GPU's.")
end
print("")
print("`pipeline` is the number of forwards enqueued back to back before the host waits " ..
  "for them (1: each forward alone; more: the host runs ahead, as a serving loop does). " ..
  "`host busy` is the share of the forward's time the host thread spent inside loramoe " ..
  "calls, waits included: time it could not spend preparing the next batch.\n")
io.write(report.markdown(rows, {
  { "pipeline", "pipeline" }, { "tokens", "M" }, { "case", "batch" }, { "guard", "guard" },
  { "mode", "mode" },
  { "syncs_per_forward", "syncs/forward" },
  { "time_ms", "ms/forward", "%.3f" },
  { "time_ms_min", "min", "%.3f" }, { "time_ms_max", "max", "%.3f" },
  { "tokens_per_s", "tokens/s", "%.0f" },
  { "time_vs_host_pct", "time vs host", "%+.1f%%" },
  { "throughput_vs_host_pct", "tok/s vs host", "%+.1f%%" },
  { "launches_per_forward", "launches/forward" },
  { "host_us", "host µs", "%.0f" },
  { "host_busy_pct", "host busy", "%.0f%%" },
}))

local jp, cp = exp.save(out, "sync_study", rows, { note = note, question = "cost of per-layer host syncs" })

-- Plots for the largest M: syncs, time and host time per forward for forwards timed
-- alone (the first pipeline depth), and tokens/s for the deepest; one bar per guard,
-- grouped by case.
local last_m = tokens_list[#tokens_list]
local p1, pn = pipelines[1], pipelines[#pipelines]
local function bars(metric, depth)
  local series = {}
  for gi, g in ipairs(guards) do
    series[gi] = { name = g, values = {} }
    for ci, c in ipairs(cases) do
      series[gi].values[ci] = by[depth .. "|" .. last_m .. "|" .. c[1] .. "|" .. g][metric]
    end
  end
  return series
end
local groups = {}
for ci, c in ipairs(cases) do groups[ci] = c[1] end
local files = { jp, cp }
local function plot(name, text)
  local p = out .. "/" .. name
  assert(svg.write(p, text))
  files[#files + 1] = p
end
local what = string.format("%s, %d layers, M=%d", r1.preset, r1.layers, last_m)
plot("sync_study_syncs.svg", svg.bars { groups = groups, series = bars("syncs_per_forward", p1),
  title = "Host waits per forward (" .. what .. ")", ylabel = "host waits per forward", note = note })
plot("sync_study_time.svg", svg.bars { groups = groups, series = bars("time_ms", p1),
  title = "Time per forward, each alone (" .. what .. ")", ylabel = "time per forward (ms)",
  note = note })
plot("sync_study_host.svg", svg.bars { groups = groups, series = bars("host_us", p1), logy = true,
  title = "Host time per forward, waits included (M=" .. last_m .. ")",
  ylabel = "host time per forward (µs, log scale)", note = note })
if pn ~= p1 then
  plot("sync_study_throughput.svg", svg.bars { groups = groups, series = bars("tokens_per_s", pn),
    title = string.format("Throughput, %d forwards per wait (%s)", pn, what), ylabel = "tokens per second",
    note = note })
end
if #tokens_list > 1 then
  local series = {}
  -- Colour says the guard, a dashed line the batch without adapters.
  for ci, c in ipairs({ cases[3], cases[1] }) do
    for gi, g in ipairs(guards) do
      local s = { name = c[1] .. ", " .. g, x = {}, y = {}, color = svg.palette[gi],
                  dash = ci == 2 and "6,3" or nil }
      for _, m in ipairs(tokens_list) do
        local r = by[p1 .. "|" .. m .. "|" .. c[1] .. "|" .. g]
        s.x[#s.x + 1], s.y[#s.y + 1] = m, r.time_ms
      end
      series[#series + 1] = s
    end
  end
  plot("sync_study_vs_tokens.svg", svg.line { series = series, logx = 2, logy = true,
    title = "Time per forward vs tokens per batch", xlabel = "tokens per batch (M)",
    ylabel = "time per forward (ms)", note = note, legend_width = 230 })
end
print("\nwrote " .. table.concat(files, ", "))
