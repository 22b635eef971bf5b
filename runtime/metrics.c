/* runtime/metrics.c — the training log: metrics.jsonl (append-only, one
 * flushed JSON object per step, so a crash loses at most the line being
 * written), its reader for plots, and the progress line. */
#include "training.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* metrics.jsonl: one row of about 250 bytes per step, so a million steps fit */
#define METRICS_MAX_BYTES ((size_t)1 << 30)

static cm_status read_metrics_file(const char *path, char **text, size_t *len, cm_err *err) {
  return cm_read_file_max(path, METRICS_MAX_BYTES, "a metrics file", text, len, err);
}

struct cm_metrics_writer {
  FILE *f;
  char *path;
};

/* Rewrites path keeping whole lines only (a crash mid-write leaves a torn
 * last line, which would glue onto the next record) and, when resume_step >= 0,
 * only lines whose "step" is below it (steps after the checkpoint a run resumes
 * from are run again). The file is replaced atomically, and only if needed. */
static cm_status repair(const char *path, int64_t resume_step, cm_err *err) {
  char *text;
  size_t len;
  if (access(path, F_OK) != 0 && errno == ENOENT) return CM_OK; /* a new file */
  cm_status st = read_metrics_file(path, &text, &len, err);
  if (st) return st;
  char *keep = malloc(len + 1);
  if (!keep) {
    free(text);
    return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
  }
  size_t kl = 0, pos = 0;
  while (pos < len) {
    char *nl = memchr(text + pos, '\n', len - pos);
    if (!nl) break; /* torn */
    size_t end = (size_t)(nl - text) + 1;
    bool drop = false;
    if (resume_step >= 0) {
      *nl = '\0';
      cJSON *o = cJSON_Parse(text + pos);
      cJSON *stp = cJSON_GetObjectItemCaseSensitive(o, "step");
      drop = cJSON_IsNumber(stp) && stp->valuedouble >= (double)resume_step;
      cJSON_Delete(o);
      *nl = '\n';
    }
    if (!drop) {
      memcpy(keep + kl, text + pos, end - pos);
      kl += end - pos;
    }
    pos = end;
  }
  if (kl != len) {
    size_t pl = strlen(path);
    char *tmp = malloc(pl + 5);
    FILE *f = NULL;
    if (tmp) {
      memcpy(tmp, path, pl);
      memcpy(tmp + pl, ".tmp", 5);
      f = fopen(tmp, "wb");
    }
    bool ok = f && fwrite(keep, 1, kl, f) == kl && fflush(f) == 0 && fsync(fileno(f)) == 0;
    if (f && fclose(f) != 0) ok = false;
    if (!ok || rename(tmp, path) != 0) {
      st = cm_errorf(err, CM_EINVALID, "%s: cannot rewrite: %s", path, strerror(errno));
      if (tmp) remove(tmp);
    }
    free(tmp);
  }
  free(keep);
  free(text);
  return st;
}

cm_status cm_metrics_open(const char *path, int64_t resume_step, cm_metrics_writer **out,
                          cm_err *err) {
  *out = NULL;
  cm_status st = repair(path, resume_step, err);
  if (st) return st;
  cm_metrics_writer *w = calloc(1, sizeof *w);
  if (!w) return cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
  w->path = strdup(path);
  w->f = fopen(path, "ab");
  if (!w->f || !w->path) {
    st = cm_errorf(err, CM_EINVALID, "%s: cannot open for appending: %s", path, strerror(errno));
    if (w->f) fclose(w->f);
    free(w->path);
    free(w);
    return st;
  }
  *out = w;
  return CM_OK;
}

/* JSON has no NaN/inf; %.17g keeps every double exactly. */
static void put_num(FILE *f, const char *key, double v) {
  fputs(",\"", f);
  for (const char *c = key; *c; c++) {
    if (*c == '"' || *c == '\\') fputc('\\', f);
    if ((unsigned char)*c < 0x20) {
      fprintf(f, "\\u%04x", (unsigned char)*c);
      continue;
    }
    fputc(*c, f);
  }
  if (isfinite(v))
    fprintf(f, "\":%.17g", v);
  else
    fputs("\":null", f);
}

