local h = dofile("spec/helpers.lua")

-- A fresh directory for files this spec writes; removed afterwards.
local function tmpdir()
  local d = h.tmpname()
  os.remove(d)
  assert(os.execute("mkdir -p '" .. d .. "'"))
  return d
end

describe("files", function()
  local ctx, dir
  before_each(function()
    ctx = h.cpu()
    dir = tmpdir()
  end)
  after_each(function()
    ctx:close()
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it("writes and reads safetensors, from a file and from a string", function()
    local path = dir .. "/t.safetensors"
    local b = assert(ctx:buffer("f32", { 2, 2 }, "host"))
    assert(b:write { 1.5, -2, 3, 4 })
    assert.is_true(ctx:write_safetensors(path, {
      { name = "w", dtype = "bf16", shape = { 2, 3 }, data = { 1, 2, 3, 4, 5, 6 } },
      { name = "b", data = b },
    }, { format = "pt", note = "spec" }))
    local f = assert(ctx:safetensors(path))
    assert.are.equal(2, f:count())
    assert.are.equal(0, f:find("w"))
    h.fails("NOT_FOUND", "no tensor named 'zz'", f:find("zz"))
    local t = assert(f:tensor("w"))
    assert.are.same({ 2, 3 }, t.shape)
    assert.are.equal("bf16", t.dtype)
    assert.are.equal("BF16", t.file_dtype)
    assert.are.equal(12, t.bytes)
    assert.are.same({ "w", "b" }, { f:tensors()[1].name, f:tensors()[2].name })
    assert.are.same({ 1, 2, 3, 4, 5, 6 }, f:read("w"))
    assert.are.same({ 1.5, -2, 3, 4 }, f:read(1))
    assert.are.same({ format = "pt", note = "spec" }, f:metadata())
    assert.are.equal(ctx, f:context())
    local fh = assert(io.open(path, "rb"))
    local bytes = fh:read("*a")
    fh:close()
    local m = assert(ctx:safetensors_string(bytes, "copy"))
    assert.are.same({ 1.5, -2, 3, 4 }, m:read("b"))
    h.fails("FORMAT", "junk", ctx:safetensors_string("garbage", "junk"))
    h.fails("NOT_FOUND", "missing.safetensors", ctx:safetensors(dir .. "/missing.safetensors"))
    h.raises("bad argument #2 to 'write_safetensors' (tensor 1: shape is missing)", function()
      ctx:write_safetensors(path, { { name = "x", data = { 1 } } })
    end)
    h.raises("bad argument #2 to 'write_safetensors' (tensor 1 data has 1 values, expected 2)", function()
      ctx:write_safetensors(path, { { name = "x", shape = { 2 }, data = { 1 } } })
    end)
  end)

  it("loads a synthetic PEFT adapter into a pool by name, and it matches the reference", function()
    assert.is_true(ctx:write_peft(dir, { layers = 2, experts = 16, hidden = 256, intermediate = 128,
      rank = 4, alpha = 8, seed = 3, targets = { "gate", "up", "down" } }))
    local p = assert(ctx:peft(dir))
    local info = p:info()
    assert.are.equal("qwen", info.family)
    assert.are.equal("per_expert", info.layout)
    assert.are.equal(4, info.rank)
    assert.are.same({ "gate", "up", "down" }, info.targets)
    assert.are.same({ 0, 1 }, p:layers())
    assert.matches("rank: 4", p:inspect())
    local layer = assert(ctx:layer { preset = "tiny", max_tokens = 64 })
    assert(layer:randomize(2, 0.05))
    local d = assert(p:layer_desc(1, layer:config()))
    assert.are.equal(4, d.gate.rank)
    assert.are.near(2.0, d.down.scale, 1e-6)
    assert.are.equal(16 * 4 * 256, #d.gate.a)
    local pool = assert(layer:pool { slots = 2, max_rank = 4 })
    assert.are.equal(0, pool:load_peft("p1", p, 1))
    assert.are.equal(1, pool:load_named("copy", d))
    assert.are.equal("p1", pool:slot_name(0))
    assert.are.equal(1, pool:find("copy"))
    h.fails("NOT_FOUND", "no slot holds an adapter named 'x'", pool:find("x"))
    assert.is_true(pool:pin(1))
    assert.are.equal(1, pool:pin_count(1))
    assert.is_true(pool:touch(1))
    -- full: slot 0 is evicted (least recently used, unpinned)
    assert.are.equal(0, pool:load_named("third", d))
    assert.are.equal(1, pool:memory().evictions)
    assert.is_true(pool:unpin(1))
    assert.is_true(pool:unload_named("third"))
    h.fails("NOT_FOUND", nil, pool:unload_named("third"))
    local batch = assert(ctx:batch())
    assert(batch:set(pool, { { tokens = 40, adapter = 1 }, { tokens = 24 } }))
    local args = assert(layer:inputs(64, 8))
    args.pool, args.batch = pool, batch
    assert.is_true(layer:forward(args))
    local c = assert(layer:check(args))
    assert.is_true(c.rel_l2 < 1e-2, "rel_l2 " .. c.rel_l2)
    h.fails("NOT_FOUND", nil, ctx:peft(dir .. "/nothing"))
  end)

  it("loads a layer and its router from a checkpoint", function()
    local E, H, I = 2, 4, 2
    local ts = {}
    for e = 0, E - 1 do
      for _, nm in ipairs { "gate_proj", "up_proj", "down_proj" } do
        local data = {}
        for i = 1, H * I do data[i] = (e * 100 + i) / 256 end
        ts[#ts + 1] = { name = ("model.layers.0.mlp.experts.%d.%s.weight"):format(e, nm), dtype = "bf16",
                        shape = nm == "down_proj" and { H, I } or { I, H }, data = data }
      end
    end
    local router = {}
    for i = 1, E * H do router[i] = i / 8 end
    ts[#ts + 1] = { name = "model.layers.0.mlp.gate.weight", dtype = "f32", shape = { E, H }, data = router }
    assert(ctx:write_safetensors(dir .. "/model.safetensors", ts))
    local ck = assert(ctx:checkpoint(dir))
    assert.are.same({ family = "qwen", experts = E, hidden = H, intermediate = I, has_router = true,
      weight_dtype = "bf16" }, ck:layer_info(0))
    local layer = assert(ctx:layer { experts = E, hidden = H, intermediate = I, top_k = 1, max_tokens = 4 })
    local r = assert(ck:load_layer(0, layer, true))
    assert.are.same({ E, H }, r:shape())
    assert.are.same(router, r:read())
    assert.are.equal(ctx, r:context())
    local w13 = layer:weights("w13"):read()
    local unpack = table.unpack or unpack
    assert.are.same(ts[1].data, { unpack(w13, 1, H * I) }) -- expert 0 gate
    assert.are.same(ts[2].data, { unpack(w13, H * I + 1, 2 * H * I) }) -- expert 0 up
    assert.is_true(ck:load_layer(0, layer))
    h.fails("NOT_FOUND", "no MoE experts for layer 3", ck:layer_info(3))
  end)
end)
