# livemig_unit_tests(TARGET PREFIX LIBS... SOURCES...): a Catch2 binary of
# *_test.cpp files with tests/unit_main.cpp, its cases discovered into CTest
# as "PREFIX<case name>". Included only when BUILD_TESTING is on, so that a
# build without tests never looks for Catch2.
find_package(Catch2 2 REQUIRED)
include(Catch)

function(livemig_unit_tests target prefix)
  cmake_parse_arguments(PARSE_ARGV 2 arg "" "" "LIBS;SOURCES")
  add_executable(${target} ${PROJECT_SOURCE_DIR}/tests/unit_main.cpp ${arg_SOURCES})
  target_link_libraries(${target} PRIVATE ${arg_LIBS} Catch2::Catch2)
  catch_discover_tests(${target} TEST_PREFIX "${prefix}")
endfunction()
