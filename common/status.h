// Errors as values (after LevelDB's Status): a function that can fail for a
// reason a user must read returns Status or Result<T>, never throws across a
// module edge.
#pragma once

#include <cerrno>
#include <string>
#include <utility>
#include <variant>

namespace livemig {

class Status {
 public:
  Status() = default;  // ok

  static Status ok() { return Status(); }
  // An error with a message for people and the errno that NBD clients see.
  static Status error(std::string message, int err = EINVAL) {
    return Status(std::move(message), err);
  }

  bool is_ok() const { return errno_ == 0; }
  explicit operator bool() const { return is_ok(); }
  const std::string& message() const { return message_; }
  int errno_value() const { return errno_; }

 private:
  Status(std::string message, int err) : message_(std::move(message)), errno_(err ? err : EIO) {}
  std::string message_;
  int errno_ = 0;
};

// A value or the Status that explains why there is none.
template <typename T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}
  Result(Status status) : v_(std::move(status)) {}

  bool is_ok() const { return std::holds_alternative<T>(v_); }
  explicit operator bool() const { return is_ok(); }
  // REQUIRES: is_ok()
  T& value() { return std::get<T>(v_); }
  const T& value() const { return std::get<T>(v_); }
  T& operator*() { return value(); }
  const T& operator*() const { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  // The value, or `fallback` when there is none.
  T value_or(T fallback) const { return is_ok() ? value() : std::move(fallback); }
  // REQUIRES: !is_ok()
  const Status& status() const { return std::get<Status>(v_); }

 private:
  std::variant<T, Status> v_;
};

// An error from a failed system call, errno read at once: "<what> <path>:
// <strerror>", e.g. errno_error("syncing", "/img.livemig-groups").
Status errno_error(const std::string& what, const std::string& path);

}  // namespace livemig
