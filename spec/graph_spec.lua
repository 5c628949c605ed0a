-- CUDA graphs from Lua on the cpu backend: refused with a message that names the cuda
-- backend (spec/gpu_spec.lua replays graphs on a GPU).
local h = dofile("spec/helpers.lua")

describe("graphs on the cpu backend", function()
  local ctx
  before_each(function() ctx = h.cpu() end)
  after_each(function() ctx:close() end)

  it("refuses graph_begin, naming the cuda backend", function()
    h.fails("UNSUPPORTED", "^UNSUPPORTED: graphs need the cuda backend %(this context uses the cpu backend%)$",
      ctx:graph_begin())
  end)

  it("refuses graph_end the same way, and has no capture to end", function()
    h.fails("UNSUPPORTED", "graphs need the cuda backend", ctx:graph_end())
  end)

  it("still computes eagerly after a refused capture", function()
    h.fails("UNSUPPORTED", nil, ctx:graph_begin())
    local r = h.rig(ctx, 32)
    assert.is_true(r.layer:forward(r.args))
    local c = assert(r.layer:check(r.args))
    assert.is_true(c.rel_l2 < 1e-2, "rel_l2 " .. c.rel_l2)
  end)

  it("raises on a bad stream argument", function()
    h.raises("bad argument #1 to 'graph_begin'", function() ctx:graph_begin(42) end)
  end)
end)
