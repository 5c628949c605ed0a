-- lm.adopt_context: a second Lua object over a context made elsewhere (an embedding
-- host in practice; here the module itself, through ctx:pointer()). Each object holds
-- its own reference, so either may be closed or collected first.
local h = dofile("spec/helpers.lua")
local lm = h.lm

local function address(obj) return tostring(obj):match("%((0x%x+)%)") or tostring(obj):match("%((.-)%)") end

-- A forward on fresh random inputs through ctx, checked against the float64 reference.
local function forward_matches(ctx)
  local seed = os.time() % 100000
  local layer = assert(ctx:layer { preset = "tiny", max_tokens = 64 })
  assert(layer:randomize(seed, 0.05))
  local pool = assert(layer:pool { slots = 2, max_rank = 8 })
  assert(pool:load_random(0, { rank = 8, alpha = 16, seed = seed + 1, scale = 0.05 }))
  assert(pool:load_random(1, { rank = 4, alpha = 8, seed = seed + 2, fused = true }))
  local batch = assert(ctx:batch())
  assert(batch:set(pool, { { tokens = 24, adapter = 0 }, { tokens = 16 }, { tokens = 24, adapter = 1 } }))
  local args = assert(layer:inputs(64, seed + 3))
  args.pool, args.batch = pool, batch
  assert.is_true(layer:forward(args))
  local c = assert(layer:check(args))
  assert.are.equal(0, c.nonfinite)
  assert.is_true(c.ref_l2 > 0)
  assert.is_true(c.rel_l2 < 1e-2, "rel_l2 " .. c.rel_l2)
  batch:close(); args.x:close(); args.logits:close(); args.out:close()
  pool:close(); layer:close()
end

describe("adopting a context", function()
  it("gives a raw pointer of the runtime's kind", function()
    local ctx = h.cpu()
    local p = ctx:pointer()
    assert.are.equal(h.is54 and "userdata" or "cdata", type(p))
    assert.are.equal(address(ctx), address(lm.adopt_context(p)))
    ctx:close()
    h.raises("attempt to use a closed context", function() ctx:pointer() end)
  end)

  it("keeps working after the object it came from is closed", function()
    local first = h.cpu { guard = "always" }
    local ctx = assert(lm.adopt_context(first:pointer()))
    assert.are_not.equal(first, ctx)
    -- one C context seen through two objects
    assert.are.equal("cpu", ctx.backend)
    assert.are.equal(first.threads, ctx.threads)
    assert.are.equal("always", ctx.guard)
    assert.is_true(ctx:set_guard("host"))
    assert.are.equal("host", first.guard)
    first:close()
    assert.is_true(first:is_closed())
    assert.is_false(ctx:is_closed())
    forward_matches(ctx)
    ctx:close()
    assert.is_true(ctx:is_closed())
  end)

  it("leaves the first owner working when the adopted object is closed or collected", function()
    local first = h.cpu()
    local adopted = assert(lm.adopt_context(first:pointer()))
    adopted:close()
    do local _ = lm.adopt_context(first:pointer()) end
    collectgarbage()
    collectgarbage()
    forward_matches(first)
    first:close()
  end)

  it("lets objects made through either owner outlive both", function()
    local first = h.cpu()
    local ctx = assert(lm.adopt_context(first:pointer()))
    local buf = assert(ctx:buffer("f32", { 4, 8 }))
    first:close()
    ctx:close()
    assert.is_true(buf:fill_random(7, -1, 1))
    local v = assert(buf:read())
    assert.are.equal(32, #v)
    buf:close()
  end)

  it("refuses what is not a context pointer", function()
    h.raises("bad argument #1 to 'adopt_context' (light userdata (an lmoe_context *) expected, got nil)",
      function() lm.adopt_context(nil) end)
    h.raises("bad argument #1 to 'adopt_context' (light userdata (an lmoe_context *) expected, got number)",
      function() lm.adopt_context(1) end)
    h.raises("bad argument #1 to 'adopt_context' (light userdata (an lmoe_context *) expected, got string)",
      function() lm.adopt_context("ctx") end)
    local ctx = h.cpu()
    h.raises("bad argument #1 to 'adopt_context' (light userdata (an lmoe_context *) expected, got loramoe.context)",
      function() lm.adopt_context(ctx) end)
    local empty = assert(ctx:buffer("f32", { 0 })) -- no storage: its data pointer is NULL
    h.raises("bad argument #1 to 'adopt_context' (context pointer is NULL)",
      function() lm.adopt_context(empty:data()) end)
    -- memory that is not a context: the library's magic check refuses it
    local buf = assert(ctx:buffer("f32", { 64 }, "host"))
    assert.is_true(buf:fill(1.0))
    h.raises("bad argument #1 to 'adopt_context' (not a loramoe context)",
      function() lm.adopt_context(buf:data()) end)
    buf:close(); empty:close()
    ctx:close()
  end)
end)
