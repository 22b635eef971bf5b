/* runtime/tuning_db.c — the tuning database (docs/runtime.md "Tuning database"): every
 * candidate the autotuner measured and the best point per (kernel, stage, device, space
 * version), in one SQLite file in WAL mode so that several processes and ranks share it. */
#include "runtime.h"

#include <errno.h>
#include <math.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define TUNE_ENV "CMAEC_TUNE"
enum {
  TUNE_DB_SCHEMA = 1,      /* PRAGMA user_version of the tables below */
  TUNE_DB_BUSY_MS = 10000, /* how long a writer waits for another's lock */
  TUNE_DB_PATH_MAX = 4096,
};

static const char tune_db_schema[] =
    "CREATE TABLE IF NOT EXISTS trials ("
    " id INTEGER PRIMARY KEY,"
    " kernel TEXT NOT NULL, stage INTEGER NOT NULL, device TEXT NOT NULL, version INTEGER NOT NULL,"
    " point TEXT NOT NULL, ms REAL, failure TEXT,"
    " recorded TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),"
    " CHECK ((ms IS NULL) <> (failure IS NULL)));"
    "CREATE INDEX IF NOT EXISTS trials_by_key ON trials (kernel, stage, device, version);"
    "CREATE TABLE IF NOT EXISTS best ("
    " kernel TEXT NOT NULL, stage INTEGER NOT NULL, device TEXT NOT NULL, version INTEGER NOT NULL,"
    " point TEXT NOT NULL, best_ms REAL NOT NULL, default_ms REAL NOT NULL, label TEXT NOT NULL,"
    " recorded TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),"
    " PRIMARY KEY (kernel, stage, device, version));";

struct cm_tune_db {
  sqlite3 *sql;
  sqlite3_stmt *put_trial, *put_best, *get_best;
  char path[TUNE_DB_PATH_MAX];
};

cm_status cm_tune_mode_resolve(cm_tune_mode given, cm_tune_mode *out, cm_err *err) {
  if (given != CM_TUNE_FROM_ENV) {
    *out = given;
    return CM_OK;
  }
  const char *v = getenv(TUNE_ENV);
  if (!v || !*v || !strcmp(v, "cached"))
    *out = CM_TUNE_CACHED;
  else if (!strcmp(v, "off"))
    *out = CM_TUNE_OFF;
  else if (!strcmp(v, "search"))
    *out = CM_TUNE_SEARCH;
  else
    return cm_errorf(err, CM_EINVALID, "%s=%s: expected off, cached or search", TUNE_ENV, v);
  return CM_OK;
}

void cm_tune_device_id(const cm_target *t, int threads, const char *gpu_name, int driver_version,
                       char *out, size_t size) {
  if (!out || size == 0) return;
  if (t->kind == CM_TARGET_CPU)
    snprintf(out, size, "cpu %s %d%s threads %d", t->cpu.cpu, t->cpu.vector_bits,
             t->cpu.dot_bf16 ? " bf16" : "", threads);
  else if (!gpu_name)
    snprintf(out, size, "emulated sm_%d", t->sm);
  else
    snprintf(out, size, "cuda %s sm_%d driver %d", gpu_name, t->sm, driver_version);
}

/* ---- errors ------------------------------------------------------------- */

/* Resource failures are CM_EINTERNAL; anything about the file itself (not a database, corrupt,
 * unreadable, read-only, of a newer schema) is CM_EINVALID naming it. */
static cm_status sql_error(const char *path, sqlite3 *sql, int rc, const char *doing, cm_err *err) {
  int primary = rc & 0xff;
  const char *msg = sql ? sqlite3_errmsg(sql) : sqlite3_errstr(rc);
  if (primary == SQLITE_NOTADB || primary == SQLITE_CORRUPT)
    return cm_errorf(err, CM_EINVALID,
                     "tuning database %s: not a usable SQLite database (%s): remove the file", path,
                     msg);
  bool resource = primary == SQLITE_NOMEM || primary == SQLITE_INTERNAL ||
                  primary == SQLITE_MISUSE || primary == SQLITE_BUSY || primary == SQLITE_LOCKED ||
                  primary == SQLITE_IOERR || primary == SQLITE_FULL;
  return cm_errorf(err, resource ? CM_EINTERNAL : CM_EINVALID, "tuning database %s: %s: %s", path,
                   doing, msg);
}

