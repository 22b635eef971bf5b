/* tests/emu/emu_compiler.c — the emulated device's compiler (tests/emu/emu.h).
 *
 * A module's CUDA C is compiled by the host C++ compiler (CMAEC_EMU_CXX) under
 * tests/emu/cuda_shim.hpp into a shared object. After the source comes the table
 * of its __global__ functions (cm_emu_table), found by a scanner of the source
 * text, through which the shim's cm_emu_launch calls them. The image is an
 * emu_image_header followed by the shared object's bytes. */
#define _GNU_SOURCE
#include "tests/emu/emu.h"

#include "codegen/codegen.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define EMU_SHIM_PATH CMAEC_SOURCE_DIR "/tests/emu/cuda_shim.hpp"

/* ---- growable text ------------------------------------------------------- */

typedef struct emu_text {
  char *p;
  size_t n, cap;
  bool oom;
} emu_text;

static void text_add(emu_text *t, const char *s, size_t n) {
  if (t->oom) return;
  if (t->n + n + 1 > t->cap) {
    size_t cap = (t->n + n + 1) * 2;
    char *q = realloc(t->p, cap);
    if (!q) {
      t->oom = true;
      return;
    }
    t->p = q;
    t->cap = cap;
  }
  memcpy(t->p + t->n, s, n);
  t->n += n;
  t->p[t->n] = 0;
}
static void text_str(emu_text *t, const char *s) {
  text_add(t, s, strlen(s));
}

/* ---- scanning the source ----------------------------------------------------- */

static bool ident_char(char c) {
  return isalnum((unsigned char)c) || c == '_';
}

/* The end of the comment, string or character literal or preprocessor line that
 * starts at s[i], or i when none starts there. */
static size_t skip_noncode(const char *s, size_t i, bool line_start) {
  if (s[i] == '/' && s[i + 1] == '/') {
    while (s[i] && s[i] != '\n') i++;
    return i;
  }
  if (s[i] == '/' && s[i + 1] == '*') {
    const char *e = strstr(s + i + 2, "*/");
    return e ? (size_t)(e - s) + 2 : strlen(s);
  }
  if (s[i] == '"' || s[i] == '\'') {
    char q = s[i++];
    while (s[i] && s[i] != q) i += s[i] == '\\' && s[i + 1] ? 2 : 1;
    return s[i] ? i + 1 : i;
  }
  if (line_start && s[i] == '#') {
    while (s[i] && s[i] != '\n') i += s[i] == '\\' && s[i + 1] ? 2 : 1;
    return i;
  }
  return i;
}

/* The names of the __global__ functions of source, in order: after the keyword,
 * the identifier before the first parenthesis that is not __launch_bounds__'s. */
static int scan_globals(const char *s, cm_cuda_kernel_info **out) {
  int n = 0, cap = 0;
  cm_cuda_kernel_info *k = NULL;
  bool line_start = true, after_global = false;
  char last[128] = "";
  for (size_t i = 0; s[i];) {
    size_t j = skip_noncode(s, i, line_start);
    if (j != i) {
      i = j;
      continue;
    }
    char c = s[i];
    if (c == '\n')
      line_start = true;
    else if (!isspace((unsigned char)c))
      line_start = false;
    if (ident_char(c) && !isdigit((unsigned char)c)) {
      size_t b = i;
      while (ident_char(s[i])) i++;
      size_t len = i - b;
      if (len == 10 && !strncmp(s + b, "__global__", 10)) {
        after_global = true;
        last[0] = 0;
      } else if (after_global && len == 17 && !strncmp(s + b, "__launch_bounds__", 17)) {
        while (s[i] && s[i] != '(') i++;
        for (int depth = 0; s[i]; i++) {
          depth += s[i] == '(' ? 1 : s[i] == ')' ? -1 : 0;
          if (!depth) break;
        }
        if (s[i]) i++;
      } else if (after_global && len < sizeof last) {
        memcpy(last, s + b, len);
        last[len] = 0;
      }
      continue;
    }
    if (after_global && (c == '(' || c == ';' || c == '{')) {
      after_global = false;
      if (c == '(' && last[0]) {
        if (n == cap) {
          cap = cap ? 2 * cap : 16;
          cm_cuda_kernel_info *q = realloc(k, (size_t)cap * sizeof *k);
          if (!q) {
            free(k);
            *out = NULL;
            return -1;
          }
          k = q;
        }
        memset(&k[n], 0, sizeof k[n]);
        snprintf(k[n].name, sizeof k[n].name, "%s", last);
        k[n++].registers = -1;
      }
    }
    i++;
  }
  *out = k;
  return n;
}

