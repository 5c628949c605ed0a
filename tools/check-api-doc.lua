-- Checks docs/api.md against native/include/loramoe.h, the reference, so the copies in
-- the page cannot drift from it:
--   structs    every `typedef struct` with a body in the header appears in a ```c block
--              of the page, and every one there has the header's fields, in order
--              (types and names; comments, spacing and `int a, b;` shorthand aside);
--   functions  under each function's heading the first code span that names it is its
--              signature as the header declares it (parameter names included);
--   constants  `LMOE_NAME value` in the page's tables has the header's value.
-- Usage: lua tools/check-api-doc.lua [repo root]   (Lua 5.1+, LuaJIT). Prints each
-- difference; exits 1 if there is one.

local root = arg[1] or "."
local function slurp(path)
  local f = assert(io.open(path, "rb"), "check-api-doc: cannot open " .. path)
  local s = f:read("*a")
  f:close()
  return s
end
local header = slurp(root .. "/native/include/loramoe.h")
local doc = slurp(root .. "/docs/api.md")

local problems = {}
local function problem(fmt, ...) problems[#problems + 1] = string.format(fmt, ...) end

local function strip_comments(s)
  s = s:gsub("/%*.-%*/", " ")
  return (s:gsub("//[^\n]*", " "))
end
local function squash(s) -- one space between words, none around punctuation
  s = s:gsub("%s+", " ")
  s = s:gsub(" ?([%*%(%)%[%],;{}]) ?", "%1")
  return (s:gsub("^ ", ""):gsub(" $", ""))
end

-- Splits s at commas outside parentheses and brackets.
local function split_top(s)
  local out, depth, start = {}, 0, 1
  for i = 1, #s do
    local c = s:sub(i, i)
    if c == "(" or c == "[" then depth = depth + 1
    elseif c == ")" or c == "]" then depth = depth - 1
    elseif c == "," and depth == 0 then
      out[#out + 1] = s:sub(start, i - 1)
      start = i + 1
    end
  end
  out[#out + 1] = s:sub(start)
  return out
end

-- The fields of a struct body, one normalized declaration each ("int32_t a, b" gives
-- "int32_t a" and "int32_t b").
local function fields(body)
  local list = {}
  for decl in strip_comments(body):gmatch("[^;]+") do
    decl = squash(decl)
    if decl ~= "" then
      local parts = split_top(decl)
      -- the type is what precedes the first declarator's name
      local first = parts[1]
      local ty = first:match("^(.-[%s%*])%(?%*?[%a_][%w_]*[%[%(]") or first:match("^(.-[%s%*])[%a_][%w_]*$")
      if not ty or #parts == 1 then
        list[#list + 1] = first
      else
        ty = ty:gsub("%*+$", ""):gsub(" $", "")
        list[#list + 1] = first
        for i = 2, #parts do list[#list + 1] = squash(ty .. " " .. parts[i]) end
      end
    end
  end
  return list
end

local function structs_of(text)
  local t, order = {}, {}
  for name, body, name2 in text:gmatch("typedef struct ([%w_]+) (%b{}) ?([%w_]+);") do
    if name == name2 then
      t[name] = fields(body:sub(2, -2))
      order[#order + 1] = name
    end
  end
  return t, order
end

-- header structs
local hs, horder = structs_of(strip_comments(header))

-- page structs: from its ```c blocks only
local ds = {}
for block in doc:gmatch("```c\n(.-)```") do
  local s = structs_of(strip_comments(block))
  for k, v in pairs(s) do
    if ds[k] then problem("%s is copied twice in docs/api.md", k) end
    ds[k] = v
  end
end
for _, name in ipairs(horder) do
  local h, d = hs[name], ds[name]
  if not d then
    problem("struct %s: not copied in a ```c block of docs/api.md", name)
  else
    local n = math.max(#h, #d)
    for i = 1, n do
      if h[i] ~= d[i] then
        problem("struct %s, field %d: header has `%s`, docs/api.md has `%s`", name, i, h[i] or "(nothing)",
          d[i] or "(nothing)")
        break
      end
    end
  end
end
for name in pairs(ds) do
  if not hs[name] then problem("struct %s: in docs/api.md but not in the header", name) end
end

-- header functions: LMOE_API <return type> <name>(<params>);
local funcs, forder = {}, {}
local hc = strip_comments(header):gsub("#[^\n]*", "")
for decl in hc:gmatch("LMOE_API([^;]-%b())%s*;") do
  local sig = squash(decl)
  local name = sig:match("([%a_][%w_]*)%(")
  if name and name:match("^lmoe_") then
    funcs[name] = sig
    forder[#forder + 1] = name
  end
end
if #forder == 0 then problem("found no LMOE_API functions in the header") end

-- page: the section under each heading
local sections = {}
do
  local pos = 1
  local heads = {}
  for s, line in doc:gmatch("()(#+ [^\n]*)") do heads[#heads + 1] = { s = s, line = line } end
  for i, h in ipairs(heads) do
    local stop = heads[i + 1] and heads[i + 1].s - 1 or #doc
    local text = doc:sub(h.s + #h.line, stop)
    for name in h.line:gmatch("lmoe_[%w_]+") do sections[name] = sections[name] or text end
  end
  pos = pos + 1
end
for _, name in ipairs(forder) do
  local text = sections[name]
  if not text then
    problem("%s: no heading in docs/api.md", name)
  else
    local found
    -- code spans outside code blocks (they may wrap lines)
    local plain = text:gsub("```.-```", "")
    for span in plain:gmatch("`([^`]+)`") do
      if span:find(name .. "%s*%(") and span:find("^[%a_][%w_ %*]-[%s%*]" .. name .. "%s*%(") then
        found = squash(span)
        break
      end
    end
    if not found then
      problem("%s: its section in docs/api.md does not begin with its signature in a code span", name)
    elseif found ~= funcs[name] then
      problem("%s: header declares `%s`, docs/api.md says `%s`", name, funcs[name], found)
    end
  end
end

-- constants: `LMOE_NAME` value pairs in the page's enum tables
local values = {}
for name, v in strip_comments(header):gmatch("(LMOE_[%u%d_]+)%s*=%s*(%-?%d+)") do values[name] = tonumber(v) end
local seen = 0
for name, v in doc:gmatch("`(LMOE_[%u%d_]+)`%s+%(?(%-?%d+)%)?") do
  if values[name] then
    seen = seen + 1
    if values[name] ~= tonumber(v) then
      problem("%s: header says %d, docs/api.md says %s", name, values[name], v)
    end
  end
end

if #problems > 0 then
  for _, p in ipairs(problems) do print(p) end
  print(string.format("check-api-doc: docs/api.md differs from loramoe.h in %d place(s)", #problems))
  os.exit(1)
end
print(string.format("check-api-doc: docs/api.md agrees with loramoe.h (%d structs, %d functions, %d constants)",
  #horder, #forder, seen))
