/* codegen/target.c — what code is generated for (codegen.h, cm_target): the CPU the LLVM
 * backend compiles for (the host, or the LLVM CPU name in $CMAEC_CPU), its vector width and GEMM
 * tile defaults; a CUDA arch and its device limits.
 *
 * LLVM's C API can name the host CPU and its features (LLVMGetHostCPUName/-Features), and
 * LLVMCreateTargetMachine accepts any CPU name, but it neither validates a name (an unknown one
 * only prints "is not a recognized processor" to stderr and falls back to a generic CPU) nor
 * says which features a named CPU implies. Both answers are in LLVM's X86 target parser, the
 * table clang's -march uses and the one the X86 backend's processor definitions are checked
 * against: llvm::X86::parseArchX86, getFeaturesForCPU and fillValidCPUArchList. They are C++
 * functions exported by libLLVM; their arguments are a StringRef (a pointer and a length, passed
 * by value in two registers like the C struct below) and a SmallVectorImpl<StringRef>& (a pointer
 * to a header {begin, uint32 size, uint32 capacity} followed by the inline elements). They are
 * declared weak: where this LLVM lacks them, a named CPU is refused with a message saying so and
 * the host target still works. */
#include "codegen.h"

#if CMAEC_HAVE_LLVM
#include <llvm-c/Core.h>
#include <llvm-c/TargetMachine.h>
#endif
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if CMAEC_HAVE_LLVM
typedef struct llvm_string_ref {
  const char *data;
  size_t size;
} llvm_string_ref;

#define REF_VEC_INLINE 512
typedef struct llvm_ref_vec {
  void *begin; /* SmallVectorBase<uint32_t> */
  uint32_t size, capacity;
  llvm_string_ref inline_elems[REF_VEC_INLINE]; /* SmallVectorStorage */
} llvm_ref_vec;

/* llvm::X86::CPUKind llvm::X86::parseArchX86(StringRef CPU, bool Only64Bit); CK_None is 0. */
extern unsigned cm_llvm_x86_parse_arch(llvm_string_ref cpu, bool only_64bit) __asm__(
    "_ZN4llvm3X8612parseArchX86ENS_9StringRefEb") __attribute__((weak));
/* void llvm::X86::getFeaturesForCPU(StringRef CPU, SmallVectorImpl<StringRef> &, bool NeedPlus) */
extern void
cm_llvm_x86_cpu_features(llvm_string_ref cpu, llvm_ref_vec *out, bool need_plus) __asm__(
    "_ZN4llvm3X8617getFeaturesForCPUENS_9StringRefERNS_15SmallVectorImplIS1_EEb")
    __attribute__((weak));
/* void llvm::X86::fillValidCPUArchList(SmallVectorImpl<StringRef> &Values, bool Only64Bit) */
extern void cm_llvm_x86_cpu_list(llvm_ref_vec *out, bool only_64bit) __asm__(
    "_ZN4llvm3X8620fillValidCPUArchListERNS_15SmallVectorImplINS_9StringRefEEEb")
    __attribute__((weak));

static void ref_vec_init(llvm_ref_vec *v) {
  v->begin = v->inline_elems;
  v->size = 0;
  v->capacity = REF_VEC_INLINE;
}
static void ref_vec_free(llvm_ref_vec *v) {
  if (v->begin != v->inline_elems) free(v->begin); /* grown by LLVM with malloc */
}
#endif

/* ---- the host, read once ---------------------------------------------------- */

static pthread_once_t host_once = PTHREAD_ONCE_INIT;
static char host_cpu[64];
static char host_features[4096]; /* LLVMGetHostCPUFeatures: "+a,-b,..." */
static char host_triple[128];