/* Appends source to t with each `extern __shared__ [__align__(A)] T NAME[];` (the
 * dynamic shared memory, declared in a function) made `T *const NAME = (T *)
 * cm_emu_dynamic_shared();`. */
static bool in_line_comment(const char *begin, const char *at) {
  const char *l = at;
  while (l > begin && l[-1] != '\n') l--;
  for (; l + 1 < at; l++)
    if (l[0] == '/' && l[1] == '/') return true;
  return false;
}

static void rewrite_dynamic_shared(emu_text *t, const char *s) {
  static const char KEY[] = "extern __shared__";
  const char *begin = s, *at;
  while ((at = strstr(s, KEY)) != NULL) {
    if (in_line_comment(begin, at)) {
      text_add(t, s, (size_t)(at - s) + sizeof KEY - 1);
      s = at + sizeof KEY - 1;
      continue;
    }
    const char *semi = strchr(at, ';'), *open = semi ? memchr(at, '[', (size_t)(semi - at)) : NULL;
    if (!open) break;
    text_add(t, s, (size_t)(at - s));
    const char *name_end = open;
    while (name_end > at && isspace((unsigned char)name_end[-1])) name_end--;
    const char *name = name_end;
    while (name > at && ident_char(name[-1])) name--;
    emu_text type = {0};
    for (const char *p = at + sizeof KEY - 1; p < name;) {
      if (!strncmp(p, "__align__", 9)) {
        p = memchr(p, ')', (size_t)(name - p));
        if (!p) break;
        p++;
        continue;
      }
      text_add(&type, p++, 1);
    }
    text_str(t, type.p ? type.p : "unsigned char");
    text_str(t, " *const ");
    text_add(t, name, (size_t)(name_end - name));
    text_str(t, " = (");
    text_str(t, type.p ? type.p : "unsigned char");
    text_str(t, " *)cm_emu_dynamic_shared()");
    if (type.oom) t->oom = true;
    free(type.p);
    s = semi;
  }
  text_str(t, s);
}

/* ---- the host compiler -------------------------------------------------------- */

/* -mfma where the host has it: CUDA's fma() is one instruction there, a libm
 * call (the GEMMs' inner loop) without; contraction stays off, as ISO C++ says. */
static const char *emu_flags[16];
static int n_emu_flags;

static void make_flags(void) {
  static const char *const BASE[] = {"-std=c++17",
                                     "-O1",
                                     "-fPIC",
                                     "-shared",
                                     "-w",
                                     "-fvisibility=hidden",
                                     "-ffp-contract=off",
                                     "-DCMAEC_EMULATED"};
  for (size_t i = 0; i < sizeof BASE / sizeof *BASE; i++) emu_flags[n_emu_flags++] = BASE[i];
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("fma")) emu_flags[n_emu_flags++] = "-mfma";
#endif
  if (CMAEC_EMU_SANITIZE) {
    emu_flags[n_emu_flags++] = "-fsanitize=address";
    emu_flags[n_emu_flags++] = "-fno-omit-frame-pointer";
  }
}

static char emu_name[512];
static pthread_once_t emu_name_once = PTHREAD_ONCE_INIT;

static uint64_t fnv1a(const char *s, size_t n, uint64_t h) {
  for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 0x100000001b3ull;
  return h;
}

static char *read_file(const char *path, size_t *size) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  char *buf = NULL;
  long n = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
  if (n >= 0 && fseek(f, 0, SEEK_SET) == 0 && (buf = malloc((size_t)n + 1)) != NULL) {
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) {
      free(buf);
      buf = NULL;
    } else {
      buf[n] = 0;
      if (size) *size = (size_t)n;
    }
  }
  fclose(f);
  return buf;
}

/* "emulated <the compiler's first --version line> <flags> shim <hash of the
 * shim>": a new compiler, new flags or an edited shim miss the cache. */
static void make_name(void) {
  char version[256] = "unknown";
  char cmd[512];
  snprintf(cmd, sizeof cmd, "'%s' --version 2>/dev/null", CMAEC_EMU_CXX);
  FILE *p = popen(cmd, "r");
  if (p) {
    if (fgets(version, sizeof version, p)) version[strcspn(version, "\r\n")] = 0;
    pclose(p);
  }
  size_t shim_bytes = 0;
  char *shim = read_file(EMU_SHIM_PATH, &shim_bytes);
  uint64_t h = fnv1a(shim ? shim : "", shim_bytes, 0xcbf29ce484222325ull);
  free(shim);
  size_t n = (size_t)snprintf(emu_name, sizeof emu_name, "emulated %s", version);
  for (int i = 0; i < n_emu_flags && n < sizeof emu_name; i++)
    n += (size_t)snprintf(emu_name + n, sizeof emu_name - n, " %s", emu_flags[i]);
  if (n < sizeof emu_name)
    snprintf(emu_name + n, sizeof emu_name - n, " shim %016llx", (unsigned long long)h);
}

