-- loramoe.ffi_core — the raw LuaJIT core: the C functions of native/include/loramoe.h
-- one to one, through the FFI, for the pure-Lua API in loramoe/api.lua. The Lua 5.4 C
-- module (lua/loramoe_core.c) exposes the same functions with the same conventions:
-- names drop the lmoe_ prefix; out-parameters become results, status first; structs
-- become plain tables with the C field names; arrays are "mems" (mem / pack / unpack).
-- The cdef is generated from the header at build time (loramoe/cdef.lua), never copied.
--
-- A handle is the box: its cdata pointer with ffi.gc(h, release) set right after the
-- NULL check. As in the C module every size C will read or write is checked here
-- against the array given (the API has checked the values already, with its messages).
local ffi = require "ffi"

local type, tonumber, error = type, tonumber, error
local floor = math.floor

if not pcall(ffi.typeof, "lmoe_context") then ffi.cdef(require "loramoe.cdef") end
if not pcall(ffi.typeof, "struct lmoe_lua_timespec") then
  ffi.cdef "struct lmoe_lua_timespec { long tv_sec; long tv_nsec; };"
end
local have_clock = pcall(function() return ffi.C.clock_gettime end)
if not have_clock then
  have_clock = pcall(ffi.cdef, "int clock_gettime(int clk, struct lmoe_lua_timespec *ts);")
end

-- The shared library: $LORAMOE_LIB, else the path configured at build/install time,
-- else the system's search path.
local function load_library()
  local path = os.getenv("LORAMOE_LIB")
  if path and path ~= "" then return ffi.load(path) end
  local ok, cfg = pcall(require, "loramoe.config")
  if ok and type(cfg) == "table" and type(cfg.lib) == "string" then
    local loaded, lib = pcall(ffi.load, cfg.lib)
    if loaded then return lib end
  end
  return ffi.load("loramoe")
end
local C = load_library()

local R = {
  _NAME = "loramoe.core", runtime = "luajit",
  _VERSION = string.format("%d.%d.%d", C.LMOE_VERSION_MAJOR, C.LMOE_VERSION_MINOR, C.LMOE_VERSION_PATCH),
}

local function bad(msg) error("loramoe.ffi_core: " .. msg, 3) end

-- ------------------------------------------------------------------ boxes

local kinds = {
  context = { "lmoe_context *", C.lmoe_context_release }, buffer = { "lmoe_buffer *", C.lmoe_buffer_release },
  layer = { "lmoe_layer *", C.lmoe_layer_release }, pool = { "lmoe_pool *", C.lmoe_pool_release },
  batch = { "lmoe_batch *", C.lmoe_batch_release }, graph = { "lmoe_graph *", C.lmoe_graph_release },
  safetensors = { "lmoe_safetensors *", C.lmoe_safetensors_close }, peft = { "lmoe_peft *", C.lmoe_peft_close },
  checkpoint = { "lmoe_checkpoint *", C.lmoe_checkpoint_close }, comm = { "lmoe_comm *", C.lmoe_comm_release },
}
local release_of, out_of = {}, {}
local box
for k, v in pairs(kinds) do
  local ct = ffi.typeof(v[1])
  kinds[k] = ct
  release_of[tonumber(ct)] = v[2]
  out_of[k] = ffi.new(v[1] .. "[1]")
