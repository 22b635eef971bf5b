/* tools/cmd_tune_report.c — cmaec tune --report: the tuning database's records (docs/runtime.md
 * "Tuning database"), per key the default and best times, the speedup and the best point. */
#include "cli.h"

#include <string.h>
#include <unistd.h>

static const char usage_tune_report[] =
    "usage: cmaec tune --report [--db PATH] [--device-id ID]\n"
    "\n"
    "Prints the tuning database: per device, per tuned kernel stage its label, the default\n"
    "plan's time, the best plan's, the speedup, the best point, the trials and failures; then\n"
    "the totals. Stale records (another search-space version) are listed and ignored.\n"
    "  --db PATH        the database (default: tuning.db in the cache root, $CMAEC_CACHE_DIR)\n"
    "  --device-id ID  one device only (\"cpu znver3 256 threads 2\", \"emulated sm_90\", ...)\n"
    "$CMAEC_TUNE (off|cached|search, default cached) is checked and shown.\n";

static const char *mode_name(cm_tune_mode m) {
  return m == CM_TUNE_OFF ? "off" : m == CM_TUNE_SEARCH ? "search" : "cached";
}

int cmd_tune_report(int argc, char **argv) {
  cli_option opts[] = {{"--help", false, NULL, false},
                       {"--report", false, NULL, false},
                       {"--db", true, NULL, false},
                       {"--device-id", true, NULL, false}};
  const int n_opts = (int)(sizeof opts / sizeof opts[0]);
  const char *pos[1];
  int n_pos;
  if (!cli_parse(argc, argv, 2, opts, n_opts, pos, 1, &n_pos, "tune")) return EXIT_INVALID;
  if (opts[0].given) return fputs(usage_tune_report, stdout), EXIT_OK;
  if (n_pos) return fprintf(stderr, "cmaec tune: --report takes no MODEL\n"), EXIT_INVALID;
  if (!opts[1].given) return fputs(usage_tune_report, stderr), EXIT_INVALID;
  cm_err err = {0};
  cm_tune_mode mode;
  if (cm_tune_mode_resolve(CM_TUNE_FROM_ENV, &mode, &err)) return cli_report(&err, "cmaec tune");
  const char *path = opts[2].value;
  char root_buf[4096], default_path[4200];
  if (!path) {
    const char *root = cm_cache_dir(NULL, root_buf, sizeof root_buf);
    if (root) {
      snprintf(default_path, sizeof default_path, "%s/tuning.db", root);
      path = default_path;
    }
  }
  /* a report never creates a database: nothing there is no records */
  if (path && access(path, F_OK) != 0) {
    if (opts[2].given) {
      fprintf(stderr, "cmaec tune: %s: no such tuning database\n", path);
      return EXIT_INVALID;
    }
    printf("CMAEC_TUNE: %s\ntuning database %s: no records (no file yet)\n", mode_name(mode), path);
    return EXIT_OK;
  }
  cm_tune_db *db = NULL;
  if (path && cm_tune_db_open(path, &db, &err)) return cli_report(&err, "cmaec tune");
  printf("CMAEC_TUNE: %s\n", mode_name(mode));
  cm_status st = cm_tune_db_report(db, opts[3].value, stdout, &err);
  cm_tune_db_close(db);
  return st ? cli_report(&err, "cmaec tune") : EXIT_OK;
}
