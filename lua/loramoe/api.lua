-- loramoe.api — the Lua API, written once over a raw core: loramoe.core (the Lua 5.4
-- C module) or loramoe.ffi_core (LuaJIT FFI), which expose the C functions of
-- loramoe.h one to one. Objects, closed checks, argument errors, names, presets and
-- table conversions live here only, so both runtimes behave and fail alike.
-- docs/lua.md is the reference.
--
-- Everything that arrives from a caller is untrusted: lists are read raw (rawget /
-- rawlen: __index and __len never run) and a list with a __len metamethod is refused;
-- fields may come from __index, and what they give is kept in tables of this file
-- while C uses it; strings are not numbers; every integer is checked in range before
-- it reaches C (no truncation), every size before it is multiplied or allocated.
if not rawget(_G, "jit") and _VERSION ~= "Lua 5.4" then
  error("loramoe needs Lua 5.4 (the C module loramoe.core) or LuaJIT (the FFI binding); this is " .. _VERSION, 2)
end
local R = require(rawget(_G, "jit") and "loramoe.ffi_core" or "loramoe.core")

local type, tostring, pairs, next, rawget, setmetatable, error = type, tostring, pairs, next, rawget,
  setmetatable, error
local floor, huge = math.floor, math.huge
local format = string.format
local getmetatable = debug.getmetatable -- sees through __metatable = "locked"
-- LuaJIT's # does not call __len on tables; Lua 5.4's does: rawlen in both.
local rawlen = _G.rawlen or function(t) return #t end

local A = {}
A.core = R
A.methods = {}

-- ------------------------------------------------------------------ errors

-- Raises msg at the first caller outside loramoe's own Lua files, so the position is
-- the user's line however deep in the API the check sits.
local function raise(msg)
  local lvl = 2
  while true do
    local info = debug.getinfo(lvl, "S")
    if not info then return error(msg, 0) end
    if not info.source:find("loramoe[/\\][%w_]+%.lua$") then break end
    lvl = lvl + 1
  end
  error(msg, lvl)
end
A.raise = raise

-- "bad argument #n to 'f' (msg)"; n counts the arguments after self for methods.
local function argerror(n, fname, msg) raise(format("bad argument #%d to '%s' (%s)", n, fname, msg)) end
local function field_error(n, fname, k, what) argerror(n, fname, format("field '%s' %s", k, what)) end

local function typename(v)
  local mt = getmetatable(v)
  if type(mt) == "table" and type(rawget(mt, "__name")) == "string" then return rawget(mt, "__name") end
  return type(v)
end

-- Integers print alike under both runtimes (5.4 would print 2^32 as 4.294967296e+09).
local function ifmt(v) return format("%.0f", v) end

local codes = { [0] = "OK", "INVALID_ARGUMENT", "OUT_OF_MEMORY", "UNSUPPORTED", "BACKEND", "STATE",
  "NOT_FOUND", "FULL", "IO", "FORMAT" }

local function fail_msg(st, msg)
  st = tonumber(st) -- an enum cdata from the FFI
  local code = codes[st] or "UNKNOWN"
  if msg == nil or msg == "" then msg = R.status_string(st) end
  return nil, code .. ": " .. msg, code
end
local function fail(st, cbox) return fail_msg(st, cbox and R.context_last_error(cbox)) end
local function status(st, cbox)
  if tonumber(st) ~= 0 then return fail(st, cbox) end
  return true
end

-- ------------------------------------------------------------------ argument checks

local I32 = 2147483647
local function isint(v) return type(v) == "number" and v == floor(v) and v > -huge and v < huge end

local function checktype(v, t, n, fname)
  if type(v) ~= t then argerror(n, fname, t .. " expected, got " .. typename(v)) end
  return v
end

local function checkint(v, n, fname, def)
  if v == nil and def ~= nil then return def end
  if type(v) ~= "number" then argerror(n, fname, "number expected, got " .. typename(v)) end
  if not isint(v) or v >= 2 ^ 63 or v < -2 ^ 63 then argerror(n, fname, "number has no integer representation") end
  return v
end

local function checkrange(v, n, fname, lo, hi, what, def)
  v = checkint(v, n, fname, def)
  if v < lo or v > hi then argerror(n, fname, format("%s must be %s..%s, got %s", what, ifmt(lo), ifmt(hi), ifmt(v))) end
  return v
end
-- Slots, indices and the like: anything C takes as an int32 (the library says what
-- is out of its own range; nothing is truncated on the way).
local function checki32(v, n, fname, what) return checkrange(v, n, fname, -I32 - 1, I32, what) end

local function checknum(v, n, fname, def)
  if v == nil and def ~= nil then return def end
  if type(v) ~= "number" then argerror(n, fname, "number expected, got " .. typename(v)) end
  return v
end

local function checkoption(v, names, n, fname, def)
  if v == nil and def ~= nil then v = def end
  if type(v) ~= "string" then argerror(n, fname, "string expected, got " .. typename(v)) end
  local i = names[v]
  if not i then argerror(n, fname, format("invalid option '%s'", v)) end
  return i
end

-- Option tables: unknown names are refused (a typo would otherwise be ignored).
local function check_fields(t, known, n, fname)
  for k in next, t do
    if not known[k] then argerror(n, fname, format("unknown option '%s'", tostring(k))) end
  end
end
local function set(list)
  local s = {}
  for _, k in ipairs(list) do s[k] = true end
  return s
end

local function field_int(t, k, n, fname, def, lo, hi)
  local v = t[k]
  if v == nil then return def end
  if not isint(v) then field_error(n, fname, k, "must be an integer") end
  lo, hi = lo or -I32 - 1, hi or I32
  if v < lo or v > hi then field_error(n, fname, k, format("must be %s..%s, got %s", ifmt(lo), ifmt(hi), ifmt(v))) end
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

-- Streams: nil, or a pointer (light userdata; pointer cdata under LuaJIT).
local function opt_stream(s, n, fname)
  if s ~= nil and R.address(s) == nil then
    argerror(n, fname, "pointer (a stream) or nil expected, got " .. typename(s))
  end
  return s
end
local function field_stream(t, n, fname)
  local s = t.stream
  if s ~= nil and R.address(s) == nil then field_error(n, fname, "stream", "must be a pointer (a cudaStream_t) or nil") end
  return s
end

-- The length of a list, read raw; a __len metamethod is refused rather than believed.
-- With a hole the border # finds differs between Lua 5.4 and LuaJIT: when an integer
-- key lies beyond it, the length is the first hole (never more than the border + 1,
-- so nothing is sized by a sparse key), where both runtimes then find the nil entry.
local function list_len(t, n, fname, what)
  local mt = getmetatable(t)
  if type(mt) == "table" and rawget(mt, "__len") ~= nil then
    argerror(n, fname, what .. " has a __len metamethod (give a plain list)")
  end
  local len = rawlen(t)
  for k in next, t do
    if type(k) == "number" and k > len and k == floor(k) then
      for i = 1, len + 1 do
        if rawget(t, i) == nil then return i end
      end
    end
  end
  return len
end

-- A list of exactly want numbers as an f64 mem (want nil: as many as it holds).
local function to_mem(t, want, n, fname, what)
  if type(t) ~= "table" then argerror(n, fname, what .. " must be a table of numbers") end
  local len = list_len(t, n, fname, what)
  if want and len ~= want then argerror(n, fname, format("%s has %d values, expected %s", what, len, ifmt(want))) end
  local m, bad = R.pack("f64", t, len)
  if not m then argerror(n, fname, format("%s[%d] is not a number", what, bad)) end
  return m, len
end

