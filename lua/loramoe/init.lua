-- loramoe: the Lua API. `local lm = require "loramoe"`.
--
-- Picks the core for the running VM: under LuaJIT the FFI binding (loramoe.ffi_core),
-- under Lua 5.4 the C module (loramoe.core). Both expose the same functions and
-- objects; this file adds what is plain Lua on top of either (presets, helpers), so
-- it behaves the same under both. docs/lua.md is the reference.
local core
if rawget(_G, "jit") then
  core = require "loramoe.ffi_core"
else
  core = require "loramoe.core"
end

local lm = {}
for k, v in pairs(core) do lm[k] = v end
lm._NAME = "loramoe"
lm._VERSION = core._VERSION
lm.core = core
lm.runtime = core.runtime -- "lua5.4" or "luajit"

lm.dtypes = { "bf16", "f16", "f32", "f64", "i32" }
lm.guards = { "host", "device_sync", "always" }
lm.backends = { "auto", "cpu", "cuda" }

-- Shapes of PERFORMANCE.md. ctx:layer("name") and ctx:layer{preset = "name", ...}
-- look names up in this table (shared with the core), so presets added here work too.
local presets = core.presets
presets.tiny = { experts = 16, hidden = 256, intermediate = 128, top_k = 2, layers = 4 }
presets["qwen3-30b-a3b"] = { experts = 128, hidden = 2048, intermediate = 768, top_k = 8, layers = 48 }
presets["mixtral-8x7b"] = { experts = 8, hidden = 4096, intermediate = 14336, top_k = 2, layers = 32 }
lm.presets = presets

local M = core.methods
local format = string.format

-- Raises msg at the first caller outside loramoe's Lua files.
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

-- ------------------------------------------------------------------ helpers

-- A value or, on failure, a raise with the message: lm.assert(ctx:buffer(...)).
-- Like assert, but the error points at the caller and keeps the "CODE: message" text.
function lm.assert(v, msg, ...)
  if v == nil or v == false then raise(msg or "assertion failed!") end
  return v, msg, ...
end

-- Random inputs for a forward of `tokens` tokens through `layer`, made in the layer's
-- context: x [M, H] bf16 in [-1, 1), router logits [M, E] f32 in [-4, 4), out [M, H] bf16.
-- Returns a table ready for layer:forward (add pool and batch), or nil, msg, code.
function M.layer.inputs(layer, tokens, seed)
  if type(tokens) ~= "number" or tokens < 0 or tokens ~= math.floor(tokens) then
    raise(format("bad argument #1 to 'inputs' (tokens must be a non-negative integer)"))
  end
  seed = seed or 1
  local c = layer:config()
  local ctx = layer:context()
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

-- Runs the float64 reference on the same arguments as a forward and compares
-- args.out with it: returns the compare table {rel_l2=, max_abs=, ...}, or nil, msg, code.
-- The reference's output is an f64 host buffer [M, H], closed before returning.
function M.layer.check(layer, args)
  if type(args) ~= "table" then raise("bad argument #1 to 'check' (table expected, got " .. type(args) .. ")") end
  local shape = args.out and args.out:shape()
  if not shape then raise("bad argument #1 to 'check' (field 'out' is missing (a loramoe.buffer))") end
  local ref, err, code = layer:context():buffer("f64", shape, "host")
  if not ref then return nil, err, code end
  local rargs = {}
  for k, v in pairs(args) do rargs[k] = v end
  rargs.out = ref
  local ok
  ok, err, code = layer:reference(rargs)
  local res
  if ok then res, err, code = args.out:compare(ref) end
  ref:close()
  if not res then return nil, err, code end
  return res
end

-- Requests for batch:set from a compact form: lm.requests({128, 64, 32}, {0, nil, 1})
-- gives {{tokens=128, adapter=0}, {tokens=64}, {tokens=32, adapter=1}}.
function lm.requests(tokens, adapters)
  if type(tokens) ~= "table" then raise("bad argument #1 to 'requests' (table expected, got " .. type(tokens) .. ")") end
  local r = {}
  for i = 1, #tokens do
    r[i] = { tokens = tokens[i], adapter = adapters and adapters[i] or nil }
  end
  return r
end

-- Counters per forward between two ctx:counters() snapshots.
function lm.per_forward(before, after, forwards)
  local n = forwards or (after.forwards - before.forwards)
  local t = {}
  for k, v in pairs(after) do
    t[k] = n > 0 and (v - (before[k] or 0)) / n or 0
  end
  return t
end

-- ------------------------------------------------------------------ adapters from files

-- lm.adapter.load(path, opts): a PEFT adapter (its directory, or adapter_config.json)
-- in one call. opts.pool: load it there under opts.name (default: path) and return
-- slot, peft_info; the layer index is opts.layer, or the adapter's only layer (a
-- multi-layer adapter needs opts.layer). Without a pool: return the opened peft object
-- (opts.context required then). Misuse raises; refusals return nil, message, code.
lm.adapter = {}
function lm.adapter.load(path, opts)
  if type(path) ~= "string" then raise("bad argument #1 to 'load' (string expected, got " .. type(path) .. ")") end
  if opts ~= nil and type(opts) ~= "table" then raise("bad argument #2 to 'load' (table expected, got " .. type(opts) .. ")") end
  opts = opts or {}
  local pool, ctx = opts.pool, opts.context
  if pool then ctx = pool:layer():context() end
  if not ctx then raise("bad argument #2 to 'load' (opts.pool or opts.context expected)") end
  local peft, err, code = ctx:peft(path)
  if not peft then return nil, err, code end
  if not pool then return peft end
  local info = peft:info()
  local layer = opts.layer
  if layer == nil then
    local layers = peft:layers()
    if #layers ~= 1 then
      peft:close()
      raise(format("bad argument #2 to 'load' (opts.layer expected: %s has %d layers, %d..%d)",
        path, #layers, info.min_layer, info.max_layer))
    end
    layer = layers[1]
  end
  local slot
  slot, err, code = pool:load_peft(opts.name or path, peft, layer)
  peft:close()
  if not slot then return nil, err, code end
  return slot, info
end

return lm
