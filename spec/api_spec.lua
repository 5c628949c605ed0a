-- The Lua-level API is the same under both runtimes (written once, lua/loramoe/api.lua);
-- this list is the contract. Each run also checks that its raw core (C module or FFI
-- binding) exposes the same functions as the other.
local h = dofile("spec/helpers.lua")
local lm = h.lm

local module_functions = {
  "version", "status_string", "has_cuda", "device_count", "device_info", "dtype_size",
  "dtype_name", "lora_scale", "now", "context", "adopt_context", "has_nccl", "comms", "wrap_nccl", "forward_group",
}
local methods = {
  context = { "close", "is_closed", "set_guard", "stream", "synchronize", "counters",
              "wait_counters", "reset_counters", "last_error", "buffer", "wrap", "layer", "batch", "safetensors",
              "safetensors_string", "write_safetensors", "peft", "write_peft", "checkpoint", "quantize_checkpoint", "pointer",
              "graph_begin", "graph_end" },
  buffer = { "close", "is_closed", "shape", "describe", "data", "write", "read", "fill_random",
             "fill", "compare", "context" },
  layer = { "close", "is_closed", "config", "randomize", "set_weights", "set_expert", "weights",
            "pool", "forward", "reference", "context" },
  pool = { "close", "is_closed", "config", "load", "load_random", "unload", "slot_info", "layer",
           "load_named", "load_peft", "unload_named", "find", "slot_name", "pin", "unpin", "pin_count",
           "touch", "memory" },
  batch = { "close", "is_closed", "set", "info", "offsets", "active_slots", "context" },
  safetensors = { "close", "is_closed", "count", "tensor", "tensors", "find", "read", "metadata", "context" },
  peft = { "close", "is_closed", "info", "layers", "inspect", "layer_desc", "context" },
  checkpoint = { "close", "is_closed", "layer_info", "load_layer", "context" },
  graph = { "close", "is_closed", "launch", "context" },
  comm = { "close", "is_closed", "context" },
}
-- Added by the pure-Lua layer on top of either core.
local lua_methods = { layer = { inputs = true, check = true } }

-- The raw core's functions: the C functions of loramoe.h without the prefix, out-
-- parameters as results (lua/loramoe_core.c and lua/loramoe/ffi_core.lua).
local core_functions = {
  "version", "status_string", "has_cuda", "device_count", "device_get_info", "dtype_size", "dtype_name",
  "lora_scale", "now", "close", "pointer", "address", "mem", "pack", "unpack",
  "context_create", "context_retain", "context_is_live", "context_last_error", "context_backend",
  "context_threads", "context_guard", "context_set_guard", "context_stream", "context_synchronize",
  "context_counters", "context_wait_counters", "context_reset_counters",
  "buffer_create", "buffer_wrap", "buffer_describe", "buffer_write", "buffer_read", "buffer_fill_random",
  "buffer_fill", "buffer_compare",
  "layer_create", "layer_get_config", "layer_randomize", "layer_set_weights", "layer_set_expert", "layer_weights",
  "pool_create", "pool_get_config", "pool_load_random", "pool_load", "pool_unload", "pool_slot_info",
  "pool_load_named", "pool_load_peft", "pool_unload_named", "pool_find", "pool_slot_name", "pool_pin",
  "pool_unpin", "pool_pin_count", "pool_touch", "pool_get_memory",
  "batch_create", "batch_create_with", "batch_set", "batch_get_info", "batch_offsets", "batch_active_slots",
  "forward", "reference_forward", "graph_begin", "graph_end", "graph_launch",
  "safetensors_open", "safetensors_open_memory", "safetensors_count", "safetensors_tensor", "safetensors_find",
  "safetensors_read", "safetensors_metadata_count", "safetensors_metadata", "safetensors_write",
  "peft_open", "peft_get_info", "peft_layers", "peft_inspect", "peft_layer_desc", "peft_write_synthetic",
  "checkpoint_open", "checkpoint_get_layer_info", "checkpoint_load_layer", "checkpoint_quantize_fp8",
  "has_nccl", "comm_create_local", "comm_wrap_nccl", "comm_rank", "comm_size", "forward_group",
}

