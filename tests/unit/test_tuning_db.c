/* tests/unit/test_tuning_db.c — the tuning database (runtime/tuning_db.c): CMAEC_TUNE, device
 * ids, records written and read back (also after reopening), a space version bump hiding old
 * records, the report's text, two processes writing one file at once, and files that are not
 * a tuning database refused with a message; a compile over such a file warns once and plans
 * with the defaults, while cm_tune still reports it; recorded K splits that remove or add a
 * stage applied by a compile. */
#include "../../runtime/runtime.h"
#include "../test.h"

#include <dirent.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

enum { WRITER_TRIALS = 200 };

/* ---- scratch files ---------------------------------------------------------- */

static char scratch[256];

static void scratch_make(void) {
  const char *tmp = getenv("TMPDIR");
  snprintf(scratch, sizeof scratch, "%s/cmaec-tunedb-XXXXXX", tmp && *tmp ? tmp : "/tmp");
  CHECK(mkdtemp(scratch) != NULL);
}

/* rm -r of the scratch directory (it holds files and one level of directories) */
static void remove_tree(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return;
  struct dirent *e;
  char path[512];
  while ((e = readdir(d))) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
    snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
    struct stat s;
    if (lstat(path, &s) == 0 && S_ISDIR(s.st_mode))
      remove_tree(path);
    else
      unlink(path);
  }
  closedir(d);
  rmdir(dir);
}

static void scratch_path(const char *name, char *out, size_t size) {
  snprintf(out, size, "%s/%s", scratch, name);
}

static void remove_db(const char *path) {
  char side[600];
  unlink(path);
  snprintf(side, sizeof side, "%s-wal", path);
  unlink(side);
  snprintf(side, sizeof side, "%s-shm", path);
  unlink(side);
}

static cm_tune_key make_key(char hash_digit, int stage, const char *device, int version) {
  cm_tune_key k;
  memset(&k, 0, sizeof k);
  memset(k.kernel, hash_digit, 64);
  k.stage = stage;
  snprintf(k.device, sizeof k.device, "%s", device);
  k.version = version;
  return k;
}

/* The report as a string (malloc'ed); NULL after a failed report. */
static char *report_text(cm_tune_db *db, const char *device) {
  char *text = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&text, &len);
  cm_err err = {0};
  cm_status st = cm_tune_db_report(db, device, f, &err);
  fclose(f);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  if (st == CM_OK) return text;
  free(text);
  return NULL;
}

/* ---- CMAEC_TUNE and device ids ---------------------------------------------------------- */

