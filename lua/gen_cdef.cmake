# Generates the LuaJIT cdef from the public header: preprocess with LMOE_FFI_CDEF
# (the header then skips its system includes and export attributes), drop blank lines,
# wrap as a Lua file returning the string. Run with cmake -P.
#   -DCC=<c compiler> -DHEADER=<loramoe.h> -DOUT=<cdef.lua>
execute_process(COMMAND ${CC} -E -P -DLMOE_FFI_CDEF ${HEADER}
  OUTPUT_VARIABLE cdef ERROR_VARIABLE err RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "preprocessing ${HEADER} for the FFI cdef failed: ${err}")
endif()
string(REGEX REPLACE "\n[ \t]*\n+" "\n" cdef "${cdef}")
if(cdef MATCHES "\\]==\\]")
  message(FATAL_ERROR "the preprocessed header contains ]==]")
endif()
file(WRITE ${OUT}.tmp "-- Generated at build time from loramoe.h; do not edit.\nreturn [==[\n${cdef}]==]\n")
file(COPY_FILE ${OUT}.tmp ${OUT} ONLY_IF_DIFFERENT)
file(REMOVE ${OUT}.tmp)
