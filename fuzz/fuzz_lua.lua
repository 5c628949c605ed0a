-- The Lua-boundary fuzzer: random calls of the loramoe Lua API with hostile values
-- (integers past int32 and 2^53, NaN, strings for numbers, lists with holes, a huge
-- __len, __index that raises or closes objects, closed objects, objects of the wrong
-- kind, pointers of other memory). Errors are expected; what it looks for is a crash,
-- a sanitizer report or a hang. Run it under a build with -DLMOE_SANITIZE (ctest -L
-- fuzz_lua does, under lua5.4 with the C module and luajit with the FFI binding).
--
--   FUZZ_SEED=1 FUZZ_RUNS=20000 FUZZ_TIME=60 lua5.4 fuzz/fuzz_lua.lua
--
-- The same seed gives the same calls again under one runtime (its own generator; the
-- runtimes differ a little, in pairs order and the like); the run stops after
-- FUZZ_RUNS calls (0: no bound) or FUZZ_TIME seconds. The last call is
-- printed before it is made when FUZZ_TRACE=1, to find the one that crashed;
-- FUZZ_STATS=1 counts the calls by method and outcome; FUZZ_DEBUG=<method> prints what
-- each call of that method returned.
local lm = require "loramoe"

local seed = tonumber(os.getenv("FUZZ_SEED") or "") or 1
local runs = tonumber(os.getenv("FUZZ_RUNS") or "") or 20000
local limit = tonumber(os.getenv("FUZZ_TIME") or "") or 60
local trace = os.getenv("FUZZ_TRACE") == "1"
local stats = os.getenv("FUZZ_STATS") == "1" and {} or nil -- calls by method and outcome
if seed == 0 then seed = os.time() end

-- Park-Miller: exact in doubles and in 5.4 integers, so both runtimes draw alike.
local x = seed % 2147483646 + 1
local function rand(n)
  x = x * 48271 % 2147483647
  return x % n + 1
