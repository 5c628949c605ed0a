local h = dofile("spec/helpers.lua")

describe("adapter pool", function()
  local ctx, layer
  before_each(function()
    ctx = h.cpu()
    layer = assert(ctx:layer { preset = "tiny", max_tokens = 64 })
    assert(layer:randomize(3, 0.05))
  end)
  after_each(function() ctx:close() end)

  it("loads random adapters and describes the slots", function()
    local pool = assert(layer:pool { slots = 3, max_rank = 16 })
    assert.are.same({ slots = 3, max_rank = 16 }, pool:config())
    assert.are.equal(layer, pool:layer())
    local s = assert(pool:slot_info(0))
    assert.is_false(s.loaded)
    assert.is_true(pool:load_random(0, { rank = 8, alpha = 16, targets = { "gate", "up" } }))
    s = assert(pool:slot_info(0))
    assert.is_true(s.loaded)
    assert.are.same({ "gate", "up" }, s.targets)
    assert.is_false(s.fused)
    assert.are.equal(8, s.rank_gate)
    assert.are.equal(8, s.rank_up)
    assert.are.equal(0, s.rank_down)
    assert.are.equal(8, s.rank)
    assert.are.near(2.0, s.scale_gate, 1e-6)
    assert.is_true(s.bytes > 0)
    local gen = s.generation
    assert.is_true(pool:load_random(0, { rank = 16, alpha = 16, fused = true, rslora = true }))
    s = pool:slot_info(0)
    assert.is_true(s.fused)
    assert.are.same({ "gate", "up", "down" }, s.targets)
    assert.are.near(4.0, s.scale_down, 1e-6) -- alpha / sqrt(rank)
    assert.is_true(s.generation > gen)
    assert.is_true(pool:unload(0))
    assert.is_false(pool:slot_info(0).loaded)
  end)

  it("loads adapters from Lua tables in PEFT's layout", function()
    local pool = assert(layer:pool { slots = 2, max_rank = 4 })
    local E, H, I, r = 16, 256, 128, 2
    local function values(n, seed)
      local t = {}
      for i = 1, n do t[i] = ((i * 7919 + seed * 104729) % 1000) / 1000 * 0.1 - 0.05 end
      return t
    end
    assert.is_true(pool:load(1, {
      gate = { a = values(E * r * H, 1), b = values(E * I * r, 2), rank = r, scale = 0.5 },
      down = { a = values(E * r * I, 3), b = values(E * H * r, 4), alpha = 4 }, -- rank inferred
    }))
    local s = pool:slot_info(1)
    assert.are.same({ "gate", "down" }, s.targets)
    assert.are.equal(2, s.rank_gate)
    assert.are.equal(0, s.rank_up)
    assert.are.equal(2, s.rank_down)
    assert.are.near(0.5, s.scale_gate, 1e-7)
    assert.are.near(2.0, s.scale_down, 1e-7)
  end)

  it("raises on bad arguments", function()
    local pool = assert(layer:pool { slots = 2, max_rank = 4 })
    h.raises("bad argument #1 to 'pool' (field 'slots' must be an integer)", function() layer:pool { slots = "2" } end)
    h.raises("bad argument #2 to 'load_random' (field 'targets' entries must be 'gate', 'up' or 'down')",
      function() pool:load_random(0, { targets = { "gate", "sideways" } }) end)
    h.raises("bad argument #2 to 'load_random' (field 'fused' must be a boolean)", function() pool:load_random(0, { fused = 1 }) end)
    h.raises("bad argument #1 to 'load_random' (number has no integer representation)", function() pool:load_random(0.5) end)
    h.raises("bad argument #2 to 'load' (gate.a has 3 values: not a multiple of E*in = 4096 (give rank))",
      function() pool:load(0, { gate = { a = { 1, 2, 3 }, b = {} } }) end)
    h.raises("bad argument #2 to 'load' (gate.b has 0 values, expected 4096)",
      function()
        local a = {}
        for i = 1, 16 * 2 * 256 do a[i] = 0.01 end
        pool:load(0, { gate = { a = a, b = {}, rank = 2 } })
      end)
    h.raises("bad argument #1 to 'set' (loramoe.pool", function() ctx:batch():set({}, {}) end)
    h.raises("bad argument #2 to 'set' (request 2: tokens must be an integer)",
      function() ctx:batch():set(pool, { { tokens = 1 }, { tokens = 1.5 } }) end)
  end)

  it("returns failures for slots out of range, ranks above max and empty slots", function()
    local pool = assert(layer:pool { slots = 2, max_rank = 4 })
    h.fails("INVALID_ARGUMENT", "slot 2 is out of range", pool:load_random(2, { rank = 4 }))
    h.fails("INVALID_ARGUMENT", "slot %-1 is out of range", pool:unload(-1))
    h.fails("INVALID_ARGUMENT", "rank 8 is out of range", pool:load_random(0, { rank = 8 }))
    h.fails("INVALID_ARGUMENT", "fused adapter targets both gate and up",
      pool:load_random(0, { rank = 2, fused = true, targets = { "gate" } }))
    h.fails("INVALID_ARGUMENT", "out of range", pool:slot_info(7))
    h.fails("INVALID_ARGUMENT", "max_rank must be", layer:pool { max_rank = 0 })
    local batch = assert(ctx:batch())
    h.fails("STATE", "slot 1, which holds no adapter", batch:set(pool, { { tokens = 4, adapter = 1 } }))
    h.fails("INVALID_ARGUMENT", "negative token count", batch:set(pool, { { tokens = -1 } }))
    -- a slot unloaded after the batch was built: the forward refuses it
    assert.is_true(pool:load_random(0, { rank = 4 }))
    assert.is_true(batch:set(pool, { { tokens = 4, adapter = 0 } }))
    assert.is_true(pool:unload(0))
    local args = assert(layer:inputs(4))
    args.pool, args.batch = pool, batch
    h.fails("STATE", "slot 0, which holds no adapter", layer:forward(args))
    assert.matches("slot 0, which holds no adapter", ctx:last_error())
  end)
end)

describe("batch", function()
  it("computes offsets and the active slots on the host", function()
    local ctx = h.cpu()
    local layer = assert(ctx:layer { preset = "tiny", max_tokens = 64 })
    local pool = assert(layer:pool { slots = 4, max_rank = 8 })
    assert(pool:load_random(1, { rank = 8 }))
    assert(pool:load_random(3, { rank = 2 }))
    local batch = assert(ctx:batch())
    assert.are.equal(ctx, batch:context())
    assert.is_true(batch:set(pool, { { tokens = 5, adapter = 3 }, { tokens = 7 }, { tokens = 2, adapter = 1 },
      { tokens = 0, adapter = 1 }, { tokens = 4, adapter = 3 } }))
    assert.are.same({ requests = 5, tokens = 18, has_active = true, active = 2, max_rank = 8, max_slot = 3 }, batch:info())
    assert.are.same({ 0, 5, 12, 14, 14, 18 }, batch:offsets())
    local slots, tokens = batch:active_slots()
    assert.are.same({ 1, 3 }, slots)
    assert.are.same({ 2, 9 }, tokens)
    assert.is_true(batch:set(nil, { { tokens = 3 }, { tokens = 1, adapter = -1 } }))
    assert.are.same({ requests = 2, tokens = 4, has_active = false, active = 0, max_rank = 0, max_slot = -1 }, batch:info())
    slots, tokens = batch:active_slots()
    assert.are.same({}, slots)
    ctx:close()
  end)
end)
