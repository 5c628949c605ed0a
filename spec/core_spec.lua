-- The raw core (lm.core: lua/loramoe_core.c under lua5.4, lua/loramoe/ffi_core.lua
-- under luajit) checks what it is given by itself, whatever the API above it checked:
-- its wrappers are made from argument specs (rows in C, the header's declarations in
-- the FFI), and these cases go through each kind of them. The messages differ between
-- the cores (the API's are the ones users see, edges_spec.lua); what must hold under
-- both is that the call raises before C runs, or answers as C does.
local h = dofile("spec/helpers.lua")
local R = h.lm.core

local function refuses(f, ...)
  local ok = pcall(f, ...)
  assert.is_false(ok)
end

describe("the raw core", function()
  local ctx, buf, layer, pool, batch
  setup(function()
    local st
    st, ctx = R.context_create { backend = 1, threads = 1 }
    assert.are.equal(0, tonumber(st))
    st, buf = R.buffer_create(ctx, 3, 0, { 4 }) -- f64, host
    assert.are.equal(0, tonumber(st))
    st, layer = R.layer_create(ctx, { num_experts = 2, hidden = 4, intermediate = 2, top_k = 1, max_tokens = 8 })
    assert.are.equal(0, tonumber(st))
    st, pool = R.pool_create(layer, { num_slots = 2, max_rank = 2 })
    assert.are.equal(0, tonumber(st))
    st, batch = R.batch_create(ctx)
    assert.are.equal(0, tonumber(st))
  end)
  teardown(function()
    for _, b in ipairs { batch, pool, layer, buf, ctx } do R.close(b) end
  end)

  it("answers with the status, then the out-parameters", function()
    local st, n = R.device_count()
    assert.are.equal(0, tonumber(st))
    assert.are.equal("number", type(n))
    local d
    st, d = R.buffer_describe(buf)
    assert.are.equal(0, tonumber(st))
    assert.are.same({ 4 }, d.shape)
    assert.are.equal(4, d.numel)
    local c
    st, c = R.layer_get_config(layer)
    assert.are.equal(0, tonumber(st))
    assert.are.equal(4, c.hidden)
    assert.are.equal(2, c.num_experts)
    st = R.pool_find(pool, "nothing here")
    assert.are.equal(6, tonumber(st)) -- NOT_FOUND, and nothing after it
    assert.are.equal(1, select("#", R.pool_find(pool, "nothing here")))
    assert.are.equal("", R.pool_slot_name(pool, 0))
    assert.are.equal(8, R.dtype_size(3))
    assert.are.equal("f64", R.dtype_name(3))
    assert.is_nil(R.context_stream(ctx)) -- the cpu backend has none
    assert.are.equal(1, select("#", R.context_stream(ctx))) -- nil, under both cores
    assert.are.equal(0, select("#", R.context_reset_counters(ctx)))
  end)

  it("refuses boxes of the wrong kind and closed boxes", function()
    refuses(R.pool_unload, layer, 0)
    refuses(R.buffer_describe, ctx)
    refuses(R.batch_get_info, pool)
    refuses(R.pool_find, pool, {}) -- a table for a string
    refuses(R.pool_find, pool, 5) -- a number for a string: no coercion under either core
    refuses(R.safetensors_open_memory, ctx, 5, "x")
    local st, b = R.buffer_create(ctx, 3, 0, { 2 })
    assert.are.equal(0, tonumber(st))
    R.close(b)
    R.close(b) -- a second close releases nothing
    refuses(R.buffer_describe, b)
    refuses(R.buffer_fill, b, 1)
  end)

  it("refuses integers out of range instead of truncating them", function()
    refuses(R.pool_unload, pool, 2 ^ 31)
    refuses(R.pool_pin, pool, -2 ^ 31 - 1)
    refuses(R.pool_slot_info, pool, 0.5)
    refuses(R.context_set_guard, ctx, 0 / 0)
    refuses(R.layer_create, ctx, { num_experts = 2 ^ 32 })
    refuses(R.pool_load_random, pool, 0, { rank = "2" })
    refuses(R.buffer_create, ctx, 3, 0, { -1 })
    refuses(R.buffer_create, ctx, 3, 0, { 1, 1, 1, 1, 1 })
  end)

  it("refuses arrays smaller than what C would read or write", function()
    local small = R.mem("f64", 2)
    refuses(R.buffer_write, buf, 0, small, 4)
    refuses(R.buffer_read, buf, 0, small, 3)
    assert.are.equal(0, tonumber(R.buffer_write(buf, 0, small, 2)))
    refuses(R.buffer_write, buf, 0, R.mem("i32", 4), 4) -- the wrong element type
    refuses(R.batch_set, batch, nil, 3, R.mem("i32", 2), R.mem("i32", 3))
    refuses(R.batch_offsets, batch, R.mem("i64", 1), 2)
    refuses(R.batch_active_slots, batch, R.mem("i32", 4), R.mem("i64", 1), 2)
    refuses(R.pool_load, pool, 0, { gate = { rank = 2, scale = 1, a = R.mem("f64", 1), b = R.mem("f64", 1) } })
    refuses(R.pool_load_named, pool, "x", { down = { rank = 1, scale = 1, a = R.mem("f64", 2), b = R.mem("f64", 8) } })
  end)

  it("wraps only inside the owner's memory", function()
    local st, d = R.buffer_describe(buf) -- 4 f64: 32 bytes
    assert.are.equal(0, tonumber(st))
    local v
    st, v = R.buffer_wrap(ctx, 3, 0, { 4 }, d.data, buf)
    assert.are.equal(0, tonumber(st))
    R.close(v)
    st, v = R.buffer_wrap(ctx, 1, 0, { 2, 4 }, d.data, buf) -- f32 [2, 4]: the same 32 bytes
    assert.are.equal(0, tonumber(st))
    R.close(v)
    refuses(R.buffer_wrap, ctx, 3, 0, { 5 }, d.data, buf) -- 40 bytes
    refuses(R.buffer_wrap, ctx, 3, 0, { 2 ^ 40, 2 ^ 40 }, d.data, buf) -- a size that wraps
    refuses(R.buffer_wrap, ctx, 3, 0, { 1 }, d.data, nil) -- no owner
    refuses(R.buffer_wrap, ctx, 3, 0, { 1 }, d.data, layer) -- not a buffer
    refuses(R.buffer_wrap, ctx, 3, 1, { 1 }, d.data, buf) -- device memory, the owner's is host
    refuses(R.buffer_wrap, ctx, 3, 0, { 1 }, R.pointer(layer), buf) -- outside the owner
    local st2, other = R.buffer_create(ctx, 3, 0, { 64 })
    assert.are.equal(0, tonumber(st2))
    local _, od = R.buffer_describe(other)
    refuses(R.buffer_wrap, ctx, 3, 0, { 1 }, od.data, buf) -- another buffer's memory
    R.close(other)
  end)

  it("takes tables where C takes a struct", function()
    refuses(R.context_create, 1)
    refuses(R.pool_load_random, pool, 0, "rank 2")
    refuses(R.forward, ctx, nil)
    refuses(R.forward, ctx, { layer = pool })
    refuses(R.forward, ctx, { layer = layer, x = buf, out = ctx }) -- a box field of the wrong kind
    refuses(R.layer_create, ctx, { num_experts = 2, hidden = 4, intermediate = 2, comm = ctx })
    refuses(R.batch_create_with, ctx, { staging_depth = 1.5 })
  end)

  -- A table whose fields all come from __index, each a fresh value (a function in
  -- `fields` builds one per read), each read first running the collector and filling
  -- the heap with strings of about the same sizes: a value that C was given a pointer
  -- into and that nothing references any more is freed, then overwritten, before C
  -- runs. The results are checked by content; the ASan build (make test-fuzz-lua
  -- builds one; ctest -L lua there) also reports any read of freed memory.
  local junk = {}
  local function hostile(fields)
    return setmetatable({}, { __index = function(_, k)
      collectgarbage()
      collectgarbage()
      for i = 1, 64 do junk[(#junk % 256) + 1] = string.rep(string.char(65 + i % 26), 40 + i % 16) .. i end
      local v = fields[k]
      if type(v) == "function" then return v() end
      return v
    end })
  end

  it("keeps what metamethods give alive until C returns", function()
    local path = h.tmpname()
    local entries = {}
    for i = 1, 6 do
      entries[i] = hostile {
        name = function() return "tensor." .. string.rep("n", 40) .. i end, dtype = 3,
        shape = function() return { 2 } end,
        data = function() -- a buffer box that only C would see
          local st, b = R.buffer_create(ctx, 3, 0, { 2 })
          assert.are.equal(0, tonumber(st))
          assert.are.equal(0, tonumber(R.buffer_fill(b, i)))
          return b
        end,
      }
    end
    assert.are.equal(0, tonumber(R.safetensors_write(ctx, path, entries, { "key" }, { "value" })))
    local st, f = R.safetensors_open(ctx, path)
    assert.are.equal(0, tonumber(st))
    assert.are.equal(6, R.safetensors_count(f))
    for i = 1, 6 do
      local found, idx = R.safetensors_find(f, "tensor." .. string.rep("n", 40) .. i)
      assert.are.equal(0, tonumber(found), "tensor " .. i)
      local m = R.mem("f64", 2)
      assert.are.equal(0, tonumber(R.safetensors_read(f, idx, m, 2)))
      assert.are.same({ i, i }, R.unpack(m))
    end
    R.close(f)
    os.remove(path)

    -- string fields of a struct (the patterns' keys)
    local dir = h.tmpname()
    os.remove(dir)
    local spec = hostile { num_layers = 1, num_experts = 2, hidden = 4, intermediate = 2, rank = 2, alpha = 4,
      rank_pattern_key = function() return "down" .. "_proj" end, rank_pattern_value = 1,
      alpha_pattern_key = function() return "up" .. "_proj" end, alpha_pattern_value = 8 }
    assert.are.equal(0, tonumber(R.peft_write_synthetic(ctx, dir, spec)))
    local p
    st, p = R.peft_open(ctx, dir)
    assert.are.equal(0, tonumber(st))
    local d
    st, d = R.peft_layer_desc(p, 0, 2, 4, 2)
    assert.are.equal(0, tonumber(st))
    assert.are.equal(1, d.down.rank)
    assert.are.equal(2, d.gate.rank)
    assert.are.near(8 / 2, d.up.scale, 1e-6)
    R.close(p)

    -- mems of an adapter description, boxes of a struct
    local part = function()
      return hostile { rank = 1, scale = 1, a = function() return R.mem("f64", 8) end,
        b = function() return R.mem("f64", 4) end }
    end
    assert.are.equal(0, tonumber(R.pool_load(pool, 0, hostile { gate = part, up = part })))
    local l2
    st, l2 = R.layer_create(ctx, hostile { num_experts = 2, hidden = 4, intermediate = 2, top_k = 1,
      max_tokens = 8 })
    assert.are.equal(0, tonumber(st))
    R.close(l2)
    junk = {}
  end)
end)