end
-- What a box keeps alive (a pool's layer, a wrap's owner, a borrowed buffer's layer).
local keep = setmetatable({}, { __mode = "k" })
local borrowed = setmetatable({}, { __mode = "k" })

local function out(kind)
  local o = out_of[kind]
  o[0] = nil
  return o
end
-- status, the handle of out-parameter o as a box (only the status on failure)
local function made(kind, st, o, parent)
  if st ~= 0 then return st end
  return st, box(kind, o[0], parent)
end
function box(kind, h, parent)
  if h == nil then return nil end
  h = ffi.gc(h, release_of[tonumber(kinds[kind])])
  if parent ~= nil then keep[h] = parent end
  return h
end

local function checkh(h, kind)
  if not ffi.istype(kinds[kind], h) or h == nil then bad(kind .. " box expected") end
  return h
end
local function opth(h, kind) if h == nil then return nil end return checkh(h, kind) end

function R.close(h)
  if type(h) ~= "cdata" then bad("box expected") end
  if borrowed[h] then return end
  local rel = release_of[tonumber(ffi.typeof(h))]
  if rel and h ~= nil then
    ffi.gc(h, nil)
    rel(h)
  end
end

function R.pointer(h) return ffi.cast("void *", h) end

-- address(p): a pointer's address as a number (nil for what is not a pointer), so the
-- API can check that a pointer lies inside the memory that owns it.
function R.address(p)
  local t = type(p)
  if t == "userdata" then return tonumber(ffi.cast("uintptr_t", p)) end
  if t ~= "cdata" or not tostring(ffi.typeof(p)):find("[%*%[&]") then return nil end
  return tonumber(ffi.cast("uintptr_t", p))
end

local function opt_ptr(p)
  if p == nil then return nil end
  if type(p) ~= "cdata" and type(p) ~= "userdata" then bad("pointer expected") end
  return ffi.cast("void *", p)
end

-- ------------------------------------------------------------------ mem

local mem_ct = { f64 = ffi.typeof("double[?]"), f32 = ffi.typeof("float[?]"),
  i32 = ffi.typeof("int32_t[?]"), i64 = ffi.typeof("int64_t[?]") }
local mem_kind, mem_len = setmetatable({}, { __mode = "k" }), setmetatable({}, { __mode = "k" })

function R.mem(ct, n)
  local t = mem_ct[ct]
  if not t or type(n) ~= "number" or n < 0 or n > 2 ^ 40 or n ~= floor(n) then bad("mem(ct, n)") end
  local m = t(n > 0 and n or 1)
  mem_kind[m], mem_len[m] = ct, n
  return m
end

local function checkmem(m, ct, n)
  if mem_kind[m] ~= ct then bad("array of " .. ct .. " expected") end
  n = tonumber(n)
  if n < 0 or n > mem_len[m] then bad("array too small") end
  return m
end

-- pack(ct, t, n): t[1..n], read raw, as a mem; nil, i at the first bad entry.
function R.pack(ct, t, n)
  if type(t) ~= "table" then bad("table expected") end
  if type(n) ~= "number" or n > #t + 1 then bad("more than the table holds") end -- # is raw here
  local m = R.mem(ct, n)
  local int = ct == "i32" or ct == "i64"
  for i = 1, n do
    local v = rawget(t, i)
    if type(v) ~= "number" or (int and (v ~= floor(v) or (ct == "i32" and (v < -2147483648 or v > 2147483647))
        or (ct == "i64" and (v < -2 ^ 63 or v >= 2 ^ 63)))) then
      return nil, i
    end
    m[i - 1] = v
  end
  return m
end

function R.unpack(m, n)
  local ct = mem_kind[m]
  if not ct then bad("array expected") end
  n = n or mem_len[m]
  checkmem(m, ct, n)
  local t = {}
  for i = 0, n - 1 do t[i + 1] = tonumber(m[i]) end
  return t
end

-- ------------------------------------------------------------------ helpers

local function i32(v)
  if type(v) ~= "number" or v ~= floor(v) or v < -2147483648 or v > 2147483647 then bad("int32 expected") end
  return v
end
local function int(v)
  if type(v) ~= "number" or v ~= floor(v) or v < -2 ^ 63 or v >= 2 ^ 63 then bad("integer expected") end
  return v
end
local function num(v) if type(v) ~= "number" then bad("number expected") end return v end
local function str(v) if type(v) ~= "string" then bad("string expected") end return v end

-- s.k = t.k for the fields of t that are set (checked as int32 / number).
local function fill(s, t, ints, nums)
  if type(t) ~= "table" then bad("table expected") end
  for _, k in ipairs(ints) do if t[k] ~= nil then s[k] = i32(t[k]) end end
  for _, k in ipairs(nums or {}) do if t[k] ~= nil then s[k] = num(t[k]) end end
  return s
end

-- The C struct s as a table of its fields (numbers; strings copied).
local function totable(s, fields)
  local t = {}
  for _, k in ipairs(fields) do
    local v = s[k]
    if type(v) == "cdata" then
      if ffi.istype("const char *", v) then v = v ~= nil and ffi.string(v) or "" else v = tonumber(v) end
    end
    t[k] = v
  end
  return t
end

local shape_buf = ffi.new("int64_t[?]", C.LMOE_TENSOR_MAX_DIMS)
local function shape(t, max)
  if type(t) ~= "table" then bad("shape expected") end
  local n = #t
  if n < 1 or n > max then bad("shape of the wrong rank") end
  for i = 1, n do
    local d = rawget(t, i)
    if type(d) ~= "number" or d ~= floor(d) or d < 0 or d >= 2 ^ 63 then bad("bad shape entry") end
    shape_buf[i - 1] = d
  end
  return n
end

local function mul3(a, b, c)
  local v = a * b * c -- doubles: exact below 2^53, and compared against a real size
  if v ~= v or v < 0 or v > 2 ^ 53 then bad("size overflows") end
  return v
end

-- ------------------------------------------------------------------ library

function R.version() return ffi.string(C.lmoe_version()) end
function R.status_string(st) return ffi.string(C.lmoe_status_string(i32(st))) end
function R.has_cuda() return C.lmoe_has_cuda() end
function R.has_nccl() return C.lmoe_has_nccl() end
local out_i32 = ffi.new("int32_t[1]")
function R.device_count()
  local st = C.lmoe_device_count(out_i32)
  return st, out_i32[0]
end
function R.device_get_info(dev)
  local i = ffi.new("lmoe_device_info")
  i.struct_size = ffi.sizeof(i)
  local st = C.lmoe_device_get_info(i32(dev), i)
  if st ~= 0 then return st end
  local t = totable(i, { "cc_major", "cc_minor", "sm_count", "memory_bytes", "l2_bytes" })
  t.name = ffi.string(i.name)
  return st, t
end
function R.dtype_size(d) return tonumber(C.lmoe_dtype_size(i32(d))) end
function R.dtype_name(d) return ffi.string(C.lmoe_dtype_name(i32(d))) end
function R.lora_scale(a, r, rs) return tonumber(C.lmoe_lora_scale(num(a), i32(r), i32(rs))) end
local ts = ffi.new("struct lmoe_lua_timespec")
function R.now()
  if have_clock and ffi.C.clock_gettime(1, ts) == 0 then -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
  end
  return os.clock()
end

-- ------------------------------------------------------------------ context

local errbuf = ffi.new("char[256]")
function R.context_create(cfg)
  local c = ffi.new("lmoe_context_config")
  C.lmoe_context_config_init(c)
  fill(c, cfg, { "backend", "device", "threads", "guard" })
  c.stream = opt_ptr(cfg.stream)
  local o = out_of.context
  o[0] = nil
  local st = C.lmoe_context_create(c, o, errbuf, ffi.sizeof(errbuf))
  if st ~= 0 then return st, ffi.string(errbuf) end
  return st, box("context", o[0])
end
function R.context_is_live(p)
  if R.address(p) == nil then return false end
  return C.lmoe_context_is_live(ffi.cast("void *", p)) ~= 0
end
function R.context_retain(p)
  if not R.context_is_live(p) then bad("not a live loramoe context") end
  local h = ffi.cast("lmoe_context *", p)
  C.lmoe_context_retain(h)
  return box("context", h)
end
local function ctx(h) return checkh(h, "context") end
function R.context_last_error(h) return ffi.string(C.lmoe_context_last_error(ctx(h))) end
function R.context_backend(h) return C.lmoe_context_backend(ctx(h)) end
function R.context_threads(h) return C.lmoe_context_threads(ctx(h)) end
function R.context_guard(h) return C.lmoe_context_guard(ctx(h)) end
function R.context_set_guard(h, g) return C.lmoe_context_set_guard(ctx(h), i32(g)) end
function R.context_stream(h)
  local s = C.lmoe_context_stream(ctx(h))
  if s == nil then return nil end
  return s
end
function R.context_synchronize(h, s) return C.lmoe_context_synchronize(ctx(h), opt_ptr(s)) end
function R.context_reset_counters(h) C.lmoe_context_reset_counters(ctx(h)) end
local counters = ffi.new("lmoe_counters")
function R.context_counters(h)
  local st = C.lmoe_context_counters(ctx(h), counters)
  if st ~= 0 then return st end
  return st, totable(counters, { "forwards", "launches", "lora_launches", "host_waits", "uploads",
    "bytes_uploaded", "downloads" })
end
local waits = ffi.new("lmoe_wait_counters")
function R.context_wait_counters(h)
  waits.struct_size = ffi.sizeof(waits)
  local st = C.lmoe_context_wait_counters(ctx(h), waits)
  if st ~= 0 then return st end
  return st, totable(waits, { "host_waits", "forced", "backpressure" })
end

-- ------------------------------------------------------------------ buffers

local function buf(h) return checkh(h, "buffer") end
function R.buffer_create(h, dtype, memory, shp)
  local nd = shape(shp, C.LMOE_MAX_DIMS)
  local o = out("buffer")
  return made("buffer", C.lmoe_buffer_create(ctx(h), i32(dtype), i32(memory), nd, shape_buf, o), o)
end
function R.buffer_wrap(h, dtype, memory, shp, p, owner)
  local nd = shape(shp, C.LMOE_MAX_DIMS)
  local o = out("buffer")
  return made("buffer", C.lmoe_buffer_wrap(ctx(h), i32(dtype), i32(memory), nd, shape_buf, opt_ptr(p), o), o, owner)
end
local desc = ffi.new("lmoe_buffer_desc")
function R.buffer_describe(h)
  local st = C.lmoe_buffer_describe(buf(h), desc)
  if st ~= 0 then return st end
  local t = totable(desc, { "dtype", "memory", "ndim", "numel", "bytes" })
  t.shape = {}
  for i = 0, desc.ndim - 1 do t.shape[i + 1] = tonumber(desc.shape[i]) end
  t.data = desc.data
  return st, t
end
function R.buffer_write(h, off, m, n)
  return C.lmoe_buffer_write(buf(h), int(off), checkmem(m, "f64", int(n)), C.LMOE_DTYPE_F64, n)
end
function R.buffer_read(h, off, m, n)
  return C.lmoe_buffer_read(buf(h), int(off), checkmem(m, "f64", int(n)), C.LMOE_DTYPE_F64, n)
end
function R.buffer_fill_random(h, seed, lo, hi, s)
  return C.lmoe_buffer_fill_random(buf(h), int(seed), num(lo), num(hi), opt_ptr(s))
end
function R.buffer_fill(h, v, s) return C.lmoe_buffer_fill(buf(h), num(v), opt_ptr(s)) end
local cmp = ffi.new("lmoe_compare_result")
function R.buffer_compare(a, b)
  local st = C.lmoe_buffer_compare(buf(a), buf(b), cmp)
  if st ~= 0 then return st end
  return st, totable(cmp, { "rel_l2", "max_abs", "ref_l2", "nonfinite", "numel" })
end

-- ------------------------------------------------------------------ layers

local function layer(h) return checkh(h, "layer") end
local layer_fields = { "num_experts", "hidden", "intermediate", "top_k", "renormalize", "max_tokens",
  "shard_mode", "shard_rank", "shard_size", "weight_dtype" }
function R.layer_create(h, cfg)
  local c = ffi.new("lmoe_layer_config")
  C.lmoe_layer_config_init(c)
  fill(c, cfg, layer_fields)
  if cfg.comm ~= nil then c.comm = checkh(cfg.comm, "comm") end -- the layer keeps it
  local o = out("layer")
  return made("layer", C.lmoe_layer_create(ctx(h), c, o), o)
end
local lcfg = ffi.new("lmoe_layer_config")
local function layer_config(h)
  lcfg.struct_size = ffi.sizeof(lcfg)
  return C.lmoe_layer_get_config(layer(h), lcfg), lcfg
end
function R.layer_get_config(h)
  local st, c = layer_config(h)
  if st ~= 0 then return st end
  return st, totable(c, layer_fields)
end
function R.layer_randomize(h, seed, scale) return C.lmoe_layer_randomize(layer(h), int(seed), num(scale)) end
function R.layer_set_weights(h, a, b)
  local st, c = layer_config(h)
  if st ~= 0 then return st end
  local n = mul3(c.num_experts, 2 * c.intermediate, c.hidden)
  return C.lmoe_layer_set_weights(h, a ~= nil and checkmem(a, "f64", n) or nil,
    b ~= nil and checkmem(b, "f64", n / 2) or nil, C.LMOE_DTYPE_F64)
end
function R.layer_set_expert(h, e, g, u, d)
  local st, c = layer_config(h)
  if st ~= 0 then return st end
  local n = mul3(c.intermediate, c.hidden, 1)
  local function m(x) return x ~= nil and checkmem(x, "f64", n) or nil end
  return C.lmoe_layer_set_expert(h, i32(e), m(g), m(u), m(d), C.LMOE_DTYPE_F64)
end
function R.layer_weights(h, which)
  local o = out_of.buffer
  o[0] = nil
  local st = C.lmoe_layer_weights(layer(h), i32(which), o)
  if st ~= 0 or o[0] == nil then return st end
  local b = o[0]
  keep[b], borrowed[b] = h, true
  return st, b
end

-- ------------------------------------------------------------------ pools

local function pool(h) return checkh(h, "pool") end
function R.pool_create(h, cfg)
  local c = ffi.new("lmoe_pool_config")
  C.lmoe_pool_config_init(c)
  fill(c, cfg, { "num_slots", "max_rank" })
  local o = out_of.pool
  o[0] = nil
  local lst, lc = layer_config(h)
  if lst ~= 0 then return lst end
  local dims = { lc.num_experts, lc.hidden, lc.intermediate } -- fixed, checked by pool_load
  local st = C.lmoe_pool_create(h, c, o)
  if st ~= 0 then return st end
  return st, box("pool", o[0], dims)
end
local pcfg = ffi.new("lmoe_pool_config")
function R.pool_get_config(h)
  pcfg.struct_size = ffi.sizeof(pcfg)
  local st = C.lmoe_pool_get_config(pool(h), pcfg)
  if st ~= 0 then return st end
  return st, totable(pcfg, { "num_slots", "max_rank" })
end
function R.pool_load_random(h, slot, spec)
  local s = ffi.new("lmoe_random_adapter")
  C.lmoe_random_adapter_init(s)
  fill(s, spec, { "targets", "fused", "rank", "use_rslora" }, { "alpha", "scale" })
  if spec.seed ~= nil then s.seed = int(spec.seed) end
  return C.lmoe_pool_load_random(pool(h), i32(slot), s)
end

-- The adapter description t for the pool h, every array checked against what C reads
-- for the pool's layer (its shapes, kept with the pool's box).
local function adapter_desc(h, t)
  if type(t) ~= "table" then bad("table expected") end
  local dims = keep[pool(h)]
  local d = ffi.new("lmoe_adapter_desc")
  C.lmoe_adapter_desc_init(d)
  d.dtype = C.LMOE_DTYPE_F64
  local E, H, I = dims[1], dims[2], dims[3]
  local dims = { gate = { H, I }, up = { H, I }, gate_up = { H, 2 * I }, down = { I, H } }
  for name, io in pairs(dims) do
    local p = t[name]
    if p ~= nil then
      local r = i32(p.rank)
      d[name].a = checkmem(p.a, "f64", mul3(E, r, io[1]))
      d[name].b = checkmem(p.b, "f64", mul3(E, io[2], r))
      d[name].rank, d[name].scale = r, num(p.scale)
    end
  end
  return d
