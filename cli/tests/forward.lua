-- The whole stack from a `loramoe run` script: the built-in C module, a context
-- (`loramoe run forward.lua [seed|-] [backend]`, backend cpu by default),
-- a small layer with random weights, two random adapters of different ranks, a batch
-- where one request has no adapter, one forward, checked against the float64
-- reference on fresh random inputs.
local core = require "loramoe.core"
assert(core._VERSION == core.version(), "module and library versions agree")

-- The pure-Lua API resolves through the package.path the CLI set up.
local found = assert(package.searchpath("loramoe", package.path))
assert(found:match("loramoe[/\\]init%.lua$"), "require 'loramoe' finds the Lua files: " .. found)
local lm = require "loramoe"
assert(type(lm) == "table" and lm.core == core, "the API runs over the built-in core")

-- Fresh inputs every run unless a seed is given ("-": pick one); printed so a failure
-- can be replayed.
local seed = math.tointeger(tonumber(arg[1] or "")) or os.time()
local backend = arg[2] or "cpu"
print("seed", seed, "backend", backend)

local ctx = assert(lm.context { backend = backend, threads = 2 })
local E, H, I, K, M = 8, 64, 32, 2, 40
local layer = assert(ctx:layer { experts = E, hidden = H, intermediate = I, top_k = K, max_tokens = M })
assert(layer:randomize(seed, 0.1))
local pool = assert(layer:pool { slots = 3, max_rank = 8 })
-- Scales large enough that the LoRA terms change the output measurably.
assert(pool:load_random(0, { rank = 4, alpha = 8, seed = seed + 1, scale = 0.2 }))
assert(pool:load_random(2, { rank = 8, alpha = 16, seed = seed + 2, scale = 0.2, fused = true }))

local batch = assert(ctx:batch())
assert(batch:set(pool, { { tokens = 16, adapter = 0 }, { tokens = 9 }, { tokens = 15, adapter = 2 } }))
local info = batch:info()
assert(info.tokens == M and info.active == 2 and info.max_rank == 8)

local x = assert(ctx:buffer("bf16", { M, H }))
local logits = assert(ctx:buffer("f32", { M, E }))
local out = assert(ctx:buffer("bf16", { M, H }))
local ref = assert(ctx:buffer("f64", { M, H }, "host"))
assert(x:fill_random(seed + 3, -1, 1))
assert(logits:fill_random(seed + 4, -2, 2))

local args = { pool = pool, batch = batch, x = x, logits = logits, out = out }
assert(layer:forward(args))
args.out = ref
assert(layer:reference(args))
local cmp = assert(out:compare(ref))
print(("rel_l2 %.3g  max_abs %.3g  ref_l2 %.3g"):format(cmp.rel_l2, cmp.max_abs, cmp.ref_l2))
assert(cmp.nonfinite == 0 and cmp.ref_l2 > 0, "finite, non-zero output")
assert(cmp.rel_l2 < 1e-2, "forward matches the float64 reference")
assert(ctx:counters().forwards == 1)
print("forward ok")
