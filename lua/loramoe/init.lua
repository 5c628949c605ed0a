-- loramoe: the Lua API. `local lm = require "loramoe"`.
--
-- The API is loramoe.api, written once in Lua over a raw core picked for the running
-- VM: under LuaJIT the FFI binding (loramoe.ffi_core), under Lua 5.4 the C module
-- (loramoe.core); both expose the C functions of loramoe.h one to one. This file adds
-- the helpers that need no core (lm.assert, lm.requests, lm.adapter.load, ...).
-- docs/lua.md is the reference.
local api = require "loramoe.api"
local core = api.core

local lm = {}
for _, k in ipairs { "version", "status_string", "has_cuda", "device_count", "device_info", "dtype_size",
  "dtype_name", "lora_scale", "now", "context", "adopt_context", "has_nccl", "comms", "wrap_nccl",
  "forward_group" } do
  lm[k] = api[k]
end
lm._NAME = "loramoe"
lm._VERSION = core._VERSION
lm.core = core             -- the raw core: loramoe.core (C module) or loramoe.ffi_core
lm.runtime = core.runtime  -- "lua5.4" or "luajit"
lm.methods = api.methods   -- methods of each kind of object, by kind
lm.presets = api.presets   -- ctx:layer looks names up here: add your own

lm.dtypes = { "bf16", "f16", "f32", "f64", "i32", "f8_e4m3" }
lm.guards = { "host", "device_sync", "always" }
lm.backends = { "auto", "cpu", "cuda" }

local format = string.format
local raise = api.raise

-- ------------------------------------------------------------------ helpers

-- A value or, on failure, a raise with the message: lm.assert(ctx:buffer(...)).
-- Like assert, but the error points at the caller and keeps the "CODE: message" text.
function lm.assert(v, msg, ...)
  if v == nil or v == false then raise(msg or "assertion failed!") end
  return v, msg, ...
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
