local h = dofile("spec/helpers.lua")
local lm = h.lm

describe("layer", function()
  local ctx
  before_each(function() ctx = h.cpu() end)
  after_each(function() ctx:close() end)

  it("is made from a table, a preset name, or a preset with overrides", function()
    local l = assert(ctx:layer { experts = 4, hidden = 8, intermediate = 6, top_k = 2, max_tokens = 32 })
    assert.are.same({ experts = 4, hidden = 8, intermediate = 6, top_k = 2, renormalize = true, max_tokens = 32,
      shard_mode = "tp", shard_rank = 0, shard_size = 1, weight_dtype = "bf16" }, l:config())
    local t = assert(ctx:layer "tiny")
    local c = t:config()
    assert.are.equal(16, c.experts)
    assert.are.equal(256, c.hidden)
    assert.are.equal(128, c.intermediate)
    assert.are.equal(2, c.top_k)
    local o = assert(ctx:layer { preset = "tiny", top_k = 4, renormalize = false, max_tokens = 64 })
    c = o:config()
    assert.are.equal(4, c.top_k)
    assert.is_false(c.renormalize)
    assert.are.equal(64, c.max_tokens)
    assert.are.equal(ctx, o:context())
  end)

  it("uses presets added to lm.presets", function()
    lm.presets.micro = { experts = 2, hidden = 4, intermediate = 2, top_k = 1 }
    local l = assert(ctx:layer "micro")
    assert.are.equal(2, l:config().experts)
    lm.presets.micro = nil
  end)

  it("sets weights and exposes them as buffers borrowed from the layer", function()
    local l = assert(ctx:layer { experts = 2, hidden = 3, intermediate = 2, top_k = 1, max_tokens = 4 })
    local E, H, I = 2, 3, 2
    local w13, w2 = {}, {}
    for i = 1, E * 2 * I * H do w13[i] = i / 16 end
    for i = 1, E * H * I do w2[i] = -i / 8 end
    assert.is_true(l:set_weights(w13, w2))
    local b13 = assert(l:weights("w13"))
    assert.are.same({ E, 2 * I, H }, b13:shape())
    assert.are.equal("bf16", b13.dtype)
    assert.are.same(w13, b13:read())
    assert.are.same(w2, l:weights("w2"):read())
    -- one expert: gate [I, H], up [I, H], down [H, I]
    assert.is_true(l:set_expert(1, { gate = { 1, 2, 3, 4, 5, 6 }, down = { 0, 0, 0, 0, 0, 0.5 } }))
    local got = b13:read(E * 2 * I * H / 2, I * H)
    assert.are.same({ 1, 2, 3, 4, 5, 6 }, got)
    assert.are.same(w13[E * 2 * I * H / 2 + I * H + 1], b13:read(E * 2 * I * H / 2 + I * H, 1)[1]) -- up unchanged
    assert.are.equal(0.5, l:weights("w2"):read(H * I * 2 - 1, 1)[1])
    assert.are.equal(ctx, b13:context())
    assert.is_true(b13:close()) -- frees nothing: the layer owns the storage
    assert.are.same({ 1, 2, 3, 4, 5, 6 }, l:weights("w13"):read(E * 2 * I * H / 2, I * H))
  end)

  it("randomizes the same way for the same seed", function()
    local a = assert(ctx:layer { experts = 2, hidden = 8, intermediate = 4, top_k = 1, max_tokens = 4 })
    local b = assert(ctx:layer { experts = 2, hidden = 8, intermediate = 4, top_k = 1, max_tokens = 4 })
    assert.is_true(a:randomize(7, 0.5))
    assert.is_true(b:randomize(7, 0.5))
    local va = a:weights("w2"):read()
    assert.are.same(va, b:weights("w2"):read())
    local big = 0
    for _, v in ipairs(va) do
      assert.is_true(v >= -0.5 and v <= 0.5) -- bf16 may round up to the bound
      big = math.max(big, math.abs(v))
    end
    assert.is_true(big > 0.2)
  end)

  it("raises on bad arguments", function()
    h.raises("bad argument #1 to 'layer' (unknown preset 'huge')", function() ctx:layer("huge") end)
    h.raises("bad argument #1 to 'layer' (field 'hidden' is missing)", function() ctx:layer { experts = 2, intermediate = 2 } end)
    h.raises("bad argument #1 to 'layer' (field 'top_k' must be an integer)", function() ctx:layer { preset = "tiny", top_k = "2" } end)
    h.raises("bad argument #1 to 'layer' (field 'renormalize' must be a boolean)", function() ctx:layer { preset = "tiny", renormalize = 1 } end)
    h.raises("bad argument #1 to 'layer' (table expected", function() ctx:layer(5) end)
    local l = assert(ctx:layer { experts = 2, hidden = 3, intermediate = 2, top_k = 1, max_tokens = 4 })
    h.raises("bad argument #1 to 'set_weights' (w13 has 3 values, expected 24)", function() l:set_weights({ 1, 2, 3 }) end)
    h.raises("bad argument #1 to 'set_expert' (expert must be 0..1, got 2)", function() l:set_expert(2, { gate = {} }) end)
    h.raises("bad argument #2 to 'set_expert' (give at least one of gate, up, down)", function() l:set_expert(0, {}) end)
    h.raises("bad argument #1 to 'weights' (invalid option 'w3')", function() l:weights("w3") end)
    h.raises("bad argument #1 to 'forward' (field 'batch' must be a loramoe.batch)", function() l:forward {} end)
  end)

  it("returns failures from the library", function()
    h.fails("INVALID_ARGUMENT", "top_k must be", ctx:layer { experts = 2, hidden = 4, intermediate = 4, top_k = 3 })
    h.fails("INVALID_ARGUMENT", "num_experts must be", ctx:layer { experts = -1, hidden = 4, intermediate = 4 })
    local l = assert(ctx:layer { experts = 2, hidden = 3, intermediate = 2, top_k = 1, max_tokens = 4 })
    h.fails("INVALID_ARGUMENT", "scale must be >= 0", l:randomize(1, -1))
  end)
end)
