-- loramoe.ffi_core — the LuaJIT FFI binding over native/include/loramoe.h.
--
-- The same Lua-level API as the Lua 5.4 C module loramoe.core (lua/loramoe_core.c);
-- docs/lua.md documents both. The cdef is generated from the header at build time
-- (loramoe/cdef.lua in the build tree), never copied by hand.
--
-- Objects are plain tables sharing one metatable per kind; each holds its C handle as
-- cdata with ffi.gc(handle, release) set right after the NULL check, so a forgotten
-- object is freed by the collector. close() removes the finalizer and releases at once.
-- Misuse raises "bad argument #n to 'f' (...)" (raised at the caller); a non-OK status
-- returns nil, "CODE: message", "CODE".
local ffi = require "ffi"

local type, tonumber, tostring, select, error = type, tonumber, tostring, select, error
local floor, huge = math.floor, math.huge
local getmetatable = debug.getmetatable -- sees through __metatable = "locked"
local format = string.format

-- cdefs guarded against redefinition (another copy of this module, or a host that
-- declared them already).
if not pcall(ffi.typeof, "lmoe_context") then
  ffi.cdef(require "loramoe.cdef")
end
if not pcall(ffi.typeof, "struct lmoe_lua_timespec") then
  ffi.cdef [[
    struct lmoe_lua_timespec { long tv_sec; long tv_nsec; };
  ]]
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

local M = {}
M._NAME = "loramoe.core"
M._VERSION = format("%d.%d.%d", C.LMOE_VERSION_MAJOR, C.LMOE_VERSION_MINOR, C.LMOE_VERSION_PATCH)
M.runtime = "luajit"
M.presets = {}

local dtype_names = { [0] = "bf16", "f16", "f32", "f64", "i32" }
local memory_names = { [0] = "host", "device" }
local backend_names = { [0] = "auto", "cpu", "cuda" }
local guard_names = { [0] = "host", "device_sync", "always" }
local function index_of(names)
  local t = {}
  for i = 0, #names do t[names[i]] = i end
  return t
end
local dtypes, memories, backends, guards = index_of(dtype_names), index_of(memory_names),
  index_of(backend_names), index_of(guard_names)
local weight_index = { w13 = 0, w2 = 1 }

local codes = {
  [0] = "OK", "INVALID_ARGUMENT", "OUT_OF_MEMORY", "UNSUPPORTED", "BACKEND", "STATE",
  "NOT_FOUND", "FULL", "IO", "FORMAT",
}

-- Out-parameters, allocated once.
local out_ctx = ffi.new("lmoe_context *[1]")
local out_buf = ffi.new("lmoe_buffer *[1]")
local out_layer = ffi.new("lmoe_layer *[1]")
local out_pool = ffi.new("lmoe_pool *[1]")
local out_batch = ffi.new("lmoe_batch *[1]")
local out_graph = ffi.new("lmoe_graph *[1]")
local out_i32 = ffi.new("int32_t[1]")
local errbuf = ffi.new("char[256]")
local ctx_cfg = ffi.new("lmoe_context_config")
local layer_cfg = ffi.new("lmoe_layer_config")
local pool_cfg = ffi.new("lmoe_pool_config")
local desc = ffi.new("lmoe_buffer_desc")
local counters = ffi.new("lmoe_counters")
local cmp = ffi.new("lmoe_compare_result")
local dev_info = ffi.new("lmoe_device_info")
local slot_info = ffi.new("lmoe_slot_info")
local batch_info = ffi.new("lmoe_batch_info")
local fwd_args = ffi.new("lmoe_forward_args")
local random_spec = ffi.new("lmoe_random_adapter")
local adapter_desc = ffi.new("lmoe_adapter_desc")
local shape_buf = ffi.new("int64_t[?]", C.LMOE_MAX_DIMS)
local timespec = ffi.new("struct lmoe_lua_timespec")

-- ------------------------------------------------------------------ errors

local function fail_msg(st, msg)
  st = tonumber(st)
  local code = codes[st] or "UNKNOWN"
  if msg == nil or msg == "" then msg = ffi.string(C.lmoe_status_string(st)) end
  return nil, code .. ": " .. msg, code
end

local function fail(st, ctx)
  return fail_msg(st, ctx ~= nil and ffi.string(C.lmoe_context_last_error(ctx)) or nil)
end

local function status(st, ctx)
  if st ~= 0 then return fail(st, ctx) end
  return true
end

-- Raises msg at the first caller outside loramoe's own Lua files, so the position is
-- the user's line however deep in the binding the check sits.
local function is_internal(src) return src:find("loramoe[/\\][%w_]+%.lua$") ~= nil end
local function raise(msg)
  local lvl = 2
  while true do
    local info = debug.getinfo(lvl, "S")
    if not info then return error(msg, 0) end
    if not is_internal(info.source) then break end
    lvl = lvl + 1
  end
  error(msg, lvl)
end

-- "bad argument #n to 'f' (msg)"; n counts the arguments after self for methods, as
-- luaL_argerror does for method calls.
local function argerror(n, fname, msg)
  raise(format("bad argument #%d to '%s' (%s)", n, fname, msg))
end

local function typename(v)
  if v == nil then return "nil" end
  local mt = getmetatable(v)
  if type(mt) == "table" and mt.__name then return mt.__name end
  return type(v)
end

local function checktype(v, t, n, fname)
  if type(v) ~= t then argerror(n, fname, t .. " expected, got " .. typename(v), 3) end
  return v
end

local function checkint(v, n, fname, def)
  if v == nil and def ~= nil then return def end
  if type(v) ~= "number" then
    if type(v) == "cdata" and (ffi.istype("int64_t", v) or ffi.istype("uint64_t", v)) then return v end
    argerror(n, fname, "number expected, got " .. typename(v))
  end
  if v ~= floor(v) or v ~= v or v == huge or v == -huge then
    argerror(n, fname, "number has no integer representation")
  end
  return v
end

local function checknum(v, n, fname, def)
  if v == nil and def ~= nil then return def end
  if type(v) ~= "number" then argerror(n, fname, "number expected, got " .. typename(v), 3) end
  return v
end

local function checkoption(v, names, n, fname, def)
  if v == nil and def ~= nil then v = def end
  if type(v) ~= "string" then argerror(n, fname, "string expected, got " .. typename(v), 3) end
  local i = names[v]
  if not i then argerror(n, fname, format("invalid option '%s'", v), 3) end
  return i
end

local function checkrange(v, n, fname, lo, hi, what)
  v = checkint(v, n, fname)
  if v < lo or v > hi then
    argerror(n, fname, format("%s must be %d..%d, got %d", what, lo, hi, v))
  end
  return v
end

local function field_error(n, fname, k, what)
  argerror(n, fname, format("field '%s' %s", k, what))
end

local function field_int(t, k, n, fname, def)
  local v = t[k]
  if v == nil then return def end
  if type(v) ~= "number" or v ~= floor(v) then field_error(n, fname, k, "must be an integer") end
  return v
end

local function field_num(t, k, n, fname, def)
  local v = t[k]
  if v == nil then return def end
  if type(v) ~= "number" then field_error(n, fname, k, "must be a number") end
  return v
end

local function field_bool(t, k, n, fname, def)
  local v = t[k]
  if v == nil then return def end
  if type(v) ~= "boolean" then field_error(n, fname, k, "must be a boolean") end
  return v
end

local function field_option(t, k, names, n, fname, def)
  local v = t[k]
  if v == nil then return def end
  if type(v) ~= "string" then field_error(n, fname, k, "must be a string") end
  local i = names[v]
  if not i then field_error(n, fname, k, format("has invalid option '%s'", v)) end
  return i
end

local function field_stream(t, n, fname)
  local s = t.stream
  if s == nil then return nil end
  if type(s) ~= "cdata" and type(s) ~= "userdata" then
    field_error(n, fname, "stream", "must be a pointer (a cudaStream_t) or nil")
  end
  return s
end

local function opt_stream(s, n, fname)
  if s == nil then return nil end
  if type(s) ~= "cdata" and type(s) ~= "userdata" then
    argerror(n, fname, "pointer (a stream) or nil expected, got " .. typename(s))
  end
  return s
end

-- A Lua array of exactly n numbers as a double[n].
local function to_doubles(t, n, argn, fname, what)
  if type(t) ~= "table" then argerror(argn, fname, what .. " must be a table of numbers", 4) end
  if #t ~= n then argerror(argn, fname, format("%s has %d values, expected %d", what, #t, n), 4) end
  local d = ffi.new("double[?]", n > 0 and n or 1)
  for i = 1, n do
    local v = t[i]
    if type(v) ~= "number" then argerror(argn, fname, format("%s[%d] is not a number", what, i), 4) end
    d[i - 1] = v
  end
  return d