local function sorted_keys(t)
  local k = {}
  for name in pairs(t) do k[#k + 1] = name end
  table.sort(k)
  return k
end

describe("the API surface", function()
  it("runs on the runtime the test asked for", function()
    local want = os.getenv("LORAMOE_LUA")
    if want then assert.are.equal(want, lm.runtime) end
    assert.are.equal(rawget(_G, "jit") and "luajit" or "lua5.4", lm.runtime)
  end)

  it("names the module and its version", function()
    assert.are.equal("loramoe", lm._NAME)
    assert.are.equal("loramoe.core", lm.core._NAME)
    assert.matches("^%d+%.%d+%.%d+$", lm._VERSION)
    assert.are.equal(lm.version(), lm._VERSION) -- binding built for the library it loads
  end)

  it("has every module function", function()
    for _, name in ipairs(module_functions) do
      assert.are.equal("function", type(lm[name]), name)
    end
  end)

  it("has a raw core with exactly the core functions", function()
    local want, got = {}, {}
    for _, n in ipairs(core_functions) do want[n] = true end
    for k, v in pairs(lm.core) do if type(v) == "function" then got[k] = true end end
    assert.are.same(sorted_keys(want), sorted_keys(got))
  end)

  for kind, names in pairs(methods) do
    it("gives " .. kind .. " objects exactly the documented methods", function()
      local want = {}
      for _, n in ipairs(names) do want[n] = true end
      for n in pairs(lua_methods[kind] or {}) do want[n] = true end
      assert.are.same(sorted_keys(want), sorted_keys(lm.methods[kind]))
    end)
  end

  it("documents every function and method in docs/lua.md", function()
    local f = assert(io.open("docs/lua.md", "r"))
    local doc = f:read("a")
    f:close()
    for _, name in ipairs(module_functions) do
      assert.truthy(doc:find("lm." .. name, 1, true), "lm." .. name .. " is not documented")
    end
    local var = { context = "ctx", buffer = "buf", layer = "layer", pool = "pool", batch = "batch",
                  safetensors = "file", peft = "peft", checkpoint = "ck", graph = "graph", comm = "comm" }
    for kind, names in pairs(methods) do
      local all = {}
      for _, n in ipairs(names) do all[#all + 1] = n end
      for n in pairs(lua_methods[kind] or {}) do all[#all + 1] = n end
      for _, n in ipairs(all) do
        -- close and is_closed are documented once for every kind, as obj:...
        local ref = (n == "close" or n == "is_closed") and "obj:" .. n or var[kind] .. ":" .. n
        assert.truthy(doc:find(ref, 1, true), ref .. " is not documented")
      end
    end
  end)

  -- What this runtime's core does, not how its source spells it: each function of the
  -- header is a function of the core (the name without lmoe_), or the release of a
  -- kind of box (core.close, and the collector), or the init of a struct that one of
  -- the core's functions passes to C (given or returned as a table). tools/check-api.sh
  -- checks the header against core_functions, which a test above holds both cores to.
  it("reaches every function of the C header through the core", function()
    local f = assert(io.open("native/include/loramoe.h", "r"))
    local header = f:read("a")
    f:close()
    local R, n = lm.core, 0
    local box_kinds = { context = 1, buffer = 1, layer = 1, pool = 1, batch = 1, graph = 1, safetensors = 1, peft = 1,
      checkpoint = 1, comm = 1 }
    -- the structs the core's functions take (lmoe_X as a parameter), by the function
    local takes = {}
    for name, ps in header:gmatch("LMOE_API[^;(]-[%s%*](lmoe_[%w_]+)%s*(%b())") do
      for s in ps:gmatch("(lmoe_[%w_]+)%s*%*") do
        if type(R[name:sub(6)]) == "function" then takes[s] = name end
      end
    end
    for name in header:gmatch("LMOE_API[^;(]-[%s%*](lmoe_[%w_]+)%s*%(") do
      n = n + 1
      local short = name:sub(6)
      local kind = short:match("^(.-)_release$") or short:match("^(.-)_close$")
      local struct = name:match("^(lmoe_[%w_]-)_init_sized$") or name:match("^(lmoe_[%w_]-)_init$")
      if kind then
        assert.truthy(box_kinds[kind], name .. " releases no kind of box")
        assert.are.equal("function", type(R.close), name)
      elseif struct then
        assert.truthy(takes[struct], name .. ": no core function takes " .. struct)
      else
        assert.are.equal("function", type(R[short]), name .. " is not a function of the core")
      end
    end
    assert.is_true(n > 40)
  end)
end)

describe("library functions", function()
  it("answers the queries", function()
    assert.is_boolean(lm.has_cuda())
    local n = assert(lm.device_count())
    assert.is_true(math.type == nil or math.type(n) == "integer")
    if n == 0 then
      local info, msg, code = lm.device_info(0)
      assert.is_nil(info)
      assert.is_string(msg)
      assert.is_string(code)
    end
    assert.are.equal(2, lm.dtype_size("bf16"))
    assert.are.equal(8, lm.dtype_size("f64"))
    assert.are.equal("i32", lm.dtype_name(4))
    assert.are.equal("invalid argument", lm.status_string(1))
    assert.are.near(2.0, lm.lora_scale(32, 16), 1e-6)
    assert.are.near(8.0, lm.lora_scale(32, 16, true), 1e-6)
  end)

  it("has a monotonic clock", function()
    local a = lm.now()
    local b = lm.now()
    assert.is_number(a)
    assert.is_true(b >= a)
  end)

  it("keeps the presets of PERFORMANCE.md", function()
    assert.are.same({ experts = 16, hidden = 256, intermediate = 128, top_k = 2, layers = 4 }, lm.presets.tiny)
    assert.are.equal(128, lm.presets["qwen3-30b-a3b"].experts)
    assert.are.equal(14336, lm.presets["mixtral-8x7b"].intermediate)
  end)

  it("raises on bad arguments", function()
    h.raises("bad argument #1 to 'dtype_size' (invalid option 'bf17')", function() lm.dtype_size("bf17") end)
    h.raises("bad argument #2 to 'lora_scale' (rank must be 1..", function() lm.lora_scale(32, 0) end)
    h.raises("bad argument #1 to 'device_info' (device must be 0..", function() lm.device_info(-1) end)
  end)
end)