#if CMAEC_HAVE_LLVM
static void read_host(void) {
  char *cpu = LLVMGetHostCPUName(), *f = LLVMGetHostCPUFeatures();
  char *triple = LLVMGetDefaultTargetTriple();
  snprintf(host_cpu, sizeof host_cpu, "%s", cpu ? cpu : "");
  snprintf(host_features, sizeof host_features, "%s", f ? f : "");
  snprintf(host_triple, sizeof host_triple, "%s", triple ? triple : "");
  LLVMDisposeMessage(cpu);
  LLVMDisposeMessage(f);
  LLVMDisposeMessage(triple);
}
#else
/* Without LLVM nothing is generated for the host CPU; its description (cmaec info, the target
 * the CPU lowering would use) comes from cpuid through the compiler's builtins, named by its
 * x86-64 microarchitecture level. */
static void read_host(void) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  static const char *const feats[] = {"sse4.2", "popcnt",  "avx",      "avx2",     "fma",
                                      "bmi2",   "avx512f", "avx512bw", "avx512dq", "avx512vl"};
  /* __builtin_cpu_supports takes string literals only */
  const int has[] = {__builtin_cpu_supports("sse4.2"),   __builtin_cpu_supports("popcnt"),
                     __builtin_cpu_supports("avx"),      __builtin_cpu_supports("avx2"),
                     __builtin_cpu_supports("fma"),      __builtin_cpu_supports("bmi2"),
                     __builtin_cpu_supports("avx512f"),  __builtin_cpu_supports("avx512bw"),
                     __builtin_cpu_supports("avx512dq"), __builtin_cpu_supports("avx512vl")};
  size_t len = 0;
  for (size_t i = 0; i < sizeof feats / sizeof *feats; i++)
    if (has[i] && len + strlen(feats[i]) + 3 < sizeof host_features)
      len += (size_t)snprintf(host_features + len, sizeof host_features - len, "%s+%s",
                              len ? "," : "", feats[i]);
  int level = has[0] && has[1] ? 2 : 1;
  if (level == 2 && has[2] && has[3] && has[4] && has[5]) level = 3;
  if (level == 3 && has[6] && has[7] && has[8] && has[9]) level = 4;
  if (level == 1)
    snprintf(host_cpu, sizeof host_cpu, "x86-64");
  else
    snprintf(host_cpu, sizeof host_cpu, "x86-64-v%d", level);
  snprintf(host_triple, sizeof host_triple, "x86_64-unknown-linux-gnu");
#else
  snprintf(host_cpu, sizeof host_cpu, "generic");
  snprintf(host_triple, sizeof host_triple, "unknown");
#endif
}
#endif

/* Is "+name" (want_plus) or "-name" in the comma-separated list? */
static bool list_has(const char *list, char sign, const char *name, size_t n) {
  for (const char *p = list; p && *p;) {
    const char *e = strchr(p, ',');
    size_t len = e ? (size_t)(e - p) : strlen(p);
    if (len == n + 1 && p[0] == sign && memcmp(p + 1, name, n) == 0) return true;
    p += len;
    if (*p == ',') p++;
  }
  return false;
}

static bool host_has(const char *name, size_t n) {
  if (list_has(host_features, '+', name, n)) return true;
  /* The two features the host list does not mention: x87 (every x86-64 has it) and evex512
   * (512-bit EVEX encodings: every AVX-512 host). */
  if (n == 3 && !memcmp(name, "x87", 3)) return true;
  if (n == 7 && !memcmp(name, "evex512", 7)) return list_has(host_features, '+', "avx512f", 7);
  return false;
}

/* Appends ",x" (or "x" when empty) to buf; false when it does not fit. */
static bool append(char *buf, size_t size, const char *sep, const char *s, size_t n) {
  size_t len = strlen(buf), sl = buf[0] ? strlen(sep) : 0;
  if (len + sl + n + 1 > size) return false;
  memcpy(buf + len, sep, sl);
  memcpy(buf + len + sl, s, n);
  buf[len + sl + n] = 0;
  return true;
}

