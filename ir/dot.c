/* ir/dot.c — the graph as Graphviz dot: one box per node (name, op, type),
 * filled by op category, edges from inputs, graph outputs with a double border. */
#include "ir.h"

/* One fill color per category, light enough for black text. */
static const char *category_color(cm_category c) {
  switch (c) {
  case CM_CAT_SOURCE: return "#c6dbef";      /* blue */
  case CM_CAT_ELEMENTWISE: return "#c7e9c0"; /* green */
  case CM_CAT_REDUCE: return "#fdd0a2";      /* orange */
  case CM_CAT_MOVEMENT: return "#dadaeb";    /* lavender */
  case CM_CAT_CONTRACTION: return "#fcbba1"; /* salmon */
  case CM_CAT_COLLECTIVE: return "#fff3a0";  /* yellow */
  case CM_CAT_UPDATE: return "#d9d9d9";      /* grey */
  }
  return "#ffffff";
}

/* Writes s as the inside of a dot string: quotes and backslashes escaped,
 * control characters dropped (names are validated, but be safe). */
static void put_escaped(FILE *out, const char *s) {
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') {
      fputc('\\', out);
      fputc(c, out);
    } else if (c >= 0x20) {
      fputc(c, out);
    }
  }
}

cm_status cm_graph_dot(const cm_graph *g, FILE *out, cm_err *err) {
  if (!g || !out) return cm_errorf(err, CM_EINVALID, "cm_graph_dot: no graph or no stream");
  fputs("digraph cmaec {\n", out);
  fputs("  node [shape=box, style=filled, fontname=\"monospace\"];\n", out);
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *nd = &g->nodes[i];
    if ((unsigned)nd->op >= CM_OP_COUNT)
      return cm_errorf(err, CM_EINVALID, "nodes[%d]: op %d is not in the op table", i, (int)nd->op);
    bool is_output = false;
    for (int k = 0; k < g->n_outputs; k++)
      if (g->outputs[k] == i) is_output = true;
    char type[128];
    fprintf(out, "  n%d [label=\"", i);
    if (nd->name)
      put_escaped(out, nd->name);
    else
      fprintf(out, "%%%d", i);
    fprintf(out, "\\n%s\\n%s\", fillcolor=\"%s\"%s];\n", cm_op_name(nd->op),
            cm_type_str(&nd->type, type, sizeof type),
            category_color(cm_op_get_info(nd->op)->category), is_output ? ", peripheries=2" : "");
  }
  for (int i = 0; i < g->n_nodes; i++)
    for (int k = 0; k < g->nodes[i].n_inputs; k++)
      fprintf(out, "  n%d -> n%d;\n", g->nodes[i].inputs[k], i);
  fputs("}\n", out);
  if (ferror(out)) return cm_errorf(err, CM_EINTERNAL, "writing the dot graph failed");
  return CM_OK;
}