end
function R.pool_load(h, slot, t) return C.lmoe_pool_load(pool(h), i32(slot), adapter_desc(h, t)) end
function R.pool_load_named(h, name, t)
  local st = C.lmoe_pool_load_named(pool(h), str(name), adapter_desc(h, t), out_i32)
  return st, out_i32[0]
end
function R.pool_unload(h, slot) return C.lmoe_pool_unload(pool(h), i32(slot)) end
local sinfo = ffi.new("lmoe_slot_info")
function R.pool_slot_info(h, slot)
  local st = C.lmoe_pool_slot_info(pool(h), i32(slot), sinfo)
  if st ~= 0 then return st end
  return st, totable(sinfo, { "loaded", "targets", "fused", "rank_gate", "rank_up", "rank_down", "scale_gate",
    "scale_up", "scale_down", "max_rank", "bytes", "generation" })
end
function R.pool_load_peft(h, name, p, l)
  local st = C.lmoe_pool_load_peft(pool(h), str(name), checkh(p, "peft"), i32(l), out_i32)
  return st, out_i32[0]
end
function R.pool_unload_named(h, name) return C.lmoe_pool_unload_named(pool(h), str(name)) end
function R.pool_find(h, name)
  local st = C.lmoe_pool_find(pool(h), str(name), out_i32)
  return st, out_i32[0]
