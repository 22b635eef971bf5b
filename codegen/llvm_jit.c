/* codegen/llvm_jit.c — the LLVM JIT of the CPU backend: one ORC LLJIT for the host CPU, modules
 * optimized with the new pass manager and compiled to objects by a target machine tuned for the
 * host (or the CPU $CMAEC_CPU names), and
 * an optional on-disk cache of those objects keyed by content.
 *
 * Every module takes the same path: verify -> set host triple and data layout -> key -> (cache
 * hit: read the object) or (miss: passes "default<On>" -> object -> cache write) -> add the object
 * to the LLJIT with LLVMOrcLLJITAddObjectFile. So code loaded from the cache is byte for byte what
 * a fresh compile produces. Symbols of the process (libm, libc) resolve in JIT'd code.
 *
 * The CPU is the host's or the one $CMAEC_CPU names (cm_cpu_target, codegen/target.c); a
 * CPU whose features the host lacks is refused unless the JIT is created compile_only.
 *
 * Cache files: <cache_dir>/<key>.cmobj, key = BLAKE3 (hex) of the length-prefixed fields (format
 * tag, LLVM version, triple, CPU, features (a named CPU's implied features, then the feature
 * string), opt level, module IR text after the triple and data layout are set). Content: an 88-byte
 * header (magic "CMJITOB\1", header version, header size, payload size, the key, BLAKE3 of the
 * payload), then the ELF object. A file that fails any check is counted as rejected, recompiled and
 * rewritten. Writes go to a mkstemp file in the same directory, then rename(2): readers in other
 * processes see the old file or the new, never half.
 *
 * The API is declared in codegen/codegen.h.
 */
#include "codegen.h"

#include <errno.h>
#include <fcntl.h>
#include <llvm-c/Analysis.h>
#include <llvm-c/Core.h>
#include <llvm-c/Error.h>
#include <llvm-c/LLJIT.h>
#include <llvm-c/Orc.h>
#include <llvm-c/Target.h>
#include <llvm-c/TargetMachine.h>
#include <llvm-c/Transforms/PassBuilder.h>
#include <llvm-c/blake3.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- state --------------------------------------------------------------- */

struct cm_jit {
  LLVMOrcLLJITRef lljit;
  LLVMTargetMachineRef tm;
  LLVMTargetDataRef layout;
  LLVMContextRef context;
  int opt_level;
  char *triple, *cpu, *features, *description, *cache_dir;
  char *key_features; /* the cache key's features: a named CPU's implied ones, then features */
  cm_cpu_target target;
  char llvm_version[32];
  char cache_error[512];
  char session_error[512]; /* last error ORC reported outside a call's result (link failures) */
  cm_jit_stats stats;
};

#define CACHE_MAGIC "CMJITOB\1"
#define CACHE_HEADER_VERSION 1u
#define CACHE_HEADER_SIZE 88u
#define CACHE_MAX_PAYLOAD ((uint64_t)1 << 32) /* 4 GiB: anything larger is not ours */
#define KEY_FORMAT_TAG "cmaec-jit-object-v1"

static pthread_once_t llvm_init_once = PTHREAD_ONCE_INIT;
static int llvm_init_failed;

