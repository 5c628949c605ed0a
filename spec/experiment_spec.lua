-- loramoe.experiment, loramoe.report and loramoe.svg on the CPU with the tiny preset.
-- Runs under lua5.4 (C module) and luajit (FFI binding) alike; a second or two.

local exp = require "loramoe.experiment"
local report = require "loramoe.report"
local svg = require "loramoe.svg"
local json = require "dkjson"

local tmpdir = dofile("spec/helpers.lua").tmpname()
os.remove(tmpdir)
assert(report.mkdir(tmpdir))

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

-- Tiny, fast, and still a stack: 2 layers so per-layer counts show.
local base = { backend = "cpu", threads = 2, preset = "tiny", layers = 2, tokens = 48, requests = 6,
               adapters = 3, rank = 8, warmup = 1, reps = 2 }
local function with(t)
  local s = {}
  for k, v in pairs(base) do s[k] = v end
  for k, v in pairs(t or {}) do s[k] = v end
  return s
end

-- RFC 4180 line splitter (quotes, doubled quotes, commas inside quotes).
local function csv_fields(line)
  local out, i, n = {}, 1, #line
  while true do
    if line:sub(i, i) == '"' then
      local buf, j = {}, i + 1
      while true do
        local c = line:sub(j, j)
        if c == "" then error("unterminated quote in CSV line: " .. line) end
        if c == '"' then
          if line:sub(j + 1, j + 1) == '"' then buf[#buf + 1] = '"'; j = j + 2
          else j = j + 1; break end
        else buf[#buf + 1] = c; j = j + 1 end
      end
      out[#out + 1] = table.concat(buf)
      i = j
    else
      local j = line:find(",", i, true) or (n + 1)
      out[#out + 1] = line:sub(i, j - 1)
      i = j
    end
    if i > n then break end
    assert(line:sub(i, i) == ",", "expected a comma in CSV line: " .. line)
    i = i + 1
    if i > n then out[#out + 1] = ""; break end
  end
  return out
end

-- Well-formed XML for what svg.lua writes: every tag closed in order, attributes quoted,
-- no bare '<' or '&' in text.
local function check_xml(text)
  local stack, pos = {}, 1
  while true do
    local s, e, close, name, attrs, selfclose = text:find("<(/?)([%w:_-]+)(.-)(/?)>", pos)
    if not s then break end
    local between = text:sub(pos, s - 1)
    assert(not between:find("<"), "stray '<' in text")
    assert(not between:find("&[^%a#]"), "bare '&' in text: " .. between)
    if close == "/" then
      assert(table.remove(stack) == name, "mismatched </" .. name .. ">")
    else
      for _, q in attrs:gmatch('%s[%w:_-]+=(["\'])(.-)%1') do
        assert(not q:find("<"), "'<' in an attribute")
      end
      local stripped = attrs:gsub('%s[%w:_-]+=(["\']).-%1', "")
      assert(stripped:match("^%s*$"), "unquoted attribute in <" .. name .. attrs .. ">")
      if selfclose ~= "/" then stack[#stack + 1] = name end
    end
    pos = e + 1
  end
  assert(#stack == 0, "unclosed <" .. tostring(stack[#stack]) .. ">")
  assert(text:match("^%s*<svg"), "does not start with <svg")
end

describe("experiment scenarios", function()
  it("fills defaults and the preset's shapes", function()
    local s = exp.scenario { preset = "tiny" }
    assert.are.equal(256, s.hidden)
    assert.are.equal(16, s.experts)
    assert.are.equal(4, s.layers)
    assert.are.equal("host", s.guard)
    assert.are.equal(7, s.target_mask)
  end)

  it("refuses unknown fields and bad values with clear messages", function()
    assert.has_error(function() exp.scenario { token = 5 } end,
      "experiment: unknown field 'token' (see docs/experiments.md)")
    assert.has_error(function() exp.scenario { guard = "sometimes" } end)
    assert.has_error(function() exp.scenario { preset = "nope" } end)
    assert.has_error(function() exp.scenario { targets = "gate,left" } end)
    assert.has_error(function() exp.scenario { mode = "lazy" } end,
      "experiment: field 'mode' must be 'eager' or 'graph'")
    -- graph mode is a valid scenario, but not with a guard that waits for the device
    assert.are.equal("graph", exp.scenario({ mode = "graph" }).mode)
    local ok, err = pcall(exp.scenario, { mode = "graph", guard = "device_sync" })
    assert.is_false(ok)
    assert.matches("device_sync", err)
  end)

  it("refuses graph mode on the cpu backend, naming the cuda backend", function()
    local ok, err = pcall(exp.run, { backend = "cpu", threads = 2, preset = "tiny", layers = 2,
                                     tokens = 16, mode = "graph", warmup = 0, reps = 1 },
                          { progress = false })
    assert.is_false(ok)
    assert.are.equal("experiment: mode 'graph' needs the cuda backend (CUDA graphs); this scenario " ..
                     "runs on the cpu backend: use mode = 'eager'", err)
  end)

  it("spreads tokens and adapters over the requests", function()
    for _, frac in ipairs({ 0, 0.25, 0.5, 1 }) do
      local s = exp.scenario { preset = "tiny", tokens = 103, requests = 8, adapters = 3, adapter_fraction = frac }
      local reqs, nwith = exp.requests(s)
      local total, count, used = 0, 0, {}
      for _, r in ipairs(reqs) do
        total = total + r.tokens
        if r.adapter then
          count = count + 1
          assert.is_true(r.adapter >= 0 and r.adapter < 3)
          used[r.adapter] = true
        end
      end
      assert.are.equal(103, total)
      assert.are.equal(math.floor(frac * 8 + 0.5), count)
      assert.are.equal(count, nwith)
      if count >= 3 then assert.is_true(used[0] and used[1] and used[2]) end
    end
  end)

  it("counts FLOPs and bytes as PERFORMANCE.md's reference table does", function()
    -- qwen3-30b-a3b, one layer, 4 adapters of rank 16 on every token, M = 512:
    -- 39.8 GFLOP and 1.35 GB in the table.
    local c = exp.cost { preset = "qwen3-30b-a3b", tokens = 512 }
    assert.is_true(math.abs(c.flops / 1e9 - 39.8) < 0.1, c.flops)
    assert.is_true(math.abs(c.bytes / 1e9 - 1.35) < 0.01, c.bytes)
    local n = exp.cost { preset = "qwen3-30b-a3b", tokens = 8192, adapter_fraction = 0 }
    assert.are.equal(0, n.lora_flops)
    assert.is_true(math.abs(n.base_flops / 1e9 - 618.5) < 1, n.base_flops)
  end)

  it("builds the cartesian product of a sweep, first axis slowest", function()
    local pts = exp.points { { "guard", { "host", "always" } }, { "tokens", { 1, 2, 3 } } }
    assert.are.equal(6, #pts)
    assert.are.same({ guard = "host", tokens = 1 }, pts[1])
    assert.are.same({ guard = "host", tokens = 3 }, pts[3])
    assert.are.same({ guard = "always", tokens = 1 }, pts[4])
    local m = exp.points { tokens = { 1, 2 }, adapters = { 1, 2, 4 }, rank = 8 }
    assert.are.equal(6, #m)
    assert.has_error(function() exp.points { { "tokenz", { 1 } } } end)
  end)

  it("parses command-line overrides", function()
    local o = exp.args { "reps=3", "guard=always", "tokens=16,32", "fused=true", "extra" }
    assert.are.equal(3, o.reps)
    assert.are.equal("always", o.guard)
    assert.are.same({ 16, 32 }, o.tokens)
    assert.is_true(o.fused)
    assert.are.equal("extra", o[1])
  end)
end)

describe("experiment runs on the cpu", function()
  local rows

  it("returns the documented fields", function()
    local r = exp.run(with(), { progress = false })
    for _, f in ipairs({ "time_ms", "time_ms_min", "time_ms_max", "layer_ms", "host_us", "batch_us",
                         "enqueue_us", "syncs_per_forward", "launches_per_forward", "tokens_per_s",
                         "gflop", "gflops", "tflops" }) do
      assert.are.equal("number", type(r[f]), f)
      assert.is_true(r[f] == r[f] and r[f] >= 0, f)
    end
    assert.is_true(r.time_ms_min <= r.time_ms and r.time_ms <= r.time_ms_max)
    assert.are.equal(2, #r.times_ms)
    assert.are.equal("cpu", r.backend)
    assert.is_nil(r.floor_ms) -- no floor on the CPU
    assert.are.equal(r.layers, r.distinct_layers)
    assert.is_true(r.launches_per_forward > 0)
  end)

  it("runs FP8 layers (weight_dtype f8_e4m3) and refuses other dtypes", function()
    local r = exp.run(with { weight_dtype = "f8_e4m3" }, { progress = false })
    assert.is_true(r.time_ms > 0 and r.launches_per_forward > 0)
    assert.has_error(function() exp.run(with { weight_dtype = "f16" }, { progress = false }) end)
  end)

  it("sweeps guards and adapter shares; waits per forward follow the guard", function()
    rows = exp.sweep(with(), { { "guard", { "host", "device_sync", "always" } },
                               { "adapter_fraction", { 0, 1 } } }, { progress = false })
    assert.are.equal(6, #rows)
    for _, r in ipairs(rows) do
      if r.guard == "device_sync" then
        assert.are.equal(r.layers, r.syncs_per_forward) -- one wait per layer
      else
        assert.are.equal(0, r.syncs_per_forward)
      end
      if r.guard == "host" and r.adapter_fraction == 0 then
        assert.are.equal(0, r.lora_launches_per_forward) -- no LoRA work is enqueued
      end
      if r.guard == "always" then
        assert.is_true(r.lora_launches_per_forward > 0)
      end
    end
  end)

  it("writes JSON and CSV that read back", function()
    local jp, cp = exp.save(tmpdir, "rows", rows, { purpose = "spec" })
    local doc = assert(json.decode(read(jp)))
    assert.are.equal(#rows, #doc.results)
    assert.are.equal("spec", doc.meta.purpose)
    for i, r in ipairs(rows) do
      assert.are.equal(r.guard, doc.results[i].guard)
      assert.are.equal(r.time_ms, doc.results[i].time_ms) -- numbers round-trip exactly
      assert.are.equal(#r.times_ms, #doc.results[i].times_ms)
    end
    local lines = {}
    for line in read(cp):gmatch("([^\n]*)\n") do lines[#lines + 1] = line end
    assert.are.equal(#rows + 1, #lines)
    local header = csv_fields(lines[1])
    local col = {}
    for i, h in ipairs(header) do col[h] = i end
    assert.truthy(col.time_ms and col.guard and col.syncs_per_forward)
    for i = 2, #lines do
      local f = csv_fields(lines[i])
      assert.are.equal(#header, #f)
      assert.are.equal(rows[i - 1].guard, f[col.guard])
      assert.are.equal(rows[i - 1].time_ms, tonumber(f[col.time_ms]))
    end
  end)

  it("draws well-formed SVG plots", function()
    local series = {}
    for _, g in ipairs({ "host", "device_sync", "always" }) do
      local s = { name = g .. " <&>", x = {}, y = {} }
      for _, r in ipairs(rows) do
        if r.guard == g then s.x[#s.x + 1], s.y[#s.y + 1] = r.adapter_fraction * 100 + 1, r.time_ms end
      end
      series[#series + 1] = s
    end
    local line = svg.line { title = "time & \"quotes\"", xlabel = "x (%)", ylabel = "ms", series = series,
                            logx = true, logy = true, note = "n" }
    check_xml(line)
    assert.truthy(line:find("&lt;&amp;&gt;", 1, true))
    local bars = svg.bars { groups = { "none", "all" }, ylabel = "waits", series = {
      { name = "host", values = { 0, 0 } }, { name = "device_sync", values = { 2, 2 } } } }
    check_xml(bars)
    assert.truthy(svg.write(tmpdir .. "/p.svg", line))
    check_xml(read(tmpdir .. "/p.svg"))
    -- Linear ticks cover the data on 1-2-5 steps.
    local ax = svg.axis({ 0.3, 7.2 }, nil, true)
    assert.are.equal(0, ax.lo)
    assert.is_true(ax.hi >= 7.2 and #ax.ticks >= 3)
  end)
end)

describe("experiment progress", function()
  it("writes \\r updates when enabled and nothing when disabled", function()
    local buf = {}
    local sink = { write = function(self, ...) for _, s in ipairs({ ... }) do buf[#buf + 1] = s end end,
                   flush = function() end }
    local p = exp.progress(true, sink)
    p("step 1", true)
    p("step 2", true)
    p()
    local text = table.concat(buf)
    assert.truthy(text:find("\rstep 1", 1, true))
    assert.truthy(text:find("\rstep 2", 1, true))
    buf = {}
    local q = exp.progress(false, sink)
    q("x", true)
    q()
    assert.are.equal("", table.concat(buf))
  end)

  it("stays silent when stderr is not a terminal", function()
    local lua = os.getenv("LORAMOE_LUA") or (jit and "luajit" or "lua5.4")
    local errfile = tmpdir .. "/stderr.txt"
    local outfile = tmpdir .. "/stdout.txt"
    local code = [[local e = require "loramoe.experiment"; io.write(tostring(e.progress_enabled())); ]] ..
                 [[local p = e.progress(); p("visible?", true); p()]]
    -- LORAMOE_PROGRESS unset: the tty check decides, and stderr is a file.
    -- the child finds the modules where this run does (busted's .busted may have set them)
    local cmd = string.format("env -u LORAMOE_PROGRESS LUA_PATH='%s' LUA_PATH_5_4='%s' LUA_CPATH_5_4='%s' %s -e '%s' >%s 2>%s",
      package.path, package.path, package.cpath, lua, code, outfile, errfile)
    local ok = os.execute(cmd)
    assert.is_true(ok == true or ok == 0)
    assert.are.equal("false", read(outfile))
    assert.are.equal("", read(errfile))
  end)
end)

describe("example scripts", function()
  -- Each example runs from one command; here with the smallest settings, checking that
  -- it exits cleanly and writes JSON that reads back with one row per point.
  local lua = os.getenv("LORAMOE_LUA") or (jit and "luajit" or "lua5.4")
  local cases = {
    { "sync_study", "layers=2 tokens=32 requests=4", 9 },
    { "adapter_fraction", "tokens=32 requests=4 adapter_fraction=0,1", 2 },
    { "rank_sweep", "tokens=32 requests=4 rank=4,8", 4 },
    { "distinct_adapters", "tokens=32 requests=4 adapters=1,2", 2 },
    { "tokens_sweep", "tokens=16,32", 4 },
  }
  for _, c in ipairs(cases) do
    it(c[1] .. ".lua runs and writes its results", function()
      local out = tmpdir .. "/" .. c[1]
      local cmd = string.format("%s examples/%s.lua backend=cpu threads=2 reps=1 warmup=0 %s out=%s >%s/stdout.txt 2>&1",
                                lua, c[1], c[2], out, tmpdir)
      local ok = os.execute(cmd)
      if not (ok == true or ok == 0) then error("failed: " .. cmd .. "\n" .. read(tmpdir .. "/stdout.txt")) end
      local doc = assert(json.decode(read(out .. "/" .. c[1] .. ".json")))
      assert.are.equal(c[3], #doc.results)
      assert.truthy(read(tmpdir .. "/stdout.txt"):find("|", 1, true)) -- a markdown table
    end)
  end
end)
