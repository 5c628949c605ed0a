local h = dofile("spec/helpers.lua")
local lm = h.lm

describe("context", function()
  it("is made on the cpu backend with options", function()
    local ctx = h.cpu { threads = 2, guard = "always" }
    assert.are.equal("cpu", ctx.backend)
    assert.are.equal(2, ctx.threads)
    assert.are.equal("always", ctx.guard)
    assert.is_nil(ctx:stream()) -- the cpu backend has no stream
    assert.are.equal("", ctx:last_error())
    assert.matches("^loramoe%.context %(", tostring(ctx))
    ctx:close()
  end)

  it("defaults to auto, which is cpu without a GPU", function()
    local ctx = assert(lm.context())
    if lm.device_count() == 0 then assert.are.equal("cpu", ctx.backend) end
    assert.are.equal("host", ctx.guard)
    if ctx.backend == "cpu" then assert.is_true(ctx.threads >= 1) end -- workers: cpu only
    ctx:close()
  end)

  it("switches guards and refuses unknown ones", function()
    local ctx = h.cpu()
    for _, g in ipairs(lm.guards) do
      assert.is_true(ctx:set_guard(g))
      assert.are.equal(g, ctx.guard)
    end
    h.raises("bad argument #1 to 'set_guard' (invalid option 'never')", function() ctx:set_guard("never") end)
    ctx:close()
  end)

  it("counts host waits and resets the counters", function()
    local ctx = h.cpu()
    ctx:reset_counters()
    assert.is_true(ctx:synchronize())
    assert.is_true(ctx:synchronize())
    local c = ctx:counters()
    assert.are.equal(2, c.host_waits)
    for _, k in ipairs { "forwards", "launches", "lora_launches", "uploads", "bytes_uploaded", "downloads" } do
      assert.is_number(c[k])
    end
    ctx:reset_counters()
    assert.are.equal(0, ctx:counters().host_waits)
    ctx:close()
  end)

  it("tells forced waits from backpressure", function()
    local ctx = h.cpu()
    ctx:reset_counters()
    assert.is_true(ctx:synchronize())
    local w = ctx:wait_counters()
    assert.are.same({ host_waits = 1, forced = 1, backpressure = 0 }, w)
    ctx:reset_counters()
    assert.are.same({ host_waits = 0, forced = 0, backpressure = 0 }, ctx:wait_counters())
    ctx:close()
  end)

  it("makes batches with a staging depth", function()
    local ctx = h.cpu()
    local b = assert(ctx:batch { staging_depth = 2 })
    b:close()
    assert(ctx:batch()):close()
    local ok, msg = ctx:batch { staging_depth = 0 }
    assert.is_nil(ok)
    assert.matches("staging_depth must be 1..64", msg)
    h.raises("bad argument #1 to 'batch' (unknown option 'depth')", function() ctx:batch { depth = 2 } end)
    ctx:close()
  end)

  it("raises on bad options", function()
    h.raises("bad argument #1 to 'context' (field 'backend' has invalid option 'tpu')", function() lm.context({ backend = "tpu" }) end)
    h.raises("bad argument #1 to 'context' (field 'guard' must be a string)", function() lm.context({ guard = 1 }) end)
    h.raises("bad argument #1 to 'context' (field 'threads' must be an integer)", function() lm.context({ threads = 1.5 }) end)
    h.raises("bad argument #1 to 'context' (field 'threads' must be 0 (one per core) .. 1024)", function() lm.context({ threads = 5000 }) end)
    h.raises("bad argument #1 to 'context' (field 'device' must be >= 0)", function() lm.context({ device = -1 }) end)
    h.raises("bad argument #1 to 'context' (table expected", function() lm.context("cpu") end)
  end)

  it("returns a failure for a backend this machine can't give", function()
    if lm.device_count() > 0 then return end
    local ctx, msg, code = lm.context { backend = "cuda" }
    assert.is_nil(ctx)
    assert.is_string(code)
    assert.matches("^" .. code .. ": .+", msg)
    if not lm.has_cuda() then assert.are.equal("UNSUPPORTED", code) end
  end)
end)
