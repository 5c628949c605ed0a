-- Sharded layers from Lua (docs/lua.md, "Sharding"): communicators over cpu contexts,
-- the shard fields of ctx:layer, lm.forward_group; the summed shards equal the
-- unsharded layer within a bf16 rounding.
local h = dofile("spec/helpers.lua")
local lm = h.lm

local shape = { experts = 6, hidden = 32, intermediate = 24, top_k = 2, max_tokens = 64 }
local function cfg(extra)
  local t = {}
  for k, v in pairs(shape) do t[k] = v end
  for k, v in pairs(extra or {}) do t[k] = v end
  return t
end

-- One rank's layer, pool (two adapters of different ranks), batch and inputs.
local function rank(ctx, extra) return h.shard_rank(ctx, cfg(extra)) end

-- Within one bf16 rounding of the larger of the two.
local function within_rounding(a, b)
  for i = 1, #b do
    local m = math.max(math.abs(a[i]), math.abs(b[i]))
    local ulp = m > 0 and 2 ^ (math.floor(math.log(m, 2)) - 7) or 0
    if math.abs(a[i] - b[i]) > ulp then return false, i end
  end
  return true
end

describe("sharding", function()
  it("reports whether the build has NCCL", function()
    assert.is_boolean(lm.has_nccl())
  end)

  it("makes one communicator per context, rank by position", function()
    local a, b = h.cpu(), h.cpu()
    local cs = assert(lm.comms { a, b })
    assert.are.equal(2, #cs)
    assert.are.equal(0, cs[1].rank)
    assert.are.equal(1, cs[2].rank)
    assert.are.equal(2, cs[2].size)
    assert.are.equal(b, cs[2]:context())
    h.fails("INVALID_ARGUMENT", "ctxs%[1%] is ctxs%[0%]", lm.comms { a, a })
    h.raises("entry 2 is not a loramoe.context", function() lm.comms { a, 5 } end)
    cs[1]:close()
    h.raises("closed comm", function() return cs[1].rank end)
  end)

  for _, mode in ipairs { "tp", "ep" } do
    for _, n in ipairs { 2, 3 } do
      it(("sums %d %s ranks to the unsharded layer's output"):format(n, mode), function()
        local whole_ctx = h.cpu()
        local wl, wa = rank(whole_ctx)
        assert(wl:forward(wa))
        local want = wa.out:read()
        local ctxs = {}
        for r = 1, n do ctxs[r] = h.cpu { threads = 1 } end
        local cs = assert(lm.comms(ctxs))
        local layers, args = {}, {}
        for r = 1, n do
          layers[r], args[r] = rank(ctxs[r], { shard_mode = mode, shard_rank = r - 1, shard_size = n, comm = cs[r] })
          local c = layers[r]:config()
          assert.are.equal(mode, c.shard_mode)
          assert.are.equal(r - 1, c.shard_rank)
          assert.are.equal(n, c.shard_size)
          assert.are.equal(shape.experts, c.experts) -- the whole layer's shapes
        end
        -- the rank holds its part: E / n experts (ep) or I / n columns (tp), the first
        -- D % n ranks one more
        local w13 = layers[1]:weights("w13"):shape()
        if mode == "ep" then
          assert.are.equal(math.ceil(shape.experts / n), w13[1])
        else
          assert.are.equal(math.ceil(shape.intermediate / n), w13[2] / 2)
        end
        assert.is_true(lm.forward_group(layers, args))
        local first = args[1].out:read()
        for r = 2, n do assert.are.same(first, args[r].out:read()) end
        local ok, at = within_rounding(first, want)
        assert.is_true(ok, "element " .. tostring(at))
        -- the float64 reference refuses a shard; the unsharded one is the check
        h.fails("UNSUPPORTED", "shard_size", layers[1]:check(args[1]))
        local res = assert(wl:check(wa))
        assert.is_true(res.rel_l2 < 1e-2)
      end)
    end
  end

  it("refuses bad shard configs, naming the field", function()
    local ctx = h.cpu()
    h.fails("INVALID_ARGUMENT", "comm is NULL", ctx:layer(cfg { shard_size = 2 }))
    h.fails("INVALID_ARGUMENT", "shard_rank", ctx:layer(cfg { shard_size = 2, shard_rank = 2 }))
    h.fails("INVALID_ARGUMENT", "num_experts", ctx:layer(cfg { shard_mode = "ep", shard_size = 7 }))
    h.raises("field 'shard_mode' has invalid option 'dp'", function() ctx:layer(cfg { shard_mode = "dp" }) end)
    h.raises("field 'comm' must be a loramoe.comm", function() ctx:layer(cfg { comm = ctx }) end)
    local other = h.cpu()
    local cs = assert(lm.comms { other, h.cpu() })
    h.fails("INVALID_ARGUMENT", "another context", ctx:layer(cfg { shard_size = 2, comm = cs[1] }))
    h.fails("INVALID_ARGUMENT", "disagree", other:layer(cfg { shard_size = 2, shard_rank = 1, comm = cs[1] }))
  end)

  it("refuses a group out of rank order", function()
    local ctxs = { h.cpu(), h.cpu() }
    local cs = assert(lm.comms(ctxs))
    local l1, a1 = rank(ctxs[1], { shard_size = 2, shard_rank = 0, comm = cs[1] })
    local l2, a2 = rank(ctxs[2], { shard_size = 2, shard_rank = 1, comm = cs[2] })
    h.fails("INVALID_ARGUMENT", "in order", lm.forward_group({ l2, l1 }, { a2, a1 }))
    -- one rank alone would wait for the other for ever: refused
    h.fails("STATE", "lm.forward_group", l1:forward(a1))
    h.raises("one args table per layer", function() lm.forward_group({ l1, l2 }, { a1 }) end)
    assert.is_true(lm.forward_group({ l1, l2 }, { a1, a2 }))
  end)

  it("wraps an NCCL communicator only in builds with NCCL", function()
    if lm.has_nccl() then return end
    local ctx = h.cpu()
    local buf = assert(ctx:buffer("f32", { 1 }, "host"))
    h.fails("UNSUPPORTED", "NCCL", lm.wrap_nccl(ctx, buf:data()))
  end)
end)
