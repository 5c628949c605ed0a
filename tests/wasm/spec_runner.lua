-- Runs spec/*_spec.lua files unchanged where busted itself can't run (busted needs C
-- modules: luafilesystem, lua-term, lua-system). The part of busted the specs use:
-- describe / it / pending, before_each / after_each, setup / teardown (lazy_ and
-- strict_ too), finally, tags in names (#gpu and #slow excluded, as .busted says), and
-- luassert (pure Lua, from Debian's lua-luassert) as the global `assert`.
--
--   loramoe run tests/wasm/spec_runner.lua [--skip=TEXT]... [--exclude-tags=a,b] FILE...
--
-- --skip=TEXT skips the describe blocks and tests whose name contains TEXT.
--
-- Prints one line per test and ends with "N passed, N failed, N skipped"; exits 1 when
-- a test failed.
local luassert = require "luassert"

local exclude = { gpu = true, slow = true }
local files, skips = {}, {}
for i = 1, select("#", ...) do
  local a = select(i, ...)
  local tags = a:match("^%-%-exclude%-tags=(.*)$")
  local skip = a:match("^%-%-skip=(.*)$")
  if skip then
    skips[#skips + 1] = skip
  elseif tags then
    exclude = {}
    for t in tags:gmatch("[^,]+") do exclude[t] = true end
  else
    files[#files + 1] = a
  end
end

local function excluded(name)
  for _, s in ipairs(skips) do
    if name:find(s, 1, true) then return true end
  end
  for tag in name:gmatch("#([%w_%-]+)") do
    if exclude[tag] then return true end
  end
  return false
end

-- The tree of blocks: each describe collects its hooks and children when it runs.
local function new_block(name, parent)
  return { name = name, parent = parent, children = {}, before_each = {}, after_each = {},
           setup = {}, teardown = {} }
end
local current

local function full_name(block, name)
  local parts = { name }
  while block and block.name do
    table.insert(parts, 1, block.name)
    block = block.parent
  end
  return table.concat(parts, " ")
end

local env = setmetatable({}, { __index = _G })
env.assert = luassert
function env.describe(name, fn)
  local b = new_block(name, current)
  b.skip = excluded(name) or (current and current.skip)
  table.insert(current.children, b)
  local saved = current
  current = b
  fn()
  current = saved
end
env.context = env.describe
function env.it(name, fn)
  table.insert(current.children, { test = true, name = name, fn = fn,
                                   skip = current.skip or excluded(name) })
end
env.spec, env.test = env.it, env.it
function env.pending(name)
  table.insert(current.children, { test = true, name = name, pending = true })
end
for _, hook in ipairs { "before_each", "after_each", "setup", "teardown" } do
  env[hook] = function(fn) table.insert(current[hook], fn) end
end
env.lazy_setup, env.strict_setup = env.setup, env.setup
env.lazy_teardown, env.strict_teardown = env.teardown, env.teardown

local finalizers
function env.finally(fn) table.insert(finalizers, fn) end

local passed, failed, skipped = 0, 0, 0
local failures = {}

local function traceback(e)
  return debug.traceback(tostring(e), 2)
end

local function chain(block, acc)
  if block.parent then chain(block.parent, acc) end
  acc[#acc + 1] = block
  return acc
end

local function run_test(block, t)
  local name = full_name(block, t.name)
  if t.pending then
    skipped = skipped + 1
    print("pending  " .. name)
    return
  end
  if t.skip then
    skipped = skipped + 1
    return
  end
  local blocks = chain(block, {})
  finalizers = {}
  local ok, err = true, nil
  for _, b in ipairs(blocks) do
    for _, f in ipairs(b.before_each) do
      if ok then ok, err = xpcall(f, traceback) end
    end
  end
  if ok then ok, err = xpcall(t.fn, traceback) end
  for i = #blocks, 1, -1 do
    for _, f in ipairs(blocks[i].after_each) do
      local ok2, err2 = xpcall(f, traceback)
      if ok and not ok2 then ok, err = ok2, err2 end
    end
  end
  for i = #finalizers, 1, -1 do
    local ok2, err2 = xpcall(finalizers[i], traceback)
    if ok and not ok2 then ok, err = ok2, err2 end
  end
  if ok then
    passed = passed + 1
    print("ok       " .. name)
  else
    failed = failed + 1
    print("FAIL     " .. name)
    failures[#failures + 1] = name .. "\n" .. tostring(err)
  end
end

local function any_runs(block)
  for _, c in ipairs(block.children) do
    if c.test then
      if not c.skip and not c.pending then return true end
    elseif any_runs(c) then
      return true
    end
  end
  return false
end

local function run_block(block)
  local live = any_runs(block)
  local ok, err = true, nil
  if live then
    for _, f in ipairs(block.setup) do
      if ok then ok, err = xpcall(f, traceback) end
    end
  end
  if not ok then
    failed = failed + 1
    failures[#failures + 1] = full_name(block, "(setup)") .. "\n" .. tostring(err)
    print("FAIL     " .. full_name(block, "(setup)"))
    return
  end
  for _, c in ipairs(block.children) do
    if c.test then run_test(block, c) else run_block(c) end
  end
  if live then
    for _, f in ipairs(block.teardown) do
      local ok2, err2 = xpcall(f, traceback)
      if not ok2 then
        failed = failed + 1
        failures[#failures + 1] = full_name(block, "(teardown)") .. "\n" .. tostring(err2)
      end
    end
  end
end

for _, file in ipairs(files) do
  local root = new_block(nil, nil)
  current = root
  local chunk, err = loadfile(file, "t", env)
  local ok
  if chunk then ok, err = xpcall(chunk, traceback) end
  if not chunk or not ok then
    failed = failed + 1
    print("FAIL     " .. file .. " (loading)")
    failures[#failures + 1] = file .. "\n" .. tostring(err)
  else
    run_block(root)
  end
  collectgarbage()
end

for _, f in ipairs(failures) do
  io.stderr:write("\n", f, "\n")
end
print(string.format("%d passed, %d failed, %d skipped", passed, failed, skipped))
if failed > 0 then os.exit(1) end