static void llvm_init(void) {
  if (LLVMInitializeNativeTarget() || LLVMInitializeNativeAsmPrinter()) llvm_init_failed = 1;
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static char *dup_str(const char *s) {
  size_t n = strlen(s) + 1;
  char *d = malloc(n);
  if (d) memcpy(d, s, n);
  return d;
}

/* Copies an LLVM-owned message (disposed with LLVMDisposeMessage) into malloc'ed memory. */
static char *take_message(char *m) {
  char *d = dup_str(m ? m : "");
  LLVMDisposeMessage(m);
  return d;
}

/* Consumes an LLVMErrorRef into err as "<context>: <message>" on one line. */
static cm_status llvm_error(cm_err *err, cm_status st, LLVMErrorRef e, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static cm_status llvm_error(cm_err *err, cm_status st, LLVMErrorRef e, const char *fmt, ...) {
  char ctx[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(ctx, sizeof ctx, fmt, ap);
  va_end(ap);
  char *m = LLVMGetErrorMessage(e); /* consumes e */
  for (char *p = m; p && *p; p++)
    if (*p == '\n' || *p == '\r') *p = ' ';
  cm_errorf(err, st, "%s: %s", ctx, m ? m : "(no message)");
  LLVMDisposeErrorMessage(m);
  return st;
}

/* Same for the char* messages of the older C API (disposed with LLVMDisposeMessage). */
static cm_status llvm_message_error(cm_err *err, cm_status st, char *m, const char *what) {
  for (char *p = m; p && *p; p++)
    if (*p == '\n' || *p == '\r') *p = ' ';
  cm_errorf(err, st, "%s: %s", what, m && *m ? m : "(no message)");
  LLVMDisposeMessage(m);
  return st;
}

/* mkdir -p; 0 on success. */
static int make_dirs(const char *path) {
  size_t n = strlen(path);
  char *p = dup_str(path);
  if (!p) return ENOMEM;
  int rc = 0;
  for (size_t i = 1; i <= n && !rc; i++) {
    if (p[i] != '/' && p[i] != 0) continue;
    char c = p[i];
    p[i] = 0;
    if (mkdir(p, 0755) != 0 && errno != EEXIST) rc = errno;
    p[i] = c;
  }
  free(p);
  if (rc) return rc;
  struct stat st;
  if (stat(path, &st) != 0) return errno;
  if (!S_ISDIR(st.st_mode)) return ENOTDIR;
  if (access(path, R_OK | W_OK | X_OK) != 0) return errno;
  return 0;
}

/* "+a,-b,+c" -> "+a,+c" (enabled features only), malloc'ed. */
static char *enabled_features(const char *features) {
  size_t n = strlen(features);
  char *out = malloc(n + 1);
  if (!out) return NULL;
  size_t o = 0;
  const char *p = features;
  while (*p) {
    const char *e = strchr(p, ',');
    size_t len = e ? (size_t)(e - p) : strlen(p);
    if (len > 1 && p[0] == '+') {
      if (o) out[o++] = ',';
      memcpy(out + o, p, len);
      o += len;
    }
    p += len;
    if (*p == ',') p++;
  }
  out[o] = 0;
  return out;
}

/* ---- create / destroy ---------------------------------------------------- */

/* ORC reports some errors (e.g. unresolved symbols while linking) to the session, not to the
 * caller, whose lookup then only says "Failed to materialize symbols". Kept for the next error. */
static void session_error_reporter(void *ctx, LLVMErrorRef e) {
  cm_jit *j = ctx;
  char *m = LLVMGetErrorMessage(e);
  snprintf(j->session_error, sizeof j->session_error, "%s", m ? m : "");
  for (char *p = j->session_error; *p; p++)
    if (*p == '\n' || *p == '\r') *p = ' ';
  LLVMDisposeErrorMessage(m);
}

cm_status cm_jit_create(cm_jit **out, const cm_jit_opts *opts, cm_err *err) {
  if (!out) return cm_errorf(err, CM_EINVALID, "cm_jit_create: no output pointer");
  *out = NULL;
  cm_jit_opts o = {NULL, 3, NULL, NULL, 0, false};
  if (opts) o = *opts;
  if (o.opt_level < 0 || o.opt_level > 3)
    return cm_errorf(err, CM_EINVALID, "cm_jit_create: opt_level %d is not in 0..3", o.opt_level);
  if (o.vector_width != 0 && o.vector_width != 256 && o.vector_width != 512)
    return cm_errorf(err, CM_EINVALID, "cm_jit_create: vector_width %d is not 0, 256 or 512",
                     o.vector_width);
  pthread_once(&llvm_init_once, llvm_init);
  if (llvm_init_failed)
    return cm_errorf(err, CM_EINTERNAL, "cm_jit_create: LLVM has no native target for this host");

  cm_jit *j = calloc(1, sizeof *j);
  if (!j) return cm_errorf(err, CM_EINTERNAL, "cm_jit_create: out of memory");
  j->opt_level = o.opt_level;
  unsigned major, minor, patch;
  LLVMGetVersion(&major, &minor, &patch);
  snprintf(j->llvm_version, sizeof j->llvm_version, "%u.%u.%u", major, minor, patch);
  cm_status st = CM_OK;

  if (o.cache_dir) {
    if (!*o.cache_dir) {
      st = cm_errorf(err, CM_EINVALID, "cm_jit_create: cache_dir is empty (use NULL for none)");
      goto fail;
    }
    int rc = make_dirs(o.cache_dir);
    if (rc) {
      st = cm_errorf(err, CM_EINVALID,
                     "cm_jit_create: cache_dir \"%s\" is not a usable directory: %s", o.cache_dir,
                     strerror(rc));
      goto fail;
    }
    if (!(j->cache_dir = dup_str(o.cache_dir))) goto oom;
  }

  /* The CPU: o.cpu, else $CMAEC_CPU, else the host. A named CPU gets its own features (an empty
   * feature string: LLVM's defaults for it), the host its detected ones. */
  if ((st = cm_cpu_target_resolve(o.cpu, o.features, &j->target, err))) {
    cm_err_prefix(err, "cm_jit_create: ");
    goto fail;
  }
  if (!j->target.runnable && !o.compile_only) {
    st = cm_cpu_target_not_runnable(&j->target, "cm_jit_create", err);
    goto fail;
  }
  char *def_triple = LLVMGetDefaultTargetTriple();
  j->triple = take_message(LLVMNormalizeTargetTriple(def_triple));
  LLVMDisposeMessage(def_triple);
  j->cpu = j->target.forced ? dup_str(j->target.cpu) : take_message(LLVMGetHostCPUName());
  j->features = o.features
                    ? dup_str(o.features)
                    : (j->target.forced ? dup_str("") : take_message(LLVMGetHostCPUFeatures()));
  if (!j->triple || !j->cpu || !j->features) goto oom;
  if (strncmp(j->triple, "x86_64", 6) == 0) {
    /* The preferred vector width is a tuning feature of the x86 target: in the feature string it
     * reaches both the vectorizer (through the target's cost model) and the cache key. */
    const char *pref = o.vector_width == 256 ? "+prefer-256-bit" : "-prefer-256-bit";
    size_t n = strlen(j->features) + strlen(pref) + 2;
    char *f = malloc(n);
    if (!f) goto oom;
    snprintf(f, n, "%s%s%s", j->features, j->features[0] ? "," : "", pref);
    free(j->features);
    j->features = f;
  }

  LLVMTargetRef target;
  char *msg = NULL;
  if (LLVMGetTargetFromTriple(j->triple, &target, &msg)) {
    st = llvm_message_error(err, CM_EINTERNAL, msg, "cm_jit_create: no LLVM target for the host");
    goto fail;
  }
  LLVMDisposeMessage(msg);
  static const LLVMCodeGenOptLevel levels[4] = {LLVMCodeGenLevelNone, LLVMCodeGenLevelLess,
                                                LLVMCodeGenLevelDefault,
                                                LLVMCodeGenLevelAggressive};
  j->tm = LLVMCreateTargetMachine(target, j->triple, j->cpu, j->features, levels[o.opt_level],
                                  LLVMRelocPIC, LLVMCodeModelDefault);
  if (!j->tm) {
    st = cm_errorf(err, CM_EINTERNAL, "cm_jit_create: no target machine for %s, CPU \"%s\"",
                   j->triple, j->cpu);
    goto fail;
  }
  j->layout = LLVMCreateTargetDataLayout(j->tm);

  /* A named CPU's features are implied by its name, not spelled out in the feature string: the
   * key lists them anyway, so that objects for two CPUs never share a key. */
  size_t kn = strlen(j->target.features) + strlen(j->features) + 2;
  if (!(j->key_features = malloc(kn))) goto oom;
  if (j->target.forced)
    snprintf(j->key_features, kn, "%s;%s", j->target.features, j->features);
  else
    snprintf(j->key_features, kn, "%s", j->features);
  char *en = j->target.forced ? dup_str(j->target.features) : enabled_features(j->features);
  if (!en) goto oom;
  size_t dn = strlen(j->triple) + strlen(j->cpu) + strlen(en) + 64;
  j->description = malloc(dn);
  if (j->description)
    snprintf(j->description, dn, "%s %s O%d%s%s%s%s", j->triple, j->cpu[0] ? j->cpu : "generic",
             o.opt_level,
             strstr(j->features, "-prefer-256-bit") && j->target.vector_bits >= 512 ? " vec512"
                                                                                    : "",
             j->target.runnable ? "" : " (compile only: not runnable on this host)",
             en[0] ? " " : "", en);
  free(en);
  if (!j->description) goto oom;

  LLVMErrorRef e = LLVMOrcCreateLLJIT(&j->lljit, NULL);
  if (e) {
    j->lljit = NULL;
    st = llvm_error(err, CM_EINTERNAL, e, "cm_jit_create: creating the ORC LLJIT failed");
    goto fail;
  }
  LLVMOrcExecutionSessionSetErrorReporter(LLVMOrcLLJITGetExecutionSession(j->lljit),
                                          session_error_reporter, j);
  LLVMOrcDefinitionGeneratorRef gen;
  e = LLVMOrcCreateDynamicLibrarySearchGeneratorForProcess(
      &gen, LLVMOrcLLJITGetGlobalPrefix(j->lljit), NULL, NULL);
  if (e) {
    st = llvm_error(err, CM_EINTERNAL, e, "cm_jit_create: process symbol generator");
    goto fail;
  }
  LLVMOrcJITDylibAddGenerator(LLVMOrcLLJITGetMainJITDylib(j->lljit), gen);
  j->context = LLVMContextCreate();
  *out = j;
  return CM_OK;

oom:
  st = cm_errorf(err, CM_EINTERNAL, "cm_jit_create: out of memory");
fail:
  cm_jit_destroy(j);
  return st;
}

void cm_jit_destroy(cm_jit *j) {
  if (!j) return;
  if (j->lljit) {
    LLVMErrorRef e = LLVMOrcDisposeLLJIT(j->lljit);
    if (e) LLVMConsumeError(e); /* nothing to report to: the JIT is gone either way */
  }
  if (j->context) LLVMContextDispose(j->context);
  if (j->layout) LLVMDisposeTargetData(j->layout);
  if (j->tm) LLVMDisposeTargetMachine(j->tm);
  free(j->triple);
  free(j->cpu);
  free(j->features);
  free(j->description);
  free(j->key_features);
  free(j->cache_dir);
  free(j);
}

LLVMContextRef cm_jit_context(cm_jit *j) {
  return j ? j->context : NULL;
}

const char *cm_jit_target_description(const cm_jit *j) {
  return j ? j->description : "";
}

const cm_cpu_target *cm_jit_target(const cm_jit *j) {
  return j ? &j->target : NULL;
}

void cm_jit_get_stats(const cm_jit *j, cm_jit_stats *out) {
  if (!out) return;
  if (j)
    *out = j->stats;
  else
    memset(out, 0, sizeof *out);
}

const char *cm_jit_cache_error(const cm_jit *j) {
  return j ? j->cache_error : "";
}

/* ---- keys ------------------------------------------------------------------ */

static void hash_field(llvm_blake3_hasher *h, const char *s) {
  uint64_t n = strlen(s);
  unsigned char len[8];
  for (int i = 0; i < 8; i++) len[i] = (unsigned char)(n >> (8 * i));
  llvm_blake3_hasher_update(h, len, sizeof len);
  llvm_blake3_hasher_update(h, s, (size_t)n);
}

static void to_hex(const uint8_t *bytes, size_t n, char *out) {
  static const char digits[] = "0123456789abcdef";
  for (size_t i = 0; i < n; i++) {
    out[2 * i] = digits[bytes[i] >> 4];
    out[2 * i + 1] = digits[bytes[i] & 15];
  }
  out[2 * n] = 0;
}

static void key_bytes(const char *ir_text, const char *llvm_version, const char *triple,
                      const char *cpu, const char *features, int opt_level,
                      uint8_t out[LLVM_BLAKE3_OUT_LEN]) {
  llvm_blake3_hasher h;
  llvm_blake3_hasher_init(&h);
  char level[16];
  snprintf(level, sizeof level, "O%d", opt_level);
  hash_field(&h, KEY_FORMAT_TAG);
  hash_field(&h, llvm_version ? llvm_version : "");
  hash_field(&h, triple ? triple : "");
  hash_field(&h, cpu ? cpu : "");
  hash_field(&h, features ? features : "");
  hash_field(&h, level);
  hash_field(&h, ir_text ? ir_text : "");
  llvm_blake3_hasher_finalize(&h, out, LLVM_BLAKE3_OUT_LEN);
}

void cm_jit_cache_key(const char *ir_text, const char *llvm_version, const char *triple,
                      const char *cpu, const char *features, int opt_level, char key[65]) {
  uint8_t b[LLVM_BLAKE3_OUT_LEN];
  key_bytes(ir_text, llvm_version, triple, cpu, features, opt_level, b);
  to_hex(b, sizeof b, key);
}

static void prepare_module(cm_jit *j, LLVMModuleRef m) {
  LLVMSetTarget(m, j->triple);
  LLVMSetModuleDataLayout(m, j->layout);
}

static void module_key_bytes(cm_jit *j, LLVMModuleRef m, uint8_t out[LLVM_BLAKE3_OUT_LEN]) {
  char *ir = LLVMPrintModuleToString(m);
  key_bytes(ir, j->llvm_version, j->triple, j->cpu, j->key_features, j->opt_level, out);
  LLVMDisposeMessage(ir);
}

void cm_jit_module_key(cm_jit *j, LLVMModuleRef module, char key[65]) {
  uint8_t b[LLVM_BLAKE3_OUT_LEN];
  prepare_module(j, module);
  module_key_bytes(j, module, b);
  to_hex(b, sizeof b, key);
}

/* ---- compile ---------------------------------------------------------------- */

static const char *module_name(LLVMModuleRef m) {
  size_t n;
  const char *s = LLVMGetModuleIdentifier(m, &n);
  return s && *s ? s : "(unnamed)";
}

/* Verifies and optimizes m in place (triple and data layout already set). */
static cm_status optimize(cm_jit *j, LLVMModuleRef m, cm_err *err) {
  char *msg = NULL;
  if (LLVMVerifyModule(m, LLVMReturnStatusAction, &msg)) {
    char what[300];
    snprintf(what, sizeof what, "jit: module \"%s\" is not valid LLVM IR", module_name(m));
    return llvm_message_error(err, CM_EINVALID, msg, what);
  }
  LLVMDisposeMessage(msg);
  char passes[32];
  snprintf(passes, sizeof passes, "default<O%d>", j->opt_level);
  LLVMPassBuilderOptionsRef po = LLVMCreatePassBuilderOptions();
  LLVMErrorRef e = LLVMRunPasses(m, passes, j->tm, po);
  LLVMDisposePassBuilderOptions(po);
  if (e)
    return llvm_error(err, CM_EINTERNAL, e, "jit: module \"%s\": running %s failed", module_name(m),
                      passes);
  return CM_OK;
}

static cm_status emit(cm_jit *j, LLVMModuleRef m, LLVMCodeGenFileType type,
                      LLVMMemoryBufferRef *buf, cm_err *err) {
  char *msg = NULL;
  *buf = NULL;
  if (LLVMTargetMachineEmitToMemoryBuffer(j->tm, m, type, &msg, buf)) {
    char what[300];
    snprintf(what, sizeof what, "jit: module \"%s\": code generation failed", module_name(m));
    *buf = NULL;
    return llvm_message_error(err, CM_EINTERNAL, msg, what);
  }
  LLVMDisposeMessage(msg);
  return CM_OK;
}

cm_status cm_jit_render(cm_jit *j, LLVMModuleRef module, cm_jit_text what, char **text,
                        cm_err *err) {
  if (!j || !module || !text) return cm_errorf(err, CM_EINVALID, "cm_jit_render: missing argument");
  *text = NULL;
  prepare_module(j, module);
  cm_status st = optimize(j, module, err);
  if (st) return st;
  if (what == CM_JIT_TEXT_IR) {
    *text = take_message(LLVMPrintModuleToString(module));
  } else {
    LLVMMemoryBufferRef buf;
    if ((st = emit(j, module, LLVMAssemblyFile, &buf, err))) return st;
    size_t n = LLVMGetBufferSize(buf);
    *text = malloc(n + 1);
    if (*text) {
      memcpy(*text, LLVMGetBufferStart(buf), n);
      (*text)[n] = 0;
    }
    LLVMDisposeMemoryBuffer(buf);
  }
  if (!*text) return cm_errorf(err, CM_EINTERNAL, "cm_jit_render: out of memory");
  return CM_OK;
}

/* ---- the cache ----------------------------------------------------------------- */

static void put_u32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put_u64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get_u32(const uint8_t *p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; i--) v = v << 8 | p[i];
  return v;
}
static uint64_t get_u64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
  return v;
}

static void checksum(const void *data, size_t n, uint8_t out[LLVM_BLAKE3_OUT_LEN]) {
  llvm_blake3_hasher h;
  llvm_blake3_hasher_init(&h);
  llvm_blake3_hasher_update(&h, data, n);
  llvm_blake3_hasher_finalize(&h, out, LLVM_BLAKE3_OUT_LEN);
}

static char *cache_path(const cm_jit *j, const char *key_hex) {
  size_t n = strlen(j->cache_dir) + 64 + 16;
  char *p = malloc(n);
  if (p) snprintf(p, n, "%s/%s.cmobj", j->cache_dir, key_hex);
  return p;
}

typedef enum { CACHE_ABSENT, CACHE_HIT, CACHE_BAD } cache_result;

static int read_all(int fd, uint8_t *buf, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(fd, buf + got, n - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    got += (size_t)r;
  }
  return 0;
}

static int write_all(int fd, const uint8_t *buf, size_t n) {
  size_t done = 0;
  while (done < n) {
    ssize_t w = write(fd, buf + done, n - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return -1;
    done += (size_t)w;
  }
  return 0;
}

/* On CACHE_HIT, *obj is a memory buffer with the object. */
static cache_result cache_load(const cm_jit *j, const char *path, const uint8_t key[32],
                               LLVMMemoryBufferRef *obj) {
  *obj = NULL;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return CACHE_ABSENT; /* not there (or unreadable: recompiling is always safe) */
  cache_result res = CACHE_BAD;
  uint8_t *data = NULL;
  struct stat st;
  uint8_t h[CACHE_HEADER_SIZE];
  if (fstat(fd, &st) != 0 || st.st_size < (off_t)CACHE_HEADER_SIZE) goto done;
  if (read_all(fd, h, sizeof h) != 0) goto done;
  if (memcmp(h, CACHE_MAGIC, 8) != 0 || get_u32(h + 8) != CACHE_HEADER_VERSION ||
      get_u32(h + 12) != CACHE_HEADER_SIZE)
    goto done;
  uint64_t size = get_u64(h + 16);
  if (size == 0 || size > CACHE_MAX_PAYLOAD || (uint64_t)st.st_size != CACHE_HEADER_SIZE + size)
    goto done;
  if (memcmp(h + 24, key, 32) != 0) goto done;
  data = malloc((size_t)size);
  if (!data || read_all(fd, data, (size_t)size) != 0) goto done;
  uint8_t sum[32];
  checksum(data, (size_t)size, sum);
  if (memcmp(sum, h + 56, 32) != 0) goto done;
  char name[80];
  to_hex(key, 8, name);
  *obj = LLVMCreateMemoryBufferWithMemoryRangeCopy((const char *)data, (size_t)size, name);
  res = *obj ? CACHE_HIT : CACHE_BAD;
done:
  free(data);
  close(fd);
  return res;
}

/* Stores the object; on failure records why in j->cache_error and counts it. */
static void cache_store(cm_jit *j, const char *path, const uint8_t key[32], const void *obj,
                        size_t size) {
  uint8_t h[CACHE_HEADER_SIZE];
  memcpy(h, CACHE_MAGIC, 8);
  put_u32(h + 8, CACHE_HEADER_VERSION);
  put_u32(h + 12, CACHE_HEADER_SIZE);
  put_u64(h + 16, (uint64_t)size);
  memcpy(h + 24, key, 32);
  checksum(obj, size, h + 56);
  size_t tn = strlen(j->cache_dir) + 32;
  char *tmp = malloc(tn);
  if (!tmp) {
    snprintf(j->cache_error, sizeof j->cache_error, "%s: out of memory", path);
    j->stats.cache_write_failures++;
    return;
  }
  snprintf(tmp, tn, "%s/.tmp-XXXXXX", j->cache_dir);
  int fd = mkstemp(tmp);
  const char *step = NULL;
  int saved = 0;
  if (fd < 0) {
    step = "creating a temporary file";
  } else if (fchmod(fd, 0644) != 0 || write_all(fd, h, sizeof h) != 0 ||
             write_all(fd, obj, size) != 0) {
    step = "writing";
  }
  if (step) saved = errno;
  if (fd >= 0 && close(fd) != 0 && !step) {
    step = "closing";
    saved = errno;
  }
  if (!step && rename(tmp, path) != 0) {
    step = "renaming";
    saved = errno;
  }
  if (step) {
    snprintf(j->cache_error, sizeof j->cache_error, "%s: %s failed: %s", path, step,
             strerror(saved));
    j->stats.cache_write_failures++;
    if (fd >= 0) unlink(tmp);
  }
  free(tmp);
}

/* ---- add / lookup ----------------------------------------------------------------- */

cm_status cm_jit_add_module(cm_jit *j, LLVMModuleRef module, cm_err *err) {
  if (!module) return cm_errorf(err, CM_EINVALID, "cm_jit_add_module: no module");
  if (!j) {
    LLVMDisposeModule(module);
    return cm_errorf(err, CM_EINVALID, "cm_jit_add_module: no JIT");
  }
  cm_status st = CM_OK;
  char name[256];
  snprintf(name, sizeof name, "%s", module_name(module));
  prepare_module(j, module);
  uint8_t key[32];
  char key_hex[65];
  char *path = NULL;
  LLVMMemoryBufferRef obj = NULL;
  if (j->cache_dir) {
    module_key_bytes(j, module, key);
    to_hex(key, sizeof key, key_hex);
    if (!(path = cache_path(j, key_hex))) {
      st = cm_errorf(err, CM_EINTERNAL, "cm_jit_add_module: out of memory");
      goto done;
    }
    double t0 = now_ms();
    cache_result r = cache_load(j, path, key, &obj);
    if (r == CACHE_HIT) {
      j->stats.cache_load_ms += now_ms() - t0;
    } else if (r == CACHE_BAD) {
      j->stats.cache_rejected++;
    }
  }
  if (!obj) {
    double t0 = now_ms();
    if ((st = optimize(j, module, err))) goto done;
    if ((st = emit(j, module, LLVMObjectFile, &obj, err))) goto done;
    j->stats.compile_ms += now_ms() - t0;
    if (path) {
      j->stats.cache_misses++;
      cache_store(j, path, key, LLVMGetBufferStart(obj), LLVMGetBufferSize(obj));
    }
  } else {
    j->stats.cache_hits++;
  }
  size_t obj_size = LLVMGetBufferSize(obj);
  LLVMErrorRef e = LLVMOrcLLJITAddObjectFile(j->lljit, LLVMOrcLLJITGetMainJITDylib(j->lljit),
                                             obj); /* owns obj */
  obj = NULL;
  if (e) {
    st = llvm_error(err, CM_EINVALID, e, "jit: adding the object of module \"%s\" failed", name);
    goto done;
  }
  j->stats.modules++;
  j->stats.object_bytes += (int64_t)obj_size;
done:
  if (obj) LLVMDisposeMemoryBuffer(obj);
  free(path);
  LLVMDisposeModule(module);
  return st;
}

cm_status cm_jit_lookup(cm_jit *j, const char *symbol, void **address, cm_err *err) {
  if (address) *address = NULL;
  if (!j || !symbol || !address)
    return cm_errorf(err, CM_EINVALID, "cm_jit_lookup: missing argument");
  double t0 = now_ms();
  LLVMOrcExecutorAddress a = 0;
  j->session_error[0] = 0;
  LLVMErrorRef e = LLVMOrcLLJITLookup(j->lljit, &a, symbol);
  j->stats.lookup_ms += now_ms() - t0;
  if (e) {
    cm_status st = llvm_error(err, CM_EINVALID, e, "jit: symbol \"%s\" not found", symbol);
    if (j->session_error[0] && err) {
      size_t n = strlen(err->msg);
      snprintf(err->msg + n, sizeof err->msg - n, " (%s)", j->session_error);
    }
    return st;
  }
  if (!a) return cm_errorf(err, CM_EINVALID, "jit: symbol \"%s\" resolved to address 0", symbol);
  *address = (void *)(uintptr_t)a;
  return CM_OK;
}