end

local function check_shape(shape, n, fname)
  if type(shape) ~= "table" then argerror(n, fname, "table expected, got " .. typename(shape), 3) end
  local nd = #shape
  if nd < 1 or nd > C.LMOE_MAX_DIMS then
    argerror(n, fname, format("shape must have 1..%d dimensions", C.LMOE_MAX_DIMS))
  end
  for i = 1, nd do
    local d = shape[i]
    if type(d) ~= "number" or d ~= floor(d) or d < 0 then
      argerror(n, fname, format("shape[%d] must be a non-negative integer", i))
    end
    shape_buf[i - 1] = d
  end
  return nd
end

-- Extra GC work in proportion to memory the collector cannot see, before a large
-- allocation, so forgotten layers and pools are finalised before new ones pile up.
local function report_pressure(bytes)
  if bytes < 1048576 then return end
  local kb = bytes / 1024
  collectgarbage("step", kb > 2 ^ 30 and 2 ^ 30 or floor(kb))
end

-- ------------------------------------------------------------------ objects

local kinds = { "context", "buffer", "layer", "pool", "batch", "safetensors", "peft", "checkpoint",
  "graph" }
local release = {
  context = C.lmoe_context_release, buffer = C.lmoe_buffer_release,
  layer = C.lmoe_layer_release, pool = C.lmoe_pool_release, batch = C.lmoe_batch_release,
  safetensors = C.lmoe_safetensors_close, peft = C.lmoe_peft_close,
  checkpoint = C.lmoe_checkpoint_close, graph = C.lmoe_graph_release,
}
local methods, props, mts = {}, {}, {}

local function is_open(self)
  if self._h == nil then return false end
  local p = self._borrowed_from
  if p ~= nil and p._h == nil then
    self._h = nil
    return false
  end
  return true
end

-- obj:close(): raises on a closed handle, like file:close().
local function make_close(kind)
  return function(self)
    if type(self) ~= "table" or getmetatable(self) ~= mts[kind] then
      argerror(1, "close", "loramoe." .. kind .. " expected, got " .. typename(self))
    end
    if not is_open(self) then raise("attempt to use a closed " .. kind) end
    local h = self._h
    self._h = nil
    if not self._borrowed_from then
      ffi.gc(h, nil)
      release[kind](h)
    end
    return true
  end
end

for _, kind in ipairs(kinds) do
  local m, p = {}, {}
  methods[kind], props[kind] = m, p
  local mt = { __name = "loramoe." .. kind, __metatable = "locked" }
  mt.__index = function(self, k)
    local f = m[k]
    if f ~= nil then return f end
    local g = p[k]
    if g ~= nil then return g(self) end
    return nil
  end
  mt.__tostring = function(self)
    if not is_open(self) then return "loramoe." .. kind .. " (closed)" end
    return format("loramoe.%s (%s)", kind, tostring(ffi.cast("void *", self._h)):gsub("^cdata<void %*>: ", ""))
  end
  -- No __gc for tables in LuaJIT: the handle's ffi.gc finalizer frees. __close only
  -- for symmetry with the C module (LuaJIT has no <close>).
  mt.__close = function(self) if is_open(self) then m.close(self) end end
  m.close = make_close(kind)
  m.is_closed = function(self) return not is_open(self) end
  mts[kind] = mt
end
M.methods = methods

-- self checked as an open object of kind; errors at the caller of the method.
local function check(self, kind, fname)
  if type(self) ~= "table" or getmetatable(self) ~= mts[kind] then
    argerror(0, fname, "loramoe." .. kind .. " expected, got " .. typename(self))
  end
  if not is_open(self) then raise("attempt to use a closed " .. kind) end
  return self
end

-- An argument that must be an open object of kind.
local function check_obj(v, kind, n, fname, what)
  if type(v) ~= "table" or getmetatable(v) ~= mts[kind] then
    if what then field_error(n, fname, what, "must be a loramoe." .. kind) end
    argerror(n, fname, "loramoe." .. kind .. " expected, got " .. typename(v))
  end
  if not is_open(v) then raise("attempt to use a closed " .. kind) end
  return v
end

-- A new object owning handle h: the finalizer is set right after the NULL check.
local function wrap(kind, h, ctx, parent)
  if h == nil then return fail_msg(C.LMOE_ERR_BACKEND, "the library returned no " .. kind) end
  return setmetatable({ _h = ffi.gc(h, release[kind]), _ctx = ctx, _parent = parent }, mts[kind])
end

-- layer:context(), batch:context(), buffer:context(), pool:layer(): the object this
-- one was made from (kept alive by the reference in _parent). A borrowed buffer's
-- parent is its layer, whose parent is the context.
methods.layer.context = function(self) return check(self, "layer", "context")._parent end
methods.batch.context = function(self) return check(self, "batch", "context")._parent end
methods.pool.layer = function(self) return check(self, "pool", "layer")._parent end
methods.safetensors.context = function(self) return check(self, "safetensors", "context")._parent end
methods.peft.context = function(self) return check(self, "peft", "context")._parent end
methods.checkpoint.context = function(self) return check(self, "checkpoint", "context")._parent end
methods.graph.context = function(self) return check(self, "graph", "context")._parent end
methods.buffer.context = function(self)
  local p = check(self, "buffer", "context")._parent
  if self._borrowed_from then p = p._parent end
  return p
end

-- ------------------------------------------------------------------ library

function M.version() return ffi.string(C.lmoe_version()) end

function M.status_string(code)
  return ffi.string(C.lmoe_status_string(checkint(code, 1, "status_string")))
end

function M.has_cuda() return C.lmoe_has_cuda() ~= 0 end

function M.device_count()
  local st = C.lmoe_device_count(out_i32)
  if st ~= 0 then return fail(st) end
  return tonumber(out_i32[0])
end

function M.device_info(dev)
  dev = checkrange(dev, 1, "device_info", 0, 2147483647, "device")
  ffi.fill(dev_info, ffi.sizeof(dev_info))
  dev_info.struct_size = ffi.sizeof(dev_info)
  local st = C.lmoe_device_get_info(dev, dev_info)
  if st ~= 0 then return fail(st) end
  return {
    name = ffi.string(dev_info.name), cc_major = dev_info.cc_major, cc_minor = dev_info.cc_minor,
    sm_count = dev_info.sm_count, memory_bytes = tonumber(dev_info.memory_bytes),
    l2_bytes = tonumber(dev_info.l2_bytes),
  }
end

function M.dtype_size(dtype)
  return tonumber(C.lmoe_dtype_size(checkoption(dtype, dtypes, 1, "dtype_size")))
end

function M.dtype_name(code) return ffi.string(C.lmoe_dtype_name(checkint(code, 1, "dtype_name"))) end

function M.lora_scale(alpha, rank, rslora)
  alpha = checknum(alpha, 1, "lora_scale")
  rank = checkrange(rank, 2, "lora_scale", 1, 2147483647, "rank")
  return tonumber(C.lmoe_lora_scale(alpha, rank, rslora and 1 or 0))
end

-- Seconds on a monotonic clock, for timing from scripts.
function M.now()
  if have_clock and ffi.C.clock_gettime(1, timespec) == 0 then -- CLOCK_MONOTONIC
    return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) * 1e-9
  end
  return os.clock()
end

-- ------------------------------------------------------------------ context

function M.context(opts)
  C.lmoe_context_config_init(ctx_cfg)
  if opts ~= nil then
    checktype(opts, "table", 1, "context")
    ctx_cfg.backend = field_option(opts, "backend", backends, 1, "context", ctx_cfg.backend)
    local dev = field_int(opts, "device", 1, "context", 0)
    if dev < 0 or dev > 2147483647 then field_error(1, "context", "device", "must be >= 0") end
    ctx_cfg.device = dev
    local th = field_int(opts, "threads", 1, "context", 0)
    if th < 0 or th > 1024 then field_error(1, "context", "threads", "must be 0 (one per core) .. 1024") end
    ctx_cfg.threads = th
    ctx_cfg.guard = field_option(opts, "guard", guards, 1, "context", ctx_cfg.guard)
    ctx_cfg.stream = field_stream(opts, 1, "context")
  end
  out_ctx[0] = nil
  local st = C.lmoe_context_create(ctx_cfg, out_ctx, errbuf, ffi.sizeof(errbuf))
  if st ~= 0 then return fail_msg(st, ffi.string(errbuf)) end
  local ctx, msg, code = wrap("context", out_ctx[0], nil, nil)
  if not ctx then return nil, msg, code end
  ctx._ctx = ctx._h
  return ctx
