-- loramoe.report: write experiment results as JSON, CSV and markdown tables.
--
-- Pure Lua, no dependencies, the same under Lua 5.4 and LuaJIT. Output is
-- deterministic (object keys sorted, numbers printed the same way every time) so two
-- runs can be diffed.

local report = {}

local floor, huge = math.floor, math.huge
local concat, sort = table.concat, table.sort
local format = string.format

-- ------------------------------------------------------------------ numbers

local function is_integer(v)
  return v == floor(v) and v > -2^53 and v < 2^53
end

-- JSON has no NaN or infinity: they become null, as most encoders do.
local function number_text(v)
  if v ~= v or v == huge or v == -huge then return "null" end
  if is_integer(v) then return format("%d", v) end
  -- Enough digits to read back the same double; trailing noise is trimmed by %.17g's
  -- shorter sibling when it round-trips.
  local s = format("%.15g", v)
  if tonumber(s) ~= v then s = format("%.17g", v) end
  return s
end
report.number_text = number_text

-- ------------------------------------------------------------------ JSON

local escapes = {
  ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
  ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t",
}
local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return escapes[c] or format("\\u%04x", c:byte())
  end) .. '"'
end

-- A table is a JSON array when its keys are exactly 1..n (an empty table is an array
-- unless it is marked with report.object()).
local object_mark = setmetatable({}, { __mode = "k" })
function report.object(t)
  t = t or {}
  object_mark[t] = true
  return t
end

local function array_length(t)
  if object_mark[t] then return nil end
  local n = 0
  for k in pairs(t) do
    if type(k) ~= "number" or k < 1 or k ~= floor(k) then return nil end
    if k > n then n = k end
  end
  for i = 1, n do
    if t[i] == nil then return nil end
  end
  return n
end