local MAX_DIMS = 4
local function check_shape(shape, n, fname, max)
  max = max or MAX_DIMS
  if type(shape) ~= "table" then argerror(n, fname, "table expected, got " .. typename(shape)) end
  local nd = list_len(shape, n, fname, "shape")
  if nd < 1 or nd > max then argerror(n, fname, format("shape must have 1..%d dimensions", max)) end
  local s, numel = {}, 1
  for i = 1, nd do
    local d = rawget(shape, i)
    if not isint(d) or d < 0 or d > 2 ^ 53 then argerror(n, fname, format("shape[%d] must be a non-negative integer", i)) end
    s[i] = d
    numel = numel * d
  end
  if numel > 2 ^ 53 then argerror(n, fname, "shape has more than 2^53 elements") end
  return s, numel
end

-- Extra GC work in proportion to memory the collector cannot see, before a large
-- allocation, so forgotten layers and pools are finalised before new ones pile up.
local function report_pressure(bytes)
  if bytes < 1048576 then return end
  local kb = bytes / 1024
  collectgarbage("step", kb > 2 ^ 30 and 2 ^ 30 or floor(kb))
end

-- ------------------------------------------------------------------ names

local function index_of(names)
  local t = {}
  for i = 0, #names do t[names[i]] = i end
  return t
end
local dtype_names = { [0] = "bf16", "f16", "f32", "f64", "i32", "f8_e4m3" }
local memory_names = { [0] = "host", "device" }
local backend_names = { [0] = "auto", "cpu", "cuda" }
local guard_names = { [0] = "host", "device_sync", "always" }
local family_names = { [0] = "unknown", "qwen", "mixtral" }
local layout_names = { [0] = "per_expert", "fused" }
local dtypes, memories, backends, guards = index_of(dtype_names), index_of(memory_names),
  index_of(backend_names), index_of(guard_names)
local families, layouts = index_of(family_names), index_of(layout_names)
local weight_index = { w13 = 0, w2 = 1, w13_scales = 2, w2_scales = 3 }
local weight_dtypes = { bf16 = 0, f8_e4m3 = 5 }
local DT_F32, MEM_HOST, BACKEND_CPU = 2, 0, 1

