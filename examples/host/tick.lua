-- The per-frame script of examples/host (main.c). The host made the loramoe context
-- (and, on CUDA, its stream) and put it in the global `host`:
--   host = { context = <light userdata: lmoe_context *>, backend = "cpu"|"cuda",
--            version = <the host's lmoe_version()> }
-- and calls:
--   init(host)     once: adopt the host's context (our own reference to it), make a
--                  layer, an adapter pool, buffers and a batch;
--   tick(frame)    every frame: compose this frame's requests (how many, how long,
--                  which adapter) and enqueue one forward; returns at once, nothing
--                  here waits for the device;
--   shutdown()     after the host drained the stream: close everything, our context
--                  reference last. The host reads the counters and releases its own
--                  reference after it closed this Lua state.
-- State lives in this chunk's locals: loramoe keeps no globals, and neither do we.

local lm = require "loramoe"

local M = {}
local ctx, layer, pool, batch, args
local TOKENS = 64 -- tokens per frame; fixed so the buffers are made once
local requests = {}

function M.init(host)
  -- The module carries its own copy of the library (Lua 5.4): a context may cross
  -- between the host's copy and ours only when both are the same loramoe build.
  if host.version ~= lm.version() then
    error(("the host links loramoe %s, the Lua module is %s"):format(host.version, lm.version()))
  end
  -- Our own reference to the host's context: closing it (or the collector) never frees
  -- the host's context, and the host's release never pulls it from under us.
  ctx = lm.adopt_context(host.context)
  assert(ctx.backend == host.backend and ctx.guard == "host")
  local preset = host.backend == "cuda" and "qwen3-30b-a3b" or "tiny"
  layer = lm.assert(ctx:layer { preset = preset, max_tokens = TOKENS })
  lm.assert(layer:randomize(1, 0.05))
  pool = lm.assert(layer:pool { slots = 3, max_rank = 16 })
  for slot = 0, 2 do
    lm.assert(pool:load_random(slot, { rank = 8 * (slot % 2 + 1), alpha = 16, seed = 10 + slot }))
  end
  args = lm.assert(layer:inputs(TOKENS, 7))
  args.pool = pool
  batch = lm.assert(ctx:batch())
  args.batch = batch
  for i = 1, 4 do requests[i] = {} end
  lm.assert(ctx:synchronize()) -- setup is done; from here on the frames never wait
  ctx:reset_counters()
end

function M.tick(frame)
  -- Four requests sharing the frame's tokens; their lengths and adapters change with
  -- the frame, and every fourth frame has no adapter at all (no LoRA work enqueued).
  local cut1 = 8 + (frame * 5) % 24
  local cut2 = cut1 + 8 + (frame * 3) % 16
  local cut3 = cut2 + 4 + frame % 8
  local lens = { cut1, cut2 - cut1, cut3 - cut2, TOKENS - cut3 }
  for i = 1, 4 do
    requests[i].tokens = lens[i]
    if frame % 4 == 3 then
      requests[i].adapter = nil
    else
      local a = (frame + i) % 4 -- 0..2 an adapter, 3 none
      requests[i].adapter = a < 3 and a or nil
    end
  end
  lm.assert(batch:set(pool, requests))
  lm.assert(layer:forward(args))
end

function M.shutdown()
  -- Device memory is invisible to the GC: close explicitly, dependants first. Closing
  -- ctx drops our reference only; the host still holds its own.
  batch:close()
  args.x:close(); args.logits:close(); args.out:close()
  pool:close()
  layer:close()
  ctx:close()
end

return M