local function encode(v, indent, depth, out, seen)
  local tv = type(v)
  if tv == "nil" then
    out[#out + 1] = "null"
  elseif tv == "boolean" then
    out[#out + 1] = v and "true" or "false"
  elseif tv == "number" then
    out[#out + 1] = number_text(v)
  elseif tv == "string" then
    out[#out + 1] = json_string(v)
  elseif tv == "table" then
    if seen[v] then error("report.json: cannot encode a table that contains itself", 0) end
    seen[v] = true
    local nl, pad, pad_in = "", "", ""
    if indent then
      nl = "\n"
      pad = string.rep(indent, depth)
      pad_in = pad .. indent
    end
    local n = array_length(v)
    if n then
      if n == 0 then
        out[#out + 1] = "[]"
      else
        out[#out + 1] = "[" .. nl
        for i = 1, n do
          out[#out + 1] = pad_in
          encode(v[i], indent, depth + 1, out, seen)
          out[#out + 1] = (i < n and "," or "") .. nl
        end
        out[#out + 1] = pad .. "]"
      end
    else
      local keys = {}
      for k in pairs(v) do
        local tk = type(k)
        if tk ~= "string" and tk ~= "number" then
          error("report.json: object keys must be strings or numbers, got " .. tk, 0)
        end
        keys[#keys + 1] = k
      end
      sort(keys, function(a, b) return tostring(a) < tostring(b) end)
      if #keys == 0 then
        out[#out + 1] = "{}"
      else
        out[#out + 1] = "{" .. nl
        for i, k in ipairs(keys) do
          out[#out + 1] = pad_in .. json_string(tostring(k)) .. (indent and ": " or ":")
          encode(v[k], indent, depth + 1, out, seen)
          out[#out + 1] = (i < #keys and "," or "") .. nl
        end
        out[#out + 1] = pad .. "}"
      end
    end
    seen[v] = nil
  else
    error("report.json: cannot encode a " .. tv, 0)
  end
end

-- report.json(value [, indent]) -> string. indent: a string such as "  " for
-- readable output, nil for one line.
function report.json(value, indent)
  local out = {}
  encode(value, indent, 0, out, {})
  return concat(out)
end

-- ------------------------------------------------------------------ files

local function write_file(path, text)
  local f, err = io.open(path, "wb")
  if not f then return nil, err end
  local ok, werr = f:write(text)
  f:close()
  if not ok then return nil, werr end
  return true
end
report.write_file = write_file

-- Creates a directory and its parents. Plain Lua has no mkdir; the shell does it.
function report.mkdir(path)
  if path == "" or path == "." then return true end
  local quoted = "'" .. path:gsub("'", "'\\''") .. "'"
  local ok = os.execute("mkdir -p " .. quoted)
  -- Lua 5.4 returns true/nil; LuaJIT (5.1 semantics) returns the exit status.
  if ok == true or ok == 0 then return true end
  return nil, "cannot create directory " .. path
end

function report.write_json(path, value)
  return write_file(path, report.json(value, "  ") .. "\n")
end

-- ------------------------------------------------------------------ tables of rows

-- The columns of a list of rows: `columns` when given (a list of keys), else every key
-- seen, with `first` (a list) leading in its order and the rest sorted.
function report.columns(rows, first)
  local seen, cols = {}, {}
  for _, k in ipairs(first or {}) do
    if not seen[k] then seen[k] = true; cols[#cols + 1] = k end
  end
  local rest = {}
  for _, row in ipairs(rows) do
    for k, v in pairs(row) do
      if not seen[k] and type(v) ~= "table" then
        seen[k] = true
        rest[#rest + 1] = k
      end
    end
  end
  sort(rest, function(a, b) return tostring(a) < tostring(b) end)
  for _, k in ipairs(rest) do cols[#cols + 1] = k end
  return cols
end

local function csv_field(v)
  if v == nil then return "" end
  local s
  if type(v) == "number" then
    s = (v ~= v) and "" or number_text(v)
    if s == "null" then s = "" end
  elseif type(v) == "boolean" then
    s = v and "true" or "false"
  else
    s = tostring(v)
  end
  if s:find('[,"\r\n]') then s = '"' .. s:gsub('"', '""') .. '"' end
  return s
end

-- report.csv(rows [, columns]) -> string: RFC 4180, a header line, CRLF-free ("\n").
function report.csv(rows, columns)
  columns = columns or report.columns(rows)
  local lines = {}
  local header = {}
  for i, c in ipairs(columns) do header[i] = csv_field(c) end
  lines[1] = concat(header, ",")
  for _, row in ipairs(rows) do
    local f = {}
    for i, c in ipairs(columns) do f[i] = csv_field(row[c]) end
    lines[#lines + 1] = concat(f, ",")
  end
  return concat(lines, "\n") .. "\n"
end

function report.write_csv(path, rows, columns)
  return write_file(path, report.csv(rows, columns))
end

-- Formats a value for a human: numbers with about 3 significant digits.
local function human(v, fmt)
  if v == nil then return "" end
  if fmt then
    if type(fmt) == "function" then return fmt(v) end
    if type(v) == "number" and v ~= v then return "n/a" end
    return format(fmt, v)
  end
  if type(v) == "number" then
    if v ~= v then return "n/a" end
    if is_integer(v) then return format("%d", v) end
    local a = math.abs(v)
    if a >= 100 then return format("%.0f", v) end
    if a >= 10 then return format("%.1f", v) end
    if a >= 1 then return format("%.2f", v) end
    return format("%.3g", v)
  end
  return tostring(v)
end
report.human = human

-- report.markdown(rows, columns) -> string. columns: a list of keys, or of
-- {key, header, fmt, align="right"|"left"} where fmt is a format string or a function.
function report.markdown(rows, columns)
  columns = columns or report.columns(rows)
  local cols = {}
  for i, c in ipairs(columns) do
    if type(c) == "table" then
      cols[i] = { key = c[1] or c.key, header = c[2] or c.header or c[1] or c.key,
                  fmt = c[3] or c.fmt, align = c.align }
    else
      cols[i] = { key = c, header = tostring(c) }
    end
  end
  local cells, width = {}, {}
  for i, c in ipairs(cols) do width[i] = #c.header end
  for r, row in ipairs(rows) do
    cells[r] = {}
    for i, c in ipairs(cols) do
      local s = human(row[c.key], c.fmt):gsub("|", "\\|")
      cells[r][i] = s
      if c.align == nil and type(row[c.key]) == "number" then c.align = "right" end
      if #s > width[i] then width[i] = #s end
    end
  end
  local function pad(s, w, right)
    local fill = string.rep(" ", w - #s)
    return right and (fill .. s) or (s .. fill)
  end
  local out = {}
  local h, sep = {}, {}
  for i, c in ipairs(cols) do
    local right = c.align == "right"
    h[i] = pad(c.header, width[i], right)
    -- width + 2: the separator spans the cell's padding too.
    sep[i] = right and (string.rep("-", width[i] + 1) .. ":") or string.rep("-", width[i] + 2)
  end
  out[1] = "| " .. concat(h, " | ") .. " |"
  out[2] = "|" .. concat(sep, "|") .. "|"
  for r = 1, #rows do
    local line = {}
    for i, c in ipairs(cols) do line[i] = pad(cells[r][i], width[i], c.align == "right") end
    out[#out + 1] = "| " .. concat(line, " | ") .. " |"
  end
  return concat(out, "\n") .. "\n"
end

return report