cm_status cm_metrics_write(cm_metrics_writer *w, const cm_metrics_row *r, cm_err *err) {
  FILE *f = w->f;
  fprintf(f, "{\"step\":%lld,\"epoch\":%lld", (long long)r->step, (long long)r->epoch);
  put_num(f, "loss_rc", r->loss_rc);
  put_num(f, "loss_ct", r->loss_ct);
  put_num(f, "loss", r->loss);
  put_num(f, "lr", r->lr);
  put_num(f, "momentum", r->momentum);
  put_num(f, "images_per_s", r->images_per_s);
  put_num(f, "step_ms", r->step_ms);
  for (int i = 0; i < r->n_extra; i++) put_num(f, r->extra_names[i], r->extra_values[i]);
  if (r->precision) fprintf(f, ",\"precision\":\"%s\"", r->precision); /* a fixed word */
  fputs("}\n", f);
  if (fflush(f) != 0 || ferror(f))
    return cm_errorf(err, CM_EINVALID, "%s: cannot write step %lld: %s", w->path,
                     (long long)r->step, strerror(errno));
  return CM_OK;
}

void cm_metrics_close(cm_metrics_writer *w) {
  if (!w) return;
  if (w->f) fclose(w->f);
  free(w->path);
  free(w);
}

void cm_metrics_table_free(cm_metrics_table *t) {
  for (int i = 0; i < t->n_cols; i++) free(t->cols[i]);
  free(t->cols);
  free(t->values);
  memset(t, 0, sizeof *t);
}

int cm_metrics_column(const cm_metrics_table *t, const char *name) {
  for (int i = 0; i < t->n_cols; i++)
    if (strcmp(t->cols[i], name) == 0) return i;
  return -1;
}

static int add_column(cm_metrics_table *t, const char *name, int64_t rows_cap) {
  int c = cm_metrics_column(t, name);
  if (c >= 0) return c;
  char **cols = realloc(t->cols, (size_t)(t->n_cols + 1) * sizeof *cols);
  if (!cols) return -1;
  t->cols = cols;
  char *dup = strdup(name);
  double *v = rows_cap ? malloc((size_t)rows_cap * (size_t)(t->n_cols + 1) * sizeof *v) : NULL;
  if (!dup || (rows_cap && !v)) {
    free(dup);
    free(v);
    return -1;
  }
  /* widen the existing rows by one NaN column */
  for (int64_t r = 0; r < t->n_rows; r++) {
    memcpy(v + r * (t->n_cols + 1), t->values + r * t->n_cols, (size_t)t->n_cols * sizeof *v);
    v[r * (t->n_cols + 1) + t->n_cols] = NAN;
  }
  free(t->values);
  t->values = v;
  cols[t->n_cols] = dup;
  return t->n_cols++;
}