end
function R.pool_slot_name(h, slot)
  local n = C.lmoe_pool_slot_name(pool(h), i32(slot))
  return n ~= nil and ffi.string(n) or ""
end
function R.pool_pin(h, slot) return C.lmoe_pool_pin(pool(h), i32(slot)) end
function R.pool_unpin(h, slot) return C.lmoe_pool_unpin(pool(h), i32(slot)) end
function R.pool_touch(h, slot) return C.lmoe_pool_touch(pool(h), i32(slot)) end
function R.pool_pin_count(h, slot) return C.lmoe_pool_pin_count(pool(h), i32(slot)) end
local pmem = ffi.new("lmoe_pool_memory")
function R.pool_get_memory(h)
  local st = C.lmoe_pool_get_memory(pool(h), pmem)
  if st ~= 0 then return st end
  return st, totable(pmem, { "slot_bytes", "total_bytes", "num_slots", "loaded_slots", "loaded_bytes",
    "used_bytes", "evictions" })
end

-- ------------------------------------------------------------------ batches, forwards, graphs

local function batch(h) return checkh(h, "batch") end
function R.batch_create(h, cfg)
  local o = out("batch")
  if cfg == nil then return made("batch", C.lmoe_batch_create(ctx(h), o), o) end
  local c = ffi.new("lmoe_batch_config")
  C.lmoe_batch_config_init(c)
  fill(c, cfg, { "staging_depth" })
  return made("batch", C.lmoe_batch_create_with(ctx(h), c, o), o)
