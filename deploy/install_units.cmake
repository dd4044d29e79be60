# Runs at install time (install(CODE) in deploy/CMakeLists.txt), so that the
# prefix of `cmake --install BUILD --prefix P` is the one the units name:
# each unit of LIVEMIG_UNITS is written with /usr/local/bin/ and
# /usr/local/share/doc/livemig/ replaced by that prefix's bin and doc
# directories, then installed into LIVEMIG_SYSTEMD_UNIT_DIR (relative to the
# prefix unless absolute, as pkg-config's systemdsystemunitdir is).
set(files)
foreach(unit IN LISTS LIVEMIG_UNITS)
  file(READ "${LIVEMIG_UNIT_SOURCE_DIR}/${unit}" text)
  string(REPLACE "/usr/local/bin/" "${CMAKE_INSTALL_PREFIX}/${LIVEMIG_BINDIR}/" text "${text}")
  string(REPLACE "/usr/local/share/doc/livemig/" "${CMAKE_INSTALL_PREFIX}/${LIVEMIG_DOCDIR}/" text "${text}")
  file(WRITE "${LIVEMIG_UNIT_BINARY_DIR}/${unit}" "${text}")
  list(APPEND files "${LIVEMIG_UNIT_BINARY_DIR}/${unit}")
endforeach()
set(dir "${LIVEMIG_SYSTEMD_UNIT_DIR}")
if(NOT IS_ABSOLUTE "${dir}")
  set(dir "${CMAKE_INSTALL_PREFIX}/${dir}")
endif()
file(INSTALL DESTINATION "${dir}" TYPE FILE FILES ${files})
