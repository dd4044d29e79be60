# livemig_unit_tests(TARGET PREFIX LIBS... SOURCES...): a Catch2 binary of
# *_test.cpp files with tests/unit_main.cpp, its cases discovered into CTest
# as "PREFIX<case name>". Included only when BUILD_TESTING is on, so that a
# build without tests never looks for Catch2.
find_package(Catch2 2 REQUIRED)
include(Catch)

# Catch2's main() holds all of Catch2's implementation: about a minute of
# compiling, so it is compiled once and linked into every test binary.
add_library(livemig_catch_main OBJECT ${PROJECT_SOURCE_DIR}/tests/unit_main.cpp)
target_link_libraries(livemig_catch_main PUBLIC Catch2::Catch2)

function(livemig_unit_tests target prefix)
  cmake_parse_arguments(PARSE_ARGV 2 arg "" "" "LIBS;SOURCES")
  add_executable(${target} ${arg_SOURCES})
  target_link_libraries(${target} PRIVATE ${arg_LIBS} livemig_catch_main Catch2::Catch2)
  catch_discover_tests(${target} TEST_PREFIX "${prefix}")
endfunction()