end
function R.batch_set(h, p, n, tokens, slots)
  n = i32(n)
  return C.lmoe_batch_set(batch(h), opth(p, "pool"), n, checkmem(tokens, "i32", n), checkmem(slots, "i32", n))
end
local binfo = ffi.new("lmoe_batch_info")
function R.batch_get_info(h)
  local st = C.lmoe_batch_get_info(batch(h), binfo)
  if st ~= 0 then return st end
  return st, totable(binfo, { "num_requests", "num_tokens", "has_active", "num_active", "max_rank", "max_slot" })
end
function R.batch_offsets(h, m, cap)
  return C.lmoe_batch_offsets(batch(h), checkmem(m, "i64", i32(cap)), cap)
end
function R.batch_active_slots(h, s, t, cap)
  return C.lmoe_batch_active_slots(batch(h), checkmem(s, "i32", i32(cap)), checkmem(t, "i64", cap), cap)
end

local fwd = ffi.new("lmoe_forward_args")
local fwd_kinds = { { "layer", "layer" }, { "pool", "pool" }, { "batch", "batch" }, { "x", "buffer" },
  { "router_logits", "buffer" }, { "topk_ids", "buffer" }, { "topk_weights", "buffer" }, { "out", "buffer" } }
local function forward_args(t)
  if type(t) ~= "table" then bad("table expected") end
  C.lmoe_forward_args_init(fwd)
  for i = 1, #fwd_kinds do
    local k = fwd_kinds[i]
    fwd[k[1]] = opth(t[k[1]], k[2])
  end
  return fwd
