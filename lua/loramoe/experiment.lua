-- loramoe.experiment: describe a scenario, run it with warm-up and repetitions, sweep
-- any field, and get back plain tables (write them with loramoe.report / loramoe.svg).
--
--   local exp = require "loramoe.experiment"
--   local r = exp.run{ preset = "tiny", tokens = 512, guard = "device_sync" }
--   print(r.time_ms, r.syncs_per_forward)
--   local rows = exp.sweep({ preset = "tiny" }, { { "guard", { "host", "always" } },
--                                                 { "tokens", { 128, 512 } } })
--
-- docs/experiments.md is the reference. Works the same under Lua 5.4 (C module) and
-- LuaJIT (FFI binding); no integer division, no goto, no <close>.

local experiment = {}

local floor, max, min, huge = math.floor, math.max, math.min, math.huge
local format, concat = string.format, table.concat

local lm_module
local function lm()
  if not lm_module then lm_module = require "loramoe" end
  return lm_module
end
-- Tests and hosts may hand in the module they already hold.
function experiment.use(module) lm_module = module end

-- ------------------------------------------------------------------ constants

-- Shapes from PERFORMANCE.md; loramoe.presets wins where it has the name.
experiment.presets = {
  ["qwen3-30b-a3b"] = { experts = 128, hidden = 2048, intermediate = 768, top_k = 8, layers = 48 },
  ["mixtral-8x7b"] = { experts = 8, hidden = 4096, intermediate = 14336, top_k = 2, layers = 32 },
  tiny = { experts = 16, hidden = 256, intermediate = 128, top_k = 2, layers = 4 },
}

-- Measured ceilings of a card (PERFORMANCE.md: bf16 matrix product and device copy,
-- read + write counted), matched against the device name. A card not listed gets no
-- floor; pass peak = {flops=, bytes=} to a scenario to supply one.
experiment.peaks = {
  { match = "H100", flops = 790e12, bytes = 3.0e12 },
}