end

-- lm.adopt_context(p): a context object over a context someone else made (an
-- embedding host), holding its own reference (lmoe_context_retain), so closing or
-- collecting it never frees the host's context. p is a light userdata or a pointer
-- cdata to a live context (a freed one cannot be told apart); NULL and pointers to
-- other loramoe objects are refused.
function M.adopt_context(p)
  local t = type(p)
  if t ~= "userdata" and t ~= "cdata" then
    argerror(1, "adopt_context", "light userdata (an lmoe_context *) expected, got " .. typename(p))
  end
  local ok, h = pcall(ffi.cast, "lmoe_context *", p)
  if not ok then argerror(1, "adopt_context", "light userdata (an lmoe_context *) expected, got " .. typename(p)) end
  if h == nil then argerror(1, "adopt_context", "context pointer is NULL") end
  -- The library checks the magic of every handle; this is its message for a handle
  -- of another kind.
  if ffi.string(C.lmoe_context_last_error(h)) == "not a loramoe context" then
    argerror(1, "adopt_context", "not a loramoe context")
  end
  C.lmoe_context_retain(h)
  local ctx = wrap("context", h, nil, nil)
  ctx._ctx = ctx._h
  return ctx
end

local Ctx, CtxP = methods.context, props.context

-- ctx:pointer(): the lmoe_context * (a void * cdata), for C code and lm.adopt_context;
-- valid while some reference to the context is held.
function Ctx.pointer(self)
  return ffi.cast("void *", check(self, "context", "pointer")._h)
end

function CtxP.backend(self)
  local b = C.lmoe_context_backend(check(self, "context", "backend")._h)
  return backend_names[b] or "unknown"
end
function CtxP.threads(self) return C.lmoe_context_threads(check(self, "context", "threads")._h) end
function CtxP.guard(self)
  return guard_names[C.lmoe_context_guard(check(self, "context", "guard")._h)] or "unknown"
end

function Ctx.set_guard(self, g)
  local h = check(self, "context", "set_guard")._h
  return status(C.lmoe_context_set_guard(h, checkoption(g, guards, 1, "set_guard")), h)
end

function Ctx.stream(self)
  local s = C.lmoe_context_stream(check(self, "context", "stream")._h)
  if s == nil then return nil end
  return s
end

function Ctx.synchronize(self, stream)
  local h = check(self, "context", "synchronize")._h
  return status(C.lmoe_context_synchronize(h, opt_stream(stream, 1, "synchronize")), h)
end

function Ctx.counters(self)
  local h = check(self, "context", "counters")._h
  local st = C.lmoe_context_counters(h, counters)
  if st ~= 0 then return fail(st, h) end
  return {
    forwards = tonumber(counters.forwards), launches = tonumber(counters.launches),
    lora_launches = tonumber(counters.lora_launches), host_waits = tonumber(counters.host_waits),
    uploads = tonumber(counters.uploads), bytes_uploaded = tonumber(counters.bytes_uploaded),
    downloads = tonumber(counters.downloads),
  }
end

function Ctx.reset_counters(self) C.lmoe_context_reset_counters(check(self, "context", "reset_counters")._h) end

function Ctx.last_error(self)
  return ffi.string(C.lmoe_context_last_error(check(self, "context", "last_error")._h))
end

function Ctx.buffer(self, dtype, shape, memory)
  local h = check(self, "context", "buffer")._h
  dtype = checkoption(dtype, dtypes, 1, "buffer")
  local nd = check_shape(shape, 2, "buffer")
  memory = checkoption(memory, memories, 3, "buffer", "device")
  local bytes = tonumber(C.lmoe_dtype_size(dtype))
  for i = 0, nd - 1 do bytes = bytes * tonumber(shape_buf[i]) end
  report_pressure(bytes)
  out_buf[0] = nil
  local st = C.lmoe_buffer_create(h, dtype, memory, nd, shape_buf, out_buf)
  if st ~= 0 then return fail(st, h) end
  return wrap("buffer", out_buf[0], h, self)
end

-- ctx:wrap(dtype, shape, ptr, memory?, owner?): a buffer over memory someone else
-- owns; owner (any value) is kept alive as long as the buffer.
function Ctx.wrap(self, dtype, shape, ptr, memory, owner)
  local h = check(self, "context", "wrap")._h
  dtype = checkoption(dtype, dtypes, 1, "wrap")
  local nd = check_shape(shape, 2, "wrap")
  if type(ptr) ~= "cdata" then argerror(3, "wrap", "pointer expected, got " .. typename(ptr)) end
  memory = checkoption(memory, memories, 4, "wrap", "host")
  out_buf[0] = nil
  local st = C.lmoe_buffer_wrap(h, dtype, memory, nd, shape_buf, ffi.cast("void *", ptr), out_buf)
  if st ~= 0 then return fail(st, h) end
  local b, msg, code = wrap("buffer", out_buf[0], h, self)
  if not b then return nil, msg, code end
  b._owner = owner
  return b
end

function Ctx.batch(self)
  local h = check(self, "context", "batch")._h
  out_batch[0] = nil
  local st = C.lmoe_batch_create(h, out_batch)
  if st ~= 0 then return fail(st, h) end
  return wrap("batch", out_batch[0], h, self)
end

-- ctx:graph_begin(stream?): start capturing (cuda backend only).
function Ctx.graph_begin(self, stream)
  local h = check(self, "context", "graph_begin")._h
  return status(C.lmoe_graph_begin(h, opt_stream(stream, 1, "graph_begin")), h)
end

-- ctx:graph_end(stream?) -> graph: end the capture and instantiate it.
function Ctx.graph_end(self, stream)
  local h = check(self, "context", "graph_end")._h
  out_graph[0] = nil
  local st = C.lmoe_graph_end(h, opt_stream(stream, 1, "graph_end"), out_graph)
  if st ~= 0 then return fail(st, h) end
  return wrap("graph", out_graph[0], h, self)
end

-- graph:launch(stream?): enqueue one replay.
function methods.graph.launch(self, stream)
  local g = check(self, "graph", "launch")
  return status(C.lmoe_graph_launch(g._h, opt_stream(stream, 1, "launch")), g._ctx)
end

-- ctx:layer(cfg): a preset name, or {experts=, hidden=, intermediate=, top_k=,
-- renormalize=, max_tokens=, preset=}; fields override the preset's.
function Ctx.layer(self, cfg)
  local h = check(self, "context", "layer")._h
  local t, preset
  if type(cfg) == "string" then
    preset = cfg
  else
    checktype(cfg, "table", 1, "layer")
    t = cfg
    preset = cfg.preset
    if preset ~= nil and type(preset) ~= "string" then field_error(1, "layer", "preset", "must be a string") end
  end
  local p
  if preset ~= nil then
    p = M.presets[preset]
    if type(p) ~= "table" then argerror(1, "layer", format("unknown preset '%s'", preset)) end
  end
  C.lmoe_layer_config_init(layer_cfg)
  local function get(k, def)
    local v = def
    if p then v = field_int(p, k, 1, "layer", v) end
    if t then v = field_int(t, k, 1, "layer", v) end
    if v < -2147483648 or v > 2147483647 then field_error(1, "layer", k, "is out of range") end
    return v
  end
  local E, H, I = get("experts", 0), get("hidden", 0), get("intermediate", 0)
  local k, mt = get("top_k", layer_cfg.top_k), get("max_tokens", layer_cfg.max_tokens)
  local renorm = layer_cfg.renormalize ~= 0
  if p then renorm = field_bool(p, "renormalize", 1, "layer", renorm) end
  if t then renorm = field_bool(t, "renormalize", 1, "layer", renorm) end
  if E == 0 then field_error(1, "layer", "experts", "is missing") end
  if H == 0 then field_error(1, "layer", "hidden", "is missing") end
  if I == 0 then field_error(1, "layer", "intermediate", "is missing") end
  layer_cfg.num_experts, layer_cfg.hidden, layer_cfg.intermediate = E, H, I
  layer_cfg.top_k, layer_cfg.max_tokens, layer_cfg.renormalize = k, mt, renorm and 1 or 0
  report_pressure(6 * E * H * I)
  out_layer[0] = nil
  local st = C.lmoe_layer_create(h, layer_cfg, out_layer)
  if st ~= 0 then return fail(st, h) end
  return wrap("layer", out_layer[0], h, self)
end

-- ------------------------------------------------------------------ buffer

