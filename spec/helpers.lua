-- Shared by the specs: dofile("spec/helpers.lua") from the repository root.
local lm = require "loramoe"
-- dofile runs outside busted's spec environment: take assert from luassert.
local assert = require "luassert"
local h = {}

h.lm = lm
h.is54 = lm.runtime == "lua5.4"

-- A runtime failure: nil, "CODE: message", "CODE".
-- ||a - ref|| / ||ref|| over two Lua arrays of numbers.
function h.rel_l2(a, ref)
  local num, den = 0, 0
  for i = 1, #ref do
    num = num + (a[i] - ref[i]) ^ 2
    den = den + ref[i] ^ 2
  end
  return math.sqrt(num / den)
end

function h.fails(code, pattern, v, msg, c)
  assert.is_nil(v)
  assert.are.equal(code, c)
  assert.is_string(msg)
  assert.matches("^" .. code .. ": ", msg)
  if pattern then assert.matches(pattern, msg) end
  return msg
end

-- f() raises an error containing text (plain search). Call the API inside f the way
-- users do (obj:method(...)), so the C module can name the function it reports.
function h.raises(text, f)
  local ok, err = pcall(f)
  assert.is_false(ok, "expected an error containing " .. text)
  err = tostring(err)
  assert.truthy(err:find(text, 1, true), "error was: " .. err)
  return err
end

function h.cpu(opts)
  opts = opts or {}
  opts.backend = "cpu"
  opts.threads = opts.threads or 2
  return assert(lm.context(opts))
end

-- The tiny preset with a pool of four adapters of mixed ranks and a mixed batch.
function h.rig(ctx, tokens)
  local layer = assert(ctx:layer { preset = "tiny", max_tokens = 512 })
  assert(layer:randomize(11, 0.05))
  local pool = assert(layer:pool { slots = 4, max_rank = 16 })
  assert(pool:load_random(0, { rank = 16, alpha = 32, seed = 1, scale = 0.05 }))
  assert(pool:load_random(1, { rank = 4, alpha = 8, seed = 2, targets = { "gate", "up" } }))
  assert(pool:load_random(2, { rank = 8, alpha = 16, seed = 3, fused = true }))
  assert(pool:load_random(3, { rank = 2, alpha = 2, seed = 4, targets = { "down" }, rslora = true }))
  local batch = assert(ctx:batch())
  tokens = tokens or 96
  local q = math.floor(tokens / 8)
  local reqs = {
    { tokens = q, adapter = 0 }, { tokens = q }, { tokens = q, adapter = 1 }, { tokens = q, adapter = 2 },
    { tokens = q }, { tokens = q, adapter = 3 }, { tokens = q, adapter = 0 }, { tokens = tokens - 7 * q, adapter = 1 },
  }
  assert(batch:set(pool, reqs))
  local args = assert(layer:inputs(tokens, 5))
  args.pool, args.batch = pool, batch
  return { layer = layer, pool = pool, batch = batch, args = args, requests = reqs }
end

-- One rank of a sharded layer (or the whole layer: no shard fields in cfg): the layer
-- made from cfg and randomized, a pool of two adapters of different ranks (the second
-- on down only), a batch of three requests and inputs; returns the layer and the
-- forward's args.
function h.shard_rank(ctx, cfg)
  local l = assert(ctx:layer(cfg))
  assert(l:randomize(4, 0.2))
  local p = assert(l:pool { slots = 2, max_rank = 8 })
  assert(p:load_random(0, { rank = 8, seed = 1, scale = 0.2 }))
  assert(p:load_random(1, { rank = 3, seed = 2, scale = 0.2, targets = { "down" } }))
  local b = assert(ctx:batch())
  assert(b:set(p, lm.requests({ 9, 4, 14 }, { 0, nil, 1 })))
  local inp = assert(l:inputs(27, 6))
  return l, { pool = p, batch = b, x = inp.x, logits = inp.logits, out = inp.out }
end

-- A fresh temporary path (a file os.tmpname made, or one made here). Under WebAssembly
-- os.tmpname's mkstemp draws names from a clock coarse enough that a quick run of specs
-- can spend its retries on names earlier specs still hold (directories they wrote
-- there): "unable to generate a unique filename", now and then. So: a few more tries,
-- then a name of this process's own.
local tmp_count = 0
function h.tmpname()
  for _ = 1, 5 do
    local ok, name = pcall(os.tmpname)
    if ok then return name end
  end
  tmp_count = tmp_count + 1
  local name = string.format("/tmp/lmoe_spec_%d_%d_%d", os.time(), math.floor(os.clock() * 1e6), tmp_count)
  local f = assert(io.open(name, "w"))
  f:close()
  return name
end

return h
