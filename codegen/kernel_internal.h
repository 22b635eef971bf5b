/* codegen/kernel_internal.h — the kernel IR builders' helpers that
 * kernel_simplify.c shares with kernel.c. Private to codegen/. */
#ifndef CM_KERNEL_INTERNAL_H
#define CM_KERNEL_INTERNAL_H

#include "codegen.h"

/* p grown to hold at least need elements of elem bytes (*cap updated);
 * aborts when out of memory while building a kernel. */
void *cm_kgrow(void *p, int *cap, int need, size_t elem);
/* Appends expression e to stage s (no folding); returns its id. */
int cm_kstage_push(cm_kstage *s, cm_kexpr e);
/* An expression of the kind and dtype with no operands, var or buffer. */
cm_kexpr cm_kexpr_blank(cm_kx_kind kind, cm_dtype dt);
/* Marks the expressions reachable from root into mark (topological order = id order). */
void cm_kexpr_reach(const cm_kstage *s, int root, bool *mark);

#endif