/* The widest vectors LLVM may use given the enabled features "+a,+b" (LLVM's implications:
 * every avx512* feature implies avx512f; avx2, fma, f16c, vaes, vpclmulqdq, xop, fma4 and every
 * avx* feature imply avx). */
static int widest_vector(const char *enabled) {
  int bits = 128;
  static const char *const avx_implied[] = {"fma", "f16c", "vaes", "vpclmulqdq", "xop", "fma4"};
  for (const char *p = enabled; *p;) {
    const char *e = strchr(p, ',');
    size_t len = e ? (size_t)(e - p) : strlen(p);
    const char *f = p + 1;
    size_t n = len ? len - 1 : 0;
    if (len > 1 && p[0] == '+') {
      if (n >= 6 && !memcmp(f, "avx512", 6)) bits = 512;
      if (bits < 256 && n >= 3 && !memcmp(f, "avx", 3)) bits = 256;
      for (size_t i = 0; bits < 256 && i < sizeof avx_implied / sizeof *avx_implied; i++)
        if (strlen(avx_implied[i]) == n && !memcmp(f, avx_implied[i], n)) bits = 256;
    }
    p += len;
    if (*p == ',') p++;
  }
  return bits;
}

#if CMAEC_HAVE_LLVM
/* The names LLVM knows, for the error message. */
static void known_cpus(char *buf, size_t size) {
  buf[0] = 0;
  if (!cm_llvm_x86_cpu_list) return;
  llvm_ref_vec v;
  ref_vec_init(&v);
  cm_llvm_x86_cpu_list(&v, true);
  const llvm_string_ref *r = v.begin;
  for (uint32_t i = 0; i < v.size; i++)
    if (!append(buf, size, ", ", r[i].data, r[i].size)) break;
  ref_vec_free(&v);
}
#endif