local Buf, BufP = methods.buffer, props.buffer

local function describe(self, fname)
  local h = check(self, "buffer", fname)._h
  if C.lmoe_buffer_describe(h, desc) ~= 0 then error("loramoe: could not describe a buffer", 3) end
  return desc, h
end

local function shape_table(d)
  local s = {}
  for i = 0, d.ndim - 1 do s[i + 1] = tonumber(d.shape[i]) end
  return s
end

function BufP.dtype(self) return dtype_names[describe(self, "dtype").dtype] end
function BufP.memory(self) return memory_names[describe(self, "memory").memory] end
function BufP.numel(self) return tonumber(describe(self, "numel").numel) end
function BufP.ndim(self) return describe(self, "ndim").ndim end
function BufP.bytes(self) return tonumber(describe(self, "bytes").bytes) end

function Buf.shape(self) return shape_table(describe(self, "shape")) end

function Buf.describe(self)
  local d = describe(self, "describe")
  return {
    dtype = dtype_names[d.dtype], memory = memory_names[d.memory], shape = shape_table(d),
    numel = tonumber(d.numel), bytes = tonumber(d.bytes),
  }
end

function Buf.data(self) return describe(self, "data").data end

function Buf.write(self, values, offset)
  local h = check(self, "buffer", "write")._h
  checktype(values, "table", 1, "write")
  offset = checkint(offset, 2, "write", 0)
  local n = #values
  local v = to_doubles(values, n, 1, "write", "values")
  return status(C.lmoe_buffer_write(h, offset, v, C.LMOE_DTYPE_F64, n), self._ctx)
end

function Buf.read(self, offset, count)
  local d, h = describe(self, "read")
  local numel, dtype = tonumber(d.numel), d.dtype
  offset = checkint(offset, 1, "read", 0)
  if offset < 0 or offset > numel then argerror(1, "read", format("offset must be 0..%d", numel)) end
  count = checkint(count, 2, "read", numel - offset)
  if count < 0 or count > numel - offset then
    argerror(2, "read", format("count must be 0..%d", numel - offset))
  end
  local v = ffi.new("double[?]", count > 0 and count or 1)
  local st = C.lmoe_buffer_read(h, offset, v, C.LMOE_DTYPE_F64, count)
  if st ~= 0 then return fail(st, self._ctx) end
  local t = {}
  for i = 0, count - 1 do t[i + 1] = v[i] end
  return t
end

function Buf.fill_random(self, seed, lo, hi, stream)
  local h = check(self, "buffer", "fill_random")._h
  seed = checkint(seed, 1, "fill_random")
  lo = checknum(lo, 2, "fill_random", -1)
  hi = checknum(hi, 3, "fill_random", 1)
  stream = opt_stream(stream, 4, "fill_random")
  return status(C.lmoe_buffer_fill_random(h, seed, lo, hi, stream), self._ctx)
end

function Buf.fill(self, value, stream)
  local h = check(self, "buffer", "fill")._h
  value = checknum(value, 1, "fill")
  return status(C.lmoe_buffer_fill(h, value, opt_stream(stream, 2, "fill")), self._ctx)
end

function Buf.compare(self, ref)
  local h = check(self, "buffer", "compare")._h
  local r = check_obj(ref, "buffer", 1, "compare")._h
  local st = C.lmoe_buffer_compare(h, r, cmp)
  if st ~= 0 then return fail(st, self._ctx) end
  return {
    rel_l2 = cmp.rel_l2, max_abs = cmp.max_abs, ref_l2 = cmp.ref_l2,
    nonfinite = tonumber(cmp.nonfinite), numel = tonumber(cmp.numel),
  }
end

-- ------------------------------------------------------------------ layer

local Layer = methods.layer

local function get_layer_config(h)
  layer_cfg.struct_size = ffi.sizeof(layer_cfg)
  if C.lmoe_layer_get_config(h, layer_cfg) ~= 0 then error("loramoe: could not read a layer's config", 3) end
  return layer_cfg
end

function Layer.config(self)
  local c = get_layer_config(check(self, "layer", "config")._h)
  return {
    experts = c.num_experts, hidden = c.hidden, intermediate = c.intermediate, top_k = c.top_k,
    renormalize = c.renormalize ~= 0, max_tokens = c.max_tokens,
  }
end

function Layer.randomize(self, seed, scale)
  local h = check(self, "layer", "randomize")._h
  seed = checkint(seed, 1, "randomize")
  scale = checknum(scale, 2, "randomize", 0.05)
  return status(C.lmoe_layer_randomize(h, seed, scale), self._ctx)
end

-- layer:set_weights(w13 | nil, w2 | nil): flat tables [E, 2I, H] and [E, H, I].
function Layer.set_weights(self, w13, w2)
  local h = check(self, "layer", "set_weights")._h
  local c = get_layer_config(h)
  local n = c.num_experts * 2 * c.intermediate * c.hidden
  local a = w13 ~= nil and to_doubles(w13, n, 1, "set_weights", "w13") or nil
  local b = w2 ~= nil and to_doubles(w2, n / 2, 2, "set_weights", "w2") or nil
  return status(C.lmoe_layer_set_weights(h, a, b, C.LMOE_DTYPE_F64), self._ctx)
end

-- layer:set_expert(e, {gate=, up=, down=}): flat tables [I, H], [I, H], [H, I].
function Layer.set_expert(self, e, parts)
  local h = check(self, "layer", "set_expert")._h
  local c = get_layer_config(h)
  e = checkrange(e, 1, "set_expert", 0, c.num_experts - 1, "expert")
  checktype(parts, "table", 2, "set_expert")
  local n = c.intermediate * c.hidden
  local g = parts.gate ~= nil and to_doubles(parts.gate, n, 2, "set_expert", "gate") or nil
  local u = parts.up ~= nil and to_doubles(parts.up, n, 2, "set_expert", "up") or nil
  local d = parts.down ~= nil and to_doubles(parts.down, n, 2, "set_expert", "down") or nil
  if not g and not u and not d then argerror(2, "set_expert", "give at least one of gate, up, down") end
  return status(C.lmoe_layer_set_expert(h, e, g, u, d, C.LMOE_DTYPE_F64), self._ctx)
end

-- layer:weights("w13" | "w2") -> a buffer borrowed from the layer (valid while the
-- layer is open; closing it frees nothing).
function Layer.weights(self, which)
  local h = check(self, "layer", "weights")._h
  which = checkoption(which, weight_index, 1, "weights")
  out_buf[0] = nil
  local st = C.lmoe_layer_weights(h, which, out_buf)
  if st ~= 0 then return fail(st, self._ctx) end
  return setmetatable({ _h = out_buf[0], _ctx = self._ctx, _parent = self, _borrowed_from = self },
    mts.buffer)
end

function Layer.pool(self, cfg)
  local h = check(self, "layer", "pool")._h
  C.lmoe_pool_config_init(pool_cfg)
  if cfg ~= nil then
    checktype(cfg, "table", 1, "pool")
    local s = field_int(cfg, "slots", 1, "pool", pool_cfg.num_slots)
    local r = field_int(cfg, "max_rank", 1, "pool", pool_cfg.max_rank)
    if s < -2147483648 or s > 2147483647 then field_error(1, "pool", "slots", "is out of range") end
    if r < -2147483648 or r > 2147483647 then field_error(1, "pool", "max_rank", "is out of range") end
    pool_cfg.num_slots, pool_cfg.max_rank = s, r
  end
  local c = get_layer_config(h)
  local R, S = math.max(pool_cfg.max_rank, 0), math.max(pool_cfg.num_slots, 0)
  report_pressure(2 * S * c.num_experts * R * (3 * c.hidden + 5 * c.intermediate))
  out_pool[0] = nil
  local st = C.lmoe_pool_create(h, pool_cfg, out_pool)
  if st ~= 0 then return fail(st, self._ctx) end
  local p, msg, code = wrap("pool", out_pool[0], self._ctx, self)
  if not p then return nil, msg, code end
  p._layer = h -- borrowed: the C pool holds a reference to its layer
  return p
end

local function args_buffer(t, k, required, fname)
  local v = t[k]
  if v == nil then
    if required then field_error(1, fname, k, "is missing (a loramoe.buffer)") end
    return nil
  end
  return check_obj(v, "buffer", 1, fname, k)._h
end

