-- loramoe.svg: small, dependency-free SVG plots for experiment results.
--
--   svg.line{title=, xlabel=, ylabel=, series={{name=, x={...}, y={...}}, ...},
--            logx=false|true|2|10, logy=..., width=, height=, note=} -> string
--   svg.bars{title=, ylabel=, groups={"label", ...},
--            series={{name=, values={...}}, ...}, logy=, note=} -> string
--   svg.write(path, text)
--
-- Axes get "nice" ticks (1-2-5 steps on linear axes; powers of 2 or 10 on log axes),
-- units belong in the axis labels ("time per forward (ms)"). Colours are the
-- Okabe-Ito palette, which stays distinguishable for colour-blind readers. Pure Lua,
-- the same under Lua 5.4 and LuaJIT.

local svg = {}

local floor, ceil, log, abs, max, min = math.floor, math.ceil, math.log, math.abs, math.max, math.min
local huge = math.huge
local format, concat = string.format, table.concat

svg.palette = { "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000" }
local dashes = { nil, "6,3", "2,3", "8,3,2,3" }

local function esc(s)
  return (tostring(s):gsub("[<>&\"']", {
    ["<"] = "&lt;", [">"] = "&gt;", ["&"] = "&amp;", ['"'] = "&quot;", ["'"] = "&apos;",
  }))
end
svg.escape = esc

local function num(v) return format("%.2f", v) end

local function finite(v)
  return type(v) == "number" and v == v and v ~= math.huge and v ~= -math.huge
end

-- Tick labels: short, exact where it matters (powers of two stay integers).
function svg.tick_label(v)
  if v == 0 then return "0" end
  local a = abs(v)
  if a >= 1e6 or a < 1e-3 then
    local s = format("%.3g", v):gsub("e%+?(%-?)0*(%d)", "e%1%2")
    return s
  end
  if v == floor(v) then return format("%d", v) end
  local s = format("%.4g", v)
  return s
end

-- 1-2-5 step covering [lo, hi] with about n ticks.
local function nice_step(span, n)
  local raw = span / max(n, 1)
  local mag = 10 ^ floor(log(raw, 10))
  local f = raw / mag
  local step
  if f <= 1 then step = 1 elseif f <= 2 then step = 2 elseif f <= 2.5 then step = 2.5
  elseif f <= 5 then step = 5 else step = 10 end
  return step * mag
end