cm_status cm_cpu_target_resolve(const char *cpu, const char *features, cm_cpu_target *out,
                                cm_err *err) {
  memset(out, 0, sizeof *out);
  pthread_once(&host_once, read_host);
  const char *name = cpu;
  char *who = out->source;
  if (!cpu) {
    name = getenv(CM_CPU_ENV);
    snprintf(who, sizeof out->source, "%s=%.60s", CM_CPU_ENV, name ? name : "");
  } else {
    snprintf(who, sizeof out->source, "CPU %.60s", cpu);
  }
  bool host = !name || !*name || !strcmp(name, "native");
  if (host) {
    snprintf(out->cpu, sizeof out->cpu, "%s", host_cpu);
    if (features && !strcmp(features, "")) features = NULL;
  } else {
    size_t n = strlen(name);
    if (n >= sizeof out->cpu)
      return cm_errorf(err, CM_EINVALID, "%s: not an LLVM CPU name (longer than %zu characters)",
                       who, sizeof out->cpu - 1);
    if (strncmp(host_triple, "x86_64", 6) != 0)
      return cm_errorf(err, CM_EINVALID,
                       "%s: naming a CPU is supported on x86-64 hosts only (this is %s); unset "
                       "%s or set it to native",
                       who, host_triple, CM_CPU_ENV);
#if !CMAEC_HAVE_LLVM
    return cm_errorf(err, CM_EINVALID,
                     "%s: this cmaec was built without LLVM (-DCMAEC_LLVM=OFF), which names and "
                     "checks CPUs; unset %s or set it to native",
                     who, CM_CPU_ENV);
#else
    if (!cm_llvm_x86_parse_arch || !cm_llvm_x86_cpu_features)
      return cm_errorf(err, CM_EINVALID,
                       "%s: this LLVM does not export its X86 target parser "
                       "(llvm::X86::parseArchX86), so CPU names cannot be checked; unset %s",
                       who, CM_CPU_ENV);
    llvm_string_ref r = {name, n};
    if (cm_llvm_x86_parse_arch(r, true) == 0) {
      char known[800];
      known_cpus(known, sizeof known);
      unsigned major, minor, patch;
      LLVMGetVersion(&major, &minor, &patch);
      return cm_errorf(err, CM_EINVALID,
                       "%s: not an x86-64 CPU LLVM %u.%u.%u knows (known: native, %s)", who, major,
                       minor, patch, known);
    }
    memcpy(out->cpu, name, n + 1);
    out->forced = true;
#endif
  }

  /* The enabled features: the host's, or those the named CPU implies; then the caller's. */
  char *en = out->features;
  size_t en_size = sizeof out->features;
  bool overflow = false;
  if (host) {
    const char *list = features ? features : host_features;
    for (const char *p = list; *p;) {
      const char *e = strchr(p, ',');
      size_t len = e ? (size_t)(e - p) : strlen(p);
      if (len > 1 && p[0] == '+') overflow |= !append(en, en_size, ",", p, len);
      p += len;
      if (*p == ',') p++;
    }
  } else {
#if CMAEC_HAVE_LLVM
    llvm_ref_vec v;
    ref_vec_init(&v);
    cm_llvm_x86_cpu_features((llvm_string_ref){out->cpu, strlen(out->cpu)}, &v, true);
    const llvm_string_ref *r = v.begin;
    for (uint32_t i = 0; i < v.size; i++) {
      const char *f = r[i].data + 1;
      size_t fn = r[i].size ? r[i].size - 1 : 0;
      if (features && list_has(features, '-', f, fn)) continue; /* the caller turned it off */
      overflow |= !append(en, en_size, ",", r[i].data, r[i].size);
    }
    ref_vec_free(&v);
    for (const char *p = features ? features : ""; *p;) { /* the caller's additions */
      const char *e = strchr(p, ',');
      size_t len = e ? (size_t)(e - p) : strlen(p);
      if (len > 1 && p[0] == '+' && !list_has(en, '+', p + 1, len - 1))
        overflow |= !append(en, en_size, ",", p, len);
      p += len;
      if (*p == ',') p++;
    }
#endif
  }
  if (overflow)
    return cm_errorf(err, CM_EINTERNAL, "%s: its feature list exceeds %zu characters", who,
                     en_size - 1);
  out->vector_bits = widest_vector(en);
  if (features && list_has(features, '-', "avx512f", 7) && out->vector_bits > 256)
    out->vector_bits = 256;
  if (features && list_has(features, '-', "avx", 3)) out->vector_bits = 128;
  if (strncmp(host_triple, "x86_64", 6) != 0) out->vector_bits = 256; /* 8 f32 lanes, as before */
  out->dot_bf16 = out->vector_bits == 512 && list_has(en, '+', "avx512bf16", 10);

  /* Can this host run the code? Every enabled feature must be the host's too. */
  out->runnable = true;
  overflow = false;
  if (out->forced) {
    for (const char *p = en; *p;) {
      const char *e = strchr(p, ',');
      size_t len = e ? (size_t)(e - p) : strlen(p);
      if (len > 1 && !host_has(p + 1, len - 1)) {
        if (out->runnable || !overflow) /* the first ones, then "..." */
          overflow = !append(out->missing, sizeof out->missing - 4, ",", p + 1, len - 1);
        if (overflow && !strstr(out->missing, "...")) strcat(out->missing, ",...");
        out->runnable = false;
      }
      p += len;
      if (*p == ',') p++;
    }
  }
  snprintf(out->host_cpu, sizeof out->host_cpu, "%s", host_cpu);
  return CM_OK;
}

cm_status cm_cpu_target_not_runnable(const cm_cpu_target *t, const char *what, cm_err *err) {
  return cm_errorf(err, CM_EINVALID,
                   "%s: %s needs %s, which this host (%s) lacks: its kernels can be compiled "
                   "(cmaec compile) but not run here",
                   what, t->source, t->missing, t->host_cpu);
}

/* ---- cm_target ------------------------------------------------------------ */

