#include "server/sqlite_db.h"

#include <sqlite3.h>

#include <fmt/format.h>

namespace livemig::daemon {

// ---------------------------------------------------------------- SqliteStmt

SqliteStmt::SqliteStmt(SqliteStmt&& other) noexcept
    : db_(other.db_), stmt_(other.stmt_), sql_(std::move(other.sql_)), bind_rc_(other.bind_rc_) {
  other.stmt_ = nullptr;
}

SqliteStmt::~SqliteStmt() {
  if (stmt_) sqlite3_finalize(stmt_);
}

Status SqliteStmt::error(int rc) const {
  return Status::error(fmt::format("sqlite: {}: {} ({:.60})", sqlite3_errstr(rc), sqlite3_errmsg(db_), sql_), EIO);
}

SqliteStmt& SqliteStmt::bind(int index, int64_t v) {
  int rc = sqlite3_bind_int64(stmt_, index, v);
  if (rc != SQLITE_OK && !bind_rc_) bind_rc_ = rc;
  return *this;
}

SqliteStmt& SqliteStmt::bind(int index, double v) {
  int rc = sqlite3_bind_double(stmt_, index, v);
  if (rc != SQLITE_OK && !bind_rc_) bind_rc_ = rc;
  return *this;
}

SqliteStmt& SqliteStmt::bind(int index, const std::string& v) {
  int rc = sqlite3_bind_text(stmt_, index, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  if (rc != SQLITE_OK && !bind_rc_) bind_rc_ = rc;
  return *this;
}

SqliteStmt& SqliteStmt::bind_null(int index) {
  int rc = sqlite3_bind_null(stmt_, index);
  if (rc != SQLITE_OK && !bind_rc_) bind_rc_ = rc;
  return *this;
}

Result<bool> SqliteStmt::step() {
  if (bind_rc_) return error(bind_rc_);
  int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  return error(rc);
}

Status SqliteStmt::run() {
  for (;;) {
    auto r = step();
    if (!r) return r.status();
    if (!*r) return Status::ok();
  }
}

int64_t SqliteStmt::column_int64(int col) const { return sqlite3_column_int64(stmt_, col); }
double SqliteStmt::column_double(int col) const { return sqlite3_column_double(stmt_, col); }
bool SqliteStmt::column_is_null(int col) const { return sqlite3_column_type(stmt_, col) == SQLITE_NULL; }

std::string SqliteStmt::column_text(int col) const {
  const unsigned char* p = sqlite3_column_text(stmt_, col);
  int n = sqlite3_column_bytes(stmt_, col);
  return p ? std::string(reinterpret_cast<const char*>(p), static_cast<size_t>(n)) : std::string();
}

// ---------------------------------------------------------------- SqliteDb

Result<std::unique_ptr<SqliteDb>> SqliteDb::open(const std::string& path) {
  sqlite3* db = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr);
  if (rc != SQLITE_OK) {
    std::string why = db ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    sqlite3_close(db);
    return Status::error(fmt::format("database {}: {}", path, why), EIO);
  }
  sqlite3_busy_timeout(db, 5000);
  return std::unique_ptr<SqliteDb>(new SqliteDb(db, path));
}

SqliteDb::~SqliteDb() { sqlite3_close(db_); }

Status SqliteDb::exec(const std::string& sql) {
  char* err = nullptr;
  int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err);
  if (rc == SQLITE_OK) return Status::ok();
  std::string why = err ? err : sqlite3_errstr(rc);
  sqlite3_free(err);
  return Status::error(fmt::format("database {}: {} ({:.60})", path_, why, sql), EIO);
}

Result<SqliteStmt> SqliteDb::prepare(const std::string& sql) {
  sqlite3_stmt* stmt = nullptr;
  int rc = sqlite3_prepare_v2(db_, sql.c_str(), static_cast<int>(sql.size()), &stmt, nullptr);
  if (rc != SQLITE_OK)
    return Status::error(fmt::format("database {}: {} ({:.60})", path_, sqlite3_errmsg(db_), sql), EIO);
  return SqliteStmt(db_, stmt, sql);
}

int64_t SqliteDb::last_insert_rowid() const { return sqlite3_last_insert_rowid(db_); }

}  // namespace livemig::daemon