local target_bits = { gate = 1, up = 2, down = 4 }
local function targets_list(mask)
  local t = {}
  for _, k in ipairs { "gate", "up", "down" } do
    if floor(mask / target_bits[k]) % 2 == 1 then t[#t + 1] = k end
  end
  return t
end
local function targets_mask(v, n, fname)
  if v == nil then return 7 end
  if type(v) == "number" then
    if not isint(v) or v < 1 or v > 7 then field_error(n, fname, "targets", "mask must be 1..7") end
    return v
  end
  if type(v) ~= "table" then field_error(n, fname, "targets", "must be a list of 'gate', 'up', 'down' or a mask") end
  local seen = {}
  for i = 1, list_len(v, n, fname, "targets") do
    local b = target_bits[rawget(v, i)]
    if not b then field_error(n, fname, "targets", "entries must be 'gate', 'up' or 'down'") end
    seen[b] = true
  end
  local mask = (seen[1] and 1 or 0) + (seen[2] and 2 or 0) + (seen[4] and 4 or 0)
  if mask == 0 then field_error(n, fname, "targets", "is empty") end
  return mask
end

-- ------------------------------------------------------------------ objects

-- An object is a table {_box = the core's box, _parent = the object it was made from
-- (kept alive), _cbox = a context box for messages}, with one metatable per kind.
local kinds = { "context", "buffer", "layer", "pool", "batch", "safetensors", "peft", "checkpoint", "graph", "comm" }
local methods, props, mts = A.methods, {}, {}

-- A borrowed buffer (layer:weights) and a view (ctx:wrap) are usable only while the
-- object whose memory they show is open: once it is closed, so are they (a view's own
-- handle is released then; a borrowed one owns nothing).
local function is_open(o)
  if o._box == nil then return false end
  local p = o._borrowed_from or o._view_of
  if p ~= nil and not is_open(p) then
    if o._view_of then R.close(o._box) end
    o._box = nil
    return false
  end
  return true
end

-- self checked as an open object of kind, at the caller of the method.
local function check(self, kind, fname)
  if getmetatable(self) ~= mts[kind] then
    raise(format("calling '%s' on bad self (loramoe.%s expected, got %s)", fname, kind, typename(self)))
  end
  if not is_open(self) then raise("attempt to use a closed " .. kind) end
  return self._box, self._cbox
end

-- An argument that must be an open object of kind (what: its field name).
local function check_obj(v, kind, n, fname, what)
  if getmetatable(v) ~= mts[kind] then
    if what then field_error(n, fname, what, "must be a loramoe." .. kind) end
    argerror(n, fname, "loramoe." .. kind .. " expected, got " .. typename(v))
  end
  if not is_open(v) then raise("attempt to use a closed " .. kind) end
  return v._box
end

local function new(kind, box, parent, cbox)
  return setmetatable({ _box = box, _parent = parent, _cbox = cbox }, mts[kind])
end
-- status, box -> a new object, or the failure triple
local function made(kind, st, box, parent, cbox)
  if st ~= 0 then return fail(st, cbox) end
  if box == nil then return fail_msg(4, "the library returned no " .. kind) end
  return new(kind, box, parent, cbox)
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
    local addr = tostring(R.pointer(self._box)):match("0x%x+") or "?"
    return format("loramoe.%s (%s)", kind, addr)
  end
  mt.__close = function(self) if is_open(self) then m.close(self) end end
  -- obj:close(): raises on a closed handle, like file:close(). A borrowed buffer frees
  -- nothing.
  m.close = function(self)
    local box = check(self, kind, "close")
    self._box = nil
    if not self._borrowed_from then R.close(box) end
    return true
  end
  m.is_closed = function(self)
    if getmetatable(self) ~= mt then
      raise(format("calling 'is_closed' on bad self (loramoe.%s expected, got %s)", kind, typename(self)))
    end
    return not is_open(self)
  end
  mts[kind] = mt
end

-- The object this one was made from; a borrowed buffer's parent is its layer, whose
-- parent is the context.
local function parent_method(kind, fname)
  methods[kind][fname] = function(self)
    check(self, kind, fname)
    local p = self._parent
    if kind == "buffer" and self._borrowed_from then p = p._parent end
    return p
  end
end
for _, kind in ipairs { "buffer", "layer", "batch", "safetensors", "peft", "checkpoint", "graph", "comm" } do
  parent_method(kind, "context")
end
parent_method("pool", "layer")

-- ------------------------------------------------------------------ library

function A.version() return R.version() end
function A.status_string(code) return R.status_string(checki32(code, 1, "status_string", "status")) end
function A.has_cuda() return R.has_cuda() ~= 0 end
function A.has_nccl() return R.has_nccl() ~= 0 end
function A.device_count()
  local st, n = R.device_count()
  if st ~= 0 then return fail(st) end
  return n
end
function A.device_info(dev)
  local st, i = R.device_get_info(checkrange(dev, 1, "device_info", 0, I32, "device"))
  if st ~= 0 then return fail(st) end
  return i
end
function A.dtype_size(dtype) return R.dtype_size(checkoption(dtype, dtypes, 1, "dtype_size")) end
function A.dtype_name(code) return R.dtype_name(checki32(code, 1, "dtype_name", "dtype")) end
function A.lora_scale(alpha, rank, rslora)
  alpha = checknum(alpha, 1, "lora_scale")
  rank = checkrange(rank, 2, "lora_scale", 1, I32, "rank")
  return R.lora_scale(alpha, rank, rslora and 1 or 0)
end
A.now = R.now

-- ------------------------------------------------------------------ context

local function new_context(box)
  local ctx = new("context", box)
  -- A second reference for the objects made through this one: their failures name
  -- the context's message even after this handle is closed.
  ctx._cbox = R.context_retain(R.pointer(box))
  return ctx
end

local context_fields = set { "backend", "device", "threads", "guard", "stream" }
function A.context(opts)
  local cfg = {}
  if opts ~= nil then
    checktype(opts, "table", 1, "context")
    check_fields(opts, context_fields, 1, "context")
    cfg.backend = field_option(opts, "backend", backends, 1, "context")
    local dev = field_int(opts, "device", 1, "context")
    if dev and dev < 0 then field_error(1, "context", "device", "must be >= 0") end
    cfg.device = dev
    local th = opts.threads
    if th ~= nil and not isint(th) then field_error(1, "context", "threads", "must be an integer") end
    if th ~= nil and (th < 0 or th > 1024) then field_error(1, "context", "threads", "must be 0 (one per core) .. 1024") end
    cfg.threads = th
    cfg.guard = field_option(opts, "guard", guards, 1, "context")
    cfg.stream = field_stream(opts, 1, "context")
  end
  local st, box = R.context_create(cfg)
  if st ~= 0 then return fail_msg(st, box) end
  return new_context(box)
end

-- lm.adopt_context(p): a context object over a context someone else made (an
-- embedding host), holding its own reference. Only a pointer to a live context of
-- this library is accepted: the library keeps the list (lmoe_context_is_live).
function A.adopt_context(p)
  local addr = (type(p) == "userdata" or type(p) == "cdata") and R.address(p) or nil
  if addr == nil then
    argerror(1, "adopt_context", "light userdata (an lmoe_context *) expected, got " .. typename(p))
  end
  if addr == 0 then argerror(1, "adopt_context", "context pointer is NULL") end
  if not R.context_is_live(p) then argerror(1, "adopt_context", "not a loramoe context") end
  return new_context(R.context_retain(p))
end

local Ctx, CtxP = methods.context, props.context

function Ctx.pointer(self) return R.pointer((check(self, "context", "pointer"))) end
function CtxP.backend(self) return backend_names[R.context_backend((check(self, "context", "backend")))] or "unknown" end
function CtxP.threads(self) return R.context_threads((check(self, "context", "threads"))) end
function CtxP.guard(self) return guard_names[R.context_guard((check(self, "context", "guard")))] or "unknown" end

function Ctx.set_guard(self, g)
  local h = check(self, "context", "set_guard")
  return status(R.context_set_guard(h, checkoption(g, guards, 1, "set_guard")), h)
end
function Ctx.stream(self) return R.context_stream((check(self, "context", "stream"))) end
function Ctx.synchronize(self, stream)
  local h = check(self, "context", "synchronize")
  return status(R.context_synchronize(h, opt_stream(stream, 1, "synchronize")), h)
end
function Ctx.counters(self)
  local h = check(self, "context", "counters")
  local st, c = R.context_counters(h)
  if st ~= 0 then return fail(st, h) end
  return c
end
-- ctx:wait_counters(): the host waits told apart, {host_waits, forced, backpressure}
-- (backpressure: a staging ring was full; forced: any other wait).
function Ctx.wait_counters(self)
  local h = check(self, "context", "wait_counters")
  local st, c = R.context_wait_counters(h)
  if st ~= 0 then return fail(st, h) end
  return c
end
function Ctx.reset_counters(self) R.context_reset_counters((check(self, "context", "reset_counters"))) end
function Ctx.last_error(self) return R.context_last_error((check(self, "context", "last_error"))) end

function Ctx.buffer(self, dtype, shape, memory)
  local h, cb = check(self, "context", "buffer")
  dtype = checkoption(dtype, dtypes, 1, "buffer")
  local s, numel = check_shape(shape, 2, "buffer")
  memory = checkoption(memory, memories, 3, "buffer", "device")
  report_pressure(numel * R.dtype_size(dtype))
  local st, box = R.buffer_create(h, dtype, memory, s)
  return made("buffer", st, box, self, cb)
end

-- ctx:wrap(dtype, shape, ptr, memory?, owner): a buffer over memory that owner (a
-- loramoe.buffer) holds; the view must lie inside it, and owner is kept alive.
function Ctx.wrap(self, dtype, shape, ptr, memory, owner)
  local h, cb = check(self, "context", "wrap")
  dtype = checkoption(dtype, dtypes, 1, "wrap")
  local s, numel = check_shape(shape, 2, "wrap")
  local addr = R.address(ptr)
  if addr == nil then argerror(3, "wrap", "pointer expected, got " .. typename(ptr)) end
  memory = checkoption(memory, memories, 4, "wrap", "host")
  local ob = check_obj(owner, "buffer", 5, "wrap")
  local st, d = R.buffer_describe(ob)
  if st ~= 0 then return fail(st, cb) end
  local lo = R.address(d.data)
  local bytes = numel * R.dtype_size(dtype)
  if d.memory ~= memory then argerror(4, "wrap", "memory differs from the owner's") end
  if lo == 0 or addr < lo or addr + bytes > lo + d.bytes then
    argerror(3, "wrap", format("the view (%s bytes) does not lie inside the owner's %s bytes", ifmt(bytes), ifmt(d.bytes)))
  end
  local box
  st, box = R.buffer_wrap(h, dtype, memory, s, ptr, ob)
  local b, msg, code = made("buffer", st, box, self, cb)
  if b then b._view_of = owner end
  return b, msg, code
end

-- ctx:batch{staging_depth=}: the options table may be left out (the defaults).
function Ctx.batch(self, cfg)
  local h, cb = check(self, "context", "batch")
  local st, box
  if cfg == nil then
    st, box = R.batch_create(h)
  else
    checktype(cfg, "table", 1, "batch")
    check_fields(cfg, set { "staging_depth" }, 1, "batch")
    st, box = R.batch_create_with(h, { staging_depth = field_int(cfg, "staging_depth", 1, "batch") })
  end
  return made("batch", st, box, self, cb)
end

function Ctx.graph_begin(self, stream)
  local h = check(self, "context", "graph_begin")
  return status(R.graph_begin(h, opt_stream(stream, 1, "graph_begin")), h)
end
function Ctx.graph_end(self, stream)
  local h, cb = check(self, "context", "graph_end")
  local st, box = R.graph_end(h, opt_stream(stream, 1, "graph_end"))
  return made("graph", st, box, self, cb)
end
function methods.graph.launch(self, stream)
  local h, cb = check(self, "graph", "launch")
  return status(R.graph_launch(h, opt_stream(stream, 1, "launch")), cb)
end

-- Shapes of PERFORMANCE.md; ctx:layer("name") and ctx:layer{preset = "name"} look
-- names up here, so presets added by users work too.
A.presets = {
  tiny = { experts = 16, hidden = 256, intermediate = 128, top_k = 2, layers = 4 },
  ["qwen3-30b-a3b"] = { experts = 128, hidden = 2048, intermediate = 768, top_k = 8, layers = 48 },
  ["mixtral-8x7b"] = { experts = 8, hidden = 4096, intermediate = 14336, top_k = 2, layers = 32 },
}

local layer_fields = set { "experts", "hidden", "intermediate", "top_k", "renormalize", "max_tokens", "preset",
  "shard_mode", "shard_rank", "shard_size", "comm", "weight_dtype" }
local shard_names = { [0] = "tp", "ep" }
local shard_modes = index_of(shard_names)
-- ctx:layer(cfg): a preset name, or {experts=, hidden=, intermediate=, top_k=,
-- renormalize=, max_tokens=, preset=, shard_mode=, shard_rank=, shard_size=, comm=,
-- weight_dtype= "bf16" (default) | "f8_e4m3" (FP8 experts, 128x128 block scales)};
-- fields override the preset's. A sharded layer (shard_size > 1) holds rank
-- shard_rank's part ("tp": a slice of every expert, "ep": whole experts) and sums its
-- output over comm's ranks (docs/design.md, "Sharding").
function Ctx.layer(self, cfg)
  local h, cb = check(self, "context", "layer")
  local t, preset
  if type(cfg) == "string" then
    preset = cfg
  else
    checktype(cfg, "table", 1, "layer")
    check_fields(cfg, layer_fields, 1, "layer")
    t = cfg
    preset = cfg.preset
    if preset ~= nil and type(preset) ~= "string" then field_error(1, "layer", "preset", "must be a string") end
  end
  local p
  if preset ~= nil then
    p = A.presets[preset]
    if type(p) ~= "table" then argerror(1, "layer", format("unknown preset '%s'", preset)) end
  end
  local function get(k)
    local v
    if p then v = field_int(p, k, 1, "layer", v) end
    if t then v = field_int(t, k, 1, "layer", v) end
    return v
  end
  local E, H, I = get("experts"), get("hidden"), get("intermediate")
  local renorm
  if p then renorm = field_bool(p, "renormalize", 1, "layer", renorm) end
  if t then renorm = field_bool(t, "renormalize", 1, "layer", renorm) end
  if not E then field_error(1, "layer", "experts", "is missing") end
  if not H then field_error(1, "layer", "hidden", "is missing") end
  if not I then field_error(1, "layer", "intermediate", "is missing") end
  local comm, mode, srank, ssize, wdt
  if t then
    wdt = field_option(t, "weight_dtype", weight_dtypes, 1, "layer")
    mode = field_option(t, "shard_mode", shard_modes, 1, "layer")
    srank, ssize = field_int(t, "shard_rank", 1, "layer"), field_int(t, "shard_size", 1, "layer")
    if t.comm ~= nil then comm = check_obj(t.comm, "comm", 1, "layer", "comm") end
  end
  local parts = math.max(ssize or 1, 1)
  report_pressure(6 * math.max(E, 0) * math.max(H, 0) * math.max(I, 0) / parts)
  local st, box = R.layer_create(h, {
    num_experts = E, hidden = H, intermediate = I, top_k = get("top_k"), max_tokens = get("max_tokens"),
    renormalize = renorm ~= nil and (renorm and 1 or 0) or nil,
    shard_mode = mode, shard_rank = srank, shard_size = ssize, comm = comm, weight_dtype = wdt,
  })
  local l, msg, code = made("layer", st, box, self, cb)
  if l then l._comm = t and t.comm or nil end -- the library keeps it too; this keeps the object
  return l, msg, code
end

-- ------------------------------------------------------------------ buffer

local Buf, BufP = methods.buffer, props.buffer

local function describe(self, fname)
  local h = check(self, "buffer", fname)
  local st, d = R.buffer_describe(h)
  if st ~= 0 then raise("loramoe: could not describe a buffer") end
  return d, h
end

function BufP.dtype(self) return dtype_names[describe(self, "dtype").dtype] end
function BufP.memory(self) return memory_names[describe(self, "memory").memory] end
function BufP.numel(self) return describe(self, "numel").numel end
function BufP.ndim(self) return describe(self, "ndim").ndim end
function BufP.bytes(self) return describe(self, "bytes").bytes end
function Buf.shape(self) return describe(self, "shape").shape end
function Buf.describe(self)
  local d = describe(self, "describe")
  return { dtype = dtype_names[d.dtype], memory = memory_names[d.memory], shape = d.shape, numel = d.numel,
    bytes = d.bytes }
end
function Buf.data(self) return describe(self, "data").data end

function Buf.write(self, values, offset)
  local d, h = describe(self, "write")
  checktype(values, "table", 1, "write")
  offset = checkint(offset, 2, "write", 0)
  local m, n = to_mem(values, nil, 1, "write", "values") -- the library checks the range
  return status(R.buffer_write(h, offset, m, n), self._cbox)
end

function Buf.read(self, offset, count)
  local d, h = describe(self, "read")
  local numel = d.numel
  offset = checkint(offset, 1, "read", 0)
  if offset < 0 or offset > numel then argerror(1, "read", format("offset must be 0..%s", ifmt(numel))) end
  count = checkint(count, 2, "read", numel - offset)
  if count < 0 or count > numel - offset then argerror(2, "read", format("count must be 0..%s", ifmt(numel - offset))) end
  local m = R.mem("f64", count)
  local st = R.buffer_read(h, offset, m, count)
  if st ~= 0 then return fail(st, self._cbox) end
  return R.unpack(m, count)
end

function Buf.fill_random(self, seed, lo, hi, stream)
  local h = check(self, "buffer", "fill_random")
  seed = checkint(seed, 1, "fill_random")
  lo = checknum(lo, 2, "fill_random", -1)
  hi = checknum(hi, 3, "fill_random", 1)
  return status(R.buffer_fill_random(h, seed, lo, hi, opt_stream(stream, 4, "fill_random")), self._cbox)
end

function Buf.fill(self, value, stream)
  local h = check(self, "buffer", "fill")
  value = checknum(value, 1, "fill")
  return status(R.buffer_fill(h, value, opt_stream(stream, 2, "fill")), self._cbox)
end

function Buf.compare(self, ref)
  local h = check(self, "buffer", "compare")
  local st, c = R.buffer_compare(h, check_obj(ref, "buffer", 1, "compare"))
  if st ~= 0 then return fail(st, self._cbox) end
  return c
end

-- ------------------------------------------------------------------ layer

local Layer = methods.layer

local function layer_config(h)
  local st, c = R.layer_get_config(h)
  if st ~= 0 then raise("loramoe: could not read a layer's config") end
  return c
end

function Layer.config(self)
  local c = layer_config((check(self, "layer", "config")))
  return { experts = c.num_experts, hidden = c.hidden, intermediate = c.intermediate, top_k = c.top_k,
    renormalize = c.renormalize ~= 0, max_tokens = c.max_tokens, shard_mode = shard_names[c.shard_mode],
    shard_rank = c.shard_rank, shard_size = c.shard_size, weight_dtype = dtype_names[c.weight_dtype] }
end

function Layer.randomize(self, seed, scale)
  local h = check(self, "layer", "randomize")
  seed = checkint(seed, 1, "randomize")
  scale = checknum(scale, 2, "randomize", 0.05)
  return status(R.layer_randomize(h, seed, scale), self._cbox)
end

-- layer:set_weights(w13 | nil, w2 | nil): flat tables [E, 2I, H] and [E, H, I].
function Layer.set_weights(self, w13, w2)
  local h = check(self, "layer", "set_weights")
  local c = layer_config(h)
  local n = c.num_experts * 2 * c.intermediate * c.hidden
  local a = w13 ~= nil and to_mem(w13, n, 1, "set_weights", "w13") or nil
  local b = w2 ~= nil and to_mem(w2, n / 2, 2, "set_weights", "w2") or nil
  return status(R.layer_set_weights(h, a, b), self._cbox)
end

-- layer:set_expert(e, {gate=, up=, down=}): flat tables [I, H], [I, H], [H, I].
function Layer.set_expert(self, e, parts)
  local h = check(self, "layer", "set_expert")
  local c = layer_config(h)
  e = checkrange(e, 1, "set_expert", 0, c.num_experts - 1, "expert")
  checktype(parts, "table", 2, "set_expert")
  check_fields(parts, set { "gate", "up", "down" }, 2, "set_expert")
  local n = c.intermediate * c.hidden
  local m = {}
  for _, k in ipairs { "gate", "up", "down" } do
    local v = parts[k]
    if v ~= nil then m[k] = to_mem(v, n, 2, "set_expert", k) end
  end
  if not (m.gate or m.up or m.down) then argerror(2, "set_expert", "give at least one of gate, up, down") end
  return status(R.layer_set_expert(h, e, m.gate, m.up, m.down), self._cbox)
end

-- layer:weights("w13" | "w2") -> a buffer borrowed from the layer.
function Layer.weights(self, which)
  local h, cb = check(self, "layer", "weights")
  which = checkoption(which, weight_index, 1, "weights")
  local st, box = R.layer_weights(h, which)
  local b, msg, code = made("buffer", st, box, self, cb)
  if b then b._borrowed_from = self end
  return b, msg, code
end

function Layer.pool(self, cfg)
  local h, cb = check(self, "layer", "pool")
  local t = {}
  if cfg ~= nil then
    checktype(cfg, "table", 1, "pool")
    check_fields(cfg, set { "slots", "max_rank" }, 1, "pool")
    t.num_slots = field_int(cfg, "slots", 1, "pool")
    t.max_rank = field_int(cfg, "max_rank", 1, "pool")
  end
  local c = layer_config(h)
  local S, Rk = math.max(t.num_slots or 4, 0), math.max(t.max_rank or 16, 0)
  report_pressure(2 * S * c.num_experts * Rk * (3 * c.hidden + 5 * c.intermediate))
  local st, box = R.pool_create(h, t)
  local p, msg, code = made("pool", st, box, self, cb)
  if p then p._dims = { c.num_experts, c.hidden, c.intermediate } end -- the layer's, fixed
  return p, msg, code
end

-- core field, argument field; x and out are required
local forward_buffers = { { "x", "x" }, { "out", "out" }, { "router_logits", "logits" }, { "topk_ids", "topk_ids" },
  { "topk_weights", "topk_weights" } }
local forward_fields = set { "pool", "batch", "x", "logits", "topk_ids", "topk_weights", "out", "stream" }
local function forward_args(self, t, fname)
  local h = check(self, "layer", fname)
  if type(t) ~= "table" then argerror(1, fname, "table expected, got " .. typename(t)) end
  check_fields(t, forward_fields, 1, fname)
  local a = { layer = h }
  if t.pool ~= nil then a.pool = check_obj(t.pool, "pool", 1, fname, "pool") end
  a.batch = check_obj(t.batch, "batch", 1, fname, "batch")
  for i = 1, #forward_buffers do
    local k, ck = forward_buffers[i][1], forward_buffers[i][2]
    local v = t[ck]
    if v == nil and i <= 2 then field_error(1, fname, ck, "is missing (a loramoe.buffer)") end
    if v ~= nil then a[k] = check_obj(v, "buffer", 1, fname, ck) end
  end
  return a
end

-- layer:forward{pool=, batch=, x=, logits= | topk_ids=, topk_weights=, out=, stream=}
function Layer.forward(self, t)
  local a = forward_args(self, t, "forward")
  -- every rank of a communicator from lm.comms lives in this Lua state: one rank's
  -- forward alone would wait for the others for ever
  local cm = self._comm
  if cm ~= nil and cm._local and is_open(cm) and cm.size > 1 then
    return fail_msg(5, format("this layer is rank %d of %d ranks made in this Lua state (lm.comms): run them " ..
      "together with lm.forward_group", cm.rank, cm.size))
  end
  local stream = field_stream(t, 1, "forward")
  return status(R.forward(self._cbox, a, stream), self._cbox)
end

-- lm.forward_group({layer, ...}, {args, ...}): the forwards of one sharded layer's
-- ranks (layers[r] is rank r's, args[r] as for layer:forward, no stream) from this
-- thread; each rank's out gets the sum over the ranks.
function A.forward_group(layers, args)
  checktype(layers, "table", 1, "forward_group")
  checktype(args, "table", 2, "forward_group")
  local n = list_len(layers, 1, "forward_group", "layers")
  if n < 1 then argerror(1, "forward_group", "no layers") end
  if list_len(args, 2, "forward_group", "args") ~= n then argerror(2, "forward_group", "one args table per layer") end
  local cs, as = {}, {}
  for i = 1, n do
    local l = rawget(layers, i)
    if getmetatable(l) ~= mts.layer then argerror(1, "forward_group", format("entry %d is not a loramoe.layer", i)) end
    as[i] = forward_args(l, rawget(args, i), "forward_group")
    if rawget(args, i).stream ~= nil then argerror(2, "forward_group", "no stream: each rank uses its context's") end
    cs[i] = l._cbox
  end
  return status(R.forward_group(cs, as), cs[1])
end

function Layer.reference(self, t)
  local a = forward_args(self, t, "reference")
  return status(R.reference_forward(self._cbox, a), self._cbox)
end

-- Random inputs for a forward of `tokens` tokens, in the layer's context: x [M, H]
-- bf16 in [-1, 1), router logits [M, E] f32 in [-4, 4), out [M, H] bf16.
function Layer.inputs(self, tokens, seed)
  check(self, "layer", "inputs")
  if not isint(tokens) or tokens < 0 or tokens > I32 then
    argerror(1, "inputs", "tokens must be a non-negative integer")
  end
  seed = checkint(seed, 2, "inputs", 1)
  local c = self:config()
  local ctx = self:context()
  local x, err, code = ctx:buffer("bf16", { tokens, c.hidden })
  if not x then return nil, err, code end
  local logits
  logits, err, code = ctx:buffer("f32", { tokens, c.experts })
  if not logits then return nil, err, code end
  local out
  out, err, code = ctx:buffer("bf16", { tokens, c.hidden })
  if not out then return nil, err, code end
  local ok
  ok, err, code = x:fill_random(seed * 2 + 1, -1, 1)
  if not ok then return nil, err, code end
  ok, err, code = logits:fill_random(seed * 2 + 2, -4, 4)
  if not ok then return nil, err, code end
  return { x = x, logits = logits, out = out }
end

-- The float64 reference on the same arguments, compared with args.out.
function Layer.check(self, args)
  check(self, "layer", "check")
  if type(args) ~= "table" then argerror(1, "check", "table expected, got " .. typename(args)) end
  local out = args.out
  if getmetatable(out) ~= mts.buffer then argerror(1, "check", "field 'out' is missing (a loramoe.buffer)") end
  local ref, err, code = self:context():buffer("f64", out:shape(), "host")
  if not ref then return nil, err, code end
  local rargs = {}
  for k, v in next, args do rargs[k] = v end
  rargs.out = ref
  local ok
  ok, err, code = self:reference(rargs)
  local res
  if ok then res, err, code = out:compare(ref) end
  ref:close()
  if not res then return nil, err, code end
  return res
end

-- ------------------------------------------------------------------ communicators

local Comm, CommP = methods.comm, props.comm

-- lm.comms{ctx, ...}: one communicator per context, rank i - 1 for contexts[i], over
-- the ranks of this process (docs/design.md, "Sharding").
function A.comms(contexts)
  checktype(contexts, "table", 1, "comms")
  local n = list_len(contexts, 1, "comms", "contexts")
  if n < 1 then argerror(1, "comms", "no contexts") end
  local boxes = {}
  for i = 1, n do
    local c = rawget(contexts, i)
    if getmetatable(c) ~= mts.context then argerror(1, "comms", format("entry %d is not a loramoe.context", i)) end
    boxes[i] = check_obj(c, "context", 1, "comms")
  end
  local st, list = R.comm_create_local(boxes)
  if st ~= 0 then return fail_msg(st, list) end
  local out = {}
  for i = 1, n do
    out[i] = new("comm", list[i], rawget(contexts, i), rawget(contexts, i)._cbox)
    out[i]._local = true -- all its ranks are in this Lua state (Layer.forward)
  end
  return out
end

-- lm.wrap_nccl(ctx, ptr): a communicator over an ncclComm_t the host made (light
-- userdata or cdata); builds without NCCL answer UNSUPPORTED.
function A.wrap_nccl(ctx, ptr)
  local h, cb = check_obj(ctx, "context", 1, "wrap_nccl"), ctx._cbox
  if R.address(ptr) == nil then argerror(2, "wrap_nccl", "pointer expected, got " .. typename(ptr)) end
  local st, box = R.comm_wrap_nccl(h, ptr)
  return made("comm", st, box, ctx, cb)
end

function CommP.rank(self) return R.comm_rank((check(self, "comm", "rank"))) end
function CommP.size(self) return R.comm_size((check(self, "comm", "size"))) end

-- ------------------------------------------------------------------ pool

local Pool = methods.pool

function Pool.config(self)
  local h = check(self, "pool", "config")
  local st, c = R.pool_get_config(h)
  if st ~= 0 then return fail(st, self._cbox) end
  return { slots = c.num_slots, max_rank = c.max_rank }
end

local random_fields = set { "rank", "alpha", "targets", "fused", "rslora", "seed", "scale" }
function Pool.load_random(self, slot, spec)
  local h = check(self, "pool", "load_random")
  slot = checki32(slot, 1, "load_random", "slot")
  local s = {}
  if spec ~= nil then
    local f = "load_random"
    checktype(spec, "table", 2, f)
    check_fields(spec, random_fields, 2, f)
    s.rank = field_int(spec, "rank", 2, f)
    s.alpha = field_num(spec, "alpha", 2, f)
    s.targets = targets_mask(spec.targets, 2, f)
    s.fused = field_bool(spec, "fused", 2, f, false) and 1 or 0
    s.use_rslora = field_bool(spec, "rslora", 2, f, false) and 1 or 0
    s.seed = field_int(spec, "seed", 2, f, 1, -2 ^ 53, 2 ^ 53)
    s.scale = field_num(spec, "scale", 2, f)
  end
  return status(R.pool_load_random(h, slot, s), self._cbox)
end

-- The adapter description of pool:load as the core's table: each part {a=, b=, rank=,
-- scale=} with a = flat [E, rank, in], b = flat [E, out, rank] (PEFT's layout).
local part_fields = set { "a", "b", "rank", "scale", "alpha", "rslora" }
local function adapter_desc(self, d, n, fname)
  checktype(d, "table", n, fname)
  check_fields(d, set { "gate", "up", "gate_up", "down" }, n, fname)
  local E, H, I = self._dims[1], self._dims[2], self._dims[3]
  local out = {}
  for _, part in ipairs { { "gate", H, I }, { "up", H, I }, { "gate_up", H, 2 * I }, { "down", I, H } } do
    local name, inn, outd = part[1], part[2], part[3]
    local t = d[name]
    if t ~= nil then
      if type(t) ~= "table" then field_error(n, fname, name, "must be a table {a=, b=, rank=, scale=}") end
      check_fields(t, part_fields, n, fname)
      local what = name .. ".a"
      local ta = t.a
      if type(ta) ~= "table" then argerror(n, fname, what .. " must be a table of numbers") end
      local na = list_len(ta, n, fname, what)
      local rank = t.rank
      if rank == nil then
        if na == 0 or na % (E * inn) ~= 0 then
          argerror(n, fname, format("%s has %d values: not a multiple of E*in = %d (give rank)", what, na, E * inn))
        end
        rank = na / (E * inn)
      elseif not isint(rank) or rank < 1 or rank > I32 then
        argerror(n, fname, name .. ".rank must be a positive integer")
      end
      local scale = 1.0
      if t.scale ~= nil then
        scale = t.scale
        if type(scale) ~= "number" then argerror(n, fname, name .. ".scale must be a number") end
      elseif t.alpha ~= nil then
        local alpha = t.alpha
        if type(alpha) ~= "number" then argerror(n, fname, name .. ".alpha must be a number") end
        scale = R.lora_scale(alpha, rank, t.rslora and 1 or 0)
      end
      -- sizes compared with what the lists hold before anything is allocated
      local a = to_mem(ta, E * rank * inn, n, fname, what)
      local b = to_mem(t.b, E * outd * rank, n, fname, name .. ".b")
      out[name] = { a = a, b = b, rank = rank, scale = scale }
    end
  end
  return out
end

function Pool.load(self, slot, d)
  local h = check(self, "pool", "load")
  slot = checki32(slot, 1, "load", "slot")
  return status(R.pool_load(h, slot, adapter_desc(self, d, 2, "load")), self._cbox)
end

local function slot_method(fname, fn)
  Pool[fname] = function(self, slot)
    local h = check(self, "pool", fname)
    return status(fn(h, checki32(slot, 1, fname, "slot")), self._cbox)
  end
end
slot_method("unload", R.pool_unload)
slot_method("pin", R.pool_pin)
slot_method("unpin", R.pool_unpin)
slot_method("touch", R.pool_touch)

function Pool.slot_info(self, slot)
  local h = check(self, "pool", "slot_info")
  local st, s = R.pool_slot_info(h, checki32(slot, 1, "slot_info", "slot"))
  if st ~= 0 then return fail(st, self._cbox) end
  return {
    loaded = s.loaded ~= 0, targets = targets_list(s.targets), fused = s.fused ~= 0,
    rank_gate = s.rank_gate, rank_up = s.rank_up, rank_down = s.rank_down,
    scale_gate = s.scale_gate, scale_up = s.scale_up, scale_down = s.scale_down,
    rank = s.max_rank, bytes = s.bytes, generation = s.generation,
  }
end

local function slot_result(st, slot, cb)
  if st ~= 0 then return fail(st, cb) end
  return slot
end

function Pool.load_named(self, name, d)
  local h = check(self, "pool", "load_named")
  checktype(name, "string", 1, "load_named")
  local st, slot = R.pool_load_named(h, name, adapter_desc(self, d, 2, "load_named"))
  return slot_result(st, slot, self._cbox)
end

function Pool.load_peft(self, name, peft, layer)
  local h = check(self, "pool", "load_peft")
  checktype(name, "string", 1, "load_peft")
  local ph = check_obj(peft, "peft", 2, "load_peft")
  layer = checkrange(layer, 3, "load_peft", 0, I32, "layer")
  local st, slot = R.pool_load_peft(h, name, ph, layer)
  return slot_result(st, slot, self._cbox)
end

function Pool.unload_named(self, name)
  local h = check(self, "pool", "unload_named")
  return status(R.pool_unload_named(h, checktype(name, "string", 1, "unload_named")), self._cbox)
end

function Pool.find(self, name)
  local h = check(self, "pool", "find")
  checktype(name, "string", 1, "find")
  local st, slot = R.pool_find(h, name)
  if st == 6 then return fail_msg(st, format("no slot holds an adapter named '%s'", name)) end
  return slot_result(st, slot, self._cbox)
end

function Pool.slot_name(self, slot)
  local h = check(self, "pool", "slot_name")
  return R.pool_slot_name(h, checki32(slot, 1, "slot_name", "slot"))
end

function Pool.pin_count(self, slot)
  local h = check(self, "pool", "pin_count")
  return R.pool_pin_count(h, checki32(slot, 1, "pin_count", "slot"))
end

function Pool.memory(self)
  local h = check(self, "pool", "memory")
  local st, m = R.pool_get_memory(h)
  if st ~= 0 then return fail(st, self._cbox) end
  return { slot_bytes = m.slot_bytes, total_bytes = m.total_bytes, slots = m.num_slots,
    loaded_slots = m.loaded_slots, loaded_bytes = m.loaded_bytes, used_bytes = m.used_bytes,
    evictions = m.evictions }
end

-- ------------------------------------------------------------------ batch

local Batch = methods.batch

-- batch:set(pool | nil, {{tokens=, adapter=}, ...}); adapter absent or -1: none.
function Batch.set(self, pool, requests)
  local h = check(self, "batch", "set")
  local ph
  if pool ~= nil then ph = check_obj(pool, "pool", 1, "set") end
  checktype(requests, "table", 2, "set")
  local n = list_len(requests, 2, "set", "requests")
  if n > I32 then argerror(2, "set", "too many requests") end
  local tokens, slots = {}, {}
  for i = 1, n do
    local r = rawget(requests, i)
    if type(r) ~= "table" then argerror(2, "set", format("request %d must be a table {tokens=, adapter=}", i)) end
    local t = r.tokens
    if not isint(t) or t < -I32 - 1 or t > I32 then argerror(2, "set", format("request %d: tokens must be an integer", i)) end
    local s = r.adapter
    if s == nil then
      s = -1
    elseif not isint(s) or s < -I32 - 1 or s > I32 then
      argerror(2, "set", format("request %d: adapter must be a slot number or nil", i))
    end
    tokens[i], slots[i] = t, s
  end
  return status(R.batch_set(h, ph, n, R.pack("i32", tokens, n), R.pack("i32", slots, n)), self._cbox)
end

local function batch_info(self, fname)
  local h = check(self, "batch", fname)
  local st, i = R.batch_get_info(h)
  return st, i, h
end

function Batch.info(self)
  local st, i = batch_info(self, "info")
  if st ~= 0 then return fail(st, self._cbox) end
  return { requests = i.num_requests, tokens = i.num_tokens, has_active = i.has_active ~= 0,
    active = i.num_active, max_rank = i.max_rank, max_slot = i.max_slot }
end

function Batch.offsets(self)
  local st, i, h = batch_info(self, "offsets")
  if st ~= 0 then return fail(st, self._cbox) end
  local cap = i.num_requests + 1
  local m = R.mem("i64", cap)
  return R.unpack(m, R.batch_offsets(h, m, cap))
end

function Batch.active_slots(self)
  local st, i, h = batch_info(self, "active_slots")
  if st ~= 0 then return fail(st, self._cbox) end
  local cap = i.num_active
  local s, t = R.mem("i32", cap), R.mem("i64", cap)
  local n = R.batch_active_slots(h, s, t, cap)
  return R.unpack(s, n), R.unpack(t, n)
end

-- ------------------------------------------------------------------ safetensors

function Ctx.safetensors(self, path)
  local h, cb = check(self, "context", "safetensors")
  checktype(path, "string", 1, "safetensors")
  local st, box = R.safetensors_open(h, path)
  return made("safetensors", st, box, self, cb)
end

function Ctx.safetensors_string(self, data, name)
  local h, cb = check(self, "context", "safetensors_string")
  checktype(data, "string", 1, "safetensors_string")
  if name ~= nil then checktype(name, "string", 2, "safetensors_string") end
  local st, box = R.safetensors_open_memory(h, data, name or "(string)")
  return made("safetensors", st, box, self, cb)
end

local File = methods.safetensors

function File.count(self) return R.safetensors_count((check(self, "safetensors", "count"))) end

-- A 0-based index from an index or a name; nil, msg, code when the name is absent.
local function tensor_index(self, h, v, fname)
  if type(v) == "string" then
    local st, idx = R.safetensors_find(h, v)
    if st == 6 then return fail_msg(st, format("no tensor named '%s'", v)) end
    if st ~= 0 then return fail(st, self._cbox) end
    return idx
  end
  return checkrange(v, 1, fname, 0, I32, "tensor index")
end

local function tensor_table(ti)
  return { name = ti.name, file_dtype = ti.dtype_name, dtype = dtype_names[ti.dtype], shape = ti.shape,
    numel = ti.numel, offset = ti.offset, bytes = ti.bytes }
end

function File.tensor(self, which)
  local h = check(self, "safetensors", "tensor")
  local idx, msg, code = tensor_index(self, h, which, "tensor")
  if not idx then return nil, msg, code end
  local st, ti = R.safetensors_tensor(h, idx)
  if st ~= 0 then return fail(st, self._cbox) end
  return tensor_table(ti)
end

function File.tensors(self)
  local h = check(self, "safetensors", "tensors")
  local t = {}
  for i = 0, R.safetensors_count(h) - 1 do
    local st, ti = R.safetensors_tensor(h, i)
    if st ~= 0 then return fail(st, self._cbox) end
    t[i + 1] = tensor_table(ti)
  end
  return t
end

function File.find(self, name)
  local h = check(self, "safetensors", "find")
  checktype(name, "string", 1, "find")
  return tensor_index(self, h, name, "find")
end

-- file:read(index | name): the values; the array is sized by what the file holds (its
-- header was validated against the file's size when it was opened).
function File.read(self, which)
  local h = check(self, "safetensors", "read")
  local idx, msg, code = tensor_index(self, h, which, "read")
  if not idx then return nil, msg, code end
  local st, ti = R.safetensors_tensor(h, idx)
  if st ~= 0 then return fail(st, self._cbox) end
  local m = R.mem("f64", ti.numel)
  st = R.safetensors_read(h, idx, m, ti.numel)
  if st ~= 0 then return fail(st, self._cbox) end
  return R.unpack(m, ti.numel)
end

function File.metadata(self)
  local h = check(self, "safetensors", "metadata")
  local t = {}
  for i = 0, R.safetensors_metadata_count(h) - 1 do
    local st, k, v = R.safetensors_metadata(h, i)
    if st ~= 0 then return fail(st, self._cbox) end
    t[k] = v
  end
  return t
end

-- ctx:write_safetensors(path, {{name=, dtype=, shape=, data=}, ...}, metadata?): data
-- a flat table of numbers (converted to dtype) or a host loramoe.buffer. Every string
-- is copied into tables this function holds until the write returns.
local tensor_fields = set { "name", "dtype", "shape", "data" }
function Ctx.write_safetensors(self, path, tensors, meta)
  local h = check(self, "context", "write_safetensors")
  local f = "write_safetensors"
  checktype(path, "string", 1, f)
  checktype(tensors, "table", 2, f)
  if meta ~= nil then checktype(meta, "table", 3, f) end
  local n = list_len(tensors, 2, f, "tensors")
  local entries, temps = {}, {}
  for i = 1, n do
    local t = rawget(tensors, i)
    if type(t) ~= "table" then argerror(2, f, format("tensor %d must be a table {name=, dtype=, shape=, data=}", i)) end
    check_fields(t, tensor_fields, 2, f)
    local name = t.name
    if type(name) ~= "string" then argerror(2, f, format("tensor %d: name must be a string", i)) end
    local data, bd = t.data, nil
    if getmetatable(data) == mts.buffer then
      check_obj(data, "buffer", 2, f)
      bd = data:describe()
    elseif type(data) ~= "table" then
      argerror(2, f, format("tensor %d: data must be a table of numbers or a loramoe.buffer", i))
    end
    local dt = field_option(t, "dtype", dtypes, 2, f, bd and dtypes[bd.dtype] or DT_F32)
    local shape = t.shape or (bd and bd.shape)
    if shape == nil then argerror(2, f, format("tensor %d: shape is missing", i)) end
    local s, numel = check_shape(shape, 2, f, 8)
    local box
    if bd then
      if dtypes[bd.dtype] ~= dt then argerror(2, f, format("tensor %d: dtype differs from its buffer's", i)) end
      if bd.memory ~= "host" and R.context_backend(h) ~= BACKEND_CPU then
        argerror(2, f, format("tensor %d: the buffer must be in host memory", i))
      end
      if numel > bd.numel then argerror(2, f, format("tensor %d: shape holds more than its buffer", i)) end
      box = data._box
    else
      -- table data goes through a temporary host buffer of the entry's dtype
      local m = to_mem(data, numel, 2, f, format("tensor %d data", i))
      local st, b = R.buffer_create(h, dt, MEM_HOST, { numel })
      if st == 0 then st = R.buffer_write(b, 0, m, numel) end
      if st ~= 0 then
        for _, tb in ipairs(temps) do R.close(tb) end
        if b then R.close(b) end
        return fail(st, h)
      end
      temps[#temps + 1], box = b, b
    end
    entries[i] = { name = name, dtype = dt, shape = s, data = box }
  end
  local keys, vals = {}, {}
  if meta then
    for k, v in next, meta do
      if type(k) ~= "string" or type(v) ~= "string" then argerror(3, f, "metadata keys and values must be strings") end
      keys[#keys + 1], vals[#vals + 1] = k, v
    end
  end
  local st = R.safetensors_write(h, path, entries, keys, vals)
  for _, b in ipairs(temps) do R.close(b) end
  return status(st, h)
end

-- ------------------------------------------------------------------ PEFT adapters

function Ctx.peft(self, path)
  local h, cb = check(self, "context", "peft")
  checktype(path, "string", 1, "peft")
  local st, box = R.peft_open(h, path)
  return made("peft", st, box, self, cb)
end

local Peft = methods.peft

local function peft_info(self, fname)
  local h = check(self, "peft", fname)
  local st, i = R.peft_get_info(h)
  return st, i, h
end

function Peft.info(self)
  local st, i = peft_info(self, "info")
  if st ~= 0 then return fail(st, self._cbox) end
  return {
    family = family_names[i.family] or "unknown", layout = layout_names[i.layout] or "unknown",
    rank = i.rank, alpha = i.alpha, rslora = i.use_rslora ~= 0, targets = targets_list(i.targets),
    layers = i.num_layers, min_layer = i.min_layer, max_layer = i.max_layer,
    experts = i.num_experts, max_rank = i.max_rank, has_patterns = i.has_patterns ~= 0,
    tensors = i.num_tensors, bytes = i.bytes,
  }
end

function Peft.layers(self)
  local st, i, h = peft_info(self, "layers")
  if st ~= 0 then return fail(st, self._cbox) end
  local m = R.mem("i32", i.num_layers)
  return R.unpack(m, R.peft_layers(h, m, i.num_layers))
end

function Peft.inspect(self)
  local h = check(self, "peft", "inspect")
  local st, s = R.peft_inspect(h)
  if st ~= 0 then return fail(st, self._cbox) end
  return s
end

-- peft:layer_desc(layer_index, {experts=, hidden=, intermediate=}) -> a pool:load
-- description. The shapes are bounded by what the adapter file holds before the
-- library allocates for them: the arrays it fills are E * rank * (in + out) floats.
function Peft.layer_desc(self, layer, cfg)
  local st, i, h = peft_info(self, "layer_desc")
  if st ~= 0 then return fail(st, self._cbox) end
  local f = "layer_desc"
  layer = checkrange(layer, 1, f, 0, I32, "layer")
  checktype(cfg, "table", 2, f)
  local E = field_int(cfg, "experts", 2, f, 0)
  local H = field_int(cfg, "hidden", 2, f, 0)
  local I = field_int(cfg, "intermediate", 2, f, 0)
  if E < 1 then field_error(2, f, "experts", "must be a positive integer") end
  if H < 1 then field_error(2, f, "hidden", "must be a positive integer") end
  if I < 1 then field_error(2, f, "intermediate", "must be a positive integer") end
  -- 16 bytes per element covers the f32 arrays and their tables; 2^31 elements is
  -- more than any real layer's adapter (qwen3 at rank 64: 0.6e9 f32 in all layers)
  local elems = E * math.max(i.max_rank, 1) * (3 * H + 5 * I)
  if elems > 2 ^ 31 then
    argerror(2, f, format("experts * max_rank * (3*hidden + 5*intermediate) = %s is more than 2^31", ifmt(elems)))
  end
  local d
  st, d = R.peft_layer_desc(h, layer, E, H, I)
  if st ~= 0 then return fail(st, self._cbox) end
  for _, part in pairs(d) do part.a, part.b = R.unpack(part.a), R.unpack(part.b) end
  return d
end

-- ctx:write_peft(dir, spec): a synthetic PEFT adapter on disk.
local peft_fields = set { "family", "layout", "layers", "experts", "hidden", "intermediate", "targets", "rank",
  "alpha", "rslora", "dtype", "seed", "scale", "rank_pattern", "alpha_pattern" }
function Ctx.write_peft(self, dir, spec)
  local h = check(self, "context", "write_peft")
  local f = "write_peft"
  checktype(dir, "string", 1, f)
  checktype(spec, "table", 2, f)
  check_fields(spec, peft_fields, 2, f)
  local s = {
    family = field_option(spec, "family", families, 2, f), layout = field_option(spec, "layout", layouts, 2, f),
    num_layers = field_int(spec, "layers", 2, f), num_experts = field_int(spec, "experts", 2, f),
    hidden = field_int(spec, "hidden", 2, f), intermediate = field_int(spec, "intermediate", 2, f),
    rank = field_int(spec, "rank", 2, f), alpha = field_num(spec, "alpha", 2, f),
    use_rslora = field_bool(spec, "rslora", 2, f) and 1 or nil, dtype = field_option(spec, "dtype", dtypes, 2, f),
    seed = field_int(spec, "seed", 2, f, nil, -2 ^ 53, 2 ^ 53), scale = field_num(spec, "scale", 2, f),
  }
  if spec.targets ~= nil then s.targets = targets_mask(spec.targets, 2, f) end
  for _, pat in ipairs { "rank_pattern", "alpha_pattern" } do
    local p = spec[pat]
    if p ~= nil then
      if type(p) ~= "table" then field_error(2, f, pat, "must be {key = number}") end
      local k, v = next(p)
      if k ~= nil then
        if type(k) ~= "string" or type(v) ~= "number" then field_error(2, f, pat, "must be {key = number}") end
        if next(p, k) ~= nil then field_error(2, f, pat, "takes one entry") end
        if pat == "rank_pattern" and (not isint(v) or v < 1 or v > I32) then
          field_error(2, f, pat, "rank must be a positive integer")
        end
        s[pat .. "_key"], s[pat .. "_value"] = k, v -- s holds the key during the call
      end
    end
  end
  return status(R.peft_write_synthetic(h, dir, s), h)
end

-- ------------------------------------------------------------------ checkpoints

function Ctx.checkpoint(self, path)
  local h, cb = check(self, "context", "checkpoint")
  checktype(path, "string", 1, "checkpoint")
  local st, box = R.checkpoint_open(h, path)
  return made("checkpoint", st, box, self, cb)
end

local Ck = methods.checkpoint

function Ck.layer_info(self, layer)
  local h = check(self, "checkpoint", "layer_info")
  local st, i = R.checkpoint_get_layer_info(h, checkrange(layer, 1, "layer_info", 0, I32, "layer"))
  if st ~= 0 then return fail(st, self._cbox) end
  return { family = family_names[i.family] or "unknown", experts = i.num_experts, hidden = i.hidden,
    intermediate = i.intermediate, has_router = i.has_router ~= 0, weight_dtype = dtype_names[i.weight_dtype] }
end

-- ctx:quantize_checkpoint(src, dst) -> true: a bf16 checkpoint (file, index or
-- directory) to one FP8 .safetensors file in the HF format (docs/formats.md, "FP8")
function Ctx.quantize_checkpoint(self, src, dst)
  local h, cb = check(self, "context", "quantize_checkpoint")
  checktype(src, "string", 1, "quantize_checkpoint")
  checktype(dst, "string", 2, "quantize_checkpoint")
  return status(R.checkpoint_quantize_fp8(h, src, dst), cb)
end

-- ck:load_layer(index, layer, with_router?) -> the router buffer [E, H] f32 (host)
-- when with_router, else true
function Ck.load_layer(self, index, layer, with_router)
  local h = check(self, "checkpoint", "load_layer")
  index = checkrange(index, 1, "load_layer", 0, I32, "layer")
  local lh = check_obj(layer, "layer", 2, "load_layer")
  local st, router = R.checkpoint_load_layer(h, index, lh, with_router and true or false)
  if st ~= 0 then return fail(st, self._cbox) end
  if not with_router then return true end
  return made("buffer", st, router, self._parent, self._cbox)
end

return A