cm_status cm_metrics_read(const char *path, cm_metrics_table *out, cm_err *err) {
  memset(out, 0, sizeof *out);
  char *text;
  size_t len;
  cm_status st = read_metrics_file(path, &text, &len, err);
  if (st) return st;
  int64_t n_lines = 0;
  for (size_t i = 0; i < len; i++) n_lines += text[i] == '\n';
  int64_t cap = n_lines + 1;
  size_t pos = 0;
  int64_t line_no = 0;
  while (pos < len) {
    line_no++;
    char *nl = memchr(text + pos, '\n', len - pos);
    size_t end = nl ? (size_t)(nl - text) : len;
    text[end] = '\0';
    const char *line = text + pos;
    pos = end + 1;
    while (*line == ' ' || *line == '\t' || *line == '\r') line++;
    if (!*line) continue;
    cJSON *obj = cJSON_Parse(line);
    if (!obj || !cJSON_IsObject(obj)) {
      cJSON_Delete(obj);
      if (!nl) break; /* torn last line */
      st = cm_errorf(err, CM_EINVALID, "%s:%lld: not a JSON object", path, (long long)line_no);
      goto fail;
    }
    int64_t r = out->n_rows;
    for (cJSON *it = obj->child; it; it = it->next) {
      if (add_column(out, it->string ? it->string : "", cap) < 0) {
        cJSON_Delete(obj);
        st = cm_errorf(err, CM_EINTERNAL, "%s: out of memory", path);
        goto fail;
      }
    }
    for (int c = 0; c < out->n_cols; c++) out->values[r * out->n_cols + c] = NAN;
    for (cJSON *it = obj->child; it; it = it->next) {
      int c = cm_metrics_column(out, it->string ? it->string : "");
      if (cJSON_IsNumber(it)) out->values[r * out->n_cols + c] = it->valuedouble;
    }
    out->n_rows++;
    cJSON_Delete(obj);
  }
  free(text);
  return CM_OK;
fail:
  free(text);
  cm_metrics_table_free(out);
  return st;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void cm_progress_init(cm_progress *p, FILE *out, int64_t total_steps, int64_t every, int tty) {
  memset(p, 0, sizeof *p);
  p->out = out;
  p->tty = tty < 0 ? isatty(fileno(out)) != 0 : tty != 0;
  p->total = total_steps;
  p->every = every > 0 ? every : 1;
  p->first_step = -1;
  p->last_step = -1;
  p->t_start = now_s();
  p->t_last_draw = -1;
}

static void fmt_duration(char *buf, size_t n, double s) {
  if (!isfinite(s) || s < 0) {
    snprintf(buf, n, "--:--");
    return;
  }
  long t = (long)(s + 0.5);
  if (t >= 3600)
    snprintf(buf, n, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
  else
    snprintf(buf, n, "%02ld:%02ld", t / 60, t % 60);
}

/* step is the 0-based index of the step just finished. */
void cm_progress_update(cm_progress *p, int64_t step, double loss) {
  double t = now_s();
  if (p->first_step < 0) {
    p->first_step = step;
    p->t_start = t;
  }
  p->last_step = step;
  int64_t done = step + 1;
  double elapsed = t - p->t_start;
  int64_t timed = step - p->first_step; /* steps finished since the first one was */
  double rate = timed > 0 && elapsed > 0 ? (double)timed / elapsed : 0;
  double eta = rate > 0 ? (double)(p->total - done) / rate : NAN;
  char eta_s[32];
  fmt_duration(eta_s, sizeof eta_s, eta);
  if (p->tty) {
    /* redraw at most ~10 times a second, and always at the end */
    if (done < p->total && p->t_last_draw >= 0 && t - p->t_last_draw < 0.1) return;
    p->t_last_draw = t;
    enum { W = 30 };
    int fill = p->total > 0 ? (int)((double)done / (double)p->total * W) : 0;
    if (fill > W) fill = W;
    char bar[W + 1];
    for (int i = 0; i < W; i++) bar[i] = i < fill ? '#' : '.';
    bar[W] = '\0';
    fprintf(p->out, "\r[%s] %lld/%lld  eta %s  %.2f steps/s  loss %.4f\033[K", bar, (long long)done,
            (long long)p->total, eta_s, rate, loss);
  } else {
    if (done % p->every != 0 && done != p->total) return;
    fprintf(p->out, "step %lld/%lld  loss %.4f  %.2f steps/s  eta %s\n", (long long)done,
            (long long)p->total, loss, rate, eta_s);
  }
  fflush(p->out);
}

void cm_progress_finish(cm_progress *p) {
  if (p->tty && p->last_step >= 0) {
    fputc('\n', p->out);
    fflush(p->out);
  }
}
