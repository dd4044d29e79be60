// A small RAII wrapper over SQLite's C API: one connection (SqliteDb) and its
// prepared statements (SqliteStmt). Errors are Status values whose message
// names the statement and SQLite's own explanation.
// Threading: a connection and its statements are used by one thread at a
// time (the caller holds a lock); SQLite is opened in its serialized mode.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "common/status.h"

struct sqlite3;
struct sqlite3_stmt;

namespace livemig::daemon {

class SqliteStmt {
 public:
  SqliteStmt(SqliteStmt&& other) noexcept;
  SqliteStmt& operator=(SqliteStmt&&) = delete;
  ~SqliteStmt();

  // Parameters are numbered from 1, as in SQL's ?1.
  SqliteStmt& bind(int index, int64_t v);
  SqliteStmt& bind(int index, double v);
  SqliteStmt& bind(int index, const std::string& v);
  SqliteStmt& bind_null(int index);
  // Runs one step: true if a row is ready (read it with the column_*
  // functions), false when the statement is done.
  Result<bool> step();
  // Runs to completion (an INSERT, UPDATE, ...).
  Status run();
  // Columns are numbered from 0.
  int64_t column_int64(int col) const;
  double column_double(int col) const;
  std::string column_text(int col) const;
  bool column_is_null(int col) const;

 private:
  friend class SqliteDb;
  SqliteStmt(sqlite3* db, sqlite3_stmt* stmt, std::string sql) : db_(db), stmt_(stmt), sql_(std::move(sql)) {}
  Status error(int rc) const;
  sqlite3* db_;
  sqlite3_stmt* stmt_;
  std::string sql_;
  int bind_rc_ = 0;  // the first failed bind, reported by step()
};

class SqliteDb {
 public:
  // Opens (creating if needed) the database at `path`.
  static Result<std::unique_ptr<SqliteDb>> open(const std::string& path);
  ~SqliteDb();
  SqliteDb(const SqliteDb&) = delete;
  SqliteDb& operator=(const SqliteDb&) = delete;

  // Runs one or more statements without results.
  Status exec(const std::string& sql);
  Result<SqliteStmt> prepare(const std::string& sql);
  int64_t last_insert_rowid() const;
  const std::string& path() const { return path_; }

 private:
  SqliteDb(sqlite3* db, std::string path) : db_(db), path_(std::move(path)) {}
  sqlite3* db_;
  std::string path_;
};

}  // namespace livemig::daemon
