local h = dofile("spec/helpers.lua")
local lm = h.lm

describe("object lifetime", function()
  it("raises on use after close, and says so in tostring", function()
    local ctx = h.cpu()
    local layer = assert(ctx:layer { preset = "tiny", max_tokens = 16 })
    local pool = assert(layer:pool { slots = 1, max_rank = 4 })
    local batch = assert(ctx:batch())
    local buf = assert(ctx:buffer("f32", { 4 }))
    for _, o in ipairs { { buf, "buffer" }, { batch, "batch" }, { pool, "pool" }, { layer, "layer" }, { ctx, "context" } } do
      local obj, kind = o[1], o[2]
      assert.is_false(obj:is_closed())
      assert.is_true(obj:close())
      assert.is_true(obj:is_closed())
      assert.are.equal("loramoe." .. kind .. " (closed)", tostring(obj))
      h.raises("attempt to use a closed " .. kind, function() obj:close() end)
    end
    h.raises("attempt to use a closed buffer", function() buf:read() end)
    h.raises("attempt to use a closed buffer", function() return buf.numel end)
    h.raises("attempt to use a closed batch", function() batch:set(nil, {}) end)
    h.raises("attempt to use a closed pool", function() pool:load_random(0) end)
    h.raises("attempt to use a closed layer", function() layer:config() end)
    h.raises("attempt to use a closed context", function() ctx:buffer("f32", { 1 }) end)
    h.raises("attempt to use a closed context", function() return ctx.backend end)
  end)

  it("refuses closed objects inside argument tables", function()
    local ctx = h.cpu()
    local r = h.rig(ctx, 16)
    r.args.x:close()
    h.raises("attempt to use a closed buffer", function() r.layer:forward(r.args) end)
    r.pool:close()
    h.raises("attempt to use a closed pool", function() r.batch:set(r.pool, {}) end)
    ctx:close()
  end)

  it("keeps what an object depends on alive", function()
    local ctx = h.cpu()
    local r = h.rig(ctx, 32)
    local layer, args = r.layer, r.args
    -- drop every reference to the context and the pool's layer variable
    ctx, r = nil, nil
    collectgarbage()
    collectgarbage()
    assert.is_true(layer:forward(args))
    local c = assert(layer:check(args))
    assert.is_true(c.rel_l2 < 1e-2)
    assert.are.equal("cpu", layer:context().backend)
    assert.are.equal(layer, args.pool:layer())
  end)

  it("keeps objects working after their context's handle is closed", function()
    local ctx = h.cpu()
    local r = h.rig(ctx, 32)
    local ref = assert(ctx:buffer("f64", { 32, 256 }, "host"))
    ctx:close() -- the library keeps the context for its dependents
    assert.is_true(r.layer:forward(r.args))
    local rargs = { pool = r.pool, batch = r.batch, x = r.args.x, logits = r.args.logits, out = ref }
    assert.is_true(r.layer:reference(rargs))
    assert.is_true(r.args.out:compare(ref).rel_l2 < 1e-2)
    -- helpers that make new buffers need the context's handle
    h.raises("attempt to use a closed context", function() r.layer:check(r.args) end)
    h.fails("INVALID_ARGUMENT", "slot 9 is out of range", r.pool:load_random(9))
    h.raises("attempt to use a closed context", function() r.layer:context():counters() end)
  end)

  it("makes borrowed weight buffers unusable once their layer is closed", function()
    local ctx = h.cpu()
    local layer = assert(ctx:layer { experts = 2, hidden = 4, intermediate = 2, top_k = 1, max_tokens = 2 })
    local w = assert(layer:weights("w2"))
    assert.are.equal(16, w.numel)
    layer:close()
    assert.is_true(w:is_closed())
    h.raises("attempt to use a closed buffer", function() w:read() end)
    ctx:close()
  end)

  it("frees forgotten objects in the collector", function()
    for i = 1, 20 do
      local ctx = h.cpu()
      local r = h.rig(ctx, 16)
      assert.is_true(r.layer:forward(r.args))
      if i % 2 == 0 then ctx:close() end -- some closed, some left to the collector
    end
    collectgarbage()
    collectgarbage()
    local ctx = h.cpu()
    assert.are.equal("cpu", ctx.backend)
  end)

  it("closes with <close> under Lua 5.4", function()
    if not h.is54 then return end -- LuaJIT has no to-be-closed variables
    local chunk = assert(load([[
      local lm = ...
      local outer, inner
      do
        local ctx <close> = assert(lm.context { backend = "cpu", threads = 1 })
        local buf <close> = assert(ctx:buffer("f32", { 4 }))
        outer, inner = ctx, buf
        assert(buf:fill(1))
      end
      return outer, inner
    ]]))
    local ctx, buf = chunk(lm)
    assert.is_true(ctx:is_closed())
    assert.is_true(buf:is_closed())
    -- a handle closed by hand before its scope ends is left alone by __close
    chunk = assert(load([[
      local lm = ...
      local ctx <close> = assert(lm.context { backend = "cpu", threads = 1 })
      ctx:close()
      return true
    ]]))
    assert.is_true(chunk(lm))
  end)
end)