-- Every field a scenario may have, with its default. A field not listed is a typo and
-- is refused, so a sweep over "token" (for "tokens") fails at once, not after an hour.
experiment.defaults = {
  name = false,           -- label for tables and plots (default: built from the fields)
  backend = "auto",       -- "auto" | "cpu" | "cuda"
  device = 0,
  threads = 0,            -- cpu backend worker threads; 0: one per core
  preset = "tiny",        -- a name from the presets, or false with explicit shapes
  experts = false, hidden = false, intermediate = false, top_k = false,
  renormalize = true,
  layers = false,         -- stack depth (default: the preset's)
  distinct_layers = false,-- weight sets; layer i uses set (i-1) % distinct + 1
  tokens = 512,           -- M, split evenly over `requests`
  requests = 8,
  request_tokens = false, -- explicit list of tokens per request (overrides tokens, requests)
  adapters = 4,           -- distinct adapters (pool slots in use)
  adapter_fraction = 1,   -- share of requests that use an adapter, 0..1
  rank = 16,
  ranks = false,          -- list: adapter j gets ranks[(j-1) % #ranks + 1]
  alpha = false,          -- default: 2 * rank
  rslora = false,
  targets = "all",        -- "all" | "gate,up" | {"gate","up","down"}
  fused = false,          -- gate and up as one gate_up part
  guard = "host",         -- "host" | "device_sync" | "always"
  mode = "eager",         -- "eager" | "graph" (replay a CUDA graph of the stack; cuda only)
  warmup = 2,
  reps = 10,
  pipeline = 1,           -- forwards enqueued back to back per synchronize
  seed = 1,
  weight_scale = false,   -- expert weights uniform in [-s, s); default 1/sqrt(hidden)
  weight_dtype = "bf16",  -- "bf16" | "f8_e4m3" (FP8 experts, 128x128 block scales; cpu backend)
  adapter_scale = 0.02,
  peak = false,           -- {flops=, bytes=} for the floor when the card is not known
  max_tokens = false,     -- layer workspace bound (a sweep sets it to its largest M)
  pool_rank = false,      -- pool bound (a sweep sets it to its largest rank)
  pool_slots = false,     -- pool bound (a sweep sets it to its most adapters)
}

local guard_names = { host = true, device_sync = true, always = true }
local target_bits = { gate = 1, up = 2, down = 4 }

-- ------------------------------------------------------------------ small helpers

-- Scenario errors carry no position: they name the field, and a scenario is often
-- built far from where it is checked (a sweep, a command line).
local function bad(field, msg)
  error(format("experiment: field '%s' %s", field, msg), 0)
end

local function is_int(v) return type(v) == "number" and v == floor(v) end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

local function now()
  local f = lm().now
  if f then return f() end
  error("experiment: loramoe.now() is missing; it is the monotonic clock timings need", 2)
end
experiment.now = function() return now() end

local function median(t)
  local s = {}
  for i = 1, #t do s[i] = t[i] end
  table.sort(s)
  local n = #s
  if n == 0 then return 0 / 0 end
  if n % 2 == 1 then return s[(n + 1) / 2] end
  return (s[n / 2] + s[n / 2 + 1]) / 2
end
experiment.median = median

local function minmax(t)
  local lo, hi = huge, -huge
  for i = 1, #t do
    if t[i] < lo then lo = t[i] end
    if t[i] > hi then hi = t[i] end
  end
  return lo, hi
end

-- "gate,up" / {"gate","up"} / "all" / mask -> mask, list, text
local function parse_targets(v)
  local mask = 0
  if v == "all" or v == nil then
    mask = 7
  elseif type(v) == "number" then
    mask = v
  elseif type(v) == "string" then
    for w in v:gmatch("[^,%s]+") do
      if not target_bits[w] then bad("targets", "has '" .. w .. "'; expected gate, up, down or all") end
      mask = mask + ((floor(mask / target_bits[w]) % 2 == 0) and target_bits[w] or 0)
    end
  elseif type(v) == "table" then
    for _, w in ipairs(v) do
      if not target_bits[w] then bad("targets", "has '" .. tostring(w) .. "'; expected gate, up or down") end
      mask = mask + ((floor(mask / target_bits[w]) % 2 == 0) and target_bits[w] or 0)
    end
  else
    bad("targets", "must be 'all', a list or a comma-separated string")
  end
  if mask < 1 or mask > 7 or not is_int(mask) then bad("targets", "selects nothing") end
  local list = {}
  for _, w in ipairs({ "gate", "up", "down" }) do
    if floor(mask / target_bits[w]) % 2 == 1 then list[#list + 1] = w end
  end
  return mask, list, concat(list, "+")
end
experiment.parse_targets = parse_targets

-- ------------------------------------------------------------------ scenarios

-- experiment.scenario(t) -> a new table with every field filled and checked.
function experiment.scenario(t)
  if type(t) ~= "table" then error("experiment.scenario: expects a table", 2) end
  for k in pairs(t) do
    if experiment.defaults[k] == nil then
      error(format("experiment: unknown field '%s' (see docs/experiments.md)", tostring(k)), 0)
    end
  end
  local s = {}
  for k, v in pairs(experiment.defaults) do
    local given = t[k]
    if given == nil then s[k] = v else s[k] = given end
  end
  -- Shapes: the preset's, overridden by explicit fields.
  if s.preset then
    local p = (lm_module and lm_module.presets and lm_module.presets[s.preset]) or experiment.presets[s.preset]
    if not p then
      local names = {}
      for n in pairs(experiment.presets) do names[#names + 1] = n end
      table.sort(names)
      bad("preset", format("'%s' is unknown (known: %s)", tostring(s.preset), concat(names, ", ")))
    end
    local fallback = experiment.presets[s.preset] or {}
    for _, f in ipairs({ "experts", "hidden", "intermediate", "top_k", "layers" }) do
      if not s[f] then s[f] = p[f] or fallback[f] end
    end
  end
  for _, f in ipairs({ "experts", "hidden", "intermediate", "top_k" }) do
    if not is_int(s[f]) or s[f] < 1 then bad(f, "must be a positive integer (or give a preset)") end
  end
  if s.top_k > s.experts then bad("top_k", "must be at most experts") end
  s.layers = s.layers or 1
  if not is_int(s.layers) or s.layers < 1 then bad("layers", "must be a positive integer") end
  if s.distinct_layers then
    if not is_int(s.distinct_layers) or s.distinct_layers < 1 then
      bad("distinct_layers", "must be a positive integer")
    end
    s.distinct_layers = min(s.distinct_layers, s.layers)
  end
  -- Requests.
  if s.request_tokens then
    if type(s.request_tokens) ~= "table" or #s.request_tokens == 0 then
      bad("request_tokens", "must be a non-empty list of token counts")
    end
    local total = 0
    for i, n in ipairs(s.request_tokens) do
      if not is_int(n) or n < 0 then bad("request_tokens", "entry " .. i .. " must be an integer >= 0") end
      total = total + n
    end
    s.requests, s.tokens = #s.request_tokens, total
  end
  if not is_int(s.tokens) or s.tokens < 1 then bad("tokens", "must be a positive integer") end
  if not is_int(s.requests) or s.requests < 1 then bad("requests", "must be a positive integer") end
  if not is_int(s.adapters) or s.adapters < 0 then bad("adapters", "must be an integer >= 0") end
  if type(s.adapter_fraction) ~= "number" or s.adapter_fraction < 0 or s.adapter_fraction > 1 then
    bad("adapter_fraction", "must be a number in 0..1")
  end
  if s.ranks then
    if type(s.ranks) ~= "table" or #s.ranks == 0 then bad("ranks", "must be a non-empty list") end
    for i, r in ipairs(s.ranks) do
      if not is_int(r) or r < 1 then bad("ranks", "entry " .. i .. " must be a positive integer") end
    end
  end
  if not is_int(s.rank) or s.rank < 1 then bad("rank", "must be a positive integer") end
  s.target_mask, s.target_list, s.target_text = parse_targets(s.targets)
  if not guard_names[s.guard] then bad("guard", "must be host, device_sync or always") end
  if s.weight_dtype ~= "bf16" and s.weight_dtype ~= "f8_e4m3" then bad("weight_dtype", "must be bf16 or f8_e4m3") end
  if s.mode ~= "eager" and s.mode ~= "graph" then bad("mode", "must be 'eager' or 'graph'") end
  if s.mode == "graph" and s.guard == "device_sync" then
    bad("mode", "'graph' cannot be used with guard device_sync: its forward waits for the device, " ..
        "which a CUDA graph cannot capture")
  end
  if not is_int(s.warmup) or s.warmup < 0 then bad("warmup", "must be an integer >= 0") end
  if not is_int(s.reps) or s.reps < 1 then bad("reps", "must be an integer >= 1") end
  if not is_int(s.pipeline) or s.pipeline < 1 then bad("pipeline", "must be an integer >= 1") end
  if not is_int(s.seed) or s.seed < 0 then bad("seed", "must be an integer >= 0") end
  return s
end

-- The adapter slot of each request (-1: none) and tokens per request. Requests with an
-- adapter are spread evenly through the batch (not bunched at the front), and take the
-- adapters in turn, so every adapter gets a fair share of tokens.
function experiment.requests(s)
  local n = s.requests
  local tokens = {}
  if s.request_tokens then
    for i = 1, n do tokens[i] = s.request_tokens[i] end
  else
    local base, extra = floor(s.tokens / n), s.tokens % n
    for i = 1, n do tokens[i] = base + ((i <= extra) and 1 or 0) end
  end
  local with = (s.adapters > 0) and floor(s.adapter_fraction * n + 0.5) or 0
  local reqs, k = {}, 0
  for i = 1, n do
    -- request i has an adapter when the running share floor(i*with/n) steps up
    local has = floor(i * with / n) > floor((i - 1) * with / n)
    local slot
    if has then
      slot = k % s.adapters
      k = k + 1
    end
    reqs[i] = { tokens = tokens[i], adapter = slot }
  end
  return reqs, with
end

local function rank_of(s, slot) -- slot is 0-based
  if s.ranks then return s.ranks[slot % #s.ranks + 1] end
  return s.rank
end

-- ------------------------------------------------------------------ cost model

-- LoRA FLOPs for one (token, expert) pair of an adapter of rank r.
local function lora_pair_flops(s, r)
  local H, I = s.hidden, s.intermediate
  local f = 0
  local gate, up, down = s.target_mask % 2 == 1, floor(s.target_mask / 2) % 2 == 1, s.target_mask >= 4
  if s.fused and (gate or up) then
    f = f + 2 * r * (H + 2 * I)
  else
    if gate then f = f + 2 * r * (H + I) end
    if up then f = f + 2 * r * (H + I) end
  end
  if down then f = f + 2 * r * (I + H) end
  return f
end

-- Bytes of one adapter for one expert (bf16).
local function lora_expert_bytes(s, r)
  local H, I = s.hidden, s.intermediate
  local e = 0
  local gate, up, down = s.target_mask % 2 == 1, floor(s.target_mask / 2) % 2 == 1, s.target_mask >= 4
  if s.fused and (gate or up) then
    e = e + r * H + 2 * I * r
  else
    if gate then e = e + r * H + I * r end
    if up then e = e + r * H + I * r end
  end
  if down then e = e + r * I + H * r end
  return 2 * e
end

-- experiment.cost(s) -> {flops, lora_flops, bytes} for one layer (PERFORMANCE.md's
-- floor: every hit expert's weights once, x in, out, the active adapters once). The
-- number of experts hit is its expectation under uniform routing, E(1 - (1 - k/E)^M),
-- which is E at the M of the reference table.
function experiment.cost(s)
  s = s.target_mask and s or experiment.scenario(s)
  local E, H, I, k, M = s.experts, s.hidden, s.intermediate, s.top_k, s.tokens
  local reqs = experiment.requests(s)
  local base = M * k * 6 * H * I
  local lora, active = 0, {}
  for _, r in ipairs(reqs) do
    if r.adapter then
      lora = lora + r.tokens * k * lora_pair_flops(s, rank_of(s, r.adapter))
      active[r.adapter] = true
    end
  end
  local hit = E * (1 - (1 - k / E) ^ M)
  local bytes = hit * 3 * H * I * 2 + 2 * M * H * 2
  for slot in pairs(active) do bytes = bytes + hit * lora_expert_bytes(s, rank_of(s, slot)) end
  return { flops = base + lora, lora_flops = lora, base_flops = base, bytes = bytes, experts_hit = hit }
end

local function peak_for(s, device_name)
  if s.peak then return s.peak end
  if not device_name then return nil end
  for _, p in ipairs(experiment.peaks) do
    if device_name:find(p.match, 1, true) then return p end
  end
  return nil
end

-- ------------------------------------------------------------------ progress

-- Progress goes to stderr with "\r" updates when stderr is a terminal. Plain Lua
-- cannot ask isatty(), so: LORAMOE_PROGRESS=1/0 decides when set; otherwise
-- loramoe.isatty(2) when the binding has it; otherwise the shell's `test -t 2` (the
-- shell inherits our stderr); otherwise (no shell) off.
local progress_cached
function experiment.progress_enabled()
  local env = os.getenv("LORAMOE_PROGRESS")
  if env == "1" then return true end
  if env == "0" then return false end
  if progress_cached == nil then
    local m = lm_module
    if m and m.isatty then
      progress_cached = m.isatty(2) and true or false
    else
      local ok, r = pcall(os.execute, "test -t 2")
      progress_cached = ok and (r == true or r == 0) or false
    end
  end
  return progress_cached
end

-- A progress line writer: p(text) rewrites the line, p() clears it. When disabled,
-- a function that does nothing.
function experiment.progress(enabled, stream)
  if enabled == nil then enabled = experiment.progress_enabled() end
  if not enabled then return function() end end
  stream = stream or io.stderr
  local last_len, last_t = 0, -huge
  return function(text, force)
    if text == nil then
      if last_len > 0 then stream:write("\r", string.rep(" ", last_len), "\r") end
      last_len = 0
      stream:flush()
      return
    end
    local t = os.clock()
    if not force and t - last_t < 0.05 then return end -- ~20 updates/s at most
    last_t = t
    local pad = max(0, last_len - #text)
    stream:write("\r", text, string.rep(" ", pad))
    stream:flush()
    last_len = #text
  end
end

-- ------------------------------------------------------------------ the rig

-- A rig holds what a run builds (context, layers, pools, buffers) so that a sweep
-- reuses it: new weights only when the shapes change, new adapters only when a slot's
-- adapter changes. rig:close() frees everything (device memory is not seen by the GC).
local Rig = {}
Rig.__index = Rig

function experiment.rig()
  return setmetatable({ contexts = {}, stack = nil, acts = nil }, Rig)
end

local function check(v, err, what)
  if v == nil or v == false then
    error(format("experiment: %s failed: %s", what or "a loramoe call", tostring(err)), 0)
  end
  return v
end

local function close(obj)
  if obj and obj.close then obj:close() end
end

function Rig:context(s)
  local key = format("%s/%d/%d", s.backend, s.device, s.threads)
  local c = self.contexts[key]
  if not c then
    local ctx, err = lm().context { backend = s.backend, device = s.device, threads = s.threads }
    check(ctx, err, "creating a " .. s.backend .. " context")
    c = { ctx = ctx, backend = ctx.backend }
    if c.backend == "cuda" then
      local info = lm().device_info(s.device)
      c.device_name = info and info.name or "cuda device"
      c.device_memory = info and info.memory_bytes
    else
      c.device_name = "cpu"
    end
    self.contexts[key] = c
  end
  return c
end

-- Distinct weight sets: what the scenario asks, else all layers on the CPU and on
-- the GPU as many as fit in a third of its memory, at most 8 (each set of a real
-- preset is far larger than the L2, so repeating sets does not flatter the timing).
local function distinct_for(s, c)
  if s.distinct_layers then return s.distinct_layers end
  if c.backend ~= "cuda" then return s.layers end
  local per = 3 * s.experts * s.hidden * s.intermediate * 2
  local fit = c.device_memory and floor(c.device_memory / 3 / per) or 1
  return max(1, min(s.layers, 8, fit))
end

function Rig:release_stack()
  local st = self.stack
  if not st then return end
  for _, d in ipairs(st.sets) do
    close(d.pool)
    close(d.layer)
  end
  self.stack = nil
end

function Rig:release_acts()
  local a = self.acts
  if not a then return end
  for _, d in ipairs(a.x) do close(d) end
  for _, d in ipairs(a.logits) do close(d) end
  close(a.out[1]); close(a.out[2])
  self.acts = nil
end

-- Layers, pools and adapters for scenario s.
function Rig:prepare(s, c)
  local nd = distinct_for(s, c)
  local max_tokens = max(s.max_tokens or 0, s.tokens)
  local shape_key = format("%s|%d,%d,%d,%d,%s|%d|%d|%d|%s|%s", tostring(c.ctx), s.experts, s.hidden,
    s.intermediate, s.top_k, tostring(s.renormalize), nd, s.seed, max_tokens, tostring(s.weight_scale),
    s.weight_dtype)
  if self.stack and self.stack.key ~= shape_key then
    self:release_acts()
    self:release_stack()
  end
  if not self.stack then
    local st = { key = shape_key, sets = {} }
    local scale = s.weight_scale or 1 / math.sqrt(s.hidden)
    for i = 1, nd do
      local layer, err = c.ctx:layer { experts = s.experts, hidden = s.hidden,
        intermediate = s.intermediate, top_k = s.top_k, renormalize = s.renormalize,
        max_tokens = max_tokens, weight_dtype = s.weight_dtype }
      check(layer, err, "creating layer " .. i)
      check(layer:randomize(s.seed * 1000 + i, scale))
      st.sets[i] = { layer = layer, loaded = {} }
    end
    self.stack = st
  end
  local st = self.stack
  st.distinct = nd
  -- Pools: sized by the sweep's largest rank and adapter count, so a sweep over ranks
  -- reloads slots instead of rebuilding pools.
  local need_rank = s.pool_rank or 0
  if s.ranks then
    for _, r in ipairs(s.ranks) do need_rank = max(need_rank, r) end
  else
    need_rank = max(need_rank, s.rank)
  end
  local need_slots = max(s.pool_slots or 0, s.adapters, 1)
  for li, d in ipairs(st.sets) do
    if d.pool and (d.pool_rank < need_rank or d.pool_slots < need_slots) then
      close(d.pool)
      d.pool, d.loaded = nil, {}
    end
    if not d.pool then
      local pool, err = d.layer:pool { slots = need_slots, max_rank = need_rank }
      d.pool = check(pool, err, "creating an adapter pool")
      d.pool_rank, d.pool_slots = need_rank, need_slots
    end
    for slot = 0, s.adapters - 1 do
      local r = rank_of(s, slot)
      local spec = { rank = r, alpha = s.alpha or 2 * r, targets = s.target_list, fused = s.fused,
                     rslora = s.rslora, seed = s.seed * 100000 + li * 100 + slot,
                     scale = s.adapter_scale }
      local key = format("%d|%s|%s|%s|%s|%d|%s", r, tostring(spec.alpha), s.target_text,
        tostring(s.fused), tostring(s.rslora), spec.seed, tostring(spec.scale))
      if d.loaded[slot] ~= key then
        check(d.pool:load_random(slot, spec))
        d.loaded[slot] = key
      end
    end
  end
  -- Activations: one x and one set of router logits per weight set (inputs of the
  -- right shape; a model's attention, residual and norm between MoE layers are not
  -- part of this library), and two outputs the stack alternates between.
  if self.acts and self.acts.M ~= s.tokens then self:release_acts() end
  if not self.acts then
    local M = s.tokens
    local a = { M = M, x = {}, logits = {}, out = {} }
    for i = 1, nd do
      a.x[i] = check(c.ctx:buffer("bf16", { M, s.hidden }))
      check(a.x[i]:fill_random(s.seed * 7919 + i, -1, 1))
      a.logits[i] = check(c.ctx:buffer("f32", { M, s.experts }))
      check(a.logits[i]:fill_random(s.seed * 104729 + i, -4, 4))
    end
    a.out[1] = check(c.ctx:buffer("bf16", { M, s.hidden }))
    a.out[2] = check(c.ctx:buffer("bf16", { M, s.hidden }))
    self.acts = a
  end
  if not self.batch or self.batch_ctx ~= c.ctx then
    close(self.batch)
    for _, b in ipairs(self.more_batches or {}) do close(b) end
    self.batch = check(c.ctx:batch())
    self.more_batches = {}
    self.batch_ctx = c.ctx
  end
  return st, self.acts
end

-- n batch objects of the current context: the rig's batch and n - 1 more (kept).
function Rig:batches(n)
  local list = { self.batch }
  for i = 2, n do
    self.more_batches[i - 1] = self.more_batches[i - 1] or check(self.batch_ctx:batch())
    list[i] = self.more_batches[i - 1]
  end
  return list
end

function Rig:close()
  self:release_acts()
  self:release_stack()
  close(self.batch)
  for _, b in ipairs(self.more_batches or {}) do close(b) end
  self.batch, self.more_batches = nil, nil
  for k, c in pairs(self.contexts) do
    close(c.ctx)
    self.contexts[k] = nil
  end
end

-- ------------------------------------------------------------------ run

local function default_name(s)
  local parts = { s.preset or format("E%d H%d I%d k%d", s.experts, s.hidden, s.intermediate, s.top_k) }
  parts[#parts + 1] = "M=" .. s.tokens
  parts[#parts + 1] = s.guard
  return concat(parts, " ")
end

-- experiment.run(scenario [, opts]) -> result table (see docs/experiments.md).
-- opts: rig = a rig to reuse (else one is made and closed), progress = a writer from
-- experiment.progress() or false, label = prefix for progress lines.
function experiment.run(t, opts)
  opts = opts or {}
  local s = t.target_mask and t or experiment.scenario(t)
  local own_rig = not opts.rig
  local rig = opts.rig or experiment.rig()
  local progress = opts.progress
  if progress == nil then progress = experiment.progress() end
  if progress == false then progress = function() end end
  local label = opts.label or ""

  local ok, result = pcall(function()
    local c = rig:context(s)
    local ctx = c.ctx
    local st, acts = rig:prepare(s, c)
    check(ctx:set_guard(s.guard))
    local reqs, with = experiment.requests(s)
    local first_pool = st.sets[1].pool
    local L, nd = s.layers, st.distinct
    local total = s.warmup + s.reps
    local depth = s.pipeline
    -- Graph mode keeps one batch (and one graph) per forward in flight: a set once
    -- waited for the pending replay that read the batch's staging. Since the set of a
    -- captured batch enqueues its upload behind the replays, one batch would do
    -- (docs/design.md, "The CUDA backend"); the figures measured this way are kept.
    -- Eager forwards of up to 400 requests take their batch as kernel parameters.
    local batches = rig:batches(s.mode == "graph" and depth or 1)
    local nb = #batches
    -- One forward argument table per layer and batch, built once: the loop below is
    -- what a serving engine does per step (build the batch, enqueue every layer).
    local fargs = {}
    for b = 1, nb do
      fargs[b] = {}
      for l = 1, L do
        local d = (l - 1) % nd + 1
        fargs[b][l] = { pool = st.sets[d].pool, batch = batches[b], x = acts.x[d], logits = acts.logits[d],
                        out = acts.out[(l - 1) % 2 + 1] }
      end
    end
    local layers = {}
    for l = 1, L do layers[l] = st.sets[(l - 1) % nd + 1].layer end

    -- mode "graph": one eager forward of the stack (kernels loaded, storage grown),
    -- then the stack captured into a CUDA graph per batch; every repetition below
    -- replays one after setting its batch (the replay reads the batch as set).
    local graphs
    if s.mode == "graph" then
      if c.backend ~= "cuda" then
        error("experiment: mode 'graph' needs the cuda backend (CUDA graphs); this scenario runs " ..
              "on the " .. c.backend .. " backend: use mode = 'eager'", 0)
      end
      graphs = {}
      for b = 1, nb do
        check(batches[b]:set(first_pool, reqs))
        for l = 1, L do check(layers[l]:forward(fargs[b][l])) end
        check(ctx:synchronize())
        check(ctx:graph_begin())
        local ok_fwd, err_fwd = true, nil
        for l = 1, L do
          local ok, msg = layers[l]:forward(fargs[b][l])
          if not ok then ok_fwd, err_fwd = false, msg break end
        end
        local g, msg = ctx:graph_end()
        if not ok_fwd then error("experiment: capturing the stack: " .. tostring(err_fwd), 0) end
        graphs[b] = check(g, msg, "capturing the stack into a CUDA graph")
      end
    end
    local function enqueue(b)
      if graphs then
        check(graphs[b]:launch())
      else
        for l = 1, L do check(layers[l]:forward(fargs[b][l])) end
      end
    end

    local times, host, batch_t, enq = {}, {}, {}, {}
    local counters0
    for rep = 1, total do
      if rep == s.warmup + 1 then
        check(ctx:synchronize())
        ctx:reset_counters()
      end
      -- `pipeline` forwards back to back, then one synchronize: with depth 1 each
      -- forward is timed alone; deeper, the host enqueues the next forward while the
      -- device still runs the last, as a serving loop does.
      local t0 = now()
      local tb, te = 0, 0
      for i = 1, depth do
        local k = (i - 1) % nb + 1
        local a = now()
        check(batches[k]:set(first_pool, reqs))
        local b = now()
        enqueue(k)
        local e = now()
        tb, te = tb + (b - a), te + (e - b)
      end
      local t2 = now()
      check(ctx:synchronize())
      local t3 = now()
      if rep > s.warmup then
        local i = rep - s.warmup
        times[i] = (t3 - t0) * 1e3 / depth
        host[i] = (t2 - t0) * 1e6 / depth
        batch_t[i] = tb * 1e6 / depth
        enq[i] = te * 1e6 / depth
      end
      progress(format("%s%s rep %d/%d", label, rep <= s.warmup and " warm-up" or "", rep, total))
    end
    counters0 = check(ctx:counters())
    for _, g in ipairs(graphs or {}) do g:close() end

    local r = {}
    r.name = s.name or default_name(s)
    for _, f in ipairs({ "backend", "preset", "experts", "hidden", "intermediate", "top_k", "layers",
                         "tokens", "requests", "adapters", "adapter_fraction", "rank", "fused",
                         "guard", "mode", "warmup", "reps", "seed", "rslora" }) do
      r[f] = s[f]
    end
    r.backend = c.backend
    r.device = c.device_name
    r.preset = s.preset or ""
    r.ranks = s.ranks and concat(s.ranks, ",") or tostring(s.rank)
    r.targets = s.target_text
    r.distinct_layers = nd
    r.requests_with_adapter = with
    r.threads = ctx.threads
    r.times_ms = times
    r.time_ms = median(times)
    r.time_ms_min, r.time_ms_max = minmax(times)
    r.layer_ms = r.time_ms / L
    r.host_us = median(host)
    r.batch_us = median(batch_t)
    r.enqueue_us = median(enq)
    r.enqueue_us_per_layer = r.enqueue_us / L
    -- Our own synchronize after each rep is a host wait too; it is not the forward's.
    local nf = s.reps * depth
    r.pipeline = depth
    r.syncs_per_forward = (counters0.host_waits - s.reps) / nf
    r.launches_per_forward = counters0.launches / nf
    r.lora_launches_per_forward = counters0.lora_launches / nf
    r.uploads_per_forward = counters0.uploads / nf
    r.downloads_per_forward = counters0.downloads / nf
    -- Share of the forward's time the host thread spent inside loramoe calls (building
    -- the batch, enqueuing, and any waits those made): what it could not spend on
    -- other work, such as preparing the next batch.
    r.host_busy_pct = 100 * r.host_us * 1e-3 / r.time_ms
    r.tokens_per_s = s.tokens / (r.time_ms * 1e-3)
    local cost = experiment.cost(s)
    r.gflop = cost.flops * L * 1e-9
    r.lora_gflop = cost.lora_flops * L * 1e-9
    r.gbytes = cost.bytes * L * 1e-9
    local rate = cost.flops * L / (r.time_ms * 1e-3)
    r.gflops = rate * 1e-9
    r.tflops = rate * 1e-12
    local peak = c.backend == "cuda" and peak_for(s, c.device_name) or nil
    if peak then
      local tc, tm = cost.flops / peak.flops, cost.bytes / peak.bytes
      r.floor_ms = max(tc, tm) * L * 1e3
      r.floor_bound = tc >= tm and "compute" or "memory"
      r.pct_floor = 100 * r.floor_ms / r.time_ms
      r.peak_tflops = peak.flops * 1e-12
      r.peak_tbps = peak.bytes * 1e-12
    end
    return r
  end)
  progress()
  if own_rig then rig:close() end
  if not ok then error(result, 0) end
  return result
end

-- ------------------------------------------------------------------ sweeps

-- Axes as an ordered list {{field, values}, ...} (the first varies slowest) or as a
-- map {field = values} (fields in sorted order). Returns a list of {field=value}.
function experiment.points(axes)
  local list = {}
  if axes[1] ~= nil or next(axes) == nil then
    for i, a in ipairs(axes) do
      if type(a) ~= "table" or type(a[1]) ~= "string" or type(a[2]) ~= "table" then
        error("experiment: axis " .. i .. " must be {field, {values...}}", 3)
      end
      list[i] = a
    end
  else
    local keys = {}
    for k in pairs(axes) do keys[#keys + 1] = k end
    table.sort(keys)
    for i, k in ipairs(keys) do
      local v = axes[k]
      if type(v) ~= "table" then v = { v } end
      list[i] = { k, v }
    end
  end
  for _, a in ipairs(list) do
    if experiment.defaults[a[1]] == nil then
      error(format("experiment: unknown sweep field '%s' (see docs/experiments.md)", a[1]), 3)
    end
    if #a[2] == 0 then error(format("experiment: sweep field '%s' has no values", a[1]), 3) end
  end
  local points = { {} }
  for _, a in ipairs(list) do
    local nextp = {}
    for _, p in ipairs(points) do
      for _, v in ipairs(a[2]) do
        local q = copy(p)
        q[a[1]] = v
        nextp[#nextp + 1] = q
      end
    end
    points = nextp
  end
  return points, list
end

-- experiment.sweep(base, axes [, opts]) -> list of results, in the order of the
-- cartesian product. opts as for run, plus on_result = function(result, i, n).
function experiment.sweep(base, axes, opts)
  opts = opts or {}
  local points, list = experiment.points(axes)
  local scen = {}
  -- Check every point before running any (a typo in the last value fails at once),
  -- and find the bounds that let one set of layers and pools serve the whole sweep.
  local bound_tokens, bound_rank, bound_slots = {}, {}, {}
  local function shape_key(s)
    return format("%d,%d,%d,%d", s.experts, s.hidden, s.intermediate, s.top_k)
  end
  for i, p in ipairs(points) do
    local t = copy(base)
    for k, v in pairs(p) do t[k] = v end
    local ok, s = pcall(experiment.scenario, t)
    if not ok then error(s, 2) end
    scen[i] = s
    local k = shape_key(s)
    bound_tokens[k] = max(bound_tokens[k] or 0, s.tokens)
    local r = s.rank
    if s.ranks then for _, x in ipairs(s.ranks) do r = max(r, x) end end
    bound_rank[k] = max(bound_rank[k] or 0, r)
    bound_slots[k] = max(bound_slots[k] or 0, s.adapters)
  end
  local own_rig = not opts.rig
  local rig = opts.rig or experiment.rig()
  local progress = opts.progress
  if progress == nil then progress = experiment.progress() end
  if progress == false then progress = function() end end
  local results = {}
  local ok, err = pcall(function()
    for i, s in ipairs(scen) do
      local k = shape_key(s)
      s.max_tokens = s.max_tokens or bound_tokens[k]
      s.pool_rank = s.pool_rank or bound_rank[k]
      s.pool_slots = s.pool_slots or bound_slots[k]
      local desc = {}
      for _, a in ipairs(list) do
        local v = s[a[1]]
        if type(v) == "table" then v = concat(v, ",") end
        desc[#desc + 1] = a[1] .. "=" .. tostring(v)
      end
      local label = format("[%d/%d] %s", i, #scen, concat(desc, " "))
      if not s.name then s.name = concat(desc, " ") end
      local r = experiment.run(s, { rig = rig, progress = progress, label = label })
      for _, a in ipairs(list) do
        if r[a[1]] == nil then
          local v = s[a[1]]
          r[a[1]] = type(v) == "table" and concat(v, ",") or v
        end
      end
      results[i] = r
      if opts.on_result then opts.on_result(r, i, #scen) end
    end
  end)
  progress()
  if own_rig then rig:close() end
  if not ok then error(err, 0) end
  return results
end

-- ------------------------------------------------------------------ scripts

-- experiment.args(arg) -> table of overrides from "field=value" command-line words
-- (numbers become numbers, "a,b" a list, true/false booleans), plus positional words
-- in the array part. Lets every example take `backend=cuda reps=50 out=dir`.
function experiment.args(argv)
  local o = {}
  for _, w in ipairs(argv or {}) do
    local k, v = w:match("^%-*([%w_]+)=(.*)$")
    if k then
      local function conv(x)
        if x == "true" then return true end
        if x == "false" then return false end
        return tonumber(x) or x
      end
      if v:find(",", 1, true) then
        local list = {}
        for item in v:gmatch("[^,]+") do list[#list + 1] = conv(item) end
        o[k] = list
      else
        o[k] = conv(v)
      end
    else
      o[#o + 1] = w
    end
  end
  return o
end

-- Which backend a script should use: `backend=` from the command line, else cuda
-- when this build has it and a device is present, else cpu.
function experiment.pick_backend(o)
  if o and o.backend and o.backend ~= "auto" then return o.backend end
  local m = lm()
  if m.has_cuda and m.has_cuda() then
    local n = m.device_count and m.device_count()
    if n and n > 0 then return "cuda" end
  end
  return "cpu"
end

-- experiment.setup(argv, {cpu = {...}, cuda = {...}, out = "out/x", sweep = {"field", ...}})
-- -> base scenario, output directory, swept overrides. The base is the backend's
-- defaults with every `field=value` word of the command line applied, except `out=`,
-- `backend=` and the fields named in `sweep`, which come back in the third result
-- (a script uses them to replace its sweep's values).
function experiment.setup(argv, cfg)
  local o = experiment.args(argv)
  local backend = experiment.pick_backend(o)
  local base = copy((backend == "cuda" and cfg.cuda or cfg.cpu) or {})
  base.backend = backend
  local sweep = {}
  for _, f in ipairs(cfg.sweep or {}) do sweep[f] = true end
  local swept = {}
  for k, v in pairs(o) do
    if type(k) == "string" and k ~= "out" and k ~= "backend" then
      if sweep[k] then
        swept[k] = type(v) == "table" and v or { v }
      else
        base[k] = v
      end
    end
  end
  return base, o.out or cfg.out or "out", swept
end

-- Columns most tables want first; report.columns adds the rest.
experiment.columns = {
  "name", "backend", "device", "preset", "layers", "distinct_layers", "tokens", "requests",
  "requests_with_adapter", "adapters", "ranks", "targets", "guard", "time_ms", "time_ms_min",
  "time_ms_max", "layer_ms", "host_us", "batch_us", "enqueue_us", "syncs_per_forward",
  "launches_per_forward", "tokens_per_s", "gflop", "gflops", "tflops", "floor_ms", "pct_floor",
}

-- experiment.save(dir, stem, results [, meta]) writes dir/stem.json (meta + results,
-- per-rep times included) and dir/stem.csv; returns the two paths.
function experiment.save(dir, stem, results, meta)
  local report = require "loramoe.report"
  check(report.mkdir(dir))
  local m = lm_module
  local doc = {
    meta = meta or report.object(),
    loramoe_version = m and m.version and m.version() or "",
    runtime = m and m.runtime or (jit and "luajit" or _VERSION),
    results = results,
  }
  local jp, cp = dir .. "/" .. stem .. ".json", dir .. "/" .. stem .. ".csv"
  check(report.write_json(jp, doc))
  check(report.write_csv(cp, results, report.columns(results, experiment.columns)))
  return jp, cp
end

return experiment