local function fill_forward_args(self, t, fname)
  local h = check(self, "layer", fname)._h
  if type(t) ~= "table" then argerror(1, fname, "table expected, got " .. typename(t), 3) end
  C.lmoe_forward_args_init(fwd_args)
  fwd_args.layer = h
  if t.pool ~= nil then fwd_args.pool = check_obj(t.pool, "pool", 1, fname, "pool")._h end
  if type(t.batch) ~= "table" or getmetatable(t.batch) ~= mts.batch then
    field_error(1, fname, "batch", "must be a loramoe.batch")
  end
  fwd_args.batch = check_obj(t.batch, "batch", 1, fname, "batch")._h
  fwd_args.x = args_buffer(t, "x", true, fname)
  fwd_args.out = args_buffer(t, "out", true, fname)
  fwd_args.router_logits = args_buffer(t, "logits", false, fname)
  fwd_args.topk_ids = args_buffer(t, "topk_ids", false, fname)
  fwd_args.topk_weights = args_buffer(t, "topk_weights", false, fname)
  return self._ctx
end

-- layer:forward{pool=, batch=, x=, logits= | topk_ids=, topk_weights=, out=, stream=}
function Layer.forward(self, t)
  local ctx = fill_forward_args(self, t, "forward")
  local stream = field_stream(t, 1, "forward")
  local st = C.lmoe_forward(ctx, fwd_args, stream)
  if st ~= 0 then return fail(st, ctx) end
  return true
end

-- layer:reference{...}: the float64 reference; out is an f32/f64 host buffer.
function Layer.reference(self, t)
  local ctx = fill_forward_args(self, t, "reference")
  local st = C.lmoe_reference_forward(ctx, fwd_args)
  if st ~= 0 then return fail(st, ctx) end
  return true
end

-- ------------------------------------------------------------------ pool

local Pool = methods.pool

function Pool.config(self)
  local h = check(self, "pool", "config")._h
  if C.lmoe_pool_get_config(h, pool_cfg) ~= 0 then return fail(C.LMOE_ERR_STATE, self._ctx) end
  return { slots = pool_cfg.num_slots, max_rank = pool_cfg.max_rank }
end

local target_bits = { gate = 1, up = 2, down = 4 }

local function targets_mask(v, n, fname)
  if v == nil then return C.LMOE_TARGET_ALL end
  if type(v) == "number" then
    if v ~= floor(v) or v < 1 or v > 7 then field_error(n, fname, "targets", "mask must be 1..7") end
    return v
  end
  if type(v) ~= "table" then
    field_error(n, fname, "targets", "must be a list of 'gate', 'up', 'down' or a mask")
  end
  local mask = 0
  for i = 1, #v do
    local b = target_bits[v[i]]
    if not b then field_error(n, fname, "targets", "entries must be 'gate', 'up' or 'down'") end
    mask = bit.bor(mask, b)
  end
  if mask == 0 then field_error(n, fname, "targets", "is empty") end
  return mask
end

-- pool:load_random(slot, {rank=, alpha=, targets=, fused=, rslora=, seed=, scale=})
function Pool.load_random(self, slot, spec)
  local h = check(self, "pool", "load_random")._h
  slot = checkint(slot, 1, "load_random")
  C.lmoe_random_adapter_init(random_spec)
  if spec ~= nil then
    checktype(spec, "table", 2, "load_random")
    random_spec.rank = field_int(spec, "rank", 2, "load_random", random_spec.rank)
    random_spec.alpha = field_num(spec, "alpha", 2, "load_random", random_spec.alpha)
    random_spec.targets = targets_mask(spec.targets, 2, "load_random")
    random_spec.fused = field_bool(spec, "fused", 2, "load_random", false) and 1 or 0
    random_spec.use_rslora = field_bool(spec, "rslora", 2, "load_random", false) and 1 or 0
    random_spec.seed = field_int(spec, "seed", 2, "load_random", 1)
    random_spec.scale = field_num(spec, "scale", 2, "load_random", random_spec.scale)
  end
  return status(C.lmoe_pool_load_random(h, slot, random_spec), self._ctx)
end