-- An axis maps data values to [0, 1]. Returns {lo, hi, ticks={...}, map=function}.
local function make_axis(values, logbase, include_zero)
  local lo, hi = math.huge, -math.huge
  for _, v in ipairs(values) do
    if finite(v) and (not logbase or v > 0) then
      if v < lo then lo = v end
      if v > hi then hi = v end
    end
  end
  if lo > hi then lo, hi = (logbase and 1 or 0), (logbase and 10 or 1) end
  local axis = { log = logbase }
  if logbase then
    local b = logbase
    local elo, ehi = floor(log(lo, b) + 1e-9), ceil(log(hi, b) - 1e-9)
    if ehi <= elo then ehi = elo + 1 end
    axis.lo, axis.hi = b ^ elo, b ^ ehi
    local ticks = {}
    local stride = max(1, ceil((ehi - elo) / 10)) -- at most ~10 labelled ticks
    for e = elo, ehi, stride do ticks[#ticks + 1] = b ^ e end
    -- Up to 3 decades on a base-10 axis: bounds and ticks on the 1-2-5 steps, so data
    -- spanning 40..110 gets 20..200, not 10..1000.
    if b == 10 and ehi - elo <= 3 then
      local steps = {}
      for e = elo - 1, ehi do
        steps[#steps + 1] = 10 ^ e
        steps[#steps + 1] = 2 * 10 ^ e
        steps[#steps + 1] = 5 * 10 ^ e
      end
      local tlo, thi = steps[1], steps[#steps]
      for _, v in ipairs(steps) do
        if v <= lo * (1 + 1e-9) then tlo = v end
      end
      for i = #steps, 1, -1 do
        if steps[i] >= hi * (1 - 1e-9) then thi = steps[i] end
      end
      if thi <= tlo then thi = 10 * tlo end
      axis.lo, axis.hi = tlo, thi
      ticks = {}
      for _, v in ipairs(steps) do
        if v >= tlo * (1 - 1e-9) and v <= thi * (1 + 1e-9) then ticks[#ticks + 1] = v end
      end
    end
    axis.ticks = ticks
    local llo, lhi = log(axis.lo), log(axis.hi)
    axis.map = function(v) return (log(v) - llo) / (lhi - llo) end
  else
    if include_zero then
      if lo > 0 then lo = 0 end
      if hi < 0 then hi = 0 end
    end
    if hi == lo then
      local pad = (lo == 0) and 1 or abs(lo) * 0.1
      lo, hi = lo - pad, hi + pad
    end
    local step = nice_step(hi - lo, 5)
    axis.lo = floor(lo / step + 1e-9) * step
    axis.hi = ceil(hi / step - 1e-9) * step
    local ticks = {}
    local i = 0
    while true do
      local t = axis.lo + i * step
      if t > axis.hi + step * 1e-6 then break end
      if abs(t) < step * 1e-9 then t = 0 end
      ticks[#ticks + 1] = t
      i = i + 1
    end
    axis.ticks = ticks
    local alo, ahi = axis.lo, axis.hi
    axis.map = function(v) return (v - alo) / (ahi - alo) end
  end
  return axis
end
svg.axis = make_axis

local function logbase_of(opt)
  if opt == true or opt == 10 then return 10 end
  if opt == 2 then return 2 end
  if opt == nil or opt == false then return nil end
  error("svg: log option must be true, 2 or 10", 3)
end

-- The frame shared by both plots: background, title, plot rectangle, y axis.
local function begin(o, legend_rows)
  local W, H = o.width or 760, o.height or 440
  local legend_w = legend_rows > 0 and (o.legend_width or 170) or 0
  -- The note wraps at word boundaries (about 5.6 px per character at 10 px).
  local note_lines = {}
  if o.note then
    local per, line = floor((W - 16) / 5.6), ""
    for word in tostring(o.note):gmatch("%S+") do
      if line ~= "" and #line + 1 + #word > per then
        note_lines[#note_lines + 1] = line
        line = word
      else
        line = (line == "") and word or (line .. " " .. word)
      end
    end
    if line ~= "" then note_lines[#note_lines + 1] = line end
  end
  local box = { x = 72, y = o.title and 46 or 20 }
  box.w = W - box.x - 24 - legend_w
  box.h = H - box.y - 58 - 13 * #note_lines
  local out = {}
  out[#out + 1] = format('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" ' ..
    'viewBox="0 0 %d %d" font-family="Helvetica, Arial, sans-serif" font-size="12">', W, H, W, H)
  out[#out + 1] = format('<rect width="%d" height="%d" fill="white"/>', W, H)
  if o.title then
    -- Centred on the plot when it fits there, else on the whole figure, and smaller
    -- when even that is too narrow (bold text is about 0.62 em per character).
    local size = 15
    if #o.title * size * 0.62 > W - 16 then size = max(9, floor((W - 16) / (#o.title * 0.62))) end
    local half = #o.title * size * 0.62 / 2
    local cx = box.x + box.w / 2
    if cx - half < 8 or cx + half > W - 8 then cx = W / 2 end
    out[#out + 1] = format('<text x="%s" y="26" text-anchor="middle" font-size="%d" ' ..
      'font-weight="bold">%s</text>', num(cx), size, esc(o.title))
  end
  for i, line in ipairs(note_lines) do
    out[#out + 1] = format('<text x="%d" y="%d" font-size="10" fill="#555">%s</text>',
      8, H - 8 - 13 * (#note_lines - i), esc(line))
  end
  return out, box, W, H, legend_w
end

local function y_axis(out, box, axis, label)
  for _, t in ipairs(axis.ticks) do
    local y = box.y + box.h * (1 - axis.map(t))
    out[#out + 1] = format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="#e4e4e4"/>',
      num(box.x), num(y), num(box.x + box.w), num(y))
    out[#out + 1] = format('<text x="%s" y="%s" text-anchor="end">%s</text>',
      num(box.x - 6), num(y + 4), esc(svg.tick_label(t)))
  end
  if label then
    out[#out + 1] = format('<text transform="translate(16,%s) rotate(-90)" text-anchor="middle">%s</text>',
      num(box.y + box.h / 2), esc(label))
  end
end

local function frame(out, box)
  out[#out + 1] = format('<rect x="%s" y="%s" width="%s" height="%s" fill="none" stroke="#333"/>',
    num(box.x), num(box.y), num(box.w), num(box.h))
end

local function legend(out, box, items, kind)
  if #items == 0 then return end
  local x = box.x + box.w + 16
  local y = box.y + 6
  for i, it in ipairs(items) do
    local yy = y + (i - 1) * 20
    if kind == "line" then
      out[#out + 1] = format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="%s" stroke-width="2"%s/>',
        num(x), num(yy + 6), num(x + 24), num(yy + 6), it.color,
        it.dash and format(' stroke-dasharray="%s"', it.dash) or "")
      out[#out + 1] = format('<circle cx="%s" cy="%s" r="3" fill="%s"/>', num(x + 12), num(yy + 6), it.color)
    else
      out[#out + 1] = format('<rect x="%s" y="%s" width="14" height="12" fill="%s"/>',
        num(x + 4), num(yy), it.color)
    end
    out[#out + 1] = format('<text x="%s" y="%s">%s</text>', num(x + 30), num(yy + 10), esc(it.name))
  end
end

-- svg.line{...}: one polyline per series. Points with a missing y break the line.
function svg.line(o)
  assert(type(o) == "table" and type(o.series) == "table", "svg.line: expects {series = {...}}")
  local xs, ys = {}, {}
  for _, s in ipairs(o.series) do
    for i = 1, #s.x do
      xs[#xs + 1] = s.x[i]
      ys[#ys + 1] = s.y[i]
    end
  end
  local lx, ly = logbase_of(o.logx), logbase_of(o.logy)
  local ax = make_axis(xs, lx, false)
  local ay = make_axis(ys, ly, not ly and o.ymin_zero ~= false)
  local out, box = begin(o, #o.series)
  y_axis(out, box, ay, o.ylabel)
  for _, t in ipairs(ax.ticks) do
    local x = box.x + box.w * ax.map(t)
    out[#out + 1] = format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="#e4e4e4"/>',
      num(x), num(box.y), num(x), num(box.y + box.h))
    out[#out + 1] = format('<text x="%s" y="%s" text-anchor="middle">%s</text>',
      num(x), num(box.y + box.h + 16), esc(svg.tick_label(t)))
  end
  if o.xlabel then
    out[#out + 1] = format('<text x="%s" y="%s" text-anchor="middle">%s</text>',
      num(box.x + box.w / 2), num(box.y + box.h + 36), esc(o.xlabel))
  end
  frame(out, box)
  local items = {}
  for si, s in ipairs(o.series) do
    local color = s.color or svg.palette[(si - 1) % #svg.palette + 1]
    local dash = s.dash or dashes[floor((si - 1) / #svg.palette) % #dashes + 1]
    items[#items + 1] = { name = s.name or ("series " .. si), color = color, dash = dash }
    local pts, runs = {}, {}
    -- Plot in x order so a sweep listed in any order still draws a line.
    local order = {}
    for i = 1, #s.x do order[i] = i end
    table.sort(order, function(a, b) return s.x[a] < s.x[b] end)
    for _, i in ipairs(order) do
      local x, y = s.x[i], s.y[i]
      local ok = finite(x) and finite(y) and (not lx or x > 0) and (not ly or y > 0)
      if ok then
        pts[#pts + 1] = num(box.x + box.w * ax.map(x)) .. "," .. num(box.y + box.h * (1 - ay.map(y)))
      elseif #pts > 0 then
        runs[#runs + 1] = pts
        pts = {}
      end
    end
    if #pts > 0 then runs[#runs + 1] = pts end
    for _, run in ipairs(runs) do
      out[#out + 1] = format('<polyline fill="none" stroke="%s" stroke-width="2"%s points="%s"/>',
        color, dash and format(' stroke-dasharray="%s"', dash) or "", concat(run, " "))
      for _, p in ipairs(run) do
        local cx, cy = p:match("([^,]+),(.+)")
        out[#out + 1] = format('<circle cx="%s" cy="%s" r="3" fill="%s"/>', cx, cy, color)
      end
    end
  end
  legend(out, box, items, "line")
  out[#out + 1] = "</svg>"
  return concat(out, "\n") .. "\n"
end

-- svg.bars{...}: grouped bars, one group per label, one bar per series; the value is
-- written above each bar so small differences (0 vs 1 sync) can be read exactly.
function svg.bars(o)
  assert(type(o) == "table" and type(o.series) == "table" and type(o.groups) == "table",
    "svg.bars: expects {groups = {...}, series = {...}}")
  local vals = {}
  for _, s in ipairs(o.series) do
    for i = 1, #o.groups do vals[#vals + 1] = s.values[i] end
  end
  local ly = logbase_of(o.logy)
  -- Headroom so the value written above the tallest bar stays inside the frame.
  local top = -huge
  for _, v in ipairs(vals) do if finite(v) and v > top then top = v end end
  if top > 0 then vals[#vals + 1] = ly and top * 1.5 or top * 1.08 end
  local ay = make_axis(vals, ly, not ly)
  local out, box = begin(o, #o.series)
  y_axis(out, box, ay, o.ylabel)
  frame(out, box)
  local ng, ns = #o.groups, max(#o.series, 1)
  local gw = box.w / max(ng, 1)
  local bw = gw * 0.8 / ns
  local base = ly and ay.lo or max(ay.lo, min(0, ay.hi))
  local y0 = box.y + box.h * (1 - ay.map(base))
  local items = {}
  for si, s in ipairs(o.series) do
    local color = s.color or svg.palette[(si - 1) % #svg.palette + 1]
    items[#items + 1] = { name = s.name or ("series " .. si), color = color }
    for gi = 1, ng do
      local v = s.values[gi]
      if finite(v) and (not ly or v > 0) then
        local x = box.x + gw * (gi - 1) + gw * 0.1 + bw * (si - 1)
        local y = box.y + box.h * (1 - ay.map(v))
        local top, h = min(y, y0), abs(y0 - y)
        out[#out + 1] = format('<rect x="%s" y="%s" width="%s" height="%s" fill="%s"/>',
          num(x), num(top), num(max(bw - 2, 1)), num(h), color)
        out[#out + 1] = format('<text x="%s" y="%s" text-anchor="middle" font-size="10">%s</text>',
          num(x + bw / 2 - 1), num(top - 3), esc(o.value_label and o.value_label(v) or svg.tick_label(
            abs(v) >= 100 and floor(v + 0.5) or tonumber(format("%.3g", v)))))
      end
    end
  end
  for gi, g in ipairs(o.groups) do
    out[#out + 1] = format('<text x="%s" y="%s" text-anchor="middle">%s</text>',
      num(box.x + gw * (gi - 0.5)), num(box.y + box.h + 16), esc(g))
  end
  if o.xlabel then
    out[#out + 1] = format('<text x="%s" y="%s" text-anchor="middle">%s</text>',
      num(box.x + box.w / 2), num(box.y + box.h + 36), esc(o.xlabel))
  end
  legend(out, box, items, "bar")
  out[#out + 1] = "</svg>"
  return concat(out, "\n") .. "\n"
end

function svg.write(path, text)
  local f, err = io.open(path, "wb")
  if not f then return nil, err end
  f:write(text)
  f:close()
  return true
end

return svg