static void test_mode_resolve(void) {
  cm_err err = {0};
  cm_tune_mode m = CM_TUNE_FROM_ENV;
  unsetenv("CMAEC_TUNE");
  CHECK(cm_tune_mode_resolve(CM_TUNE_FROM_ENV, &m, &err) == CM_OK && m == CM_TUNE_CACHED);
  setenv("CMAEC_TUNE", "", 1);
  CHECK(cm_tune_mode_resolve(CM_TUNE_FROM_ENV, &m, &err) == CM_OK && m == CM_TUNE_CACHED);
  setenv("CMAEC_TUNE", "off", 1);
  CHECK(cm_tune_mode_resolve(CM_TUNE_FROM_ENV, &m, &err) == CM_OK && m == CM_TUNE_OFF);
  setenv("CMAEC_TUNE", "search", 1);
  CHECK(cm_tune_mode_resolve(CM_TUNE_FROM_ENV, &m, &err) == CM_OK && m == CM_TUNE_SEARCH);
  setenv("CMAEC_TUNE", "cached", 1);
  CHECK(cm_tune_mode_resolve(CM_TUNE_FROM_ENV, &m, &err) == CM_OK && m == CM_TUNE_CACHED);
  /* an explicit mode wins over the environment */
  CHECK(cm_tune_mode_resolve(CM_TUNE_OFF, &m, &err) == CM_OK && m == CM_TUNE_OFF);
  setenv("CMAEC_TUNE", "fast", 1);
  CHECK(cm_tune_mode_resolve(CM_TUNE_FROM_ENV, &m, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "CMAEC_TUNE=fast");
  CHECK_STR_CONTAINS(err.msg, "off, cached or search");
  CHECK(cm_tune_mode_resolve(CM_TUNE_SEARCH, &m, &err) == CM_OK && m == CM_TUNE_SEARCH);
  unsetenv("CMAEC_TUNE");
}

static void test_device_id(void) {
  char id[192];
  cm_target cpu;
  memset(&cpu, 0, sizeof cpu);
  cpu.kind = CM_TARGET_CPU;
  snprintf(cpu.cpu.cpu, sizeof cpu.cpu.cpu, "znver3");
  cpu.cpu.vector_bits = 256;
  cm_tune_device_id(&cpu, 2, NULL, 0, id, sizeof id);
  CHECK_MSG(!strcmp(id, "cpu znver3 256 threads 2"), "%s", id);
  snprintf(cpu.cpu.cpu, sizeof cpu.cpu.cpu, "znver4");
  cpu.cpu.vector_bits = 512;
  cpu.cpu.dot_bf16 = true;
  cm_tune_device_id(&cpu, 16, NULL, 0, id, sizeof id);
  CHECK_MSG(!strcmp(id, "cpu znver4 512 bf16 threads 16"), "%s", id);

  cm_target gpu;
  cm_err err = {0};
  CHECK(cm_target_cuda("sm_90", &gpu, &err) == CM_OK);
  cm_tune_device_id(&gpu, 0, "NVIDIA H100 80GB HBM3", 13000, id, sizeof id);
  CHECK_MSG(!strcmp(id, "cuda NVIDIA H100 80GB HBM3 sm_90 driver 13000"), "%s", id);
  cm_tune_device_id(&gpu, 0, NULL, 0, id, sizeof id);
  CHECK_MSG(!strcmp(id, "emulated sm_90"), "%s", id);
  /* a short buffer is cut, never overrun */
  char small[8];
  memset(small, 'x', sizeof small);
  cm_tune_device_id(&gpu, 0, NULL, 0, small, 6);
  CHECK(!strcmp(small, "emula") && small[6] == 'x');
}

/* ---- records ---------------------------------------------------------------------------- */

static void test_round_trip(void) {
  scratch_make();
  char path[300];
  scratch_path("t.db", path, sizeof path);
  cm_err err = {0};
  cm_tune_db *db = NULL;
  CHECK_MSG(cm_tune_db_open(path, &db, &err) == CM_OK && db, "%s", err.msg);
  cm_tune_key k = make_key('a', 1, "cpu znver3 256 threads 2", CM_TUNE_SPACE_VERSION);
  char point[64];
  double ms = -1;
  bool found = true;
  CHECK(cm_tune_db_get_best(db, &k, point, sizeof point, &ms, &found, &err) == CM_OK && !found);
  CHECK(cm_tune_db_put_trial(db, &k, "mr=6,nr=16", 2.5, NULL, &err) == CM_OK);
  CHECK(cm_tune_db_put_trial(db, &k, "mr=4,nr=16", 0, "compile: too many registers", &err) ==
        CM_OK);
  CHECK(cm_tune_db_put_best(db, &k, "mr=6,nr=16", 2.5, 3.0, "k1_gemm s1 gemm 8x8x8", &err) ==
        CM_OK);
  CHECK(cm_tune_db_get_best(db, &k, point, sizeof point, &ms, &found, &err) == CM_OK && found);
  CHECK(found && !strcmp(point, "mr=6,nr=16") && ms == 2.5);
  /* a later search replaces the best */
  CHECK(cm_tune_db_put_best(db, &k, "mr=6,nr=8", 2.0, 3.0, "k1_gemm s1 gemm 8x8x8", &err) == CM_OK);
  /* another stage, device or version is another key */
  cm_tune_key other = k;
  other.stage = 2;
  CHECK(cm_tune_db_get_best(db, &other, point, sizeof point, &ms, &found, &err) == CM_OK && !found);
  other = k;
  snprintf(other.device, sizeof other.device, "cpu znver3 256 threads 1");
  CHECK(cm_tune_db_get_best(db, &other, point, sizeof point, &ms, &found, &err) == CM_OK && !found);
  /* bad records are refused, naming the file */
  CHECK(cm_tune_db_put_trial(db, &k, "mr=6", -1, NULL, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, path);
  CHECK(cm_tune_db_put_trial(db, &k, "", 1, NULL, &err) == CM_EINVALID);
  CHECK(cm_tune_db_put_best(db, &k, "mr=6", NAN, 1, "l", &err) == CM_EINVALID);
  other = k;
  other.kernel[0] = 0;
  CHECK(cm_tune_db_put_trial(db, &other, "mr=6", 1, NULL, &err) == CM_EINVALID);
  char tiny[4];
  CHECK(cm_tune_db_get_best(db, &k, tiny, sizeof tiny, &ms, &found, &err) == CM_EINVALID && !found);
  cm_tune_db_close(db);

  /* the records outlive the connection */
  db = NULL;
  CHECK_MSG(cm_tune_db_open(path, &db, &err) == CM_OK && db, "%s", err.msg);
  CHECK(cm_tune_db_get_best(db, &k, point, sizeof point, &ms, &found, &err) == CM_OK && found);
  CHECK(found && !strcmp(point, "mr=6,nr=8") && ms == 2.0);
  cm_tune_db_close(db);

  /* no database when caching is disabled: puts do nothing, nothing is found */
  setenv("CMAEC_CACHE_DIR", "", 1);
  db = (cm_tune_db *)&err; /* overwritten */
  CHECK(cm_tune_db_open(NULL, &db, &err) == CM_OK && db == NULL);
  CHECK(cm_tune_db_put_trial(NULL, &k, "mr=6", 1, NULL, &err) == CM_OK);
  CHECK(cm_tune_db_put_best(NULL, &k, "mr=6", 1, 1, "l", &err) == CM_OK);
  CHECK(cm_tune_db_get_best(NULL, &k, point, sizeof point, &ms, &found, &err) == CM_OK && !found);
  char *text = report_text(NULL, NULL);
  CHECK(text && strstr(text, "caching disabled"));
  free(text);
  /* the default file: tuning.db in the cache root, created with its directories */
  char root[300], expect[340];
  scratch_path("cache/nested", root, sizeof root);
  setenv("CMAEC_CACHE_DIR", root, 1);
  CHECK_MSG(cm_tune_db_open(NULL, &db, &err) == CM_OK && db, "%s", err.msg);
  cm_tune_db_close(db);
  snprintf(expect, sizeof expect, "%s/tuning.db", root);
  CHECK(access(expect, F_OK) == 0);
  unsetenv("CMAEC_CACHE_DIR");
  remove_tree(scratch);
}

static void test_version_bump(void) {
  scratch_make();
  char path[300];
  scratch_path("v.db", path, sizeof path);
  cm_err err = {0};
  cm_tune_db *db = NULL;
  CHECK_MSG(cm_tune_db_open(path, &db, &err) == CM_OK && db, "%s", err.msg);
  const char *dev = "emulated sm_90";
  cm_tune_key old = make_key('b', 0, dev, CM_TUNE_SPACE_VERSION - 1);
  CHECK(cm_tune_db_put_trial(db, &old, "bm=64", 4.0, NULL, &err) == CM_OK);
  CHECK(cm_tune_db_put_best(db, &old, "bm=64", 4.0, 5.0, "old_gemm s0", &err) == CM_OK);
  cm_tune_key now = old;
  now.version = CM_TUNE_SPACE_VERSION;
  char point[64];
  double ms;
  bool found = true;
  CHECK(cm_tune_db_get_best(db, &now, point, sizeof point, &ms, &found, &err) == CM_OK && !found);
  char *text = report_text(db, NULL);
  char stale[64];
  snprintf(stale, sizeof stale, "stale: space version %d, ignored", CM_TUNE_SPACE_VERSION - 1);
  CHECK(text && strstr(text, "old_gemm s0") && strstr(text, stale));
  CHECK(text && strstr(text, "total: 0 tuned stages") && strstr(text, "1 stale"));
  free(text);
  /* the current version's records count; the old ones stay stale */
  CHECK(cm_tune_db_put_best(db, &now, "bm=128", 2.0, 5.0, "new_gemm s0", &err) == CM_OK);
  CHECK(cm_tune_db_get_best(db, &now, point, sizeof point, &ms, &found, &err) == CM_OK && found);
  CHECK(found && !strcmp(point, "bm=128"));
  text = report_text(db, NULL);
  CHECK(text && strstr(text, "total: 1 tuned stage,") && strstr(text, "1 stale"));
  /* the current version's row comes before the stale one */
  CHECK(text && strstr(text, "new_gemm s0") && strstr(text, "old_gemm s0") &&
        strstr(text, "new_gemm s0") < strstr(text, "old_gemm s0"));
  free(text);
  cm_tune_db_close(db);
  remove_tree(scratch);
}

/* ---- the report --------------------------------------------------------------------------- */

typedef struct fill_record {
  char hash;
  int stage;
  const char *device;
  const char *point;
  double ms;           /* a trial's time; < 0: a best record */
  const char *failure; /* a failed trial */
  double default_ms;   /* best records */
  const char *label;
} fill_record;

static const fill_record report_records[] = {
    {'a', 0, "cpu znver3 256 threads 2", "mr=6,nr=16,kc=256", 1.5, NULL, 0, NULL},
    {'a', 0, "cpu znver3 256 threads 2", "mr=4,nr=16,kc=256", 3.0, NULL, 0, NULL},
    {'a', 0, "cpu znver3 256 threads 2", "mr=8,nr=16,kc=256", 0, "compile: spills", 0, NULL},
    {'a', 0, "cpu znver3 256 threads 2", "mr=6,nr=16,kc=256", -1, NULL, 3.0,
     "k1_gemm s0 gemm 394x192x576"},
    {'b', 1, "cpu znver3 256 threads 2", "bc=64", 4.0, NULL, 0, NULL},
    {'b', 1, "cpu znver3 256 threads 2", "bc=32", 6.0, NULL, 0, NULL},
    {'b', 1, "cpu znver3 256 threads 2", "bc=64", -1, NULL, 6.0, "k2_attn s1 attention"},
    {'c', 0, "cpu znver3 256 threads 2", "vec=8", 0.5, NULL, 0, NULL},
    {'c', 0, "cpu znver3 256 threads 2", "vec=16", 0, "crash: signal 11", 0, NULL},
    {'a', 0, "emulated sm_90", "bm=128", 1.0, NULL, 0, NULL},
    {'a', 0, "emulated sm_90", "bm=128", -1, NULL, 1.0, "k1_gemm s0 gemm 394x192x576"},
};
enum { N_REPORT_RECORDS = (int)(sizeof report_records / sizeof report_records[0]) };

/* The trials, then the bests (a best's time is its point's trial time), in the table's order or
 * reversed. */
static void fill(cm_tune_db *db, bool reversed) {
  cm_err err = {0};
  for (int j = 0; j < N_REPORT_RECORDS; j++) {
    const fill_record *r = &report_records[reversed ? N_REPORT_RECORDS - 1 - j : j];
    if (r->ms < 0) continue;
    cm_tune_key k = make_key(r->hash, r->stage, r->device, CM_TUNE_SPACE_VERSION);
    CHECK_MSG(cm_tune_db_put_trial(db, &k, r->point, r->ms, r->failure, &err) == CM_OK, "%s",
              err.msg);
  }
  for (int j = 0; j < N_REPORT_RECORDS; j++) {
    const fill_record *b = &report_records[reversed ? N_REPORT_RECORDS - 1 - j : j];
    if (b->ms >= 0) continue;
    double best = -1;
    for (int i = 0; i < N_REPORT_RECORDS; i++) {
      const fill_record *t = &report_records[i];
      if (t->ms >= 0 && !t->failure && t->hash == b->hash && !strcmp(t->device, b->device) &&
          !strcmp(t->point, b->point))
        best = t->ms;
    }
    cm_tune_key k = make_key(b->hash, b->stage, b->device, CM_TUNE_SPACE_VERSION);
    CHECK(cm_tune_db_put_best(db, &k, b->point, best, b->default_ms, b->label, &err) == CM_OK);
  }
}

/* The numbers of the report line of label: default, best, speedup, point, trials, failed. */
static bool report_line(const char *text, const char *label, double *def, double *best,
                        double *speedup, char *point, long long *trials, long long *failed) {
  const char *line = text;
  while ((line = strstr(line, label))) {
    if (line[-1] == ' ' && line[-2] == ' ') break;
    line++;
  }
  if (!line) return false;
  return sscanf(line + strlen(label), "%lf %lf %lfx %63s %lld %lld", def, best, speedup, point,
                trials, failed) == 6;
}

static void test_report(void) {
  scratch_make();
  char path[300];
  scratch_path("r.db", path, sizeof path);
  cm_err err = {0};
  cm_tune_db *db = NULL;
  CHECK_MSG(cm_tune_db_open(path, &db, &err) == CM_OK && db, "%s", err.msg);
  char *empty = report_text(db, NULL);
  CHECK(empty && strstr(empty, path) && strstr(empty, ": no records\n"));
  free(empty);
  fill(db, false);
  char *text = report_text(db, NULL);
  cm_tune_db_close(db);
  CHECK(text != NULL);
  if (!text) return;
  fputs(text, stderr);
  double def, best, speedup;
  long long trials, failed;
  char point[64];
  CHECK(report_line(text, "k1_gemm s0 gemm 394x192x576", &def, &best, &speedup, point, &trials,
                    &failed));
  CHECK(def == 3.0 && best == 1.5 && speedup == 2.0 && !strcmp(point, "mr=6,nr=16,kc=256"));
  CHECK(trials == 3 && failed == 1);
  CHECK(report_line(text, "k2_attn s1 attention", &def, &best, &speedup, point, &trials, &failed));
  CHECK(def == 6.0 && best == 4.0 && speedup == 1.5 && !strcmp(point, "bc=64"));
  CHECK(trials == 2 && failed == 0);
  /* a key with trials and no best yet: its hash's first 12 digits and stage */
  const char *pending = strstr(text, "cccccccccccc s0");
  CHECK(pending && strstr(pending, "no best yet"));
  /* per device, the most expensive default first; devices in name order */
  const char *dev_cpu = strstr(text, "device cpu znver3 256 threads 2\n");
  const char *dev_emu = strstr(text, "device emulated sm_90\n");
  const char *k1 = strstr(text, "  k1_gemm"), *k2 = strstr(text, "  k2_attn");
  CHECK(dev_cpu && dev_emu && k1 && k2 && pending);
  CHECK(dev_cpu < k2 && k2 < k1 && k1 < pending && pending < dev_emu);
  /* the cpu total: defaults 3 + 6, best 1.5 + 4, 7 trials of which 2 failed */
  char total[160];
  snprintf(total, sizeof total,
           "total: 2 tuned stages, default %.4f ms, best %.4f ms, speedup %.2fx, 7 trials, "
           "2 failed\n",
           9.0, 5.5, 9.0 / 5.5);
  CHECK_STR_CONTAINS(text, total);
  CHECK_STR_CONTAINS(text, "total: 1 tuned stage, default 1.0000 ms, best 1.0000 ms, speedup "
                           "1.00x, 1 trials, 0 failed\n");

  /* the same records written in the other order print the same text */
  remove_db(path);
  CHECK_MSG(cm_tune_db_open(path, &db, &err) == CM_OK && db, "%s", err.msg);
  fill(db, true);
  char *again = report_text(db, NULL);
  CHECK(again && !strcmp(again, text));
  free(again);
  /* one device only */
  char *emu = report_text(db, "emulated sm_90");
  CHECK(emu && strstr(emu, "device emulated sm_90") && !strstr(emu, "znver3"));
  free(emu);
  char *none = report_text(db, "cuda nothing");
  CHECK(none && strstr(none, ", device cuda nothing: no records\n"));
  free(none);
  cm_tune_db_close(db);
  free(text);
  remove_tree(scratch);
}

/* ---- two processes at once ---------------------------------------------------------------- */

/* A child: waits for the go byte, then opens the (maybe not yet created) file and records
 * WRITER_TRIALS trials, each its own transaction, a best now and then. 0 when all went well. */
static int writer(const char *path, int id, int go) {
  char c;
  if (read(go, &c, 1) != 1) return 3;
  cm_err err = {0};
  cm_tune_db *db = NULL;
  if (cm_tune_db_open(path, &db, &err) != CM_OK) {
    fprintf(stderr, "writer %d: %s\n", id, err.msg);
    return 1;
  }
  cm_tune_key k = make_key('d', 0, "cpu shared threads 1", CM_TUNE_SPACE_VERSION);
  cm_status st = CM_OK;
  for (int i = 0; i < WRITER_TRIALS && st == CM_OK; i++) {
    char point[32], got[32];
    snprintf(point, sizeof point, "w%d_p%d", id, i);
    st = cm_tune_db_put_trial(db, &k, point, 1.0 + i, NULL, &err);
    bool found;
    double ms;
    if (st == CM_OK && i % 20 == 0)
      st = cm_tune_db_put_best(db, &k, point, 1.0 + i, 2.0 + i, "shared", &err);
    if (st == CM_OK && i % 20 == 0)
      st = cm_tune_db_get_best(db, &k, got, sizeof got, &ms, &found, &err);
  }
  if (st != CM_OK) fprintf(stderr, "writer %d: %s\n", id, err.msg);
  cm_tune_db_close(db);
  return st == CM_OK ? 0 : 2;
}

static long long count_where(sqlite3 *sql, const char *query) {
  sqlite3_stmt *s = NULL;
  long long n = -1;
  if (sqlite3_prepare_v2(sql, query, -1, &s, NULL) == SQLITE_OK && sqlite3_step(s) == SQLITE_ROW)
    n = sqlite3_column_int64(s, 0);
  sqlite3_finalize(s);
  return n;
}

static void test_two_processes(void) {
  scratch_make();
  char path[300];
  scratch_path("shared.db", path, sizeof path);
  int go[2];
  CHECK(pipe(go) == 0);
  fflush(NULL);
  pid_t pids[2];
  for (int id = 0; id < 2; id++) {
    pids[id] = fork();
    if (pids[id] == 0) {
      close(go[1]);
      _exit(writer(path, id, go[0]));
    }
    CHECK(pids[id] > 0);
  }
  close(go[0]);
  CHECK(write(go[1], "gg", 2) == 2); /* both start at once */
  close(go[1]);
  for (int id = 0; id < 2; id++) {
    int status = -1;
    CHECK(pids[id] > 0 && waitpid(pids[id], &status, 0) == pids[id]);
    CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 0, "writer %d: status 0x%x", id, status);
  }
  sqlite3 *sql = NULL;
  CHECK(sqlite3_open_v2(path, &sql, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK);
  CHECK(count_where(sql, "SELECT count(*) FROM trials") == 2 * WRITER_TRIALS);
  CHECK(count_where(sql, "SELECT count(DISTINCT point) FROM trials") == 2 * WRITER_TRIALS);
  CHECK(count_where(sql, "SELECT count(*) FROM trials WHERE substr(point, 1, 3) = 'w0_'") ==
        WRITER_TRIALS);
  CHECK(count_where(sql, "SELECT count(*) FROM best") == 1);
  sqlite3_close(sql);
  cm_err err = {0};
  cm_tune_db *db = NULL;
  CHECK_MSG(cm_tune_db_open(path, &db, &err) == CM_OK && db, "%s", err.msg);
  char *text = report_text(db, NULL);
  double def, best, speedup;
  long long trials = 0, failed = -1;
  char point[64];
  CHECK(text && report_line(text, "shared", &def, &best, &speedup, point, &trials, &failed));
  CHECK(trials == 2 * WRITER_TRIALS && failed == 0);
  free(text);
  cm_tune_db_close(db);
  remove_tree(scratch);
}

/* ---- files that are not a tuning database ------------------------------------------------- */

/* Opening path fails with CM_EINVALID naming it (and needle), or, where the damage is found
 * later, reading from it does. */
static void check_refused(const char *path, const char *needle) {
  cm_err err = {0};
  cm_tune_db *db = NULL;
  cm_status st = cm_tune_db_open(path, &db, &err);
  if (st == CM_OK) {
    cm_tune_key k = make_key('a', 0, "cpu x", CM_TUNE_SPACE_VERSION);
    char point[64];
    bool found;
    st = cm_tune_db_get_best(db, &k, point, sizeof point, NULL, &found, &err);
    cm_tune_db_close(db);
  } else {
    CHECK(db == NULL);
  }
  CHECK_MSG(st == CM_EINVALID, "%s: status %d", path, (int)st);
  CHECK_STR_CONTAINS(err.msg, path);
  if (needle) CHECK_STR_CONTAINS(err.msg, needle);
}

static void sql_run(const char *path, const char *text) {
  sqlite3 *sql = NULL;
  CHECK(sqlite3_open(path, &sql) == SQLITE_OK);
  CHECK(sqlite3_exec(sql, text, NULL, NULL, NULL) == SQLITE_OK);
  sqlite3_close(sql);
}

static void test_bad_files(void) {
  scratch_make();
  char path[300];
  /* text */
  scratch_path("text.db", path, sizeof path);
  FILE *f = fopen(path, "w");
  CHECK(f != NULL);
  for (int i = 0; f && i < 200; i++) fputs("this is not a database\n", f);
  if (f) fclose(f);
  check_refused(path, "not a usable SQLite database");
  /* a tuning database whose schema page was overwritten */
  scratch_path("damaged.db", path, sizeof path);
  cm_err err = {0};
  cm_tune_db *db = NULL;
  CHECK_MSG(cm_tune_db_open(path, &db, &err) == CM_OK && db, "%s", err.msg);
  cm_tune_key k = make_key('a', 0, "cpu x", CM_TUNE_SPACE_VERSION);
  CHECK(cm_tune_db_put_best(db, &k, "mr=6", 1, 2, "l", &err) == CM_OK);
  cm_tune_db_close(db);
  f = fopen(path, "r+b");
  CHECK(f && fseek(f, 100, SEEK_SET) == 0);
  for (int i = 100; f && i < 4096; i++) fputc(0xA5, f);
  if (f) fclose(f);
  check_refused(path, "not a usable SQLite database");
  /* a newer schema */
  scratch_path("newer.db", path, sizeof path);
  sql_run(path, "PRAGMA user_version = 99; CREATE TABLE x (a);");
  check_refused(path, "newer cmaec");
  /* another program's database with a table of the same name */
  scratch_path("other.db", path, sizeof path);
  sql_run(path, "CREATE TABLE trials (something_else TEXT);");
  check_refused(path, NULL);
  /* a directory */
  scratch_path("cache", path, sizeof path);
  CHECK(mkdir(path, 0777) == 0);
  check_refused(path, NULL);
  remove_tree(scratch);
}

/* ---- compiling over an unreadable database ---------------------------------------------- */

/* tanh(x w): one GEMM stage, tunable on the CPU. */
static cm_graph *one_gemm(void) {
  cm_graph *g = cm_graph_new();
  int64_t xd[2] = {48, 64}, wd[2] = {64, 96};
  int y = cm_matmul(g, cm_input(g, "x", CM_F32, 2, xd), cm_input(g, "w", CM_F32, 2, wd), false,
                    false, NULL);
  cm_err err = {0};
  CHECK(cm_graph_add_output(g, cm_unary(g, CM_OP_TANH, y, NULL), &err) == CM_OK);
  CHECK_MSG(cm_graph_verify(g, &err) == CM_OK, "%s", err.msg);
  return g;
}

/* Compiles g (rendered, not built: the database is read before anything renders) with stderr
 * appended to log; returns the status, the tuned stages in *tuned. */
static cm_status compile_logged(const cm_graph *g, const cm_target *t, const char *log, int *tuned,
                                cm_err *err) {
  cm_compile_opts co = {0};
  co.compile_only = co.render_only = true;
  co.tune = CM_TUNE_FROM_ENV;
  fflush(stderr);
  int saved = dup(2), fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
  CHECK(saved >= 0 && fd >= 0);
  dup2(fd, 2);
  cm_program *pr = NULL;
  cm_status st = cm_compile(g, t, &co, &pr, err);
  fflush(stderr);
  dup2(saved, 2);
  close(fd);
  close(saved);
  cm_program_stats ps = {0};
  if (pr) cm_program_stats_get(pr, &ps);
  *tuned = ps.tuned_stages;
  cm_program_free(pr);
  return st;
}

static char *read_all(const char *path) {
  FILE *f = fopen(path, "rb");
  char *text = calloc(1, 1 << 16);
  if (f && text) fread(text, 1, (1 << 16) - 1, f);
  if (f) fclose(f);
  return text;
}

static int occurrences(const char *hay, const char *needle) {
  int n = 0;
  for (const char *p = hay; p && (p = strstr(p, needle)); p += strlen(needle)) n++;
  return n;
}

static void test_unreadable_db_compiles(void) {
  scratch_make();
  char db[300], log[300], note[400];
  scratch_path("tuning.db", db, sizeof db);
  scratch_path("stderr.txt", log, sizeof log);
  FILE *f = fopen(db, "w");
  CHECK(f != NULL);
  for (int i = 0; f && i < 300; i++) fputs("garbage, not SQLite\n", f);
  if (f) fclose(f);
  setenv("CMAEC_CACHE_DIR", scratch, 1);
  setenv("CMAEC_TUNE", "cached", 1);
  cm_graph *g = one_gemm();
  cm_target t;
  cm_err err = {0};
  CHECK(cm_target_cpu(NULL, NULL, &t, &err) == CM_OK);
  for (int round = 0; round < 2; round++) {
    int tuned = -1;
    cm_status st = compile_logged(g, &t, log, &tuned, &err);
    CHECK_MSG(st == CM_OK, "compile %d over a garbage tuning.db: %s", round, err.msg);
    CHECK(tuned == 0);
  }
  char *text = read_all(log);
  snprintf(note, sizeof note, "tuning database %s unreadable: ", db);
  CHECK_MSG(occurrences(text, note) == 1, "expected one warning \"%s\" in: %s", note, text);
  CHECK_MSG(occurrences(text, "using default plans") == 1, "stderr: %s", text);
  CHECK_STR_CONTAINS(text, "not a usable SQLite database");
  free(text);
  /* the tuner itself still refuses the file */
  cm_tune_stats ts;
  cm_tune_opts to = {.max_stages = 1};
  err = (cm_err){0};
  CHECK(cm_tune(g, &t, NULL, &to, &ts, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, db);
  CHECK_STR_CONTAINS(err.msg, "not a usable SQLite database");
  cm_graph_free(g);
  unsetenv("CMAEC_TUNE");
  unsetenv("CMAEC_CACHE_DIR");
  remove_tree(scratch);
}

/* ---- recorded K splits ------------------------------------------------------------------ */

/* The GEMM stage of x[24 x K] w[K x 40] as lowered for t (compile_only, render_only, tune off):
 * its kernel's index, hash, stage and stage count. */
static bool lowered_gemm(const cm_graph *g, const cm_target *t, int *ki, char hash[65], int *si,
                         int *n_stages) {
  cm_compile_opts co = {0};
  co.compile_only = co.render_only = true;
  co.tune = CM_TUNE_OFF;
  cm_program *pr = NULL;
  cm_err err = {0};
  CHECK_MSG(cm_compile(g, t, &co, &pr, &err) == CM_OK, "%s", err.msg);
  bool found = false;
  const cm_kprogram *kp = pr ? cm_program_kernels(pr) : NULL;
  for (int i = 0; kp && i < kp->n_kernels && !found; i++)
    for (int s = 0; s < kp->kernels[i].n_stages && !found; s++)
      if (kp->kernels[i].stages[s].tmpl == CM_KT_GEMM) {
        *ki = i, *si = s, *n_stages = kp->kernels[i].n_stages, found = true;
        cm_kernel_structural_hash(&kp->kernels[i], hash);
      }
  cm_program_free(pr);
  return found;
}

/* The default point of stage si with knob k_split = split, as the database holds it. */
static bool k_split_point(const cm_graph *g, const cm_target *t, int ki, int si, int split,
                          char *text, size_t size) {
  cm_compile_opts co = {0};
  co.compile_only = co.render_only = true;
  co.tune = CM_TUNE_OFF;
  cm_program *pr = NULL;
  cm_err err = {0};
  CHECK(cm_compile(g, t, &co, &pr, &err) == CM_OK);
  cm_tune_space sp;
  bool ok = pr && cm_tune_space_of(&cm_program_kernels(pr)->kernels[ki], si, t, &sp, &err) == CM_OK;
  cm_tune_point p;
  if (ok) cm_tune_point_default(&sp, &p);
  bool knob = false;
  for (int i = 0; ok && i < sp.n_knobs; i++)
    if (!strcmp(sp.knobs[i].name, "k_split")) p.value[i] = split, knob = true;
  CHECK_MSG(knob, "stage %d: no k_split knob", si);
  if (knob) cm_tune_point_format(&sp, &p, text, size);
  cm_program_free(pr);
  return knob;
}

static void test_k_split_records(void) {
  scratch_make();
  setenv("CMAEC_CACHE_DIR", scratch, 1);
  setenv("CMAEC_TUNE", "cached", 1);
  cm_target t;
  cm_err err = {0};
  CHECK(cm_target_cpu(NULL, NULL, &t, &err) == CM_OK);
  /* K 1536 in one block: split in 4 as lowered (record: none); K 1024 over 4 row blocks of a
   * batch: not split (record: 2) */
  static const int64_t shapes[2][3] = {{1, 24, 1536}, {4, 24, 1024}};
  static const int record[2] = {1, 2}, change[2] = {-1, +1};
  for (int c = 0; c < 2; c++) {
    cm_graph *g = cm_graph_new();
    int64_t xd[3] = {shapes[c][0], shapes[c][1], shapes[c][2]},
            wd[3] = {shapes[c][0], shapes[c][2], 40};
    int r = shapes[c][0] > 1 ? 3 : 2, o = shapes[c][0] > 1 ? 0 : 1;
    int y = cm_matmul(g, cm_input(g, "x", CM_F32, r, xd + o), cm_input(g, "w", CM_F32, r, wd + o),
                      false, false, NULL);
    CHECK(cm_graph_add_output(g, cm_unary(g, CM_OP_TANH, y, NULL), &err) == CM_OK);
    int ki = 0, si = 0, n_stages = 0;
    cm_tune_key key = {.version = CM_TUNE_SPACE_VERSION};
    char text[256];
    if (lowered_gemm(g, &t, &ki, key.kernel, &si, &n_stages) &&
        k_split_point(g, &t, ki, si, record[c], text, sizeof text)) {
      key.stage = si;
      cm_tune_device_for(&t, NULL, key.device, sizeof key.device);
      char path[300];
      scratch_path("tuning.db", path, sizeof path);
      cm_tune_db *db = NULL;
      CHECK(cm_tune_db_open(path, &db, &err) == CM_OK);
      CHECK(cm_tune_db_put_best(db, &key, text, 1, 2, "gemm", &err) == CM_OK);
      cm_tune_db_close(db);
      cm_compile_opts co = {0};
      co.compile_only = co.render_only = true;
      cm_program *pr = NULL;
      CHECK_MSG(cm_compile(g, &t, &co, &pr, &err) == CM_OK, "%s", err.msg);
      cm_program_stats ps = {0};
      if (pr) cm_program_stats_get(pr, &ps);
      CHECK_MSG(ps.tuned_stages == 1, "case %d (%s): %d tuned stages", c, text, ps.tuned_stages);
      const cm_kernel *k = pr ? &cm_program_kernels(pr)->kernels[ki] : NULL;
      CHECK(k && k->n_stages == n_stages + change[c]);
      CHECK(pr && cm_program_kernels(pr)->max_scratch_bytes >= (k ? k->scratch_bytes : 0));
      cm_program_free(pr);
      remove_db(path);
    }
    cm_graph_free(g);
  }
  unsetenv("CMAEC_TUNE");
  unsetenv("CMAEC_CACHE_DIR");
  remove_tree(scratch);
}

TEST_MAIN(TEST(test_mode_resolve), TEST(test_device_id), TEST(test_round_trip),
          TEST(test_version_bump), TEST(test_report), TEST(test_two_processes),
          TEST(test_bad_files), TEST(test_unreadable_db_compiles), TEST(test_k_split_records))
