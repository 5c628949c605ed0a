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
--
-- Most functions are regular (check each argument by its C type, call, return the
-- status and the out-parameters): their wrappers are made from their declarations in
-- the cdef (see "regular functions"); the others are written out below that.
local ffi = require "ffi"

local type, tonumber, error = type, tonumber, error
local floor = math.floor
local unpack = unpack or table.unpack

local cdef = require "loramoe.cdef"
if not pcall(ffi.typeof, "lmoe_context") then ffi.cdef(cdef) end
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

-- Whatever C gets a pointer into (a string, a box, a mem) is put in an anchor table as
-- soon as it is read, whatever metamethods (a fresh string from __index) do to the
-- tables it came from; `live` holds that table from the last read until C returns (a
-- local alone would not do: LuaJIT's compiler may drop a local that is not read again).
local live

-- ------------------------------------------------------------------ the header's declarations

-- "const char *name", "int64_t shape[LMOE_MAX_DIMS]" -> {name=, type=} with no spaces
-- around '*' and "[]" for an array ("const char*", "int64_t[]"); nil for what is not
-- a declaration (the allocator's function pointers, which nothing here reads).
local function decl(s)
  local ty, name = s:gsub("%b[]", ""):match("^%s*(.-)%s*([%w_]+)%s*$")
  if not ty then return nil end
  return { name = name, type = ty:gsub("%s*%*%s*", "*") .. (s:find("[", 1, true) and "[]" or "") }
end

-- The fields of every struct and the parameters of every function, read from the cdef.
local fields, params = {}, {}
for sname, body in cdef:gmatch("typedef struct (lmoe_[%w_]+) (%b{})") do
  local list = {}
  for d in body:sub(2, -2):gmatch("[^;]+") do
    local first
    for part in d:gmatch("[^,]+") do -- "int32_t a, b": b has a's type
      local f = decl(part)
      if f then
        if f.type == "" then f.type = first.type end
        first = first or f
        list[#list + 1] = f
      end
    end
  end
  fields[sname] = list
end
for name, ps in cdef:gmatch("(lmoe_[%w_]+)%s*(%b())%s*;") do
  local list = {}
  if ps ~= "(void)" then
    for p in ps:sub(2, -2):gmatch("[^,]+") do list[#list + 1] = decl(p) end
  end
  params[name] = list
end

-- ------------------------------------------------------------------ boxes

-- The kinds of boxes: what a release or close function of the header releases.
local kinds, release_of, out_of = {}, {}, {}
for cname, ps in pairs(params) do
  local kind = cname:match("^lmoe_(.-)_release$") or cname:match("^lmoe_(.-)_close$")
  if kind and #ps == 1 and ps[1].type == "lmoe_" .. kind .. "*" then
    kinds[kind] = ffi.typeof("lmoe_" .. kind .. " *")
    release_of[tonumber(kinds[kind])] = C[cname]
    out_of[kind] = ffi.new("lmoe_" .. kind .. " *[1]")
  end
end
-- What a box keeps alive (a wrap's owner, a borrowed buffer's layer), or for a pool its
-- layer's shapes, which pool_load checks arrays against (the library keeps the layer).
local keep = setmetatable({}, { __mode = "k" })
local borrowed = setmetatable({}, { __mode = "k" })
-- Boxes closed by R.close: their pointers would reach freed memory.
local closed = setmetatable({}, { __mode = "k" })

local function out(kind)
  local o = out_of[kind]
  o[0] = nil
  return o
end
local function box(kind, h, parent)
  if h == nil then return nil end
  h = ffi.gc(h, release_of[tonumber(kinds[kind])])
  if parent ~= nil then keep[h] = parent end
  return h
end
-- status, the handle of out-parameter o as a box (only the status on failure)
local function made(kind, st, o, parent)
  if st ~= 0 then return st end
  return st, box(kind, o[0], parent)
end

local function checkh(h, kind)
  if not ffi.istype(kinds[kind], h) or h == nil then bad(kind .. " box expected") end
  if closed[h] then bad("closed " .. kind) end
  return h
end
local function opth(h, kind) if h == nil then return nil end return checkh(h, kind) end

function R.close(h)
  if type(h) ~= "cdata" then bad("box expected") end
  if closed[h] then return end -- released already
  if release_of[tonumber(ffi.typeof(h))] then closed[h] = true end
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

-- How an argument, or a field of a struct given as a table, is checked by its C type.
local check_in = { int32_t = i32, lmoe_status = i32, int64_t = int, uint64_t = int, float = num, double = num,
  ["const char*"] = str, ["void*"] = opt_ptr }
for kind in pairs(kinds) do
  local function h(v) return checkh(v, kind) end
  check_in["lmoe_" .. kind .. "*"], check_in["const lmoe_" .. kind .. "*"] = h, h
end

-- Structs are filled by their init function with this binding's size
-- (lmoe_X_init_sized(s, sizeof s): the exported lmoe_X_init writes only the fields of
-- 0.1.0, so a field added later would stay zero here), else zeroed with their
-- struct_size set.
local function new_struct(sname)
  local s = ffi.new(sname)
  if params[sname .. "_init_sized"] then
    C[sname .. "_init_sized"](s, ffi.sizeof(s))
  elseif fields[sname][1].name == "struct_size" then
    s.struct_size = ffi.sizeof(s)
  end
  return s
end

-- The struct sname with the fields that table t sets, each checked by its C type;
-- what they give (strings among them) is kept in anchor while C uses it.
local function fill(sname, t, anchor)
  if type(t) ~= "table" then bad("table expected") end
  local s = new_struct(sname)
  for _, f in ipairs(fields[sname]) do
    local check = check_in[f.type]
    local v = check and t[f.name]
    if v ~= nil and check then
      v = check(v)
      anchor[#anchor + 1] = v
      s[f.name] = v
    end
  end
  return s
end

-- How a field of a struct is given back by its C type: numbers, strings copied ("" for
-- NULL), pointers as they are; a shape as the list of its first ndim entries.
local function number(v) return tonumber(v) end
local check_out = { int32_t = number, int64_t = number, uint64_t = number, size_t = number, float = number,
  double = number, ["const char*"] = function(v) return v ~= nil and ffi.string(v) or "" end,
  ["char[]"] = function(v) -- up to its NUL or its last byte, as the C module reads it
    local n, len = ffi.sizeof(v) - 1, 0
    while len < n and v[len] ~= 0 do len = len + 1 end
    return ffi.string(v, len)
  end, ["void*"] = function(v) return v end }
local function totable(s, sname)
  local t = {}
  for _, f in ipairs(fields[sname]) do
    local conv = check_out[f.type]
    if conv then t[f.name] = conv(s[f.name]) end
    if f.type == "int64_t[]" then
      t[f.name] = {}
      for d = 0, math.min(s.ndim, ffi.sizeof(s[f.name]) / 8) - 1 do t[f.name][d + 1] = tonumber(s[f.name][d]) end
    end
  end
  return t
end

-- ------------------------------------------------------------------ regular functions

-- The adapter description t for the pool h, every array checked against what C reads
-- for the pool's layer (its shapes, kept with the pool's box); the arrays are kept in
-- anchor while C uses them.
-- An adapter description's parts in the C module's order, with each one's input and
-- output sizes for a layer of hidden size H and intermediate size I.
local function parts_of(H, I)
  return { { "gate", H, I }, { "up", H, I }, { "gate_up", H, 2 * I }, { "down", I, H } }
end

local function adapter_desc(h, t, anchor)
  if type(t) ~= "table" then bad("table expected") end
  local dims = keep[checkh(h, "pool")]
  local d = new_struct("lmoe_adapter_desc")
  d.dtype = C.LMOE_DTYPE_F64
  local E, H, I = dims[1], dims[2], dims[3]
  for _, part in ipairs(parts_of(H, I)) do
    local name, p = part[1], t[part[1]]
    if type(p) == "table" then -- as the C module: a part that is not a table is absent
      local r, scale = i32(p.rank), num(p.scale) -- checked in the C module's order
      local a = checkmem(p.a, "f64", mul3(E, r, part[2]))
      anchor[#anchor + 1] = a
      local b = checkmem(p.b, "f64", mul3(E, part[3], r))
      anchor[#anchor + 1] = b
      d[name].a, d[name].b = a, b
      d[name].rank, d[name].scale = r, scale
    end
  end
  return d
end


-- The wrapper of C function f (lmoe_<name>), made from its parameters. Each takes the
-- next argument, checked by its C type (a table for a struct, filled as above), or is
-- an out-parameter whose value follows the status on success: a handle (lmoe_X **) as
-- a box, an int32, a string, a struct as a table. ndim and shape take one argument, a
-- shape list; data and its size a string; errbuf and its size none (on failure the
-- message follows the status). In a function with a count or capacity, its pointers
-- are arrays of that many elements, checked after the other arguments (void *: f64,
-- the dtype after it LMOE_DTYPE_F64). Without out-parameters the result is C's: a
-- status, a number, a string ("" for NULL), a pointer (nil for NULL) or nothing.
local array_of = { ["void*"] = "f64", ["const void*"] = "f64", ["int32_t*"] = "i32", ["const int32_t*"] = "i32",
  ["int64_t*"] = "i64", ["const int64_t*"] = "i64" }
local function wrap(f, name)
  local steps, ps, i, counted = {}, params["lmoe_" .. name], 1, false
  for _, p in ipairs(ps) do counted = counted or p.name == "count" or p.name == "capacity" end
  while i <= #ps do
    local ty = ps[i].type
    local sname, kind = ty:match("^const (lmoe_[%w_]+)%*$"), ty:match("^lmoe_([%w_]+)%*%*$")
    local s
    if ps[i].name == "ndim" then
      s, i = { arg = true, two = true, make = function(v) return shape(v, C.LMOE_MAX_DIMS), shape_buf end }, i + 1
    elseif counted and array_of[ty] then
      local dtype = ty:find("void") and ps[i + 1].name:find("dtype$") -- f64's, not an argument
      s, i = { arg = true, array = array_of[ty], two = dtype, make = function(v) return v, C.LMOE_DTYPE_F64 end },
        dtype and i + 1 or i
    elseif ty == "const void*" and ps[i + 1] and ps[i + 1].type == "size_t" then
      s, i = { arg = true, two = true, make = function(v) return str(v), #v end }, i + 1
    elseif ty == "char*" then
      local err = ffi.new("char[256]")
      local function make()
        err[0] = 0
        return err, 256
      end
      s, i = { errbuf = err, two = true, make = make }, i + 1
    elseif check_in[ty] then
      s = { arg = true, make = check_in[ty], count = ps[i].name == "count" or ps[i].name == "capacity" }
    elseif ty == "const lmoe_adapter_desc*" then -- for the pool that is argument 1
      s = { arg = true, make = function(v, anchor, args) return adapter_desc(args[1], v, anchor) end }
    elseif sname and fields[sname] then
      s = { arg = true, make = function(v, anchor) return fill(sname, v, anchor) end }
    elseif kind then
      s = { make = function() return out(kind) end, give = function(o) return box(kind, o[0]) end }
    elseif ty == "int32_t*" then
      s = { make = function() return ffi.new("int32_t[1]") end, give = function(o) return o[0] end }
    elseif ty == "const char**" then
      s = { make = function() return ffi.new("const char *[1]") end,
        give = function(o) return o[0] ~= nil and ffi.string(o[0]) or "" end }
    elseif fields[ty:match("^(lmoe_[%w_]+)%*$")] then
      local sn = ty:match("^(lmoe_[%w_]+)%*$")
      s = { make = function() return new_struct(sn) end, give = function(o) return totable(o, sn) end }
    else
      error("loramoe.ffi_core: no rule for " .. ty .. " in lmoe_" .. name)
    end
    steps[#steps + 1] = s
    i = i + 1
  end
  -- after the call: C's result, or the status and the out-parameters' values
  local status_t = ffi.typeof("lmoe_status")
  local errbuf = (steps[#steps] or {}).errbuf
  local function finish(outs, ...)
    live = nil
    local r = ...
    if type(r) == "cdata" and not ffi.istype(status_t, r) then -- a status stays an enum cdata
      if ffi.istype("const char *", r) then return r ~= nil and ffi.string(r) or "" end
      if ffi.istype("void *", r) then return r ~= nil and r or nil end
      return tonumber(r)
    end
    if #outs == 0 and not errbuf then return ... end
    if r ~= 0 then
      if errbuf then return r, ffi.string(errbuf) end
      return r
    end
    local res, j = { r }, 0
    for k = 1, #steps do
      if steps[k].give then
        j = j + 1
        res[j + 1] = steps[k].give(outs[j])
      end
    end
    return unpack(res, 1, j + 1)
  end
  local arrays, nc = {}, 0 -- each array's place among C's arguments, and its type
  for k = 1, #steps do
    nc = nc + (steps[k].two and 2 or 1)
    if steps[k].array then arrays[#arrays + 1] = { nc - (steps[k].two and 1 or 0), steps[k].array } end
  end
  return function(...)
    local a, c, outs, anchor, n, nc, count = { ... }, {}, {}, {}, 0, 0, nil
    for k = 1, #steps do
      local s = steps[k]
      if s.arg then n = n + 1 end
      local x, y = s.make(a[n], anchor, a)
      nc = nc + 1
      c[nc] = x
      if s.count then count = x end
      if s.two then
        nc = nc + 1
        c[nc] = y
      end
      if s.give then outs[#outs + 1] = x end
    end
    for k = 1, #arrays do checkmem(c[arrays[k][1]], arrays[k][2], count) end
    live = anchor
    return finish(outs, f(unpack(c, 1, nc)))
  end
end

-- ------------------------------------------------------------------ the others

local ts = ffi.new("struct lmoe_lua_timespec")
function R.now()
  if have_clock and ffi.C.clock_gettime(1, ts) == 0 then -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
  end
  return os.clock()
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
local function buf(h) return checkh(h, "buffer") end
local function layer(h) return checkh(h, "layer") end
local function batch(h) return checkh(h, "batch") end
local function peft(h) return checkh(h, "peft") end

-- The view must lie inside owner's memory, as the C module checks (wrap_inside).
function R.buffer_wrap(h, dtype, memory, shp, p, owner)
  local nd = shape(shp, C.LMOE_MAX_DIMS)
  local d = ffi.new("lmoe_buffer_desc")
  if C.lmoe_buffer_describe(buf(owner), d) ~= 0 then bad("owner buffer cannot be described") end
  local bytes = tonumber(C.lmoe_dtype_size(i32(dtype)))
  for i = 0, nd - 1 do bytes = mul3(bytes, tonumber(shape_buf[i]), 1) end
  local at, lo, size = R.address(p), tonumber(ffi.cast("uintptr_t", d.data)), tonumber(d.bytes)
  if i32(memory) ~= d.memory then bad("memory differs from the owner's") end
  if at == nil or lo == 0 or at < lo or at + bytes > lo + size then
    bad("the view does not lie inside the owner's memory")
  end
  local o = out("buffer")
  return made("buffer", C.lmoe_buffer_wrap(ctx(h), i32(dtype), i32(memory), nd, shape_buf, opt_ptr(p), o), o, owner)
end

local lcfg = ffi.new("lmoe_layer_config")
local function layer_config(h)
  lcfg.struct_size = ffi.sizeof(lcfg)
  return C.lmoe_layer_get_config(layer(h), lcfg), lcfg
end
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
  local o = out("buffer")
  local st = C.lmoe_layer_weights(layer(h), i32(which), o)
  if st ~= 0 or o[0] == nil then return st end
  local b = o[0]
  keep[b], borrowed[b] = h, true
  return st, b
end

function R.pool_create(h, cfg)
  layer(h) -- the arguments in order, as the C module checks them
  local c = fill("lmoe_pool_config", cfg, {}) -- integers only
  local o = out("pool")
  local lst, lc = layer_config(h)
  if lst ~= 0 then return lst end -- as from the C module: the status alone
  local dims = { lc.num_experts, lc.hidden, lc.intermediate } -- fixed, checked by pool_load
  return made("pool", C.lmoe_pool_create(h, c, o), o, dims)
end

function R.batch_set(h, p, n, tokens, slots)
  n = i32(n)
  return C.lmoe_batch_set(batch(h), opth(p, "pool"), n, checkmem(tokens, "i32", n), checkmem(slots, "i32", n))
end

-- forward_group({ctx, ...}, {args, ...}): every box read from the lists is anchored.
function R.forward_group(cs, as)
  if type(cs) ~= "table" or type(as) ~= "table" then bad("lists expected") end
  local n = #cs
  if n < 1 or n > 4096 or #as ~= n then bad("1..4096 contexts and as many args") end
  local ctxs = ffi.new("lmoe_context *[?]", n)
  local args = ffi.new("lmoe_forward_args[?]", n)
  local pa = ffi.new("const lmoe_forward_args *[?]", n)
  local anchor = {}
  for i = 1, n do
    anchor[#anchor + 1] = ctx(cs[i])
    ctxs[i - 1] = anchor[#anchor]
    args[i - 1] = fill("lmoe_forward_args", as[i], anchor)
    pa[i - 1] = args + (i - 1)
  end
  live = anchor
  local st = C.lmoe_forward_group(n, ctxs, pa, nil)
  live = nil
  return st
end

-- comm_create_local({ctx, ...}) -> st, {box, ...} | st, message
function R.comm_create_local(cs)
  if type(cs) ~= "table" then bad("list expected") end
  local n = #cs
  if n < 1 or n > 4096 then bad("1..4096 contexts") end
  local ctxs, anchor = ffi.new("lmoe_context *[?]", n), {}
  for i = 1, n do
    anchor[i] = ctx(cs[i])
    ctxs[i - 1] = anchor[i]
  end
  local o = ffi.new("lmoe_comm *[?]", n)
  local err = ffi.new("char[256]")
  live = anchor
  local st = C.lmoe_comm_create_local(n, ctxs, o, err, 256)
  live = nil
  if st ~= 0 then return st, ffi.string(err) end
  local t = {}
  for i = 1, n do t[i] = box("comm", o[i - 1]) end
  return st, t
end

-- entries {name=, dtype=, shape=, data=buffer box}, the lists read raw; every string
-- and box is anchored during the call.
function R.safetensors_write(h, path, entries, keys, vals)
  local n, nm = #entries, #keys
  if nm ~= #vals then bad("keys and values differ in length") end
  local e, anchor = ffi.new("lmoe_tensor_entry[?]", n > 0 and n or 1), {}
  for i = 1, n do
    local t = rawget(entries, i)
    if type(t) ~= "table" then bad("entries must be tables") end
    local ent = e[i - 1]
    anchor[#anchor + 1] = str(t.name)
    ent.name = anchor[#anchor]
    ent.dtype = i32(t.dtype)
    ent.ndim = shape(t.shape, C.LMOE_TENSOR_MAX_DIMS)
    local numel = 1
    for d = 0, ent.ndim - 1 do
      ent.shape[d] = shape_buf[d]
      numel = mul3(numel, tonumber(shape_buf[d]), 1)
    end
    anchor[#anchor + 1] = t.data
    local st, bd = R.buffer_describe(anchor[#anchor])
    if st ~= 0 or bd.dtype ~= ent.dtype or numel > bd.numel then bad("data smaller than its shape") end
    if bd.memory ~= C.LMOE_MEMORY_HOST and C.lmoe_context_backend(ctx(h)) ~= C.LMOE_BACKEND_CPU then
      bad("data not in host memory")
    end
    ent.data = bd.data
  end
  local mk = ffi.new("const char *[?]", nm > 0 and nm or 1)
  local mv = ffi.new("const char *[?]", nm > 0 and nm or 1)
  for i = 1, nm do
    local k, v = str(rawget(keys, i)), str(rawget(vals, i))
    anchor[#anchor + 1] = k
    anchor[#anchor + 1] = v
    mk[i - 1], mv[i - 1] = k, v
  end
  live = anchor
  local st = C.lmoe_safetensors_write(ctx(h), str(path), n, e, nm, mk, mv)
  live = nil
  return st
end

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
  local d = new_struct("lmoe_adapter_desc")
  local st = C.lmoe_peft_layer_desc(peft(h), i32(l), i32(E), i32(H), i32(I), d)
  if st ~= 0 or d.dtype ~= C.LMOE_DTYPE_F32 then return st ~= 0 and st or C.LMOE_ERR_UNSUPPORTED end
  local t = {}
  for _, part in ipairs(parts_of(H, I)) do
    local name = part[1]
    local p = d[name]
    if p.a ~= nil and p.b ~= nil then
      local na, nb = mul3(E, p.rank, part[2]), mul3(E, part[3], p.rank)
      local a, b = R.mem("f32", na), R.mem("f32", nb)
      ffi.copy(a, p.a, 4 * na)
      ffi.copy(b, p.b, 4 * nb)
      t[name] = { a = a, b = b, rank = p.rank, scale = p.scale }
    end
  end
  return st, t
end

function R.checkpoint_load_layer(h, i, l, with_router)
  local o = out("buffer")
  local st = C.lmoe_checkpoint_load_layer(checkh(h, "checkpoint"), i32(i), layer(l), with_router and o or nil)
  local router = box("buffer", o[0]) -- owned even when the load failed after making it
  if st ~= 0 then return st end
  return st, router
end

-- Every other function of the header is regular: its wrapper is made from its
-- declaration. Not bound as functions: the *_init of the structs (called where a
-- struct is filled, see new_struct) and the release and close functions (a box's
-- release, see kinds).
for cname in pairs(params) do
  local name = cname:sub(6)
  local elsewhere = name:find("_init$") or name:find("_init_sized$") or name:find("_release$")
    or name:find("_close$")
  if R[name] == nil and not elsewhere then
    R[name] = wrap(C[cname], name)
  end
end

return R
