local h = dofile("spec/helpers.lua")
local lm = h.lm

local function read_all(b) return assert(b:read()) end

local rel_l2 = h.rel_l2

describe("forward on the cpu backend", function()
  local ctx
  before_each(function() ctx = h.cpu() end)
  after_each(function() ctx:close() end)

  it("matches the float64 reference on a mixed batch", function()
    local r = h.rig(ctx, 96)
    assert.is_true(r.layer:forward(r.args))
    local c = assert(r.layer:check(r.args))
    assert.are.equal(96 * 256, c.numel)
    assert.are.equal(0, c.nonfinite)
    assert.is_true(c.ref_l2 > 0)
    assert.is_true(c.rel_l2 < 1e-2, "rel_l2 " .. c.rel_l2)
  end)

  it("applies the adapters: a batch without them gives another result", function()
    local r = h.rig(ctx, 64)
    assert.is_true(r.layer:forward(r.args))
    local with = read_all(r.args.out)
    assert.is_true(r.batch:set(nil, { { tokens = 64 } }))
    local args = { batch = r.batch, x = r.args.x, logits = r.args.logits, out = r.args.out }
    assert.is_true(r.layer:forward(args))
    local without = read_all(r.args.out)
    assert.is_true(rel_l2(with, without) > 1e-2)
    local c = assert(r.layer:check(args))
    assert.is_true(c.rel_l2 < 1e-2, "rel_l2 " .. c.rel_l2)
  end)

  it("takes routing as top-k ids and weights", function()
    local layer = assert(ctx:layer { preset = "tiny", max_tokens = 32 })
    assert(layer:randomize(5, 0.05))
    local pool = assert(layer:pool { slots = 1, max_rank = 8 })
    assert(pool:load_random(0, { rank = 8, seed = 9 }))
    local batch = assert(ctx:batch())
    assert(batch:set(pool, { { tokens = 20, adapter = 0 }, { tokens = 12 } }))
    local M, k = 32, 2
    local ids, wts = {}, {}
    for t = 0, M - 1 do
      ids[2 * t + 1], ids[2 * t + 2] = t % 16, (t * 5 + 3) % 16
      wts[2 * t + 1], wts[2 * t + 2] = 0.75, 0.25
    end
    local tid = assert(ctx:buffer("i32", { M, k }))
    local tw = assert(ctx:buffer("f32", { M, k }))
    assert(tid:write(ids))
    assert(tw:write(wts))
    local x = assert(ctx:buffer("bf16", { M, 256 }))
    assert(x:fill_random(4, -1, 1))
    local out = assert(ctx:buffer("bf16", { M, 256 }))
    local args = { pool = pool, batch = batch, x = x, topk_ids = tid, topk_weights = tw, out = out }
    assert.is_true(layer:forward(args))
    local c = assert(layer:check(args))
    assert.is_true(c.rel_l2 < 1e-2, "rel_l2 " .. c.rel_l2)
    -- ids out of range are the library's to refuse, never a crash
    assert(tid:write({ 99 }))
    local ok, msg, code = layer:forward(args)
    if not ok then h.fails(code, nil, ok, msg, code) end
  end)

  it("gives equal results and the documented waits under every guard", function()
    local r = h.rig(ctx, 64)
    local outs = {}
    for _, g in ipairs(lm.guards) do
      assert.is_true(ctx:set_guard(g))
      ctx:reset_counters()
      for _ = 1, 3 do assert.is_true(r.layer:forward(r.args)) end
      local c = ctx:counters()
      assert.are.equal(3, c.forwards)
      if g == "device_sync" then
        assert.are.equal(3, c.host_waits) -- one wait per forward: the old way
      else
        assert.are.equal(0, c.host_waits) -- the host knows; nothing waits
      end
      assert.is_true(c.lora_launches >= 3)
      outs[g] = read_all(r.args.out)
    end
    assert.are.same(outs.host, outs.device_sync)
    assert.are.same(outs.host, outs.always)
  end)

  it("enqueues LoRA work without active adapters only under guard always", function()
    local r = h.rig(ctx, 32)
    assert.is_true(r.batch:set(r.pool, { { tokens = 32 } }))
    local per = {}
    for _, g in ipairs(lm.guards) do
      assert.is_true(ctx:set_guard(g))
      ctx:reset_counters()
      assert.is_true(r.layer:forward(r.args))
      per[g] = ctx:counters()
    end
    assert.are.equal(0, per.host.lora_launches)
    assert.are.equal(0, per.device_sync.lora_launches)
    assert.are.equal(1, per.device_sync.host_waits)
    assert.is_true(per.always.lora_launches > 0)
  end)

  it("matches an independent Lua computation of the layer's math", function()
    -- Shapes small enough to compute here; values that bf16 holds exactly.
    local E, H, I, k, M = 3, 8, 4, 2, 6
    local layer = assert(ctx:layer { experts = E, hidden = H, intermediate = I, top_k = k, max_tokens = M })
    local seed = 17
    local function v()
      seed = (seed * 1103515245 + 12345) % 2147483648
      return (seed % 64 - 32) / 64
    end
    local function arr(n)
      local t = {}
      for i = 1, n do t[i] = v() end
      return t
    end
    local W13, W2 = arr(E * 2 * I * H), arr(E * H * I)
    assert(layer:set_weights(W13, W2))
    local pool = assert(layer:pool { slots = 2, max_rank = 2 })
    local sep = {
      gate = { a = arr(E * 2 * H), b = arr(E * I * 2), rank = 2, scale = 0.5 },
      up = { a = arr(E * 1 * H), b = arr(E * I * 1), rank = 1, scale = 2 },
      down = { a = arr(E * 2 * I), b = arr(E * H * 2), rank = 2, scale = 1.5 },
    }
    local fused = { gate_up = { a = arr(E * 2 * H), b = arr(E * 2 * I * 2), rank = 2, scale = 0.75 } }
    assert(pool:load(0, sep))
    assert(pool:load(1, fused))
    local batch = assert(ctx:batch())
    local reqs = { { tokens = 3, adapter = 0 }, { tokens = 2 }, { tokens = 1, adapter = 1 } }
    assert(batch:set(pool, reqs))
    local X = arr(M * H)
    local ids, wts = {}, {}
    for t = 0, M - 1 do
      ids[k * t + 1], ids[k * t + 2] = t % E, (t + 1) % E
      wts[k * t + 1], wts[k * t + 2] = 0.625, 0.375
    end
    local x = assert(ctx:buffer("bf16", { M, H }))
    assert(x:write(X))
    local tid = assert(ctx:buffer("i32", { M, k }))
    assert(tid:write(ids))
    local tw = assert(ctx:buffer("f32", { M, k }))
    assert(tw:write(wts))
    local out = assert(ctx:buffer("bf16", { M, H }))
    assert.is_true(layer:forward { pool = pool, batch = batch, x = x, topk_ids = tid, topk_weights = tw, out = out })

    -- part: a [E, r, in], b [E, out, r]; returns s * B (A v) for expert e (0-based)
    local function lora(p, e, vin, nin, nout)
      local r = p.rank
      local mid = {}
      for j = 1, r do
        local s = 0
        for i = 1, nin do s = s + p.a[(e * r + j - 1) * nin + i] * vin[i] end
        mid[j] = s
      end
      local res = {}
      for o = 1, nout do
        local s = 0
        for j = 1, r do s = s + p.b[(e * nout + o - 1) * r + j] * mid[j] end
        res[o] = p.scale * s
      end
      return res
    end
    local slot_of = { 0, 0, 0, -1, -1, 1 }
    local want = {}
    for t = 0, M - 1 do
      local xt = {}
      for i = 1, H do xt[i] = X[t * H + i] end
      local acc = {}
      for i = 1, H do acc[i] = 0 end
      for j = 1, k do
        local e, w = ids[k * t + j], wts[k * t + j]
        local gu = {}
        for row = 1, 2 * I do
          local s = 0
          for i = 1, H do s = s + W13[(e * 2 * I + row - 1) * H + i] * xt[i] end
          gu[row] = s
        end
        local slot = slot_of[t + 1]
        if slot == 0 then
          local g, u = lora(sep.gate, e, xt, H, I), lora(sep.up, e, xt, H, I)
          for i = 1, I do gu[i], gu[I + i] = gu[i] + g[i], gu[I + i] + u[i] end
        elseif slot == 1 then
          local d = lora(fused.gate_up, e, xt, H, 2 * I)
          for i = 1, 2 * I do gu[i] = gu[i] + d[i] end
        end
        local act = {}
        for i = 1, I do act[i] = gu[i] / (1 + math.exp(-gu[i])) * gu[I + i] end
        local y = {}
        for o = 1, H do
          local s = 0
          for i = 1, I do s = s + W2[(e * H + o - 1) * I + i] * act[i] end
          y[o] = s
        end
        if slot == 0 then
          local d = lora(sep.down, e, act, I, H)
          for o = 1, H do y[o] = y[o] + d[o] end
        end
        for o = 1, H do acc[o] = acc[o] + w * y[o] end
      end
      for o = 1, H do want[t * H + o] = acc[o] end
    end
    local got = read_all(out)
    local err = rel_l2(got, want)
    assert.is_true(err < 1e-2, "rel_l2 vs the Lua computation " .. err)
  end)

  it("returns failures for inconsistent arguments", function()
    local r = h.rig(ctx, 32)
    local bad = assert(ctx:buffer("bf16", { 31, 256 }))
    local args = {}
    for key, val in pairs(r.args) do args[key] = val end
    args.out = bad
    h.fails("INVALID_ARGUMENT", "out has shape %[31, 256%]; expected %[32, 256%]", r.layer:forward(args))
    args.out = r.args.out
    args.pool = nil
    h.fails("INVALID_ARGUMENT", "no pool was given", r.layer:forward(args))
    local f32 = assert(ctx:buffer("f32", { 32, 256 }, "host"))
    args.pool, args.out = r.pool, f32
    h.fails("INVALID_ARGUMENT", "out has dtype f32", r.layer:forward(args))
    h.raises("bad argument #1 to 'forward' (field 'x' must be a loramoe.buffer)", function()
      r.layer:forward { batch = r.batch, x = 1, out = f32 }
    end)
    h.raises("bad argument #1 to 'forward' (field 'out' is missing", function()
      r.layer:forward { batch = r.batch, x = f32 }
    end)
  end)
end)
