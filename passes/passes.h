/* passes/passes.h — graph passes: the contract of the passes layer.
 *
 * Empty for now: autodiff, the optimizer, simplification, fusion, scheduling
 * and memory planning come with their issues. Uses ir/ only. */
#ifndef CMAEC_PASSES_H
#define CMAEC_PASSES_H

#include "../ir/ir.h"

#endif
