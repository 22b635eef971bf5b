/* tests/llvm_kernels.h — what the LLVM renderer's tests share: a JIT for the
 * host at O3 (512-bit vectors where AVX-512 exists), a hand-built kernel
 * rendered and JIT'd with its stage entry points, and a substring count for
 * the asm checks. Include after tests/test.h. */
#ifndef CMAEC_TEST_LLVM_KERNELS_H
#define CMAEC_TEST_LLVM_KERNELS_H

#include "codegen/codegen.h"

#include <llvm-c/Core.h>
#include <stdio.h>
#include <string.h>

static inline cm_jit *test_new_jit(void) {
  cm_jit_opts o = {NULL, 3, NULL, NULL, 512, false};
  cm_jit *j = NULL;
  cm_err err = {0};
  cm_status st = cm_jit_create(&j, &o, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  return j;
}

/* Renders k into a fresh module of j's context and JITs it; fns[i] = stage i.
 * k's name gets a per-module suffix: symbols are unique per JIT. */
static inline bool test_jit_kernel(cm_jit *j, cm_kernel *k, const cm_llvm_render_opts *o,
                                   cm_cpu_stage_fn *fns) {
  static int module_counter;
  char mname[64];
  snprintf(mname, sizeof mname, "m%d", module_counter++);
  size_t len = strcspn(k->name, "_");
  snprintf(k->name + len, sizeof k->name - len, "_%d", module_counter);
  LLVMModuleRef m = LLVMModuleCreateWithNameInContext(mname, cm_jit_context(j));
  cm_err err = {0};
  cm_status st = cm_render_llvm(k, m, o, &err);
  CHECK_MSG(st == CM_OK, "render %s: %s", k->name, err.msg);
  if (st != CM_OK) {
    LLVMDisposeModule(m);
    return false;
  }
  st = cm_jit_add_module(j, m, &err);
  CHECK_MSG(st == CM_OK, "add %s: %s", k->name, err.msg);
  if (st != CM_OK) return false;
  for (int i = 0; i < k->n_stages; i++) {
    char name[96];
    void *addr = NULL;
    snprintf(name, sizeof name, "%s_s%d", k->name, i);
    st = cm_jit_lookup(j, name, &addr, &err);
    CHECK_MSG(st == CM_OK, "lookup %s: %s", name, err.msg);
    if (st != CM_OK) return false;
    memcpy(&fns[i], &addr, sizeof addr);
  }
  return true;
}

/* Occurrences of what in text (overlapping ones too). */
static inline int test_count(const char *text, const char *what) {
  int n = 0;
  for (const char *p = strstr(text, what); p; p = strstr(p + 1, what)) n++;
  return n;
}

#endif
