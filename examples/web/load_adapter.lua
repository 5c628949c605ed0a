-- Load a PEFT adapter from disk and check a forward that uses it.
--
--   loramoe run examples/web/load_adapter.lua DIR [layer=N] [hidden=H] [intermediate=I]
--
-- The web page puts the adapter picked from the user's disk under /adapters/NAME in the
-- module's file system and passes that directory. The script prints the adapter's
-- summary, makes a MoE layer of the adapter's shapes (random base weights: an adapter
-- directory holds no base model), loads one of the adapter's layers into a pool, runs a
-- batch where half of the requests use it and checks the result against the float64
-- reference. Exits non-zero (raises) when the check fails.

local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/../../lua/?.lua;" .. here .. "/../../lua/?/init.lua;" .. here ..
  "/../../build/lua/?.lua;" .. package.path
package.cpath = package.cpath .. ";" .. here .. "/../../build/lua/?.so"

local lm = require "loramoe"

local dir
local opt = {}
for _, a in ipairs(arg) do
  local k, v = a:match("^(%w+)=(.*)$")
  if k then opt[k] = math.tointeger(tonumber(v)) or error("bad value in " .. a, 0)
  else dir = a end
end
if not dir then error("give the adapter's directory (in the page: pick it with 'PEFT adapter')", 0) end

local ctx = lm.assert(lm.context { backend = "cpu" })
local peft = lm.assert(ctx:peft(dir))
local info = peft:info()
print(peft:inspect())

-- The shapes the adapter was trained for, from its tensors: down_proj's A is
-- [rank, intermediate] and its B [hidden, rank] (w2 in Mixtral's names); the fused
-- layout's experts.lora_A is [experts * rank, intermediate], base_layer's [., hidden].
local hidden, intermediate = opt.hidden, opt.intermediate
local experts = info.experts > 0 and info.experts or nil
local file = ctx:safetensors(dir .. "/adapter_model.safetensors")
if file then
  for _, t in ipairs(file:tensors()) do
    local n, s = t.name, t.shape
    if n:find("%.down_proj%.lora_A%.") or n:find("%.w2%.lora_A%.") then
      intermediate = intermediate or s[2]
    elseif n:find("experts%.lora_A%.") then
      intermediate = intermediate or s[2]
      experts = experts or s[1] // info.rank
    elseif n:find("%.down_proj%.lora_B%.") or n:find("%.w2%.lora_B%.") then
      hidden = hidden or s[1]
    elseif n:find("base_layer%.lora_A%.") then
      hidden = hidden or s[2]
    end
  end
  file:close()
end
if not (hidden and intermediate and experts) then
  error("cannot tell the layer's shapes from the adapter's tensors: give hidden= and intermediate=", 0)
end
local tokens = 64
local layer = lm.assert(ctx:layer { experts = experts, hidden = hidden, intermediate = intermediate,
  top_k = math.min(2, experts), max_tokens = tokens })
lm.assert(layer:randomize(1, 0.05))
local pool = lm.assert(layer:pool { slots = 1, max_rank = math.max(info.max_rank, info.rank) })
local slot = lm.assert(lm.adapter.load(dir, { pool = pool, name = "picked", layer = opt.layer or info.min_layer }))
peft:close()

local batch = lm.assert(ctx:batch())
lm.assert(batch:set(pool, { { tokens = 16, adapter = slot }, { tokens = 16 }, { tokens = 16, adapter = slot },
  { tokens = 16 } }))
local args = lm.assert(layer:inputs(tokens, 7))
args.pool, args.batch = pool, batch
local t0 = lm.now()
lm.assert(layer:forward(args))
local ms = (lm.now() - t0) * 1e3
local res = lm.assert(layer:check(args))
local ok = res.nonfinite == 0 and res.rel_l2 < 1e-2
print(string.format("layer E=%d H=%d I=%d top_k=%d, adapter layer %d in slot %d, %d tokens (half on the adapter): %.2f ms",
  experts, hidden, intermediate, math.min(2, experts), opt.layer or info.min_layer, slot, tokens, ms))
print(string.format("check vs float64 reference: rel_l2 %.2e, max_abs %.2e, non-finite %d: %s",
  res.rel_l2, res.max_abs, res.nonfinite, ok and "ok" or "FAILED"))
batch:close(); pool:close(); layer:close(); ctx:close()
if not ok then error("the check against the float64 reference failed", 0) end