end
function R.forward(h, t, s) return C.lmoe_forward(ctx(h), forward_args(t), opt_ptr(s)) end
function R.reference_forward(h, t) return C.lmoe_reference_forward(ctx(h), forward_args(t)) end
-- forward_group({ctx, ...}, {args, ...}): the lists hold the boxes during the call.
function R.forward_group(cs, as)
  if type(cs) ~= "table" or type(as) ~= "table" then bad("lists expected") end
  local n = #cs
  if n < 1 or n > 4096 or #as ~= n then bad("1..4096 contexts and as many args") end
  local ctxs = ffi.new("lmoe_context *[?]", n)
  local args = ffi.new("lmoe_forward_args[?]", n)
  local pa = ffi.new("const lmoe_forward_args *[?]", n)
  for i = 1, n do
    ctxs[i - 1] = ctx(cs[i])
    args[i - 1] = forward_args(as[i])
    pa[i - 1] = args + (i - 1)
  end
  return C.lmoe_forward_group(n, ctxs, pa, nil)
end

-- ------------------------------------------------------------------ communicators

local function comm(h) return checkh(h, "comm") end
-- comm_create_local({ctx, ...}) -> st, {box, ...} | st, message
function R.comm_create_local(cs)
  if type(cs) ~= "table" then bad("list expected") end
  local n = #cs
  if n < 1 or n > 4096 then bad("1..4096 contexts") end
  local ctxs = ffi.new("lmoe_context *[?]", n)
  for i = 1, n do ctxs[i - 1] = ctx(cs[i]) end
  local o = ffi.new("lmoe_comm *[?]", n)
  local err = ffi.new("char[256]")
  local st = C.lmoe_comm_create_local(n, ctxs, o, err, 256)
  if st ~= 0 then return st, ffi.string(err) end
  local t = {}
  for i = 1, n do t[i] = box("comm", o[i - 1]) end
  return st, t