/* Runs the host compiler with the flags, then args, its output in log; the
 * exit status (-1: not started). */
static int spawn_cxx(const char *const *args, int n_args, const char *log) {
  const char *argv[40];
  int n = 0;
  argv[n++] = CMAEC_EMU_CXX;
  for (int i = 0; i < n_emu_flags; i++) argv[n++] = emu_flags[i];
  for (int i = 0; i < n_args && n < 39; i++) argv[n++] = args[i];
  argv[n] = NULL;
  posix_spawn_file_actions_t fa;
  if (posix_spawn_file_actions_init(&fa)) return -1;
  posix_spawn_file_actions_addopen(&fa, 1, log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  pid_t pid;
  int rc = posix_spawnp(&pid, argv[0], &fa, NULL, (char *const *)argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc) return -1;
  int status;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* ---- the shim, precompiled ------------------------------------------------------
 *
 * Parsing the shim's C++ headers is about half of a small module's compile: GCC
 * builds it once per process as a precompiled header in a private directory
 * (the .gch beside a copy of the shim, which -include then finds), removed at
 * exit. Elsewhere (clang), or when that fails, modules include the shim itself. */
static char pch_dir[4096];
static const char *shim_include = EMU_SHIM_PATH;
static char shim_copy[4096];
static pthread_once_t pch_once = PTHREAD_ONCE_INIT;

static void remove_pch(void) {
  static const char *const FILES[] = {"cuda_shim.hpp", "cuda_shim.hpp.gch", "pch.log"};
  char path[4200];
  for (size_t i = 0; i < sizeof FILES / sizeof *FILES; i++) {
    snprintf(path, sizeof path, "%s/%s", pch_dir, FILES[i]);
    unlink(path);
  }
  rmdir(pch_dir);
}

static void make_pch(void) {
  if (strstr(emu_name, "clang")) return;
  const char *tmp = getenv("TMPDIR");
  snprintf(pch_dir, sizeof pch_dir, "%s/cmaec_emu_pch_XXXXXX", tmp && *tmp ? tmp : "/tmp");
  if (!mkdtemp(pch_dir)) return;
  size_t bytes = 0;
  char *shim = read_file(EMU_SHIM_PATH, &bytes);
  char gch[4200], log[4200];
  snprintf(shim_copy, sizeof shim_copy, "%s/cuda_shim.hpp", pch_dir);
  snprintf(gch, sizeof gch, "%s.gch", shim_copy);
  snprintf(log, sizeof log, "%s/pch.log", pch_dir);
  FILE *f = shim ? fopen(shim_copy, "wb") : NULL;
  bool ok = f && fwrite(shim, 1, bytes, f) == bytes;
  if (f && fclose(f)) ok = false;
  free(shim);
  const char *args[] = {"-x", "c++-header", shim_copy, "-o", gch};
  if (ok && spawn_cxx(args, 5, log) == 0 && atexit(remove_pch) == 0) {
    shim_include = shim_copy;
    return;
  }
  remove_pch();
}

/* Compiles dir/module.cpp into dir/module.so, the output in dir/log.txt. */
static int run_cxx(const char *dir) {
  pthread_once(&pch_once, make_pch);
  char src[4096], so[4096], log[4096];
  snprintf(src, sizeof src, "%s/module.cpp", dir);
  snprintf(so, sizeof so, "%s/module.so", dir);
  snprintf(log, sizeof log, "%s/log.txt", dir);
  const char *args[] = {"-include", shim_include, "-x", "c++", src, "-o", so};
  return spawn_cxx(args, 7, log);
}

static void first_error_line(const char *log, char *out, size_t size) {
  const char *l = strstr(log, "error");
  if (!l) l = log;
  while (l > log && l[-1] != '\n') l--;
  size_t n = strcspn(l, "\n");
  snprintf(out, size, "%.*s", (int)(n < size ? n : size - 1), l);
}

static void remove_dir(const char *dir) {
  static const char *const FILES[] = {"module.cpp", "module.so", "log.txt"};
  char path[4096];
  for (size_t i = 0; i < sizeof FILES / sizeof *FILES; i++) {
    snprintf(path, sizeof path, "%s/%s", dir, FILES[i]);
    unlink(path);
  }
  rmdir(dir);
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* The source, its table of __global__ functions, written to dir/module.cpp. */
static cm_status write_module(const char *dir, const char *source, const cm_cubin *out,
                              const char *name, cm_err *err) {
  emu_text t = {0};
  rewrite_dynamic_shared(&t, source);
  text_str(&t, "\n// the module's __global__ functions (tests/emu/emu_compiler.c)\n"
               "const cm_emu_entry cm_emu_table[] = {\n");
  for (int i = 0; i < out->n_kernels; i++) {
    text_str(&t, "  CM_EMU_ENTRY(");
    text_str(&t, out->kernels[i].name);
    text_str(&t, "),\n");
  }
  if (!out->n_kernels) text_str(&t, "  {0, 0, 0},\n");
  char tail[64];
  snprintf(tail, sizeof tail, "};\nconst int cm_emu_table_size = %d;\n", out->n_kernels);
  text_str(&t, tail);
  if (t.oom) {
    free(t.p);
    return cm_errorf(err, CM_EINTERNAL, "%s: emulated compile: out of memory", name);
  }
  char path[4096];
  snprintf(path, sizeof path, "%s/module.cpp", dir);
  FILE *f = fopen(path, "wb");
  bool ok = f && fwrite(t.p, 1, t.n, f) == t.n;
  if (f && fclose(f)) ok = false;
  free(t.p);
  if (!ok) return cm_errorf(err, CM_EINTERNAL, "%s: emulated compile: cannot write %s", name, path);
  return CM_OK;
}

/* Reads dir/module.so into out->data behind the image header. */
static cm_status read_image(const char *dir, cm_cubin *out, const char *name, cm_err *err) {
  char path[4096];
  snprintf(path, sizeof path, "%s/module.so", dir);
  size_t so_bytes = 0;
  char *so = read_file(path, &so_bytes);
  if (!so) return cm_errorf(err, CM_EINTERNAL, "%s: emulated compile: no %s", name, path);
  emu_image_header h;
  memcpy(h.magic, EMU_IMAGE_MAGIC, sizeof h.magic);
  h.so_bytes = so_bytes;
  out->data = malloc(sizeof h + so_bytes);
  if (out->data) {
    memcpy(out->data, &h, sizeof h);
    memcpy((char *)out->data + sizeof h, so, so_bytes);
    out->size = sizeof h + so_bytes;
  }
  free(so);
  if (!out->data) return cm_errorf(err, CM_EINTERNAL, "%s: emulated compile: out of memory", name);
  return CM_OK;
}

static cm_status emu_compile(void *self, const char *source, const char *name, const char *arch,
                             cm_cubin *out, cm_err *err) {
  (void)self;
  (void)arch; /* the host runs every arch */
  double t0 = now_ms();
  memset(out, 0, sizeof *out);
  if (!source || !name) return cm_errorf(err, CM_EINVALID, "emulated compile: bad arguments");
  out->n_kernels = scan_globals(source, &out->kernels);
  if (out->n_kernels < 0) {
    out->n_kernels = 0;
    return cm_errorf(err, CM_EINTERNAL, "%s: emulated compile: out of memory", name);
  }
  const char *tmp = getenv("TMPDIR");
  char dir[4096];
  snprintf(dir, sizeof dir, "%s/cmaec_emu_XXXXXX", tmp && *tmp ? tmp : "/tmp");
  if (!mkdtemp(dir)) {
    cm_cubin_free(out);
    return cm_errorf(err, CM_EINTERNAL, "%s: emulated compile: cannot create %s", name, dir);
  }
  cm_status st = write_module(dir, source, out, name, err);
  if (st == CM_OK) {
    int rc = run_cxx(dir);
    char log_path[4096];
    snprintf(log_path, sizeof log_path, "%s/log.txt", dir);
    out->log = read_file(log_path, NULL);
    if (!out->log) out->log = strdup("");
    if (rc != 0) {
      char first[512];
      first_error_line(out->log ? out->log : "", first, sizeof first);
      st = cm_errorf(err, rc < 0 ? CM_EINTERNAL : CM_EINVALID,
                     "%s: emulated compile (%s) failed with status %d: %s", name, CMAEC_EMU_CXX, rc,
                     first);
    } else {
      st = read_image(dir, out, name, err);
    }
  }
  remove_dir(dir);
  if (st != CM_OK) {
    free(out->kernels);
    out->kernels = NULL;
    out->n_kernels = 0;
    free(out->data);
    out->data = NULL;
    out->size = 0;
  }
  out->compile_ms = now_ms() - t0;
  return st;
}

static cm_cuda_compiler emu_compiler_table = {NULL, "so", emu_compile, NULL};

static void init_compiler(void) {
  make_flags();
  make_name();
  emu_compiler_table.name = emu_name;
}

const cm_cuda_compiler *emu_compiler(void) {
  pthread_once(&emu_name_once, init_compiler);
  return &emu_compiler_table;
}