static cm_status exec_sql(cm_tune_db *db, const char *text, const char *doing, cm_err *err) {
  int rc = sqlite3_exec(db->sql, text, NULL, NULL, NULL);
  return rc == SQLITE_OK ? CM_OK : sql_error(db->path, db->sql, rc, doing, err);
}

/* ---- opening ------------------------------------------------------------ */

/* One-value pragma: its first column as text into out (may be NULL). */
static cm_status pragma_text(cm_tune_db *db, const char *text, char *out, size_t size,
                             cm_err *err) {
  sqlite3_stmt *s = NULL;
  int rc = sqlite3_prepare_v2(db->sql, text, -1, &s, NULL);
  if (rc == SQLITE_OK) rc = sqlite3_step(s);
  if (rc == SQLITE_ROW) {
    const unsigned char *v = sqlite3_column_text(s, 0);
    if (out) snprintf(out, size, "%s", v ? (const char *)v : "");
    rc = SQLITE_OK;
  } else if (rc == SQLITE_DONE) {
    if (out && size) *out = 0;
    rc = SQLITE_OK;
  }
  cm_status st = rc == SQLITE_OK ? CM_OK : sql_error(db->path, db->sql, rc, text, err);
  sqlite3_finalize(s);
  return st;
}

static cm_status schema_version(cm_tune_db *db, int *version, cm_err *err) {
  char text[32];
  cm_status st = pragma_text(db, "PRAGMA user_version", text, sizeof text, err);
  *version = atoi(text);
  if (st == CM_OK && *version > TUNE_DB_SCHEMA)
    st = cm_errorf(err, CM_EINVALID,
                   "tuning database %s: schema version %d, written by a newer cmaec (this one "
                   "reads version %d): use another file",
                   db->path, *version, TUNE_DB_SCHEMA);
  return st;
}

/* Creates the tables in a fresh file, refuses a file of a newer schema. A file that has them
 * takes no lock here, so readers of a shared (even read-only) file never wait. */
static cm_status ensure_schema(cm_tune_db *db, cm_err *err) {
  int version;
  cm_status st = schema_version(db, &version, err);
  if (st != CM_OK || version == TUNE_DB_SCHEMA) return st;
  st = exec_sql(db, "BEGIN IMMEDIATE", "locking to create the tables", err);
  if (st != CM_OK) return st;
  st = schema_version(db, &version, err); /* another process may have made them meanwhile */
  if (st == CM_OK && version < TUNE_DB_SCHEMA) {
    char set[64];
    snprintf(set, sizeof set, "PRAGMA user_version = %d", TUNE_DB_SCHEMA);
    st = exec_sql(db, tune_db_schema, "creating the tables", err);
    if (st == CM_OK) st = exec_sql(db, set, "setting the schema version", err);
  }
  if (st == CM_OK) return exec_sql(db, "COMMIT", "creating the tables", err);
  sqlite3_exec(db->sql, "ROLLBACK", NULL, NULL, NULL);
  return st;
}

static cm_status prepare(cm_tune_db *db, const char *text, sqlite3_stmt **out, cm_err *err) {
  int rc = sqlite3_prepare_v3(db->sql, text, -1, SQLITE_PREPARE_PERSISTENT, out, NULL);
  return rc == SQLITE_OK ? CM_OK : sql_error(db->path, db->sql, rc, "preparing a statement", err);
}

