-- A sharded MoE layer driven from one script: the tiny preset cut over 2 ranks, each a
-- cpu context of this process, tensor parallel and then expert parallel.
--
--   loramoe run examples/sharded.lua [tp|ep|both]   (default: both)
--   lua5.4 examples/sharded.lua / luajit examples/sharded.lua
--
-- Each rank's layer is made with the whole layer's shapes and its shard (shard_mode,
-- shard_rank, shard_size, comm) and keeps only its part of the same random weights and
-- adapters; lm.forward_group runs both ranks' forwards and sums their outputs, so each
-- rank's out holds the whole layer's output. The script compares that with an
-- unsharded layer (within one bf16 rounding) and with the float64 reference, prints
-- what each rank holds, and exits non-zero when a check fails. docs/design.md,
-- "Sharding", gives the math; on GPUs the same layer config takes a communicator that
-- wraps the host's ncclComm_t (lm.wrap_nccl), in builds with NCCL.

local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/../lua/?.lua;" .. here .. "/../lua/?/init.lua;" .. here ..
  "/../build/lua/?.lua;" .. package.path
package.cpath = package.cpath .. ";" .. here .. "/../build/lua/?.so"

local lm = require "loramoe"

local which = arg and arg[1] or "both"
local modes = which == "both" and { "tp", "ep" } or { which }
local RANKS, TOKENS = 2, 96
local requests = lm.requests({ 40, 24, 32 }, { 0, nil, 1 })

-- A layer (unsharded, or one rank's shard) with the same weights, adapters and inputs.
local function build(ctx, shard)
  local cfg = { preset = "tiny", max_tokens = TOKENS }
  for k, v in pairs(shard or {}) do cfg[k] = v end
  local layer = lm.assert(ctx:layer(cfg))
  lm.assert(layer:randomize(1, 0.05))
  local pool = lm.assert(layer:pool { slots = 2, max_rank = 16 })
  lm.assert(pool:load_random(0, { rank = 16, alpha = 32, seed = 11 }))
  lm.assert(pool:load_random(1, { rank = 4, alpha = 8, seed = 12, targets = { "gate", "up" } }))
  local batch = lm.assert(ctx:batch())
  lm.assert(batch:set(pool, requests))
  local inp = lm.assert(layer:inputs(TOKENS, 7))
  return layer, { pool = pool, batch = batch, x = inp.x, logits = inp.logits, out = inp.out }
end

local whole_ctx = lm.assert(lm.context { backend = "cpu" })
local whole, wargs = build(whole_ctx)
lm.assert(whole:forward(wargs))
local want = wargs.out:read()
local ref = lm.assert(whole:check(wargs))
print(("unsharded layer: rel L2 vs float64 reference %.2e"):format(ref.rel_l2))

local ok_all = true
for _, mode in ipairs(modes) do
  local ctxs = {}
  for r = 1, RANKS do ctxs[r] = lm.assert(lm.context { backend = "cpu", threads = 1 }) end
  local comms = lm.assert(lm.comms(ctxs))
  local layers, args = {}, {}
  for r = 1, RANKS do
    layers[r], args[r] = build(ctxs[r], { shard_mode = mode, shard_rank = r - 1, shard_size = RANKS,
                                          comm = comms[r] })
    local w13 = layers[r]:weights("w13"):shape()
    print(("%s rank %d of %d: W13 [%d, %d, %d] (%s)"):format(mode, r - 1, RANKS, w13[1], w13[2], w13[3],
      mode == "tp" and "every expert, its slice of the intermediate dimension" or "its experts, whole"))
  end
  local t0 = lm.now()
  lm.assert(lm.forward_group(layers, args))
  local dt = lm.now() - t0
  local got = args[1].out:read()
  local same_ranks = true
  local other = args[2].out:read()
  for i = 1, #got do same_ranks = same_ranks and got[i] == other[i] end
  local worst, off = 0, 0
  for i = 1, #want do
    local d = math.abs(got[i] - want[i])
    local m = math.max(math.abs(got[i]), math.abs(want[i]))
    local ulp = m > 0 and 2 ^ (math.floor(math.log(m, 2)) - 7) or 0
    if d > worst then worst = d end
    if d > ulp then off = off + 1 end
  end
  local num, den = 0, 0
  local f64 = lm.assert(whole_ctx:buffer("f64", { TOKENS, whole:config().hidden }, "host"))
  local rargs = {}
  for k, v in pairs(wargs) do rargs[k] = v end
  rargs.out = f64
  lm.assert(whole:reference(rargs))
  local r64 = f64:read()
  for i = 1, #r64 do num, den = num + (got[i] - r64[i]) ^ 2, den + r64[i] ^ 2 end
  local rel = math.sqrt(num / den)
  local ok = same_ranks and off == 0 and rel < 1e-2
  ok_all = ok_all and ok
  print(("%s: %d ranks summed in %.1f ms; ranks agree: %s; vs unsharded: %d of %d off by more than a bf16 " ..
    "rounding (largest difference %.2e); rel L2 vs float64 reference %.2e: %s"):format(mode, RANKS, dt * 1e3,
    tostring(same_ranks), off, #want, worst, rel, ok and "ok" or "FAILED"))
end
if not ok_all then os.exit(1) end
