-- FP8 e4m3 experts (issue 12) from Lua, under either runtime: the layer's weight_dtype
-- field, its codes and block scales, a forward with adapters against the reference,
-- and the checkpoint quantizer and loader.
local h = dofile("spec/helpers.lua")
local lm = h.lm

local function tmpdir()
  local d = h.tmpname()
  os.remove(d)
  assert(os.execute("mkdir -p '" .. d .. "'"))
  return d
end

describe("fp8 layers", function()
  local ctx, dir
  before_each(function()
    ctx = h.cpu()
    dir = tmpdir()
  end)
  after_each(function()
    ctx:close()
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it("take weight_dtype, hold codes and block scales, and check against the reference", function()
    assert.truthy(lm.dtypes[6] == "f8_e4m3")
    local l = assert(ctx:layer { experts = 4, hidden = 160, intermediate = 96, top_k = 2, max_tokens = 64,
      weight_dtype = "f8_e4m3" })
    assert.are.equal("f8_e4m3", l:config().weight_dtype)
    assert.is_true(l:randomize(3, 0.1))
    local w13 = assert(l:weights("w13"))
    assert.are.equal("f8_e4m3", w13.dtype)
    assert.are.same({ 4, 2, 2 }, assert(l:weights("w13_scales")):shape()) -- [E, 2*ceil(I/128), ceil(H/128)]
    assert.are.same({ 4, 2, 1 }, assert(l:weights("w2_scales")):shape())
    local pool = assert(l:pool { slots = 2, max_rank = 8 })
    assert(pool:load_random(0, { rank = 8, seed = 1 }))
    assert(pool:load_random(1, { rank = 2, seed = 2, fused = true }))
    local batch = assert(ctx:batch())
    assert(batch:set(pool, { { tokens = 20, slot = 0 }, { tokens = 10 }, { tokens = 30, slot = 1 } }))
    local args = assert(l:inputs(60, 4))
    args.pool, args.batch = pool, batch
    assert.is_true(l:forward(args))
    local c = assert(l:check(args))
    assert.are.equal(0, c.nonfinite)
    assert.is_true(c.rel_l2 < 1e-2, "rel_l2 " .. c.rel_l2)
    -- a bf16 layer has no scales, and the field takes only its two dtypes
    local b = assert(ctx:layer { experts = 2, hidden = 8, intermediate = 4, weight_dtype = "bf16" })
    assert.are.equal("bf16", b:config().weight_dtype)
    h.fails("INVALID_ARGUMENT", "block scales belong to FP8 layers", b:weights("w13_scales"))
    h.raises("weight_dtype", function() return ctx:layer { experts = 2, hidden = 8, intermediate = 4,
      weight_dtype = "f16" } end)
  end)

  it("quantizes a bf16 checkpoint and loads it into an fp8 layer", function()
    local E, H, I = 2, 16, 8
    local ts = {}
    for e = 0, E - 1 do
      for _, nm in ipairs { "gate_proj", "up_proj", "down_proj" } do
        local data = {}
        for i = 1, H * I do data[i] = ((e * 37 + i * 11) % 29 - 14) / 64 end
        ts[#ts + 1] = { name = ("model.layers.0.mlp.experts.%d.%s.weight"):format(e, nm), dtype = "bf16",
                        shape = nm == "down_proj" and { H, I } or { I, H }, data = data }
      end
    end
    assert(ctx:write_safetensors(dir .. "/bf16.safetensors", ts))
    assert.is_true(ctx:quantize_checkpoint(dir .. "/bf16.safetensors", dir .. "/fp8.safetensors"))
    local st = assert(ctx:safetensors(dir .. "/fp8.safetensors"))
    local t = assert(st:tensor("model.layers.0.mlp.experts.1.down_proj.weight"))
    assert.are.equal("F8_E4M3", t.file_dtype)
    local s = assert(st:tensor("model.layers.0.mlp.experts.1.down_proj.weight_scale_inv"))
    assert.are.equal("F32", s.file_dtype)
    assert.are.same({ 1, 1 }, s.shape)
    st:close()
    local ck = assert(ctx:checkpoint(dir .. "/fp8.safetensors"))
    local info = assert(ck:layer_info(0))
    assert.are.equal("f8_e4m3", info.weight_dtype)
    local l = assert(ctx:layer { experts = E, hidden = H, intermediate = I, top_k = 1, max_tokens = 4,
      weight_dtype = info.weight_dtype })
    assert.is_true(ck:load_layer(0, l))
    -- the same as quantizing the same values through set_expert
    local q = assert(ctx:layer { experts = E, hidden = H, intermediate = I, top_k = 1, max_tokens = 4,
      weight_dtype = "f8_e4m3" })
    for e = 0, E - 1 do
      assert(q:set_expert(e, { gate = ts[3 * e + 1].data, up = ts[3 * e + 2].data, down = ts[3 * e + 3].data }))
    end
    for _, w in ipairs { "w13", "w2", "w13_scales", "w2_scales" } do
      assert.are.same(q:weights(w):read(), l:weights(w):read())
    end
    -- an FP8 checkpoint into a bf16 layer is refused, saying why
    local b = assert(ctx:layer { experts = E, hidden = H, intermediate = I, top_k = 1, max_tokens = 4 })
    h.fails("INVALID_ARGUMENT", "F8_E4M3", ck:load_layer(0, b))
    h.fails("NOT_FOUND", nil, ctx:quantize_checkpoint(dir .. "/missing.safetensors", dir .. "/x.safetensors"))
  end)
end)
