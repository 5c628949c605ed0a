-- The cuda backend from Lua (tag #gpu: excluded by default, run with
-- `busted --tags gpu spec/gpu_spec.lua` on a machine with a GPU).
local h = dofile("spec/helpers.lua")
local lm = h.lm

local rel_l2 = h.rel_l2

describe("the cuda backend #gpu", function()
  local ctx
  before_each(function()
    assert.is_true(lm.has_cuda() == true or lm.has_cuda() == 1, "this build has no CUDA backend")
    ctx = assert(lm.context { backend = "cuda" })
  end)
  after_each(function() ctx:close() end)

  it("matches the float64 reference on a mixed batch", function()
    local r = h.rig(ctx, 200)
    assert.is_true(r.layer:forward(r.args))
    local c = assert(r.layer:check(r.args))
    assert.are.equal(0, c.nonfinite)
    assert.is_true(c.ref_l2 > 0)
    assert.is_true(c.rel_l2 < 1e-2, "rel_l2 " .. c.rel_l2)
  end)

  it("gives what the cpu backend gives on the same inputs", function()
    local r = h.rig(ctx, 96)
    assert.is_true(r.layer:forward(r.args))
    local gpu = assert(r.args.out:read())
    local cpu = h.cpu()
    local rc = h.rig(cpu, 96) -- same seeds: the same weights, adapters, inputs
    assert.is_true(rc.layer:forward(rc.args))
    local ref = assert(rc.args.out:read())
    cpu:close()
    assert.is_true(rel_l2(gpu, ref) < 1e-2, "rel_l2 " .. rel_l2(gpu, ref))
  end)

  it("waits for the device only under the device_sync guard, once per forward", function()
    local r = h.rig(ctx, 64)
    for _, g in ipairs(lm.guards) do
      assert.is_true(ctx:set_guard(g))
      assert.is_true(ctx:synchronize())
      ctx:reset_counters()
      for _ = 1, 5 do assert.is_true(r.layer:forward(r.args)) end
      local c = ctx:counters()
      assert.are.equal(5, c.forwards)
      assert.are.equal(g == "device_sync" and 5 or 0, c.host_waits, "guard " .. g)
      local chk = assert(r.layer:check(r.args))
      assert.is_true(chk.rel_l2 < 1e-2, "guard " .. g .. " rel_l2 " .. chk.rel_l2)
    end
  end)

  it("replays a captured forward for new adapter mixes (graph)", function()
    local r = h.rig(ctx, 200)
    assert.is_true(ctx:set_guard("always")) -- the capture then holds the LoRA work
    assert.is_true(r.layer:forward(r.args)) -- eager once: kernels loaded
    assert.is_true(ctx:synchronize())
    assert.is_true(ctx:graph_begin())
    assert.is_true(r.layer:forward(r.args))
    local g = assert(ctx:graph_end())
    assert.are.equal(ctx, g:context())
    local mixes = {
      { { tokens = 50, adapter = 2 }, { tokens = 100 }, { tokens = 50, adapter = 3 } },
      { { tokens = 120 }, { tokens = 80 } },
      { { tokens = 1, adapter = 0 }, { tokens = 199, adapter = 1 } },
    }
    for i, mix in ipairs(mixes) do
      assert.is_true(r.batch:set(r.pool, mix))
      assert.is_true(r.args.out:fill(0 / 0))
      ctx:reset_counters()
      assert.is_true(g:launch())
      local cnt = ctx:counters()
      assert.are.equal(1, cnt.launches)
      assert.are.equal(1, cnt.forwards)
      local got = assert(r.args.out:read())
      local c = assert(r.layer:check(r.args))
      assert.are.equal(0, c.nonfinite, "mix " .. i)
      assert.is_true(c.rel_l2 < 1e-2, "mix " .. i .. " rel_l2 " .. c.rel_l2)
      assert.is_true(r.layer:forward(r.args)) -- eager, same batch: the same bits
      local eager = assert(r.args.out:read())
      for j = 1, #eager do
        if eager[j] ~= got[j] then error("mix " .. i .. ": replay and eager differ at " .. j) end
      end
    end
    assert.is_true(g:close())
    h.raises("attempt to use a closed graph", function() g:launch() end)
  end)

  it("refuses a capture whose forward failed (device_sync cannot be captured)", function()
    local r = h.rig(ctx, 64)
    assert.is_true(r.layer:forward(r.args))
    assert.is_true(ctx:synchronize())
    assert.is_true(ctx:set_guard("device_sync"))
    assert.is_true(ctx:graph_begin())
    h.fails("UNSUPPORTED", "cannot be captured", r.layer:forward(r.args))
    h.fails("UNSUPPORTED", "discarded", ctx:graph_end())
  end)

  it("keeps forwards in flight without host waits, eager and as graph replays", function()
    local exp = require "loramoe.experiment"
    local base = { backend = "cuda", preset = "tiny", layers = 3, tokens = 64, requests = 8,
                   adapters = 2, rank = 8, warmup = 1, reps = 2, pipeline = 4 }
    local rows = exp.sweep(base, { { "mode", { "eager", "graph" } }, { "guard", { "host", "always" } },
                                   { "adapter_fraction", { 0, 0.5 } } }, { progress = false })
    assert.are.equal(8, #rows)
    for _, r in ipairs(rows) do
      assert.are.equal(0, r.syncs_per_forward, r.mode .. " " .. r.guard)
      -- a replay is one launch; a set of a batch the graph reads enqueues its metadata
      -- upload (a kernel) too, which happens when the capture held LoRA work
      local lora = r.guard == "always" or r.adapter_fraction > 0
      if r.mode == "graph" then assert.are.equal(lora and 2 or 1, r.launches_per_forward) end
    end
    local one = { guard = "device_sync" }
    for k, v in pairs(base) do one[k] = one[k] or v end
    local r = exp.run(one, { progress = false })
    assert.are.equal(3, r.syncs_per_forward) -- one per layer: the old way
  end)

  -- A rank per device through NCCL, driven from one script: where the machine has two
  -- devices and the build NCCL (in CI: two simulated devices and the simulated NCCL).
  it("drives ranks on several devices from one script, summed through NCCL", function()
    if lm.device_count() < 2 or not lm.has_nccl() then
      pending("needs two devices and NCCL in the build")
      return
    end
    local shape = { experts = 8, hidden = 64, intermediate = 48, top_k = 2, max_tokens = 64 }
    local function make(c, extra)
      local t = {}
      for k, v in pairs(shape) do t[k] = v end
      for k, v in pairs(extra or {}) do t[k] = v end
      return h.shard_rank(c, t)
    end
    local wl, wa = make(ctx)
    assert(wl:forward(wa))
    local want = assert(wa.out:read())
    for _, mode in ipairs { "tp", "ep" } do
      local ctxs = { ctx, assert(lm.context { backend = "cuda", device = 1 }) }
      local cs = assert(lm.comms(ctxs))
      local layers, args = {}, {}
      for r = 1, 2 do
        layers[r], args[r] = make(ctxs[r], { shard_mode = mode, shard_rank = r - 1, shard_size = 2, comm = cs[r] })
      end
      assert.is_true(lm.forward_group(layers, args))
      local first = assert(args[1].out:read())
      assert.are.same(first, assert(args[2].out:read()))
      assert.is_true(rel_l2(first, want) < 1e-2, mode .. ": rel_l2 " .. rel_l2(first, want))
      ctxs[2]:close()
    end
  end)

  it("launches no LoRA work under guard host when the batch has no adapter", function()
    local r = h.rig(ctx, 64)
    assert.is_true(ctx:set_guard("host"))
    assert.is_true(r.batch:set(r.pool, { { tokens = 64 } }))
    ctx:reset_counters()
    assert.is_true(r.layer:forward(r.args))
    assert.are.equal(0, ctx:counters().lora_launches)
    assert.is_true(ctx:set_guard("always"))
    ctx:reset_counters()
    assert.is_true(r.layer:forward(r.args))
    assert.is_true(ctx:counters().lora_launches > 0)
  end)
end)