static cm_status open_connection(cm_tune_db *db, cm_err *err) {
  int rc = sqlite3_open_v2(db->path, &db->sql, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL);
  if (rc != SQLITE_OK) return sql_error(db->path, db->sql, rc, "cannot open", err);
  sqlite3_busy_timeout(db->sql, TUNE_DB_BUSY_MS);
  char mode[32];
  cm_status st = pragma_text(db, "PRAGMA journal_mode = WAL", mode, sizeof mode, err);
  if (st != CM_OK) return st;
  if (strcmp(mode, "wal") != 0)
    return cm_errorf(err, CM_EINVALID,
                     "tuning database %s: WAL mode refused (journal mode stays \"%s\"; a file "
                     "system without shared memory?)",
                     db->path, mode);
  /* WAL + NORMAL never corrupts the file; a power cut may lose the last trials, which is fine
   * for a cache and spares a sync per trial */
  st = exec_sql(db, "PRAGMA synchronous = NORMAL", "setting synchronous", err);
  if (st == CM_OK) st = ensure_schema(db, err);
  if (st == CM_OK)
    st = prepare(db,
                 "INSERT INTO trials (kernel, stage, device, version, point, ms, failure) "
                 "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                 &db->put_trial, err);
  if (st == CM_OK)
    st = prepare(db,
                 "INSERT OR REPLACE INTO best (kernel, stage, device, version, point, best_ms, "
                 "default_ms, label) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                 &db->put_best, err);
  if (st == CM_OK)
    st = prepare(db,
                 "SELECT point, best_ms FROM best "
                 "WHERE kernel = ?1 AND stage = ?2 AND device = ?3 AND version = ?4",
                 &db->get_best, err);
  return st;
}

cm_status cm_tune_db_open(const char *path, cm_tune_db **out, cm_err *err) {
  *out = NULL;
  char root_buf[TUNE_DB_PATH_MAX], file[TUNE_DB_PATH_MAX + 16];
  if (!path) {
    const char *root = cm_cache_dir(NULL, root_buf, sizeof root_buf);
    if (!root) return CM_OK; /* caching disabled */
    if (!cm_make_dirs(root))
      return cm_errorf(err, CM_EINVALID,
                       "tuning database: cannot create the cache directory %s: %s", root,
                       strerror(errno));
    snprintf(file, sizeof file, "%s/tuning.db", root);
    path = file;
  }
  if (!*path) return cm_errorf(err, CM_EINVALID, "tuning database: an empty path");
  cm_tune_db *db = calloc(1, sizeof *db);
  if (!db) return cm_errorf(err, CM_EINTERNAL, "tuning database %s: out of memory", path);
  if (snprintf(db->path, sizeof db->path, "%s", path) >= (int)sizeof db->path) {
    free(db);
    return cm_errorf(err, CM_EINVALID, "tuning database %.200s...: path longer than %d bytes", path,
                     TUNE_DB_PATH_MAX - 1);
  }
  cm_status st = open_connection(db, err);
  if (st != CM_OK) {
    cm_tune_db_close(db);
    return st;
  }
  *out = db;
  return CM_OK;
}

void cm_tune_db_close(cm_tune_db *db) {
  if (!db) return;
  sqlite3_finalize(db->put_trial);
  sqlite3_finalize(db->put_best);
  sqlite3_finalize(db->get_best);
  sqlite3_close(db->sql);
  free(db);
}

/* ---- records ------------------------------------------------------------ */

static cm_status check_key(const cm_tune_db *db, const cm_tune_key *key, cm_err *err) {
  size_t nk = strnlen(key->kernel, sizeof key->kernel);
  size_t nd = strnlen(key->device, sizeof key->device);
  if (nk == 0 || nk == sizeof key->kernel || nd == 0 || nd == sizeof key->device || key->stage < 0)
    return cm_errorf(err, CM_EINVALID,
                     "tuning database %s: a key needs a kernel hash, a stage >= 0 and a device "
                     "(kernel \"%.64s\", stage %d, device \"%.191s\")",
                     db->path, key->kernel, key->stage, key->device);
  return CM_OK;
}

static int bind_key(sqlite3_stmt *s, const cm_tune_key *key) {
  int rc = sqlite3_bind_text(s, 1, key->kernel, -1, SQLITE_STATIC);
  if (rc == SQLITE_OK) rc = sqlite3_bind_int(s, 2, key->stage);
  if (rc == SQLITE_OK) rc = sqlite3_bind_text(s, 3, key->device, -1, SQLITE_STATIC);
  if (rc == SQLITE_OK) rc = sqlite3_bind_int(s, 4, key->version);
  return rc;
}

/* Runs the bound write statement s in its own transaction (BEGIN IMMEDIATE: the lock is taken,
 * waiting up to the busy timeout, before anything is read, so two writers never deadlock). */
static cm_status write_one(cm_tune_db *db, sqlite3_stmt *s, int bind_rc, const char *doing,
                           cm_err *err) {
  cm_status st = bind_rc == SQLITE_OK ? CM_OK : sql_error(db->path, db->sql, bind_rc, doing, err);
  if (st == CM_OK) st = exec_sql(db, "BEGIN IMMEDIATE", doing, err);
  if (st == CM_OK) {
    int rc = sqlite3_step(s);
    st = rc == SQLITE_DONE ? CM_OK : sql_error(db->path, db->sql, rc, doing, err);
    sqlite3_reset(s);
    if (st == CM_OK) st = exec_sql(db, "COMMIT", doing, err);
    if (st != CM_OK) sqlite3_exec(db->sql, "ROLLBACK", NULL, NULL, NULL);
  }
  sqlite3_reset(s);
  sqlite3_clear_bindings(s);
  return st;
}

cm_status cm_tune_db_put_trial(cm_tune_db *db, const cm_tune_key *key, const char *point, double ms,
                               const char *failure, cm_err *err) {
  if (!db) return CM_OK;
  cm_status st = check_key(db, key, err);
  if (st != CM_OK) return st;
  if (!point || !*point || (!failure && !(ms >= 0 && isfinite(ms))))
    return cm_errorf(err, CM_EINVALID,
                     "tuning database %s: a trial of kernel %.12s stage %d needs a point and a "
                     "time >= 0 or a failure (point \"%s\", ms %g)",
                     db->path, key->kernel, key->stage, point ? point : "(null)", ms);
  sqlite3_stmt *s = db->put_trial;
  int rc = bind_key(s, key);
  if (rc == SQLITE_OK) rc = sqlite3_bind_text(s, 5, point, -1, SQLITE_STATIC);
  if (rc == SQLITE_OK) rc = failure ? sqlite3_bind_null(s, 6) : sqlite3_bind_double(s, 6, ms);
  if (rc == SQLITE_OK)
    rc = failure ? sqlite3_bind_text(s, 7, failure, -1, SQLITE_STATIC) : sqlite3_bind_null(s, 7);
  return write_one(db, s, rc, "recording a trial", err);
}

cm_status cm_tune_db_put_best(cm_tune_db *db, const cm_tune_key *key, const char *point,
                              double best_ms, double default_ms, const char *label, cm_err *err) {
  if (!db) return CM_OK;
  cm_status st = check_key(db, key, err);
  if (st != CM_OK) return st;
  if (!point || !*point || !label || !(best_ms >= 0 && isfinite(best_ms)) ||
      !(default_ms >= 0 && isfinite(default_ms)))
    return cm_errorf(err, CM_EINVALID,
                     "tuning database %s: the best of kernel %.12s stage %d needs a point, a label "
                     "and times >= 0 (point \"%s\", best %g ms, default %g ms)",
                     db->path, key->kernel, key->stage, point ? point : "(null)", best_ms,
                     default_ms);
  sqlite3_stmt *s = db->put_best;
  int rc = bind_key(s, key);
  if (rc == SQLITE_OK) rc = sqlite3_bind_text(s, 5, point, -1, SQLITE_STATIC);
  if (rc == SQLITE_OK) rc = sqlite3_bind_double(s, 6, best_ms);
  if (rc == SQLITE_OK) rc = sqlite3_bind_double(s, 7, default_ms);
  if (rc == SQLITE_OK) rc = sqlite3_bind_text(s, 8, label, -1, SQLITE_STATIC);
  return write_one(db, s, rc, "recording the best point", err);
}

cm_status cm_tune_db_get_best(cm_tune_db *db, const cm_tune_key *key, char *point, size_t size,
                              double *best_ms, bool *found, cm_err *err) {
  *found = false;
  if (!db) return CM_OK;
  cm_status st = check_key(db, key, err);
  if (st != CM_OK) return st;
  sqlite3_stmt *s = db->get_best;
  int rc = bind_key(s, key);
  if (rc == SQLITE_OK) rc = sqlite3_step(s);
  if (rc == SQLITE_ROW) {
    const char *p = (const char *)sqlite3_column_text(s, 0);
    if (!p || snprintf(point, size, "%s", p) >= (int)size)
      st = cm_errorf(err, CM_EINVALID,
                     "tuning database %s: the best point of kernel %.12s stage %d (\"%.200s\") "
                     "does not fit %zu bytes",
                     db->path, key->kernel, key->stage, p ? p : "(null)", size);
    if (best_ms) *best_ms = sqlite3_column_double(s, 1);
    *found = st == CM_OK;
  } else if (rc != SQLITE_DONE) {
    st = sql_error(db->path, db->sql, rc, "reading the best point", err);
  }
  sqlite3_reset(s);
  sqlite3_clear_bindings(s);
  return st;
}

/* ---- the report --------------------------------------------------------- */

typedef struct report_row {
  char device[192], kernel[65], label[160], point[256];
  int stage, version;
  bool has_best;
  double default_ms, best_ms;
  int64_t trials, failures;
} report_row;

/* Every key of best or trials (device NULL: all), per device: this space version first, the
 * most expensive default first, then label, kernel and stage, so the order is total. */
static const char report_query[] =
    "SELECT k.device, k.kernel, k.stage, k.version, b.label, b.point, b.default_ms, b.best_ms,"
    " (SELECT count(*) FROM trials AS t WHERE t.kernel = k.kernel AND t.stage = k.stage"
    "   AND t.device = k.device AND t.version = k.version),"
    " (SELECT count(*) FROM trials AS t WHERE t.kernel = k.kernel AND t.stage = k.stage"
    "   AND t.device = k.device AND t.version = k.version AND t.failure IS NOT NULL)"
    " FROM (SELECT kernel, stage, device, version FROM best"
    "       UNION SELECT kernel, stage, device, version FROM trials) AS k"
    " LEFT JOIN best AS b ON b.kernel = k.kernel AND b.stage = k.stage AND b.device = k.device"
    "   AND b.version = k.version"
    " WHERE ?1 IS NULL OR k.device = ?1"
    " ORDER BY k.device, k.version = ?2 DESC, k.version DESC, b.default_ms IS NULL,"
    "   b.default_ms DESC, b.label, k.kernel, k.stage";

static void column_copy(sqlite3_stmt *s, int col, char *out, size_t size) {
  const unsigned char *v = sqlite3_column_text(s, col);
  snprintf(out, size, "%s", v ? (const char *)v : "");
}

static cm_status report_rows(cm_tune_db *db, const char *device, report_row **rows, int *n,
                             cm_err *err) {
  *rows = NULL;
  *n = 0;
  sqlite3_stmt *s = NULL;
  int cap = 0;
  int rc = sqlite3_prepare_v2(db->sql, report_query, -1, &s, NULL);
  if (rc == SQLITE_OK)
    rc = device ? sqlite3_bind_text(s, 1, device, -1, SQLITE_STATIC) : sqlite3_bind_null(s, 1);
  if (rc == SQLITE_OK) rc = sqlite3_bind_int(s, 2, CM_TUNE_SPACE_VERSION);
  while (rc == SQLITE_OK || rc == SQLITE_ROW) {
    rc = sqlite3_step(s);
    if (rc != SQLITE_ROW) break;
    if (*n == cap) {
      cap = cap ? 2 * cap : 16;
      report_row *grown = realloc(*rows, (size_t)cap * sizeof *grown);
      if (!grown) {
        sqlite3_finalize(s);
        return cm_errorf(err, CM_EINTERNAL, "tuning database %s: out of memory", db->path);
      }
      *rows = grown;
    }
    report_row *r = &(*rows)[(*n)++];
    memset(r, 0, sizeof *r);
    column_copy(s, 0, r->device, sizeof r->device);
    column_copy(s, 1, r->kernel, sizeof r->kernel);
    r->stage = sqlite3_column_int(s, 2);
    r->version = sqlite3_column_int(s, 3);
    r->has_best = sqlite3_column_type(s, 5) != SQLITE_NULL;
    column_copy(s, 4, r->label, sizeof r->label);
    column_copy(s, 5, r->point, sizeof r->point);
    r->default_ms = sqlite3_column_double(s, 6);
    r->best_ms = sqlite3_column_double(s, 7);
    r->trials = sqlite3_column_int64(s, 8);
    r->failures = sqlite3_column_int64(s, 9);
    if (!r->has_best) snprintf(r->label, sizeof r->label, "%.12s s%d", r->kernel, r->stage);
  }
  cm_status st = rc == SQLITE_DONE ? CM_OK : sql_error(db->path, db->sql, rc, "reading", err);
  sqlite3_finalize(s);
  return st;
}

static void print_speedup(FILE *out, double default_ms, double best_ms) {
  if (best_ms > 0)
    fprintf(out, "  %7.2fx", default_ms / best_ms);
  else
    fprintf(out, "  %8s", "-");
}

/* One device's rows [first, last): the table, then its total over this space version. */
static void report_device(const report_row *rows, int first, int last, FILE *out) {
  int label_w = 5, point_w = 5;
  for (int i = first; i < last; i++) {
    int nl = (int)strlen(rows[i].label), np = (int)strlen(rows[i].point);
    label_w = nl > label_w ? nl : label_w;
    point_w = np > point_w ? np : point_w;
  }
  fprintf(out, "device %s\n", rows[first].device);
  fprintf(out, "  %-*s  %10s  %10s  %8s  %-*s  %6s  %6s\n", label_w, "label", "default ms",
          "best ms", "speedup", point_w, "point", "trials", "failed");
  int tuned = 0, stale = 0;
  int64_t trials = 0, failures = 0;
  double default_sum = 0, best_sum = 0;
  for (int i = first; i < last; i++) {
    const report_row *r = &rows[i];
    fprintf(out, "  %-*s", label_w, r->label);
    if (r->has_best) {
      fprintf(out, "  %10.4f  %10.4f", r->default_ms, r->best_ms);
      print_speedup(out, r->default_ms, r->best_ms);
    } else {
      fprintf(out, "  %10s  %10s  %8s", "-", "-", "-");
    }
    fprintf(out, "  %-*s  %6lld  %6lld", point_w, r->has_best ? r->point : "-",
            (long long)r->trials, (long long)r->failures);
    if (r->version != CM_TUNE_SPACE_VERSION) {
      fprintf(out, "  stale: space version %d, ignored\n", r->version);
      stale++;
      continue;
    }
    fprintf(out, r->has_best ? "\n" : "  no best yet\n");
    trials += r->trials;
    failures += r->failures;
    if (!r->has_best) continue;
    tuned++;
    default_sum += r->default_ms;
    best_sum += r->best_ms;
  }
  fprintf(out, "  total: %d tuned stage%s, default %.4f ms, best %.4f ms, speedup", tuned,
          tuned == 1 ? "" : "s", default_sum, best_sum);
  if (best_sum > 0)
    fprintf(out, " %.2fx", default_sum / best_sum);
  else
    fprintf(out, " -");
  fprintf(out, ", %lld trials, %lld failed", (long long)trials, (long long)failures);
  if (stale) fprintf(out, "; %d stale (another space version)", stale);
  fputc('\n', out);
}

cm_status cm_tune_db_report(cm_tune_db *db, const char *device, FILE *out, cm_err *err) {
  if (!db) {
    fprintf(out,
            "tuning database: none (caching disabled: CMAEC_CACHE_DIR is empty): no records\n");
    return CM_OK;
  }
  report_row *rows;
  int n;
  cm_status st = report_rows(db, device, &rows, &n, err);
  if (st != CM_OK) {
    free(rows);
    return st;
  }
  fprintf(out, "tuning database %s (space version %d)", db->path, CM_TUNE_SPACE_VERSION);
  if (device) fprintf(out, ", device %s", device);
  if (n == 0)
    fprintf(out, ": no records\n");
  else
    fprintf(out, "\n");
  for (int first = 0; first < n;) {
    int last = first + 1;
    while (last < n && !strcmp(rows[last].device, rows[first].device)) last++;
    report_device(rows, first, last, out);
    first = last;
  }
  free(rows);
  return CM_OK;
}