/* A 6 x 64 register block (24 zmm accumulators) measured best on AVX-512; 6 x 2
 * vectors with AVX2's (or SSE's) 16 registers. */
cm_kgemm_tiles cm_cpu_gemm_defaults(int lanes) {
  if (lanes >= 16) return (cm_kgemm_tiles){240, 512, 128, 6, 4 * lanes};
  return (cm_kgemm_tiles){240, 256, 128, 6, 2 * lanes};
}

static void cpu_fill(cm_target *out) {
  out->kind = CM_TARGET_CPU;
  snprintf(out->arch, sizeof out->arch, "%s", out->cpu.cpu);
  out->vector_lanes = out->cpu.vector_bits / 32;
  out->gemm = cm_cpu_gemm_defaults(out->vector_lanes);
}

cm_status cm_target_cpu(const char *cpu, const char *features, cm_target *out, cm_err *err) {
  memset(out, 0, sizeof *out);
  cm_status st = cm_cpu_target_resolve(cpu, features, &out->cpu, err);
  if (st != CM_OK) return st;
  cpu_fill(out);
  return CM_OK;
}

void cm_target_host(cm_target *out) {
  if (cm_target_cpu(NULL, NULL, out, NULL) == CM_OK) return;
  memset(out, 0, sizeof *out); /* an invalid $CMAEC_CPU: the host itself */
  (void)cm_cpu_target_resolve("native", NULL, &out->cpu, NULL);
  cpu_fill(out);
}

cm_status cm_target_cuda(const char *arch, cm_target *out, cm_err *err) {
  memset(out, 0, sizeof *out);
  int sm = 0, used = 0;
  if (!arch || sscanf(arch, "sm_%d%n", &sm, &used) != 1 ||
      (arch[used] && strcmp(arch + used, "a")) || sm < 70 || sm > 199)
    return cm_errorf(err, CM_EINVALID, "CUDA target \"%s\": expected sm_XY or sm_XYa, XY >= 70",
                     arch ? arch : "(null)");
  out->kind = CM_TARGET_CUDA;
  snprintf(out->arch, sizeof out->arch, "%s", arch);
  out->sm = sm;
  out->vector_lanes = 1;
  out->gemm = (cm_kgemm_tiles){64, 64, 16, 32, 32};
  out->warp_size = 32;
  out->max_threads_per_block = 1024;
  out->max_regs_per_thread = 255;
  out->regs_per_sm = 65536;
  out->shared_bytes_static = 48 * 1024;
  /* the opt-in maximum per block (CUDA C Programming Guide, compute capabilities) */
  out->shared_bytes_max = sm >= 90   ? 227 * 1024
                          : sm == 80 ? 163 * 1024
                          : sm >= 86 ? 99 * 1024
                          : sm == 75 ? 64 * 1024
                                     : 96 * 1024;
  out->mma_bf16 = sm >= 80;
  return CM_OK;
}

void cm_target_print(const cm_target *t, FILE *out) {
  const cm_kgemm_tiles *g = &t->gemm;
  if (t->kind == CM_TARGET_CPU)
    fprintf(out, "cpu %s (%s), %d f32 lanes%s", t->arch, t->cpu.source, t->vector_lanes,
            t->cpu.runnable ? "" : ", not runnable here");
  else
    fprintf(out,
            "cuda %s, warp %d, %d threads/block, %d regs/thread, shared %lld KiB (%lld KiB "
            "opt-in)%s",
            t->arch, t->warp_size, t->max_threads_per_block, t->max_regs_per_thread,
            (long long)(t->shared_bytes_static / 1024), (long long)(t->shared_bytes_max / 1024),
            t->mma_bf16 ? ", bf16/f16 mma" : "");
  fprintf(out, "; GEMM tiles mc %d nc %d kc %d, register block %d x %d\n", g->mc, g->nc, g->kc,
          g->mr, g->nr);
}
