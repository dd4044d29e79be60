// Enums are parsed from their names once, at the edges (config, CLI, wire,
// state file); inside, the program compares enums, never strings.
#pragma once

#include <optional>
#include <string_view>

namespace livemig {

// The value of `all` whose name(value) is `s`, if any.
template <typename E, size_t N>
std::optional<E> enum_by_name(std::string_view s, const E (&all)[N], const char* (*name)(E)) {
  for (E e : all)
    if (s == name(e)) return e;
  return std::nullopt;
}

}  // namespace livemig
