# Generates the LuaJIT cdef from the public header: preprocess it (header_text.cmake),
# drop blank lines, wrap as a Lua file returning the string. Run with cmake -P.
#   -DCC=<c compiler> -DHEADER=<loramoe.h> -DOUT=<cdef.lua>
include(${CMAKE_CURRENT_LIST_DIR}/header_text.cmake)
lmoe_header_text(cdef "the FFI cdef")
string(REGEX REPLACE "\n[ \t]*\n+" "\n" cdef "${cdef}")
if(cdef MATCHES "\\]==\\]")
  message(FATAL_ERROR "the preprocessed header contains ]==]")
endif()
file(WRITE ${OUT}.tmp "-- Generated at build time from loramoe.h; do not edit.\nreturn [==[\n${cdef}]==]\n")
file(COPY_FILE ${OUT}.tmp ${OUT} ONLY_IF_DIFFERENT)
file(REMOVE ${OUT}.tmp)
