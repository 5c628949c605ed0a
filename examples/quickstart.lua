-- loramoe quickstart: one MoE layer, three LoRA adapters, a mixed batch.
--
--   loramoe run examples/quickstart.lua          (the CLI preloads loramoe.core)
--   lua5.4 examples/quickstart.lua               (the C module of build/, or LUA_CPATH)
--   luajit examples/quickstart.lua               (the FFI binding)
--
-- On a GPU the layer is qwen3-30b-a3b; on the CPU the tiny preset. It loads three
-- random adapters of different ranks (one on gate and up only), runs a batch of eight
-- requests (some without adapter), checks the result against the float64 reference and
-- prints host waits per forward, time per forward and the batch. Exits non-zero when
-- the check fails.

-- From the checkout after a build into build/: the Lua files and the build tree's
-- module on the paths (ahead of LUA_PATH, as in the other examples).
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/../lua/?.lua;" .. here .. "/../lua/?/init.lua;" .. here ..
  "/../build/lua/?.lua;" .. package.path
package.cpath = package.cpath .. ";" .. here .. "/../build/lua/?.so"

local lm = require "loramoe"

local ctx = lm.assert(lm.context { backend = "auto" })
local gpu = ctx.backend == "cuda"
local preset = gpu and "qwen3-30b-a3b" or "tiny"
local per_request = gpu and 256 or 32 -- tokens of each of the eight requests

local layer = lm.assert(ctx:layer { preset = preset, max_tokens = 8 * per_request })
lm.assert(layer:randomize(1, 0.05))
local cfg = layer:config()

-- Three adapters in three slots: different ranks, slot 1 on gate and up only.
local adapters = {
  [0] = { rank = 16, alpha = 32, seed = 11 },
  [1] = { rank = 8, alpha = 16, seed = 12, targets = { "gate", "up" } },
  [2] = { rank = 4, alpha = 8, seed = 13 },
}
local pool = lm.assert(layer:pool { slots = 3, max_rank = 16 })
for slot = 0, 2 do lm.assert(pool:load_random(slot, adapters[slot])) end

-- Eight requests; nil: the request uses no adapter.
local slots = { 0, nil, 1, 2, nil, 0, 1, nil }
local function requests(tokens_each)
  local r = {}
  for i = 1, 8 do r[i] = { tokens = tokens_each, adapter = slots[i] } end
  return r
end

local batch = lm.assert(ctx:batch())
lm.assert(batch:set(pool, requests(per_request)))
local args = lm.assert(layer:inputs(batch:info().tokens, 7))
args.pool, args.batch = pool, batch

-- Timing: wall time on a monotonic clock; on the GPU the stream is drained before
-- and after, so the time covers the work, not just the enqueue. The final
-- synchronize is ours, so counters are read before it. Each guard decides "is any
-- adapter active?" its own way: host (from the batch, no wait), device_sync (asks the
-- device and waits, once per forward), always (enqueues the LoRA work regardless).
local reps = gpu and 20 or 5
local function measure(guard)
  lm.assert(ctx:set_guard(guard))
  lm.assert(layer:forward(args)) -- warm-up
  lm.assert(ctx:synchronize())
  ctx:reset_counters()
  local t0 = lm.now()
  for _ = 1, reps do lm.assert(layer:forward(args)) end
  local c = ctx:counters()
  lm.assert(ctx:synchronize())
  return (lm.now() - t0) * 1e3 / reps, c.host_waits / c.forwards
end
local timings = {}
for _, g in ipairs { "device_sync", "always", "host" } do timings[g] = { measure(g) } end

-- The check. The float64 reference is plain loops: on the GPU it checks a batch of
-- the same eight requests with 4 tokens each (a few seconds for qwen3), on the CPU
-- the batch that was timed.
local check_args = args
if gpu then
  local small = lm.assert(ctx:batch())
  lm.assert(small:set(pool, requests(4)))
  check_args = lm.assert(layer:inputs(32, 8))
  check_args.pool, check_args.batch = pool, small
  lm.assert(layer:forward(check_args))
end
local res = lm.assert(layer:check(check_args))
local ok = res.nonfinite == 0 and res.rel_l2 < 1e-2

print(string.format("loramoe %s (%s), backend %s, layer %s: E=%d H=%d I=%d top_k=%d",
  lm.version(), lm.runtime, ctx.backend, preset, cfg.experts, cfg.hidden, cfg.intermediate, cfg.top_k))
print()
print("request  tokens  adapter  rank")
local offsets = batch:offsets()
for i = 1, 8 do
  local s = slots[i]
  local rank = s and pool:slot_info(s).rank or 0
  local targets = s and table.concat(pool:slot_info(s).targets, "+") or ""
  print(string.format("%7d  %6d  %7s  %4s  %s", i, offsets[i + 1] - offsets[i], s and tostring(s) or "-",
    s and tostring(rank) or "-", targets))
end
print()
print(string.format("%d tokens, %d forwards per guard:", batch:info().tokens, reps))
print("guard        ms/forward  syncs/forward")
for _, g in ipairs(lm.guards) do
  print(string.format("%-11s  %10.3f  %13.2f", g, timings[g][1], timings[g][2]))
end
print()
print(string.format("check vs float64 reference (%d tokens): rel_l2 %.2e, max_abs %.2e, non-finite %d: %s",
  check_args.batch:info().tokens, res.rel_l2, res.max_abs, res.nonfinite, ok and "ok" or "FAILED"))

if not ok then os.exit(1) end
