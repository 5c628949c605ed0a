-- `loramoe run args.lua one "two words" 3` must pass arguments as the lua interpreter does.
local script = arg[0]
assert(script:match("args%.lua$"), "arg[0] is the script, got " .. tostring(script))
assert(arg[-1] == "run", "arg[-1] is the command, got " .. tostring(arg[-1]))
assert(arg[-2]:match("loramoe"), "arg[-2] is the program, got " .. tostring(arg[-2]))
assert(#arg == 3 and arg[1] == "one" and arg[2] == "two words" and arg[3] == "3",
       "arg[1..3] are the arguments")
local n, a, b, c = select("#", ...), ...
assert(n == 3 and a == "one" and b == "two words" and c == "3", "the chunk gets them as ...")
-- The C module is built in, registered for require.
assert(type(package.preload["loramoe.core"]) == "function", "loramoe.core is preloaded")
print("args ok")
