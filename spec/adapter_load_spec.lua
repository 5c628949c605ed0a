-- lm.adapter.load: a PEFT adapter from its directory into a pool in one call.
local h = dofile("spec/helpers.lua")
local lm = h.lm

describe("lm.adapter.load", function()
  local ctx, layer, pool, dir
  before_each(function()
    ctx = assert(lm.context { backend = "cpu" })
    layer = assert(ctx:layer { experts = 4, hidden = 64, intermediate = 32, top_k = 2, max_tokens = 64 })
    assert(layer:randomize(3, 0.05))
    pool = assert(layer:pool { slots = 2, max_rank = 8 })
    dir = h.tmpname()
    os.remove(dir)
  end)
  after_each(function()
    pool:close(); layer:close(); ctx:close()
  end)

  local function write(layers)
    assert(ctx:write_peft(dir, { family = "qwen", layout = "per_expert", layers = layers, experts = 4,
                                 hidden = 64, intermediate = 32, rank = 4, alpha = 8, seed = os.time() }))
  end

  it("loads a one-layer adapter into a pool under a name and it changes the output", function()
    write(1)
    local slot, info = assert(lm.adapter.load(dir, { pool = pool, name = "mine" }))
    assert.are.equal(0, slot)
    assert.are.equal(4, info.rank)
    assert.are.equal(slot, pool:find("mine"))
    local batch = assert(ctx:batch())
    assert(batch:set(pool, { { tokens = 20, adapter = slot }, { tokens = 12 } }))
    local args = assert(layer:inputs(32, os.time()))
    args.pool, args.batch = pool, batch
    assert(layer:forward(args))
    local c = assert(layer:check(args))
    assert.is_true(c.rel_l2 < 1e-2, "rel_l2 " .. c.rel_l2)
  end)

  it("needs opts.layer for a multi-layer adapter, and takes it", function()
    write(3)
    assert.has_error(function() lm.adapter.load(dir, { pool = pool }) end)
    assert(lm.adapter.load(dir, { pool = pool, layer = 2, name = "l2" }))
    assert.are.equal(0, pool:find("l2"))
  end)

  it("returns the peft object without a pool, nil and a message for a missing path", function()
    write(1)
    local p = assert(lm.adapter.load(dir, { context = ctx }))
    assert.are.equal(4, p:info().rank)
    p:close()
    local v, msg = lm.adapter.load(dir .. "/nope", { context = ctx })
    assert.is_nil(v)
    assert.matches("nope", msg)
    assert.has_error(function() lm.adapter.load(42) end)
    assert.has_error(function() lm.adapter.load(dir) end)
  end)
end)
