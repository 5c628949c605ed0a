-- The malformed-file corpus (tests/corpus, as tests/formats/test_safetensors.c reads
-- it) through the Lua API, from the file and from bytes in memory: each file gives the
-- error its MANIFEST names (and names the file), each valid one opens, each "read" case
-- opens and refuses to read. A trap or an abort would end the run instead.
--
--   loramoe run tests/wasm/corpus.lua tests/corpus
local lm = require "loramoe"
local dir = assert(..., "usage: corpus.lua DIR")
local ctx = lm.assert(lm.context { backend = "cpu", threads = 1 })

local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local passed, failed = 0, 0
local function check(ok, what)
  if ok then
    passed = passed + 1
  else
    failed = failed + 1
    print("FAIL     " .. what)
  end
end

local cases = 0
for line in io.lines(dir .. "/MANIFEST") do
  local file, when, want = line:match("^([^#\t][^\t]*)\t([^\t]+)\t([^\t]+)$")
  if file then
    cases = cases + 1
    local path = dir .. "/" .. file
    local bytes = slurp(path)
    for pass = 1, 2 do
      local how = pass == 1 and "file" or "memory"
      local ok, st, msg = pcall(function()
        if pass == 1 then return ctx:safetensors(path) end
        return ctx:safetensors_string(bytes, file)
      end)
      if not ok then
        check(false, string.format("%s (%s): raised instead of returning an error: %s", file, how, st))
      elseif when == "valid" then
        check(st ~= nil, string.format("%s (%s) should open: %s", file, how, msg))
      elseif when == "open" then
        check(st == nil and type(msg) == "string" and msg:find(want, 1, true) and msg:find(file, 1, true),
              string.format("%s (%s): message %q lacks %q or the file's name", file, how, tostring(msg), want))
      else
        check(st ~= nil, string.format("%s (%s) should open: %s", file, how, msg))
        if st then
          local v, rmsg = st:read(0)
          check(v == nil and type(rmsg) == "string" and rmsg:find(want, 1, true),
                string.format("%s (%s): read gave %s %q, want %q", file, how, tostring(v), tostring(rmsg), want))
        end
      end
      if ok and st then st:close() end
    end
  end
end
check(cases >= 25, string.format("the corpus has %d cases (want >= 25)", cases))
ctx:close()
print(string.format("corpus: %d cases", cases))
print(string.format("%d passed, %d failed", passed, failed))
if failed > 0 then os.exit(1) end
