-- A failing script: `loramoe run` must print the message with a traceback and exit 1.
local function inner()
  error("deliberate failure")
end
local function outer()
  inner()
end
outer()
