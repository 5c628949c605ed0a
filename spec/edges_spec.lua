-- The Lua boundary under both runtimes: the same misuse gives the same message, raised
-- at the caller's line, under lua5.4 (C module) and luajit (FFI). Each entry's message
-- is compared exactly, and this file runs under both (ctest's lua54_specs and
-- luajit_specs), so a runtime that said anything else would fail here. Hostile values
-- (huge counts, __len and __index metamethods, strings for numbers, lists with holes)
-- are refused before anything is allocated or truncated.
local h = dofile("spec/helpers.lua")
local lm = h.lm

local this_file = "edges_spec.lua"

-- f() raises exactly msg, positioned in this file.
local function same(msg, f)
  local ok, err = pcall(f)
  assert.is_false(ok, "expected: " .. msg)
  err = tostring(err)
  local where, text = err:match("^(.-:%d+): (.*)$")
  assert.are.equal(msg, text or err)
  assert.truthy(where and where:find(this_file, 1, true), "raised at " .. tostring(where))
end

describe("the Lua boundary", function()
  local ctx, layer, pool, batch, buf
  setup(function()
    ctx = h.cpu()
    layer = assert(ctx:layer { experts = 2, hidden = 4, intermediate = 2, top_k = 1, max_tokens = 8 })
    pool = assert(layer:pool { slots = 2, max_rank = 2 })
    batch = assert(ctx:batch())
    buf = assert(ctx:buffer("f32", { 4 }, "host"))
  end)
  teardown(function() ctx:close() end)

  it("refuses integers out of range instead of truncating them", function()
    same("bad argument #1 to 'load_random' (slot must be -2147483648..2147483647, got 4294967296)",
      function() pool:load_random(2 ^ 32) end)
    same("bad argument #1 to 'unload' (slot must be -2147483648..2147483647, got 4294967296)",
      function() pool:unload(2 ^ 32) end)
    same("bad argument #1 to 'pin' (number has no integer representation)", function() pool:pin(2 ^ 64) end)
    same("bad argument #1 to 'slot_info' (number has no integer representation)", function() pool:slot_info(0 / 0) end)
    same("bad argument #1 to 'touch' (number has no integer representation)", function() pool:touch(math.huge) end)
    same("bad argument #2 to 'set' (request 1: adapter must be a slot number or nil)",
      function() batch:set(pool, { { tokens = 1, adapter = 2 ^ 32 } }) end)
    same("bad argument #2 to 'set' (request 1: tokens must be an integer)",
      function() batch:set(nil, { { tokens = 2 ^ 31 } }) end)
    same("bad argument #1 to 'pool' (field 'slots' must be -2147483648..2147483647, got 4294967296)",
      function() layer:pool { slots = 2 ^ 32 } end)
    same("bad argument #1 to 'layer' (field 'experts' must be -2147483648..2147483647, got 8589934592)",
      function() ctx:layer { experts = 2 ^ 33, hidden = 4, intermediate = 4 } end)
    -- a slot inside int32 but outside the pool is the library's to refuse
    h.fails("INVALID_ARGUMENT", nil, pool:load_random(7))
  end)

  it("does not take strings for numbers", function()
    same("bad argument #1 to 'fill' (number expected, got string)", function() buf:fill("1") end)
    same("bad argument #1 to 'load_random' (number expected, got string)", function() pool:load_random("0") end)
    same("bad argument #1 to 'write' (values[1] is not a number)", function() buf:write({ "1" }) end)
    same("bad argument #1 to 'context' (field 'threads' must be an integer)", function() lm.context { threads = "2" } end)
    same("bad argument #2 to 'buffer' (shape[1] must be a non-negative integer)", function() ctx:buffer("f32", { "4" }) end)
  end)

  it("reads lists raw: holes are found, __len and __index are not believed", function()
    same("bad argument #1 to 'write' (values[2] is not a number)", function() buf:write({ 1, nil, 3 }) end)
    local huge_len = setmetatable({ 1, 2 }, { __len = function() return 2 ^ 40 end })
    same("bad argument #1 to 'write' (values has a __len metamethod (give a plain list))",
      function() buf:write(huge_len) end)
    same("bad argument #2 to 'set' (requests has a __len metamethod (give a plain list))",
      function() batch:set(nil, huge_len) end)
    same("bad argument #2 to 'buffer' (shape has a __len metamethod (give a plain list))",
      function() ctx:buffer("f32", huge_len) end)
    -- a proxy list: __index gives values, but the list itself holds none
    local proxy = setmetatable({}, { __index = function(_, i) return i end })
    same("bad argument #1 to 'set_weights' (w13 has 0 values, expected 32)", function() layer:set_weights(proxy) end)
    same("bad argument #2 to 'load' (gate.a has a __len metamethod (give a plain list))",
      function() pool:load(0, { gate = { a = huge_len, b = {} } }) end)
  end)

  it("takes only nil or a pointer as a stream", function()
    same("bad argument #1 to 'synchronize' (pointer (a stream) or nil expected, got number)",
      function() ctx:synchronize(0) end)
    same("bad argument #2 to 'fill' (pointer (a stream) or nil expected, got string)", function() buf:fill(1, "s") end)
    same("bad argument #1 to 'context' (field 'stream' must be a pointer (a cudaStream_t) or nil)",
      function() lm.context { stream = true } end)
    assert.is_true(ctx:synchronize(nil))
  end)

  it("names a bad self instead of 'bad argument #0'", function()
    same("calling 'read' on bad self (loramoe.buffer expected, got table)", function() buf.read({}) end)
    same("calling 'set' on bad self (loramoe.batch expected, got loramoe.pool)", function() batch.set(pool, nil, {}) end)
    same("calling 'close' on bad self (loramoe.context expected, got number)", function() ctx.close(1) end)
  end)

  it("refuses unknown option names", function()
    same("bad argument #1 to 'context' (unknown option 'max_token')", function() lm.context { max_token = 4 } end)
    same("bad argument #1 to 'layer' (unknown option 'max_token')",
      function() ctx:layer { preset = "tiny", max_token = 4 } end)
    same("bad argument #1 to 'pool' (unknown option 'slot')", function() layer:pool { slot = 2 } end)
    same("bad argument #2 to 'load_random' (unknown option 'ranks')", function() pool:load_random(0, { ranks = 2 }) end)
    same("bad argument #2 to 'write_peft' (unknown option 'layer')", function() ctx:write_peft("x", { layer = 1 }) end)
  end)

  it("adopts only live contexts and wraps only inside the owner", function()
    local other = assert(ctx:buffer("f32", { 64 }, "host"))
    same("bad argument #1 to 'adopt_context' (not a loramoe context)", function() lm.adopt_context(other:data()) end)
    local gone = h.cpu()
    local p = gone:pointer()
    gone:close()
    gone = nil -- its objects' reference goes with it
    collectgarbage()
    collectgarbage()
    same("bad argument #1 to 'adopt_context' (not a loramoe context)", function() lm.adopt_context(p) end)
    local view = assert(ctx:wrap("f32", { 64 }, other:data(), "host", other))
    assert.are.equal(64, view.numel)
    same("bad argument #3 to 'wrap' (the view (260 bytes) does not lie inside the owner's 256 bytes)",
      function() ctx:wrap("f32", { 65 }, other:data(), "host", other) end)
    -- a view is closed with its owner (its memory is gone)
    local owner = assert(ctx:buffer("f32", { 4 }, "host"))
    local v2 = assert(ctx:wrap("f32", { 4 }, owner:data(), "host", owner))
    owner:close()
    assert.is_true(v2:is_closed())
    same("attempt to use a closed buffer", function() v2:read() end)
    same("bad argument #5 to 'wrap' (loramoe.buffer expected, got nil)",
      function() ctx:wrap("f32", { 1 }, other:data(), "host") end)
    same("bad argument #4 to 'wrap' (memory differs from the owner's)",
      function() ctx:wrap("f32", { 1 }, other:data(), "device", other) end)
  end)

  it("makes pools alike: refusals, a closed layer, the raw cores' answer", function()
    local l2 = assert(ctx:layer { experts = 2, hidden = 4, intermediate = 2, top_k = 1, max_tokens = 8 })
    local p, msg, code = l2:pool { slots = 0 }
    assert.is_nil(p)
    assert.are.equal("INVALID_ARGUMENT: num_slots must be 1..4096, got 0", msg)
    assert.are.equal("INVALID_ARGUMENT", code)
    p, msg = l2:pool { max_rank = 2000 }
    assert.are.equal("INVALID_ARGUMENT: max_rank must be 1..1024, got 2000", msg)
    same("bad argument #1 to 'pool' (table expected, got number)", function() l2:pool(5) end)
    same("bad argument #1 to 'pool' (field 'max_rank' must be an integer)", function() l2:pool { max_rank = "2" } end)
    -- under either core a pool the library refuses is its status alone, no box (as is
    -- a layer whose config can't be read, which an open layer box never is)
    local st, box = lm.core.pool_create(l2._box, { num_slots = 0 })
    assert.are.equal(1, tonumber(st))
    assert.is_nil(box)
    assert.are.equal(1, select("#", lm.core.pool_create(l2._box, { num_slots = 0 })))
    l2:close()
    same("attempt to use a closed layer", function() l2:pool {} end)
  end)

  it("keeps strings computed by __index alive while C uses them", function()
    local dir = h.tmpname()
    local names = setmetatable({}, { __index = function(_, k) return k == "name" and ("t" .. string.rep("x", 40)) or nil end })
    local tensors = {}
    for i = 1, 8 do
      tensors[i] = setmetatable({ shape = { 2 }, data = { i, i } },
        { __index = function(_, k) collectgarbage(); return names[k] and (names[k] .. i) or nil end })
    end
    assert.is_true(ctx:write_safetensors(dir, tensors))
    local f = assert(ctx:safetensors(dir))
    assert.are.equal(8, f:count())
    assert.are.equal("t" .. string.rep("x", 40) .. "3", f:tensor(2).name)
    f:close()
    os.remove(dir)
  end)

  it("bounds a PEFT layer description by what it would allocate", function()
    local dir = h.tmpname()
    os.remove(dir)
    assert.is_true(ctx:write_peft(dir, { layers = 1, experts = 2, hidden = 4, intermediate = 2, rank = 2 }))
    local p = assert(ctx:peft(dir))
    same("bad argument #2 to 'layer_desc' (experts * max_rank * (3*hidden + 5*intermediate) = 94489280468 is more than 2^31)",
      function() p:layer_desc(0, { experts = 2 ^ 31 - 1, hidden = 4, intermediate = 2 }) end)
    p:close()
  end)

  it("writes PEFT adapters with rank and alpha patterns", function()
    local dir = h.tmpname()
    os.remove(dir)
    assert.is_true(ctx:write_peft(dir, { layers = 1, experts = 2, hidden = 4, intermediate = 2, rank = 2, alpha = 4,
      rank_pattern = { down_proj = 1 }, alpha_pattern = { up_proj = 8 } }))
    local p = assert(ctx:peft(dir))
    local info = p:info()
    assert.is_true(info.has_patterns)
    assert.are.equal(2, info.max_rank)
    local d = assert(p:layer_desc(0, { experts = 2, hidden = 4, intermediate = 2 }))
    assert.are.equal(1, d.down.rank)
    assert.are.equal(2, d.gate.rank)
    assert.are.near(8 / 2, d.up.scale, 1e-6)
    assert.are.near(4 / 2, d.gate.scale, 1e-6)
    p:close()
  end)
end)
