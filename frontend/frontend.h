/* frontend/frontend.h — files in, files out: the contract of the frontend layer.
 *
 * Defines: graph JSON v1 read/write (cmaec.graph/1, docs/graph-format.md),
 * loading a graph from JSON or text IR by content, named tensor sets, and
 * safetensors read/write. Uses ir/ only. Every reader validates everything it
 * reads and returns CM_EINVALID with a one-line message naming the place
 * (JSON path, node, tensor) and the rule; none reads out of bounds. */
#ifndef CMAEC_FRONTEND_H
#define CMAEC_FRONTEND_H

#include "../ir/ir.h"

#define CM_GRAPH_FORMAT_TAG "cmaec.graph/1"

/* ---- graph JSON -------------------------------------------------------- */

/* Parses graph JSON text (len bytes, need not be NUL-terminated). Nodes may be
 * listed in any order; they are sorted topologically, and a cycle is an error
 * naming a node on it. Errors: "nodes[7].inputs[1]: no value named \"h2\"". */
cm_status cm_graph_from_json(const char *text, size_t len, cm_graph **out, cm_err *err);
/* Writes graph JSON (malloc'd, NUL-terminated, pretty-printed); NULL on out of
 * memory. write(read(x)) is a fixed point: writing what was read gives the same text. */
char *cm_graph_to_json(const cm_graph *g);
/* Reads a file: graph JSON if its first non-blank byte is '{', '[' or '"' or
 * the file is blank, else text IR. Errors are prefixed with the path. */
cm_status cm_graph_load(const char *path, cm_graph **out, cm_err *err);
cm_status cm_graph_save_json(const cm_graph *g, const char *path, cm_err *err);

/* ---- named tensors and safetensors ------------------------------------- */

typedef struct cm_tensor_set {
  int n, cap;
  char **names;
  cm_tensor *tensors;
  int n_meta; /* "__metadata__" string pairs */
  char **meta_keys, **meta_values;
} cm_tensor_set;

void cm_tensor_set_init(cm_tensor_set *s);
void cm_tensor_set_free(cm_tensor_set *s);
/* Adds a copy of t under name (replacing an existing entry of that name). */
cm_status cm_tensor_set_add(cm_tensor_set *s, const char *name, const cm_tensor *t, cm_err *err);
/* Takes ownership of t->data (t is left empty). */
cm_status cm_tensor_set_take(cm_tensor_set *s, const char *name, cm_tensor *t, cm_err *err);
const cm_tensor *cm_tensor_set_get(const cm_tensor_set *s, const char *name);
cm_status cm_tensor_set_meta(cm_tensor_set *s, const char *key, const char *value, cm_err *err);

/* Parses a safetensors image of len bytes: 8-byte little-endian header length,
 * JSON header, data. Checks dtypes, shapes (rank <= 6, dims >= 0 fitting the
 * byte range), offsets in order, inside the data and matching dtype x shape,
 * header length inside the buffer. Zero-sized dims are read but rejected as
 * graph values later. */
cm_status cm_safetensors_parse(const uint8_t *buf, size_t len, cm_tensor_set *out, cm_err *err);
cm_status cm_safetensors_load(const char *path, cm_tensor_set *out, cm_err *err);
/* Serializes (tensors in set order, data 8-byte aligned header). */
cm_status cm_safetensors_serialize(const cm_tensor_set *s, uint8_t **buf, size_t *len, cm_err *err);
/* Writes to path.tmp, flushes, fsyncs and renames, so a crash never leaves a broken file. */
cm_status cm_safetensors_save(const char *path, const cm_tensor_set *s, cm_err *err);

/* Reads a whole file (malloc'd, NUL-terminated, *len without the NUL). */
cm_status cm_read_file(const char *path, char **data, size_t *len, cm_err *err);

#endif