end
local function pick(t) return t[rand(#t)] end
local function chance(p) return rand(1000) <= p * 1000 end

local tmp = os.tmpname()
os.remove(tmp)
local paths = { tmp .. ".a", tmp .. ".b", tmp .. ".dir", tmp .. ".missing/x", tmp }

local path_methods = { write_safetensors = true, write_peft = true, safetensors = true, peft = true, checkpoint = true }

local numbers = { 0, 1, 2, 3, 4, 7, 8, 16, 64, -1, -2, 0.5, 1.5, -0.0, 2 ^ 31 - 1, 2 ^ 31, -2 ^ 31, -2 ^ 31 - 1,
  2 ^ 32, 2 ^ 32 + 1, 2 ^ 53, 2 ^ 53 + 2, 2 ^ 63, -2 ^ 63, 2 ^ 64, 1e300, -1e300, math.huge, -math.huge, 0 / 0 }
local small = { 0, 1, 2, 3, 4, 8 }
local strings = { "", "1", "2", "0x10", " 3 ", "bf16", "f16", "f32", "f64", "i32", "host", "device", "cpu", "auto",
  "cuda", "gate", "up", "down", "gate_up", "w13", "w2", "always", "device_sync", "qwen", "mixtral", "fused",
  "per_expert", "tiny", "%s%n", "a\0b", string.rep("x", 300), "down_proj", "(a+)+" }

local objects = {} -- loramoe objects made so far (some closed)
local inputs -- the last layer:inputs result, for forwards
local function remember(o)
  if type(o) == "table" and tostring(o):find("^loramoe%.") then
    if #objects >= 48 then table.remove(objects, rand(#objects)) end
    objects[#objects + 1] = o
  end
end
local function some_object()
  if #objects == 0 then return nil end
  return objects[rand(#objects)]
end
local function of_kind(kind)
  local c = {}
  for _, o in ipairs(objects) do
    if tostring(o):find("^loramoe%." .. kind .. " ") then c[#c + 1] = o end
  end
  return c[1] and pick(c) or nil
end

local value
local function list(n, gen)
  local t = {}
  for i = 1, n do t[i] = gen() end
  return t
end

-- A hostile table: holes, __len, __index that raises, closes an object or collects.
local function hostile(depth)
  local k = rand(9)
  if k == 1 then return list(pick(small), function() return pick(numbers) end) end
  if k == 2 then
    local t = list(pick { 2, 3, 8 }, function() return rand(4) end)
    t[rand(#t)] = nil
    return t
  end
  if k == 3 then return setmetatable(list(pick(small), function() return 1 end), { __len = function() return pick(numbers) end }) end
  if k == 4 then return setmetatable({}, { __index = function() error("index raised") end }) end
  if k == 5 then
    return setmetatable({}, { __index = function(_, key)
      local o = some_object()
      if o and not o:is_closed() then pcall(o.close, o) end
      collectgarbage()
      return value(depth + 1, key)
    end })
  end
  if k == 6 then
    local t = {}
    t[pick { 1, 2, 2 ^ 31, 2 ^ 40, 1.5, -1 }] = pick(numbers)
    return t
  end
  if k == 7 then return setmetatable({}, { __index = function() return pick(strings) end, __pairs = function() error("pairs") end }) end
  if k == 8 then return { tokens = pick(numbers), adapter = pick(numbers) } end
  return list(rand(3), function() return value(depth + 1) end)
end

-- An option table for the API's option names, with values right or wrong.
local option_names = { "backend", "device", "threads", "guard", "stream", "experts", "hidden", "intermediate", "top_k",
  "renormalize", "max_tokens", "preset", "slots", "max_rank", "rank", "alpha", "targets", "fused", "rslora", "seed",
  "scale", "gate", "up", "gate_up", "down", "a", "b", "pool", "batch", "x", "logits", "topk_ids", "topk_weights",
  "out", "name", "dtype", "shape", "data", "family", "layout", "layers", "rank_pattern", "alpha_pattern", "max_token" }
local function options(depth)
  local t = {}
  for _ = 1, rand(4) do t[pick(option_names)] = value(depth + 1) end
  return t
end

function value(depth, _)
  depth = depth or 0
  local k = rand(depth > 2 and 5 or 10)
  if k <= 2 then return pick(numbers) end
  if k == 3 then return pick(strings) end
  if k == 4 then return pick { true, false, "nil" } ~= "nil" or nil end
  if k == 5 then
    local o = some_object()
    if o and chance(0.3) then
      local ok, p = pcall(function() return o:data() end)
      if ok then return p end
      ok, p = pcall(function() return o:pointer() end)
      if ok then return p end
    end
    return o
  end
  if k <= 7 then return hostile(depth) end
  if k == 8 then return options(depth) end
  if k == 9 then return pick(small) end
  return pick(strings)
end

-- Arguments close enough to right that calls reach the library, with some mutated.
local function near(kind, name, self)
  if name == "write_safetensors" then
    return pick(paths), list(rand(3), function()
      return { name = pick(strings), dtype = chance(0.8) and "f32" or value(), shape = { pick(small) },
        data = chance(0.8) and list(pick(small), function() return rand(9) end) or value() }
    end), chance(0.5) and { k = "v" } or value()
  end
  if name == "write_peft" then
    return tmp .. ".dir", { layers = pick { 1, 2 }, experts = pick { 2, 4 }, hidden = pick { 4, 8 },
      intermediate = pick { 2, 4 }, rank = pick { 1, 2, 4 }, alpha = 4, layout = pick { "fused", "per_expert" },
      rank_pattern = chance(0.3) and { down_proj = pick { 1, 2, 2 ^ 32 } } or nil,
      alpha_pattern = chance(0.3) and { [pick(strings)] = 2 } or nil }
  end
  if name == "safetensors" or name == "peft" or name == "checkpoint" then return pick(paths) end
  if name == "buffer" then
    return pick { "f32", "bf16", "i32", "f64" }, list(rand(2), function() return pick(small) end), pick { "host", "device" }
  end
  if name == "layer" then
    return { experts = pick { 2, 4 }, hidden = pick { 4, 8, 16 }, intermediate = pick { 2, 4, 8 }, top_k = pick { 1, 2 },
      max_tokens = pick { 8, 64 } }
  end
  if name == "pool" then return { slots = pick { 1, 2, 4 }, max_rank = pick { 1, 2, 4, 8 } } end
  if name == "load_random" then
    return rand(5) - 2, { rank = pick { 1, 2, 4, 8, 0, 2 ^ 32 }, targets = pick { 7, 1, { "gate" }, { "up", "down" } },
      fused = chance(0.3), seed = pick(numbers) }
  end
  if name == "set" then
    return of_kind("pool"), list(rand(4), function() return { tokens = pick { 0, 1, 3, 8 }, adapter = pick { -1, 0, 1, 3 } } end)
  end
  if (name == "forward" or name == "reference" or name == "check") and chance(0.7) then
    -- inputs of this layer and a batch of as many tokens: the library's own checks pass
    local m = pick { 1, 4, 8 }
    local ok, inp = pcall(function() return self:inputs(m, rand(100)) end)
    if ok and type(inp) == "table" then
      for _, v in pairs(inp) do remember(v) end
      local okb, b = pcall(function() return chance(0.8) and self:context():batch() or of_kind("batch") end)
      if not okb then b = nil end
      remember(b)
      local p
      for _, o in ipairs(objects) do
        if tostring(o):find("^loramoe%.pool ") and pcall(function() return o:layer() == self end) and o:layer() == self then p = o end
      end
      if chance(0.2) then p = of_kind("pool") end
      local a = p and rand(3) - 2 or -1
      if b then pcall(b.set, b, p, { { tokens = m - 1, adapter = a }, { tokens = 1, adapter = chance(0.5) and a or -1 } }) end
      inp.batch, inp.pool = b, p
      return inp
    end
  end
  if name == "forward" or name == "reference" or name == "check" then
    local args = {}
    for key, v in pairs(inputs or {}) do args[key] = v end
    args.batch, args.pool = of_kind("batch"), chance(0.7) and of_kind("pool") or nil
    if chance(0.2) then args[pick { "x", "out", "logits" }] = of_kind("buffer") end
    return args
  end
  if name == "write" then return list(pick(small), function() return rand(9) end), pick { 0, 1, 2 ^ 32 } end
  if name == "read" then return pick { false, 0, 1 } or nil, pick { false, 0, 1, 2 ^ 40 } or nil end
  if name == "wrap" then
    local owner = of_kind("buffer")
    local p = owner and not owner:is_closed() and owner:data() or nil
    return "f32", { pick(small) }, p, "host", owner
  end
  if name == "inputs" then return pick { 0, 1, 4, 8 }, pick(numbers) end
  if name == "load" or name == "load_named" then
    local ok, c = pcall(function() return self:layer():config() end)
    local E, H, I = 2, 4, 2
    if ok and type(c) == "table" then E, H, I = c.experts, c.hidden, c.intermediate end
    local r = pick { 1, 2, 4 }
    local function arr(n) return list(n, function() return 0.01 end) end
    local d = { gate = { a = arr(E * r * H), b = arr(E * I * r), rank = chance(0.8) and r or nil, alpha = 2 },
      down = chance(0.5) and { a = arr(E * r * I), b = arr(E * H * r + pick { 0, 0, 1 }) } or nil }
    if chance(0.2) then d.gate_up = { a = arr(E * r * H), b = arr(E * 2 * I * r) } end
    if name == "load_named" then return pick(strings), d end
    return rand(3) - 1, d
  end
  if name == "layer_desc" then return rand(3) - 1, { experts = pick { 2, 4, 2 ^ 31 - 1 }, hidden = pick { 4, 8 }, intermediate = pick { 2, 4 } } end
  if name == "load_peft" then return pick(strings), of_kind("peft"), rand(3) - 1 end
  if name == "load_layer" then return rand(3) - 1, of_kind("layer"), chance(0.5) end
  if name == "set_weights" then return list(pick { 0, 64, 128 }, function() return 0.01 end), nil end
  if name == "set_expert" then return rand(3) - 1, { gate = list(pick { 8, 16, 32 }, function() return 0.01 end) } end
  if name == "weights" then return pick { "w13", "w2", "w3" } end
  if name == "set_guard" then return pick { "host", "always", "device_sync", "never" } end
  return rand(4) - 2, options(0)
end

local kinds = { "context", "buffer", "layer", "pool", "batch", "safetensors", "peft", "checkpoint", "graph" }
local method_names = {}
for _, kind in ipairs(kinds) do
  local names = {}
  for n in pairs(lm.methods[kind]) do names[#names + 1] = n end
  table.sort(names) -- pairs order differs between runtimes
  method_names[kind] = names
end

local function describe_args(args, n)
  local s = {}
  for i = 1, n do s[i] = tostring(args[i]) end
  return table.concat(s, ", ")
end

local function call(i)
  local k = rand(20)
  if k == 1 or #objects == 0 then
    local opts = chance(0.8) and { backend = "cpu", threads = pick { 1, 2 } } or options(0)
    if type(opts) == "table" and opts.threads ~= nil and type(opts.threads) == "number" and opts.threads > 4 then opts.threads = 1 end
    if type(opts) == "table" and (opts.threads == 0 or opts.threads == -0.0) then opts.threads = 1 end
    if trace then print(i, "context", opts) end
    local ok, ctx = pcall(lm.context, opts)
    if ok then remember(ctx) end
    return
  end
  if k == 2 then
    local v = value()
    if trace then print(i, "adopt_context", v) end
    local ok, c = pcall(lm.adopt_context, v)
    if ok then remember(c) end
    return
  end
  if k == 3 then
    collectgarbage()
    return
  end
  local self = chance(0.9) and some_object() or value()
  local kind = pick(kinds)
  if type(self) == "table" then
    kind = tostring(self):match("^loramoe%.(%w+) ") or kind
  end
  local name = pick(method_names[kind])
  if name == "close" and chance(0.7) then name = pick(method_names[kind]) end
  local f = lm.methods[kind][name]
  local args, n
  if chance(0.7) then
    args = table.pack and table.pack(near(kind, name, self)) or { n = 5, near(kind, name, self) }
    n = args.n
    if chance(0.3) and n > 0 then args[rand(n)] = value() end
  else
    n = rand(5) - 1
    args = {}
    for j = 1, n do args[j] = value() end
  end
  -- files are written under the temporary name only, whatever the value drawn
  if path_methods[name] and type(args[1]) == "string" then args[1] = pick(paths) end
  if trace then print(i, kind .. ":" .. name, tostring(self), describe_args(args, n)) end
  local unpack = table.unpack or unpack
  local ok, r, msg = pcall(f, self, unpack(args, 1, n))
  if os.getenv("FUZZ_DEBUG") == name then print(name, ok, r, msg) end
  if stats then
    local key = kind .. ":" .. name .. (ok and (r ~= nil and " ok" or " fail") or " raise")
    stats[key] = (stats[key] or 0) + 1
  end
  if ok then remember(r) end
  if ok and name == "inputs" and type(r) == "table" then inputs = r end
  if ok and type(r) == "table" then
    for _, v in pairs(r) do remember(v) end
  end
end

local clock = lm.now
local t0 = clock()
local done = 0
while (runs == 0 or done < runs) and clock() - t0 < limit do
  done = done + 1
  call(done)
end
for _, o in ipairs(objects) do pcall(o.close, o) end
objects = nil
collectgarbage()
collectgarbage()
for _, p in ipairs(paths) do
  os.remove(p .. "/adapter_config.json")
  os.remove(p .. "/adapter_model.safetensors")
  os.remove(p)
end
if stats then
  local keys = {}
  for key in pairs(stats) do keys[#keys + 1] = key end
  table.sort(keys)
  for _, key in ipairs(keys) do print(key, stats[key]) end
end
print(string.format("fuzz_lua: %s, seed %d, %d calls in %.1f s, no crash", lm.runtime, seed, done, clock() - t0))
