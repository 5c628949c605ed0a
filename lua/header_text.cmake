# lmoe_header_text(<var> <purpose>): the public header as the Lua bindings read it,
# preprocessed with LMOE_FFI_CDEF (the header then skips its system includes and export
# attributes), into <var>; stops with <purpose> in the message when the compiler fails.
# Included by gen_cdef.cmake and gen_core_rows.cmake, which get CC and HEADER with -D.
function(lmoe_header_text var purpose)
  execute_process(COMMAND ${CC} -E -P -DLMOE_FFI_CDEF ${HEADER}
    OUTPUT_VARIABLE text ERROR_VARIABLE err RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "preprocessing ${HEADER} for ${purpose} failed: ${err}")
  endif()
  set(${var} "${text}" PARENT_SCOPE)
endfunction()