end
function R.comm_wrap_nccl(h, p)
  local o = out("comm")
  return made("comm", C.lmoe_comm_wrap_nccl(ctx(h), opt_ptr(p), o), o)
end
function R.comm_rank(h) return C.lmoe_comm_rank(comm(h)) end
function R.comm_size(h) return C.lmoe_comm_size(comm(h)) end
function R.graph_begin(h, s) return C.lmoe_graph_begin(ctx(h), opt_ptr(s)) end
function R.graph_end(h, s)
  local o = out("graph")
  return made("graph", C.lmoe_graph_end(ctx(h), opt_ptr(s), o), o)
end
function R.graph_launch(h, s) return C.lmoe_graph_launch(checkh(h, "graph"), opt_ptr(s)) end

-- ------------------------------------------------------------------ safetensors

local function stf(h) return checkh(h, "safetensors") end
function R.safetensors_open(h, path)
  local o = out("safetensors")
  return made("safetensors", C.lmoe_safetensors_open(ctx(h), str(path), o), o)
end
function R.safetensors_open_memory(h, data, name)
  local o = out("safetensors")
  return made("safetensors", C.lmoe_safetensors_open_memory(ctx(h), str(data), #data, str(name), o), o)
end
function R.safetensors_count(h) return C.lmoe_safetensors_count(stf(h)) end
local tinfo = ffi.new("lmoe_tensor_info")
function R.safetensors_tensor(h, i)
  local st = C.lmoe_safetensors_tensor(stf(h), i32(i), tinfo)
  if st ~= 0 then return st end
  local t = totable(tinfo, { "name", "dtype_name", "dtype", "numel", "offset", "bytes" })
  t.shape = {}
  for d = 0, tinfo.ndim - 1 do t.shape[d + 1] = tonumber(tinfo.shape[d]) end
  return st, t
end
function R.safetensors_find(h, name)
  local st = C.lmoe_safetensors_find(stf(h), str(name), out_i32)
  return st, out_i32[0]
end
function R.safetensors_read(h, i, m, n)
  return C.lmoe_safetensors_read(stf(h), i32(i), checkmem(m, "f64", int(n)), C.LMOE_DTYPE_F64, n)
end
function R.safetensors_metadata_count(h) return C.lmoe_safetensors_metadata_count(stf(h)) end
local okey, oval = ffi.new("const char *[1]"), ffi.new("const char *[1]")
function R.safetensors_metadata(h, i)
  local st = C.lmoe_safetensors_metadata(stf(h), i32(i), okey, oval)
  if st ~= 0 then return st end
  return st, okey[0] ~= nil and ffi.string(okey[0]) or "", oval[0] ~= nil and ffi.string(oval[0]) or ""
end
-- entries {name=, dtype=, shape=, data=buffer box}; the strings and boxes stay
-- referenced by the argument tables during the call.
function R.safetensors_write(h, path, entries, keys, vals)
  local n, nm = #entries, #keys
  if nm ~= #vals then bad("keys and values differ in length") end
  local e = ffi.new("lmoe_tensor_entry[?]", n > 0 and n or 1)
  for i = 1, n do
    local t = entries[i]
    local ent = e[i - 1]
    ent.name = str(t.name)
    ent.dtype = i32(t.dtype)
    ent.ndim = shape(t.shape, C.LMOE_TENSOR_MAX_DIMS)
    local numel = 1
    for d = 0, ent.ndim - 1 do
      ent.shape[d] = shape_buf[d]
      numel = mul3(numel, tonumber(shape_buf[d]), 1)
    end
    local st, bd = R.buffer_describe(t.data)
    if st ~= 0 or bd.dtype ~= ent.dtype or numel > bd.numel then bad("data smaller than its shape") end
    if bd.memory ~= C.LMOE_MEMORY_HOST and C.lmoe_context_backend(ctx(h)) ~= C.LMOE_BACKEND_CPU then
      bad("data not in host memory")
    end
    ent.data = bd.data
  end
  local mk = ffi.new("const char *[?]", nm > 0 and nm or 1)
  local mv = ffi.new("const char *[?]", nm > 0 and nm or 1)
  for i = 1, nm do mk[i - 1], mv[i - 1] = str(keys[i]), str(vals[i]) end
  return C.lmoe_safetensors_write(ctx(h), str(path), n, e, nm, mk, mv)
end

-- ------------------------------------------------------------------ PEFT adapters

local function peft(h) return checkh(h, "peft") end
function R.peft_open(h, path)
  local o = out("peft")
  return made("peft", C.lmoe_peft_open(ctx(h), str(path), o), o)
end
local pinfo = ffi.new("lmoe_peft_info")
function R.peft_get_info(h)
  C.lmoe_peft_info_init(pinfo)
  local st = C.lmoe_peft_get_info(peft(h), pinfo)
  if st ~= 0 then return st end
  return st, totable(pinfo, { "family", "layout", "rank", "alpha", "use_rslora", "targets", "num_layers",
    "min_layer", "max_layer", "num_experts", "max_rank", "has_patterns", "num_tensors", "bytes" })
end
function R.peft_layers(h, m, cap) return C.lmoe_peft_layers(peft(h), checkmem(m, "i32", i32(cap)), cap) end
local need = ffi.new("size_t[1]")
function R.peft_inspect(h)
  local probe = ffi.new("char[1]")
  local st = C.lmoe_peft_inspect(peft(h), probe, 1, need)
  if st ~= 0 then return st end
  local size = tonumber(need[0]) + 1
  local b = ffi.new("char[?]", size)
  st = C.lmoe_peft_inspect(h, b, size, nil)
  if st ~= 0 then return st end
  return st, ffi.string(b)
end
function R.peft_layer_desc(h, l, E, H, I)
  local d = ffi.new("lmoe_adapter_desc")
  C.lmoe_adapter_desc_init(d)
  local st = C.lmoe_peft_layer_desc(peft(h), i32(l), i32(E), i32(H), i32(I), d)
  if st ~= 0 or d.dtype ~= C.LMOE_DTYPE_F32 then return st ~= 0 and st or C.LMOE_ERR_UNSUPPORTED end
  local t = {}
  for name, io in pairs { gate = { H, I }, up = { H, I }, gate_up = { H, 2 * I }, down = { I, H } } do
    local p = d[name]
    if p.a ~= nil and p.b ~= nil then
      local na, nb = mul3(E, p.rank, io[1]), mul3(E, io[2], p.rank)
      local a, b = R.mem("f32", na), R.mem("f32", nb)
      ffi.copy(a, p.a, 4 * na)
      ffi.copy(b, p.b, 4 * nb)
      t[name] = { a = a, b = b, rank = p.rank, scale = p.scale }
    end
  end
  return st, t
end
function R.peft_write_synthetic(h, dir, spec)
  local s = ffi.new("lmoe_peft_synthetic")
  C.lmoe_peft_synthetic_init(s)
  fill(s, spec, { "family", "layout", "num_layers", "num_experts", "hidden", "intermediate", "targets", "rank",
    "use_rslora", "dtype", "rank_pattern_value" }, { "alpha", "scale", "alpha_pattern_value" })
  if spec.seed ~= nil then s.seed = int(spec.seed) end
  -- the key strings stay referenced by spec during the call
  if spec.rank_pattern_key ~= nil then s.rank_pattern_key = str(spec.rank_pattern_key) end
  if spec.alpha_pattern_key ~= nil then s.alpha_pattern_key = str(spec.alpha_pattern_key) end
  return C.lmoe_peft_write_synthetic(ctx(h), str(dir), s)
end

-- ------------------------------------------------------------------ checkpoints

local function ck(h) return checkh(h, "checkpoint") end
function R.checkpoint_open(h, path)
  local o = out("checkpoint")
  return made("checkpoint", C.lmoe_checkpoint_open(ctx(h), str(path), o), o)
end
local cinfo = ffi.new("lmoe_checkpoint_layer_info")
function R.checkpoint_get_layer_info(h, l)
  C.lmoe_checkpoint_layer_info_init(cinfo)
  local st = C.lmoe_checkpoint_get_layer_info(ck(h), i32(l), cinfo)
  if st ~= 0 then return st end
  return st, totable(cinfo, { "family", "num_experts", "hidden", "intermediate", "has_router", "weight_dtype" })
end
function R.checkpoint_quantize_fp8(h, src, dst) return C.lmoe_checkpoint_quantize_fp8(ctx(h), str(src), str(dst)) end
function R.checkpoint_load_layer(h, i, l, with_router)
  local o = out_of.buffer
  o[0] = nil
  local st = C.lmoe_checkpoint_load_layer(ck(h), i32(i), layer(l), with_router and o or nil)
  local router = box("buffer", o[0]) -- owned even when the load failed after making it
  if st ~= 0 then return st end
  return st, router
end

return R