-- One part {a=, b=, rank=, scale= | alpha=, rslora=} of pool:load's description.
local function load_part(d, name, part, keep, E, inn, out, argn, fname)
  argn, fname = argn or 2, fname or "load"
  local t = d[name]
  if t == nil then
    part.a, part.b, part.rank, part.scale = nil, nil, 0, 0
    return
  end
  if type(t) ~= "table" then field_error(argn, fname, name, "must be a table {a=, b=, rank=, scale=}") end
  local what = name .. ".a"
  if type(t.a) ~= "table" then argerror(argn, fname, what .. " must be a table of numbers", 4) end
  local na = #t.a
  local rank = t.rank
  if rank == nil then
    if na == 0 or na % (E * inn) ~= 0 then
      argerror(argn, fname, format("%s has %d values: not a multiple of E*in = %d (give rank)", what, na, E * inn))
    end
    rank = na / (E * inn)
  elseif type(rank) ~= "number" or rank ~= floor(rank) or rank < 1 or rank > 2147483647 then
    argerror(argn, fname, name .. ".rank must be a positive integer")
  end
  local scale = 1.0
  if t.scale ~= nil then
    if type(t.scale) ~= "number" then argerror(argn, fname, name .. ".scale must be a number", 4) end
    scale = t.scale
  elseif t.alpha ~= nil then
    if type(t.alpha) ~= "number" then argerror(argn, fname, name .. ".alpha must be a number", 4) end
    scale = tonumber(C.lmoe_lora_scale(t.alpha, rank, t.rslora and 1 or 0))
  end
  local a = to_doubles(t.a, E * rank * inn, argn, fname, what)
  local b = to_doubles(t.b, E * out * rank, argn, fname, name .. ".b")
  keep[#keep + 1], keep[#keep + 2] = a, b
  part.a, part.b, part.rank, part.scale = a, b, rank, scale
end

-- pool:load(slot, {gate=, up=, gate_up=, down=}): each part {a=, b=, rank=, scale=}
-- with a = flat [E, rank, in], b = flat [E, out, rank] (PEFT's layout per expert).
function Pool.load(self, slot, d)
  local h = check(self, "pool", "load")._h
  slot = checkint(slot, 1, "load")
  checktype(d, "table", 2, "load")
  local c = get_layer_config(self._layer)
  local E, H, I = c.num_experts, c.hidden, c.intermediate
  C.lmoe_adapter_desc_init(adapter_desc)
  adapter_desc.dtype = C.LMOE_DTYPE_F64
  local keep = {} -- the arrays stay referenced until the load has copied them
  load_part(d, "gate", adapter_desc.gate, keep, E, H, I)
  load_part(d, "up", adapter_desc.up, keep, E, H, I)
  load_part(d, "gate_up", adapter_desc.gate_up, keep, E, H, 2 * I)
  load_part(d, "down", adapter_desc.down, keep, E, I, H)
  local st = C.lmoe_pool_load(h, slot, adapter_desc)
  keep = nil
  return status(st, self._ctx)
end

function Pool.unload(self, slot)
  local h = check(self, "pool", "unload")._h
  return status(C.lmoe_pool_unload(h, checkint(slot, 1, "unload")), self._ctx)
end

function Pool.slot_info(self, slot)
  local h = check(self, "pool", "slot_info")._h
  local st = C.lmoe_pool_slot_info(h, checkint(slot, 1, "slot_info"), slot_info)
  if st ~= 0 then return fail(st, self._ctx) end
  local s = slot_info
  local targets = {}
  if bit.band(s.targets, 1) ~= 0 then targets[#targets + 1] = "gate" end
  if bit.band(s.targets, 2) ~= 0 then targets[#targets + 1] = "up" end
  if bit.band(s.targets, 4) ~= 0 then targets[#targets + 1] = "down" end
  return {
    loaded = s.loaded ~= 0, targets = targets, fused = s.fused ~= 0,
    rank_gate = s.rank_gate, rank_up = s.rank_up, rank_down = s.rank_down,
    scale_gate = s.scale_gate, scale_up = s.scale_up, scale_down = s.scale_down,
    rank = s.max_rank, bytes = tonumber(s.bytes), generation = tonumber(s.generation),
  }
end

-- ------------------------------------------------------------------ pool by name

local out_slot = ffi.new("int32_t[1]")
local pool_mem = ffi.new("lmoe_pool_memory")

local function slot_result(st, ctx)
  if st ~= 0 then return fail(st, ctx) end
  return out_slot[0]
end

-- The adapter description of pool:load, as C structs; keep holds the arrays.
local function fill_desc(self, d, argn, fname)
  checktype(d, "table", argn, fname)
  local c = get_layer_config(self._layer)
  local E, H, I = c.num_experts, c.hidden, c.intermediate
  C.lmoe_adapter_desc_init(adapter_desc)
  adapter_desc.dtype = C.LMOE_DTYPE_F64
  local keep = {}
  load_part(d, "gate", adapter_desc.gate, keep, E, H, I, argn, fname)
  load_part(d, "up", adapter_desc.up, keep, E, H, I, argn, fname)
  load_part(d, "gate_up", adapter_desc.gate_up, keep, E, H, 2 * I, argn, fname)
  load_part(d, "down", adapter_desc.down, keep, E, I, H, argn, fname)
  return keep
end

-- pool:load_named(name, desc) -> slot
function Pool.load_named(self, name, d)
  local h = check(self, "pool", "load_named")._h
  checktype(name, "string", 1, "load_named")
  local keep = fill_desc(self, d, 2, "load_named")
  out_slot[0] = -1
  local st = C.lmoe_pool_load_named(h, name, adapter_desc, out_slot)
  keep = nil
  return slot_result(st, self._ctx)
end

-- pool:load_peft(name, peft, layer_index) -> slot
function Pool.load_peft(self, name, peft, layer)
  local h = check(self, "pool", "load_peft")._h
  checktype(name, "string", 1, "load_peft")
  local ph = check_obj(peft, "peft", 2, "load_peft")._h
  layer = checkrange(layer, 3, "load_peft", 0, 2147483647, "layer")
  out_slot[0] = -1
  return slot_result(C.lmoe_pool_load_peft(h, name, ph, layer, out_slot), self._ctx)
end

function Pool.unload_named(self, name)
  local h = check(self, "pool", "unload_named")._h
  return status(C.lmoe_pool_unload_named(h, checktype(name, "string", 1, "unload_named")), self._ctx)
end

-- pool:find(name) -> slot, or nil, "NOT_FOUND: ...", "NOT_FOUND"
function Pool.find(self, name)
  local h = check(self, "pool", "find")._h
  checktype(name, "string", 1, "find")
  out_slot[0] = -1
  local st = C.lmoe_pool_find(h, name, out_slot)
  if st == C.LMOE_ERR_NOT_FOUND then -- not recorded in the context: say it here
    return fail_msg(st, format("no slot holds an adapter named '%s'", name))
  end
  return slot_result(st, self._ctx)
end

function Pool.slot_name(self, slot)
  local h = check(self, "pool", "slot_name")._h
  local n = C.lmoe_pool_slot_name(h, checkint(slot, 1, "slot_name"))
  if n == nil then return "" end
  return ffi.string(n)
end

function Pool.pin(self, slot)
  local h = check(self, "pool", "pin")._h
  return status(C.lmoe_pool_pin(h, checkint(slot, 1, "pin")), self._ctx)
end

function Pool.unpin(self, slot)
  local h = check(self, "pool", "unpin")._h
  return status(C.lmoe_pool_unpin(h, checkint(slot, 1, "unpin")), self._ctx)
end

function Pool.pin_count(self, slot)
  local h = check(self, "pool", "pin_count")._h
  return C.lmoe_pool_pin_count(h, checkint(slot, 1, "pin_count"))
end

function Pool.touch(self, slot)
  local h = check(self, "pool", "touch")._h
  return status(C.lmoe_pool_touch(h, checkint(slot, 1, "touch")), self._ctx)
end

function Pool.memory(self)
  local h = check(self, "pool", "memory")._h
  ffi.fill(pool_mem, ffi.sizeof(pool_mem))
  local st = C.lmoe_pool_get_memory(h, pool_mem)
  if st ~= 0 then return fail(st, self._ctx) end
  local m = pool_mem
  return {
    slot_bytes = tonumber(m.slot_bytes), total_bytes = tonumber(m.total_bytes), slots = m.num_slots,
    loaded_slots = m.loaded_slots, loaded_bytes = tonumber(m.loaded_bytes),
    used_bytes = tonumber(m.used_bytes), evictions = tonumber(m.evictions),
  }
end

-- ------------------------------------------------------------------ safetensors

local family_names = { [0] = "unknown", "qwen", "mixtral" }
local layout_names = { [0] = "per_expert", "fused" }
local families, layouts = index_of(family_names), index_of(layout_names)
local out_st = ffi.new("lmoe_safetensors *[1]")
local out_peft = ffi.new("lmoe_peft *[1]")
local out_ck = ffi.new("lmoe_checkpoint *[1]")
local tensor_info = ffi.new("lmoe_tensor_info")
local out_idx = ffi.new("int32_t[1]")
local out_key = ffi.new("const char *[1]")
local out_val = ffi.new("const char *[1]")
local out_need = ffi.new("size_t[1]")
local peft_info = ffi.new("lmoe_peft_info")
local ck_info = ffi.new("lmoe_checkpoint_layer_info")
local peft_syn = ffi.new("lmoe_peft_synthetic")

local function targets_list(mask)
  local t = {}
  if bit.band(mask, 1) ~= 0 then t[#t + 1] = "gate" end
  if bit.band(mask, 2) ~= 0 then t[#t + 1] = "up" end
  if bit.band(mask, 4) ~= 0 then t[#t + 1] = "down" end
  return t
end

-- ctx:safetensors(path) -> file
function Ctx.safetensors(self, path)
  local h = check(self, "context", "safetensors")._h
  checktype(path, "string", 1, "safetensors")
  out_st[0] = nil
  local st = C.lmoe_safetensors_open(h, path, out_st)
  if st ~= 0 then return fail(st, h) end
  return wrap("safetensors", out_st[0], h, self)
end

-- ctx:safetensors_string(bytes, name?) -> file, from bytes in memory (copied)
function Ctx.safetensors_string(self, data, name)
  local h = check(self, "context", "safetensors_string")._h
  checktype(data, "string", 1, "safetensors_string")
  if name ~= nil then checktype(name, "string", 2, "safetensors_string") end
  out_st[0] = nil
  local st = C.lmoe_safetensors_open_memory(h, data, #data, name or "(string)", out_st)
  if st ~= 0 then return fail(st, h) end
  return wrap("safetensors", out_st[0], h, self)
end

local File = methods.safetensors

function File.count(self) return C.lmoe_safetensors_count(check(self, "safetensors", "count")._h) end

-- A 0-based index from an index or a name; nil, msg, code when the name is absent.
local function tensor_index(self, v, fname)
  local h = self._h
  if type(v) == "string" then
    local st = C.lmoe_safetensors_find(h, v, out_idx)
    if st == C.LMOE_ERR_NOT_FOUND then return fail_msg(st, format("no tensor named '%s'", v)) end
    if st ~= 0 then return fail(st, self._ctx) end
    return out_idx[0]
  end
  return checkrange(v, 1, fname, 0, 2147483647, "tensor index")
end

local function tensor_table(ti)
  local shape = {}
  for i = 0, ti.ndim - 1 do shape[i + 1] = tonumber(ti.shape[i]) end
  return {
    name = ti.name ~= nil and ffi.string(ti.name) or "",
    file_dtype = ti.dtype_name ~= nil and ffi.string(ti.dtype_name) or "",
    dtype = dtype_names[ti.dtype], shape = shape, numel = tonumber(ti.numel),
    offset = tonumber(ti.offset), bytes = tonumber(ti.bytes),
  }
end

-- file:tensor(index | name) -> {name=, dtype=, file_dtype=, shape=, numel=, offset=, bytes=}
function File.tensor(self, which)
  local h = check(self, "safetensors", "tensor")._h
  local idx, msg, code = tensor_index(self, which, "tensor")
  if not idx then return nil, msg, code end
  local st = C.lmoe_safetensors_tensor(h, idx, tensor_info)
  if st ~= 0 then return fail(st, self._ctx) end
  return tensor_table(tensor_info)
end

function File.tensors(self)
  local h = check(self, "safetensors", "tensors")._h
  local t = {}
  for i = 0, C.lmoe_safetensors_count(h) - 1 do
    local st = C.lmoe_safetensors_tensor(h, i, tensor_info)
    if st ~= 0 then return fail(st, self._ctx) end
    t[i + 1] = tensor_table(tensor_info)
  end
  return t
end

function File.find(self, name)
  check(self, "safetensors", "find")
  checktype(name, "string", 1, "find")
  return tensor_index(self, name, "find")
end

-- file:read(index | name) -> flat table of the tensor's values
function File.read(self, which)
  local h = check(self, "safetensors", "read")._h
  local idx, msg, code = tensor_index(self, which, "read")
  if not idx then return nil, msg, code end
  local st = C.lmoe_safetensors_tensor(h, idx, tensor_info)
  if st ~= 0 then return fail(st, self._ctx) end
  local n = tonumber(tensor_info.numel)
  local v = ffi.new("double[?]", n > 0 and n or 1)
  st = C.lmoe_safetensors_read(h, idx, v, C.LMOE_DTYPE_F64, n)
  if st ~= 0 then return fail(st, self._ctx) end
  local t = {}
  for i = 0, n - 1 do t[i + 1] = v[i] end
  return t
end

function File.metadata(self)
  local h = check(self, "safetensors", "metadata")._h
  local t = {}
  for i = 0, C.lmoe_safetensors_metadata_count(h) - 1 do
    local st = C.lmoe_safetensors_metadata(h, i, out_key, out_val)
    if st ~= 0 then return fail(st, self._ctx) end
    t[out_key[0] ~= nil and ffi.string(out_key[0]) or ""] = out_val[0] ~= nil and ffi.string(out_val[0]) or ""
  end
  return t
end

-- ctx:write_safetensors(path, {{name=, dtype=, shape=, data=}, ...}, metadata?)
-- data is a flat table of numbers (converted to dtype) or a host loramoe.buffer.
function Ctx.write_safetensors(self, path, tensors, meta)
  local h = check(self, "context", "write_safetensors")._h
  checktype(path, "string", 1, "write_safetensors")
  checktype(tensors, "table", 2, "write_safetensors")
  if meta ~= nil then checktype(meta, "table", 3, "write_safetensors") end
  local n = #tensors
  local e = ffi.new("lmoe_tensor_entry[?]", n > 0 and n or 1)
  local keep, temps = {}, {}
  for i = 1, n do
    local t = tensors[i]
    if type(t) ~= "table" then
      argerror(2, "write_safetensors", format("tensor %d must be a table {name=, dtype=, shape=, data=}", i))
    end
    if type(t.name) ~= "string" then argerror(2, "write_safetensors", format("tensor %d: name must be a string", i)) end
    local ent = e[i - 1]
    ent.name = t.name
    keep[#keep + 1] = t.name
    local src, bd = nil, nil
    if type(t.data) == "table" and getmetatable(t.data) == mts.buffer then
      src = check_obj(t.data, "buffer", 2, "write_safetensors")
      bd = src:describe()
    elseif type(t.data) ~= "table" then
      argerror(2, "write_safetensors", format("tensor %d: data must be a table of numbers or a loramoe.buffer", i))
    end
    local dt = bd and dtypes[bd.dtype] or C.LMOE_DTYPE_F32
    dt = field_option(t, "dtype", dtypes, 2, "write_safetensors", dt)
    ent.dtype = dt
    local shape = t.shape or (bd and bd.shape)
    if shape == nil then argerror(2, "write_safetensors", format("tensor %d: shape is missing", i)) end
    local nd = check_shape(shape, 2, "write_safetensors")
    ent.ndim = nd
    local numel = 1
    for d = 0, nd - 1 do
      ent.shape[d] = shape_buf[d]
      numel = numel * tonumber(shape_buf[d])
    end
    if src then
      if dtypes[bd.dtype] ~= dt then argerror(2, "write_safetensors", format("tensor %d: dtype differs from its buffer's", i)) end
      if bd.memory ~= "host" and C.lmoe_context_backend(src._ctx) ~= C.LMOE_BACKEND_CPU then
        argerror(2, "write_safetensors", format("tensor %d: the buffer must be in host memory", i))
      end
      ent.data = src:data()
      keep[#keep + 1] = src
    else
      local v = to_doubles(t.data, numel, 2, "write_safetensors", format("tensor %d data", i))
      keep[#keep + 1] = v
      temps[#temps + 1] = { ent = ent, v = v, numel = numel, dtype = dt }
    end
  end
  local nmeta = 0
  if meta then
    for k, v in pairs(meta) do
      if type(k) ~= "string" or type(v) ~= "string" then
        argerror(3, "write_safetensors", "metadata keys and values must be strings")
      end
      nmeta = nmeta + 1
    end
  end
  local mk = ffi.new("const char *[?]", nmeta > 0 and nmeta or 1)
  local mv = ffi.new("const char *[?]", nmeta > 0 and nmeta or 1)
  if meta then
    local j = 0
    for k, v in pairs(meta) do
      mk[j], mv[j] = k, v
      keep[#keep + 1], keep[#keep + 2] = k, v
      j = j + 1
    end
  end
  -- Table data goes through temporary host buffers of the entry's dtype (converted by
  -- the library), released right after the write.
  local st = 0
  local bufs = {}
  for _, tmp in ipairs(temps) do
    shape_buf[0] = tmp.numel
    out_buf[0] = nil
    st = C.lmoe_buffer_create(h, tmp.dtype, C.LMOE_MEMORY_HOST, 1, shape_buf, out_buf)
    if st ~= 0 then break end
    local b = ffi.gc(out_buf[0], C.lmoe_buffer_release)
    bufs[#bufs + 1] = b
    st = C.lmoe_buffer_write(b, 0, tmp.v, C.LMOE_DTYPE_F64, tmp.numel)
    if st == 0 then st = C.lmoe_buffer_describe(b, desc) end
    if st ~= 0 then break end
    tmp.ent.data = desc.data
  end
  if st == 0 then st = C.lmoe_safetensors_write(h, path, n, e, nmeta, mk, mv) end
  for _, b in ipairs(bufs) do
    ffi.gc(b, nil)
    C.lmoe_buffer_release(b)
  end
  keep = nil
  return status(st, h)
end

-- ------------------------------------------------------------------ PEFT adapters

-- ctx:peft(path) -> adapter
function Ctx.peft(self, path)
  local h = check(self, "context", "peft")._h
  checktype(path, "string", 1, "peft")
  out_peft[0] = nil
  local st = C.lmoe_peft_open(h, path, out_peft)
  if st ~= 0 then return fail(st, h) end
  return wrap("peft", out_peft[0], h, self)
end

local Peft = methods.peft

function Peft.info(self)
  local h = check(self, "peft", "info")._h
  C.lmoe_peft_info_init(peft_info)
  local st = C.lmoe_peft_get_info(h, peft_info)
  if st ~= 0 then return fail(st, self._ctx) end
  local i = peft_info
  return {
    family = family_names[i.family] or "unknown", layout = layout_names[i.layout] or "unknown",
    rank = i.rank, alpha = i.alpha, rslora = i.use_rslora ~= 0, targets = targets_list(i.targets),
    layers = i.num_layers, min_layer = i.min_layer, max_layer = i.max_layer,
    experts = i.num_experts, max_rank = i.max_rank, has_patterns = i.has_patterns ~= 0,
    tensors = i.num_tensors, bytes = tonumber(i.bytes),
  }
end

function Peft.layers(self)
  local h = check(self, "peft", "layers")._h
  C.lmoe_peft_info_init(peft_info)
  local st = C.lmoe_peft_get_info(h, peft_info)
  if st ~= 0 then return fail(st, self._ctx) end
  local cap = peft_info.num_layers > 0 and peft_info.num_layers or 1
  local v = ffi.new("int32_t[?]", cap)
  local n = C.lmoe_peft_layers(h, v, cap)
  local t = {}
  for k = 0, n - 1 do t[k + 1] = v[k] end
  return t
end

function Peft.inspect(self)
  local h = check(self, "peft", "inspect")._h
  local probe = ffi.new("char[1]")
  local st = C.lmoe_peft_inspect(h, probe, 1, out_need)
  if st ~= 0 then return fail(st, self._ctx) end
  local size = tonumber(out_need[0]) + 1
  local buf = ffi.new("char[?]", size)
  st = C.lmoe_peft_inspect(h, buf, size, nil)
  if st ~= 0 then return fail(st, self._ctx) end
  return ffi.string(buf)
end

local function part_table(p, E, inn, out)
  if p.a == nil or p.b == nil then return nil end
  local r = p.rank
  local a, b = ffi.cast("const float *", p.a), ffi.cast("const float *", p.b)
  local ta, tb = {}, {}
  for i = 0, E * r * inn - 1 do ta[i + 1] = a[i] end
  for i = 0, E * out * r - 1 do tb[i + 1] = b[i] end
  return { a = ta, b = tb, rank = r, scale = p.scale }
end

-- peft:layer_desc(layer_index, {experts=, hidden=, intermediate=}) -> description for pool:load
function Peft.layer_desc(self, layer, cfg)
  local h = check(self, "peft", "layer_desc")._h
  layer = checkrange(layer, 1, "layer_desc", 0, 2147483647, "layer")
  checktype(cfg, "table", 2, "layer_desc")
  local E, H, I = field_int(cfg, "experts", 2, "layer_desc", 0), field_int(cfg, "hidden", 2, "layer_desc", 0),
    field_int(cfg, "intermediate", 2, "layer_desc", 0)
  if E < 1 or E > 2147483647 then field_error(2, "layer_desc", "experts", "must be a positive integer") end
  if H < 1 or H > 2147483647 then field_error(2, "layer_desc", "hidden", "must be a positive integer") end
  if I < 1 or I > 2147483647 then field_error(2, "layer_desc", "intermediate", "must be a positive integer") end
  local d = ffi.new("lmoe_adapter_desc")
  C.lmoe_adapter_desc_init(d)
  local st = C.lmoe_peft_layer_desc(h, layer, E, H, I, d)
  if st ~= 0 then return fail(st, self._ctx) end
  if d.dtype ~= C.LMOE_DTYPE_F32 then return fail_msg(C.LMOE_ERR_UNSUPPORTED, "layer_desc gave non-f32 arrays") end
  return {
    gate = part_table(d.gate, E, H, I), up = part_table(d.up, E, H, I),
    gate_up = part_table(d.gate_up, E, H, 2 * I), down = part_table(d.down, E, I, H),
  }
end

-- ctx:write_peft(dir, spec): a synthetic PEFT adapter on disk.
function Ctx.write_peft(self, dir, spec)
  local h = check(self, "context", "write_peft")._h
  checktype(dir, "string", 1, "write_peft")
  checktype(spec, "table", 2, "write_peft")
  local s = peft_syn
  C.lmoe_peft_synthetic_init(s)
  local f = "write_peft"
  s.family = field_option(spec, "family", families, 2, f, s.family)
  s.layout = field_option(spec, "layout", layouts, 2, f, s.layout)
  s.num_layers = field_int(spec, "layers", 2, f, s.num_layers)
  s.num_experts = field_int(spec, "experts", 2, f, s.num_experts)
  s.hidden = field_int(spec, "hidden", 2, f, s.hidden)
  s.intermediate = field_int(spec, "intermediate", 2, f, s.intermediate)
  s.rank = field_int(spec, "rank", 2, f, s.rank)
  s.targets = targets_mask(spec.targets, 2, f)
  s.alpha = field_num(spec, "alpha", 2, f, s.alpha)
  s.use_rslora = field_bool(spec, "rslora", 2, f, s.use_rslora ~= 0) and 1 or 0
  s.dtype = field_option(spec, "dtype", dtypes, 2, f, s.dtype)
  s.seed = field_int(spec, "seed", 2, f, tonumber(s.seed))
  s.scale = field_num(spec, "scale", 2, f, s.scale)
  local keep = {}
  for _, pat in ipairs { "rank_pattern", "alpha_pattern" } do
    local p = spec[pat]
    if p ~= nil then
      if type(p) ~= "table" then field_error(2, f, pat, "must be {key = number}") end
      local k, v = next(p)
      if k ~= nil then
        if type(k) ~= "string" or type(v) ~= "number" then field_error(2, f, pat, "must be {key = number}") end
        if next(p, k) ~= nil then field_error(2, f, pat, "takes one entry") end
        keep[#keep + 1] = k
        if pat == "rank_pattern" then
          s.rank_pattern_key, s.rank_pattern_value = k, v
        else
          s.alpha_pattern_key, s.alpha_pattern_value = k, v
        end
      end
    end
  end
  local st = C.lmoe_peft_write_synthetic(h, dir, s)
  s.rank_pattern_key, s.alpha_pattern_key = nil, nil
  keep = nil
  return status(st, h)
end

-- ------------------------------------------------------------------ checkpoints

-- ctx:checkpoint(path) -> checkpoint
function Ctx.checkpoint(self, path)
  local h = check(self, "context", "checkpoint")._h
  checktype(path, "string", 1, "checkpoint")
  out_ck[0] = nil
  local st = C.lmoe_checkpoint_open(h, path, out_ck)
  if st ~= 0 then return fail(st, h) end
  return wrap("checkpoint", out_ck[0], h, self)
end

local Ck = methods.checkpoint

function Ck.layer_info(self, layer)
  local h = check(self, "checkpoint", "layer_info")._h
  layer = checkrange(layer, 1, "layer_info", 0, 2147483647, "layer")
  C.lmoe_checkpoint_layer_info_init(ck_info)
  local st = C.lmoe_checkpoint_get_layer_info(h, layer, ck_info)
  if st ~= 0 then return fail(st, self._ctx) end
  return {
    family = family_names[ck_info.family] or "unknown", experts = ck_info.num_experts,
    hidden = ck_info.hidden, intermediate = ck_info.intermediate, has_router = ck_info.has_router ~= 0,
  }
end

-- ck:load_layer(index, layer, with_router?) -> router buffer [E, H] f32 (host) when
-- with_router, else true
function Ck.load_layer(self, index, layer, with_router)
  local h = check(self, "checkpoint", "load_layer")._h
  index = checkrange(index, 1, "load_layer", 0, 2147483647, "layer")
  local lh = check_obj(layer, "layer", 2, "load_layer")._h
  if not with_router then return status(C.lmoe_checkpoint_load_layer(h, index, lh, nil), self._ctx) end
  out_buf[0] = nil
  local st = C.lmoe_checkpoint_load_layer(h, index, lh, out_buf)
  local router = nil
  if out_buf[0] ~= nil then router = wrap("buffer", out_buf[0], self._ctx, self._parent) end
  if st ~= 0 then return fail(st, self._ctx) end
  return router
end

-- ------------------------------------------------------------------ batch

local Batch = methods.batch

-- batch:set(pool | nil, {{tokens=, adapter=}, ...}); adapter absent or -1: none.
function Batch.set(self, pool, requests)
  local h = check(self, "batch", "set")._h
  local ph = nil
  if pool ~= nil then ph = check_obj(pool, "pool", 1, "set")._h end
  checktype(requests, "table", 2, "set")
  local n = #requests
  local tokens = ffi.new("int32_t[?]", n > 0 and n or 1)
  local slots = ffi.new("int32_t[?]", n > 0 and n or 1)
  for i = 1, n do
    local r = requests[i]
    if type(r) ~= "table" then
      argerror(2, "set", format("request %d must be a table {tokens=, adapter=}", i))
    end
    local t = r.tokens
    if type(t) ~= "number" or t ~= floor(t) or t < -2147483648 or t > 2147483647 then
      argerror(2, "set", format("request %d: tokens must be an integer", i))
    end
    local s = r.adapter
    if s == nil then
      s = C.LMOE_NO_ADAPTER
    elseif type(s) ~= "number" or s ~= floor(s) or s < -2147483648 or s > 2147483647 then
      argerror(2, "set", format("request %d: adapter must be a slot number or nil", i))
    end
    tokens[i - 1], slots[i - 1] = t, s
  end
  return status(C.lmoe_batch_set(h, ph, n, tokens, slots), self._ctx)
end

local function get_batch_info(self, fname)
  local h = check(self, "batch", fname)._h
  local st = C.lmoe_batch_get_info(h, batch_info)
  return st, h
end

function Batch.info(self)
  local st = get_batch_info(self, "info")
  if st ~= 0 then return fail(st, self._ctx) end
  local i = batch_info
  return {
    requests = i.num_requests, tokens = tonumber(i.num_tokens), has_active = i.has_active ~= 0,
    active = i.num_active, max_rank = i.max_rank, max_slot = i.max_slot,
  }
end

function Batch.offsets(self)
  local st, h = get_batch_info(self, "offsets")
  if st ~= 0 then return fail(st, self._ctx) end
  local cap = batch_info.num_requests + 1
  local o = ffi.new("int64_t[?]", cap)
  local n = C.lmoe_batch_offsets(h, o, cap)
  local t = {}
  for k = 0, n - 1 do t[k + 1] = tonumber(o[k]) end
  return t
end

-- batch:active_slots() -> slots, tokens (two arrays, slots increasing)
function Batch.active_slots(self)
  local st, h = get_batch_info(self, "active_slots")
  if st ~= 0 then return fail(st, self._ctx) end
  local cap = batch_info.num_active > 0 and batch_info.num_active or 1
  local s = ffi.new("int32_t[?]", cap)
  local t = ffi.new("int64_t[?]", cap)
  local n = C.lmoe_batch_active_slots(h, s, t, cap)
  local slots, tokens = {}, {}
  for k = 0, n - 1 do
    slots[k + 1] = s[k]
    tokens[k + 1] = tonumber(t[k])
  end
  return slots, tokens
end

return M
