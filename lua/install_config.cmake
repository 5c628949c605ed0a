# Run at install time (install(SCRIPT)): writes loramoe/config.lua for the installed
# FFI binding with the library's final path, so `cmake --install --prefix P` and
# DESTDIR both work. LMOE_LIBDIR, LMOE_DATADIR and LMOE_SONAME come from install(CODE).
set(_libdir "${LMOE_LIBDIR}")
if(NOT IS_ABSOLUTE "${_libdir}")
  set(_libdir "${CMAKE_INSTALL_PREFIX}/${_libdir}")
endif()
set(_datadir "${LMOE_DATADIR}")
if(NOT IS_ABSOLUTE "${_datadir}")
  set(_datadir "${CMAKE_INSTALL_PREFIX}/${_datadir}")
endif()
set(_cfg "$ENV{DESTDIR}${_datadir}/lua/5.1/loramoe/config.lua")
message(STATUS "Installing: ${_cfg}")
file(WRITE "${_cfg}" "-- Generated at install time; do not edit.\nreturn { lib = \"${_libdir}/${LMOE_SONAME}\" }\n")
