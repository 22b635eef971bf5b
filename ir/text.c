/* ir/text.c — the text IR: printer and parser (syntax in docs/text-ir.md).
 *
 *   x: f32[4,8] = input
 *   %3: f32[4,16] = matmul(x, fc.weight) {transpose_b=true}
 *   outputs(y, s)
 *
 * The printer writes only the attributes that differ from cm_attrs_default()
 * (plus what an op needs to be rebuilt), numbers in the shortest form that
 * reads back exactly, so that print(parse(print(g))) == print(g). The parser
 * rebuilds the graph through cm_graph_add and checks every annotated type
 * against inference. It is meant to survive any input: every read is bounded
 * by the current line and every number is range-checked. */
#include "ir.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#define TEXT_HEADER "# cmaec.graph/1"

/* ---- shared helpers ---------------------------------------------------- */

/* Shortest of %.15g, %.16g, %.17g that reads back as the same double. */
static void format_double(double v, char buf[40]) {
  if (isnan(v)) {
    strcpy(buf, "nan");
    return;
  }
  if (isinf(v)) {
    strcpy(buf, v < 0 ? "-inf" : "inf");
    return;
  }
  for (int prec = 15; prec <= 17; prec++) {
    snprintf(buf, 40, "%.*g", prec, v);
    if (prec == 17 || strtod(buf, NULL) == v) return;
  }
}

/* Bitwise, so that -0 differs from 0 and NaN equals itself. */
static bool same_double(double a, double b) {
  return memcmp(&a, &b, sizeof a) == 0;
}

/* The fields each init kind carries, with their documented defaults. */
typedef struct init_fields {
  int n;
  const char *name[2];
  double fallback[2];
} init_fields;

static init_fields init_fields_of(cm_init_kind k) {
  init_fields f = {0, {NULL, NULL}, {0, 0}};
  switch (k) {
  case CM_INIT_CONSTANT: f = (init_fields){1, {"value", NULL}, {0, 0}}; break;
  case CM_INIT_NORMAL:
  case CM_INIT_TRUNC_NORMAL: f = (init_fields){2, {"mean", "std"}, {0, 1}}; break;
  case CM_INIT_UNIFORM: f = (init_fields){2, {"low", "high"}, {0, 1}}; break;
  case CM_INIT_XAVIER_UNIFORM: f = (init_fields){2, {"gain", "flatten"}, {1, 0}}; break;
  case CM_INIT_SINCOS_2D: f = (init_fields){1, {"cls", NULL}, {0, 0}}; break;
  case CM_INIT_TORCH_DEFAULT: f = (init_fields){1, {"fan_in", NULL}, {0, 0}}; break;
  default: break;
  }
  return f;
}

static bool init_same(const cm_init *x, const cm_init *y) {
  if (x->kind != y->kind) return false;
  init_fields f = init_fields_of(x->kind);
  if (f.n >= 1 && !same_double(x->a, y->a)) return false;
  if (f.n >= 2 && !same_double(x->b, y->b)) return false;
  return true;
}

/* The attribute keys, in printing order. */
typedef enum attr_key {
#define CM_ATTR_KEY(id, key, bit) K_##id,
#include "attrs.def"
#undef CM_ATTR_KEY
  K_COUNT
} attr_key;

static const struct {
  const char *name;
  unsigned bit;
} attr_keys[K_COUNT] = {
#define CM_ATTR_KEY(id, key, bit) [K_##id] = {key, bit},
#include "attrs.def"
#undef CM_ATTR_KEY
};

/* ---- printer ----------------------------------------------------------- */

typedef struct attr_printer {
  FILE *out;
  int count;
} attr_printer;

static void begin_attr(attr_printer *ap, const char *key) {
  fputs(ap->count++ ? ", " : " {", ap->out);
  fprintf(ap->out, "%s=", key);
}

static void print_i64_list(FILE *out, const int64_t *v, int n) {
  fputc('[', out);
  for (int i = 0; i < n; i++) fprintf(out, "%s%lld", i ? "," : "", (long long)v[i]);
  fputc(']', out);
}

static void print_int_list(FILE *out, const int *v, int n) {
  fputc('[', out);
  for (int i = 0; i < n; i++) fprintf(out, "%s%d", i ? "," : "", v[i]);
  fputc(']', out);
}

static void print_double(FILE *out, double v) {
  char buf[40];
  format_double(v, buf);
  fputs(buf, out);
}

static bool i64_lists_equal(const int64_t *a, const int64_t *b, int n) {
  for (int i = 0; i < n; i++)
    if (a[i] != b[i]) return false;
  return true;
}

static bool int_lists_equal(const int *a, const int *b, int n) {
  for (int i = 0; i < n; i++)
    if (a[i] != b[i]) return false;
  return true;
}

static void print_init(FILE *out, const cm_init *init) {
  fputs(cm_init_kind_name(init->kind), out);
  init_fields f = init_fields_of(init->kind);
  /* fan_in 0 means "from the shape": not a value worth spelling out. */
  if (init->kind == CM_INIT_TORCH_DEFAULT && init->a == 0) return;
  if (f.n == 0) return;
  double v[2] = {init->a, init->b};
  /* xavier's flatten is an option: spelled out only when set */
  if (init->kind == CM_INIT_XAVIER_UNIFORM && init->b == 0) f.n = 1;
  fputc('(', out);
  for (int i = 0; i < f.n; i++) {
    fprintf(out, "%s%s=", i ? ", " : "", f.name[i]);
    print_double(out, v[i]);
  }
  fputc(')', out);
}

static void print_attrs(const cm_graph *g, const cm_node *nd, FILE *out) {
  const cm_op_info *info = cm_op_get_info(nd->op);
  const cm_attrs *a = &nd->attrs;
  cm_attrs d;
  cm_attrs_default(&d);
  unsigned bits = info->attrs;
  bool source = info->category == CM_CAT_SOURCE;
  int in_rank = 0;
  if (nd->n_inputs > 0 && nd->inputs[0] >= 0 && nd->inputs[0] < g->n_nodes)
    in_rank = g->nodes[nd->inputs[0]].type.rank;
  if (in_rank > CM_MAX_RANK) in_rank = CM_MAX_RANK;
  attr_printer ap = {out, 0};

  /* Sources take dtype and shape from the type annotation; every other op
   * that has them needs them to be rebuilt, default or not. */
  if ((bits & CM_ATTR_DTYPE) && !source) {
    begin_attr(&ap, "dtype");
    fputs(cm_dtype_name(a->dtype), out);
  }
  if ((bits & CM_ATTR_SHAPE) && !source) {
    begin_attr(&ap, "shape");
    print_i64_list(out, a->shape, a->rank < 0 ? 0 : a->rank > CM_MAX_RANK ? CM_MAX_RANK : a->rank);
  }
  if ((bits & CM_ATTR_INIT) && !init_same(&a->init, &d.init)) {
    begin_attr(&ap, "init");
    print_init(out, &a->init);
  }
  if ((bits & CM_ATTR_VALUE) && !same_double(a->value, d.value)) {
    begin_attr(&ap, "value");
    print_double(out, a->value);
  }
  if ((bits & CM_ATTR_DATA) && a->data) {
    begin_attr(&ap, "data");
    fputc('[', out);
    for (int64_t i = 0; i < a->n_data; i++) {
      if (i) fputc(',', out);
      print_double(out, a->data[i]);
    }
    fputc(']', out);
  }
  if ((bits & CM_ATTR_AXIS) && a->axis != d.axis) {
    begin_attr(&ap, "axis");
    fprintf(out, "%d", a->axis);
  }
  if (bits & CM_ATTR_AXES) {
    int n = a->n_axes < 0 ? 0 : a->n_axes > CM_MAX_RANK ? CM_MAX_RANK : a->n_axes;
    if (n != d.n_axes || !int_lists_equal(a->axes, d.axes, n)) {
      begin_attr(&ap, "axes");
      print_int_list(out, a->axes, n);
    }
  }
  if ((bits & CM_ATTR_KEEPDIMS) && a->keepdims != d.keepdims) {
    begin_attr(&ap, "keepdims");
    fputs(a->keepdims ? "true" : "false", out);
  }
  if ((bits & CM_ATTR_PERM) && !int_lists_equal(a->perm, d.perm, in_rank)) {
    begin_attr(&ap, "perm");
    print_int_list(out, a->perm, in_rank);
  }
  if (bits & CM_ATTR_SLICE) {
    const int64_t *lists[3] = {a->start, a->stop, a->step};
    const int64_t *defaults[3] = {d.start, d.stop, d.step};
    const char *names[3] = {"start", "stop", "step"};
    for (int k = 0; k < 3; k++)
      if (!i64_lists_equal(lists[k], defaults[k], in_rank)) {
        begin_attr(&ap, names[k]);
        print_i64_list(out, lists[k], in_rank);
      }
  }
  if (bits & CM_ATTR_PAD) {
    if (!i64_lists_equal(a->lo, d.lo, in_rank)) {
      begin_attr(&ap, "lo");
      print_i64_list(out, a->lo, in_rank);
    }
    if (!i64_lists_equal(a->hi, d.hi, in_rank)) {
      begin_attr(&ap, "hi");
      print_i64_list(out, a->hi, in_rank);
    }
  }
  if (bits & CM_ATTR_TRANSPOSE) {
    if (a->transpose_a != d.transpose_a) {
      begin_attr(&ap, "transpose_a");
      fputs(a->transpose_a ? "true" : "false", out);
    }
    if (a->transpose_b != d.transpose_b) {
      begin_attr(&ap, "transpose_b");
      fputs(a->transpose_b ? "true" : "false", out);
    }
  }
  if (bits & CM_ATTR_CONV) {
    const int *pairs[3] = {a->stride, a->padding, a->dilation};
    const int *defaults[3] = {d.stride, d.padding, d.dilation};
    const char *names[3] = {"stride", "padding", "dilation"};
    for (int k = 0; k < 3; k++)
      if (!int_lists_equal(pairs[k], defaults[k], 2)) {
        begin_attr(&ap, names[k]);
        print_int_list(out, pairs[k], 2);
      }
    if (a->groups != d.groups) {
      begin_attr(&ap, "groups");
      fprintf(out, "%d", a->groups);
    }
  }
  if ((bits & CM_ATTR_MODE) && a->mode != d.mode) {
    begin_attr(&ap, "mode");
    fputs(a->mode == CM_MODE_MEAN ? "mean" : "sum", out);
  }
  if ((bits & CM_ATTR_RANKS) && a->ranks != d.ranks) {
    begin_attr(&ap, "ranks");
    fprintf(out, "%d", a->ranks);
  }
  if (ap.count) fputc('}', out);
}

static void print_node_name(const cm_graph *g, int id, FILE *out) {
  if (id < 0 || id >= g->n_nodes) {
    fprintf(out, "?%d", id);
    return;
  }
  if (g->nodes[id].name)
    fputs(g->nodes[id].name, out);
  else
    fprintf(out, "%%%d", id);
}

cm_status cm_graph_print(const cm_graph *g, FILE *out, cm_err *err) {
  if (!g || !out) return cm_errorf(err, CM_EINVALID, "cm_graph_print: no graph or no stream");
  fputs(TEXT_HEADER "\n", out);
  for (int i = 0; i < g->n_nodes; i++) {
    const cm_node *nd = &g->nodes[i];
    if ((unsigned)nd->op >= CM_OP_COUNT)
      return cm_errorf(err, CM_EINVALID, "nodes[%d]: op %d is not in the op table", i, (int)nd->op);
    char type[128];
    print_node_name(g, i, out);
    fprintf(out, ": %s = %s", cm_type_str(&nd->type, type, sizeof type), cm_op_name(nd->op));
    if (nd->n_inputs > 0) {
      fputc('(', out);
      for (int k = 0; k < nd->n_inputs; k++) {
        if (k) fputs(", ", out);
        print_node_name(g, nd->inputs[k], out);
      }
      fputc(')', out);
    }
    print_attrs(g, nd, out);
    fputc('\n', out);
  }
  fputs("outputs(", out);
  for (int k = 0; k < g->n_outputs; k++) {
    if (k) fputs(", ", out);
    print_node_name(g, g->outputs[k], out);
  }
  fputs(")\n", out);
  if (ferror(out)) return cm_errorf(err, CM_EINTERNAL, "writing the text IR failed");
  return CM_OK;
}

char *cm_graph_print_str(const cm_graph *g) {
  char *buf = NULL;
  size_t len = 0;
  FILE *mem = open_memstream(&buf, &len);
  if (!mem) return NULL;
  cm_status st = cm_graph_print(g, mem, NULL);
  if (fclose(mem) != 0 || st != CM_OK) {
    free(buf);
    return NULL;
  }
  return buf;
}

/* ---- parser ------------------------------------------------------------ */

typedef struct parser {
  const char *line; /* first byte of the current line (columns count from here) */
  const char *end;  /* end of the line's content: comment and trailing blanks cut */
  const char *p;    /* cursor, line <= p <= end */
  int lineno;
  cm_graph *g;
  cm_err *err;
} parser;

static cm_status fail_at(parser *ps, const char *at, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* "line L:C: rule" */
static cm_status fail_at(parser *ps, const char *at, const char *fmt, ...) {
  char rule[900];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(rule, sizeof rule, fmt, ap);
  va_end(ap);
  return cm_errorf(ps->err, CM_EINVALID, "line %d:%d: %s", ps->lineno, (int)(at - ps->line) + 1,
                   rule);
}

static bool is_blank(char c) {
  return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f';
}
static bool is_digit(char c) {
  return c >= '0' && c <= '9';
}
static bool is_ident_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || is_digit(c) || c == '_';
}
/* The characters cm_name_is_valid may accept, '%' included. */
static bool is_name_char(char c) {
  return is_ident_char(c) || c == '.' || c == ':' || c == '/' || c == '-' || c == '%';
}

static void skip_blanks(parser *ps) {
  while (ps->p < ps->end && is_blank(*ps->p)) ps->p++;
}

static bool accept(parser *ps, char c) {
  skip_blanks(ps);
  if (ps->p < ps->end && *ps->p == c) {
    ps->p++;
    return true;
  }
  return false;
}

/* A token as a quoted string for messages; long tokens are cut. */
static const char *quote_token(const char *s, size_t n, char buf[80]) {
  size_t k = n > 60 ? 60 : n;
  snprintf(buf, 80, "\"%.*s%s\"", (int)k, s, n > k ? "..." : "");
  return buf;
}

/* What follows the cursor, for "unexpected ..." messages. */
static const char *rest_token(parser *ps, char buf[80]) {
  if (ps->p >= ps->end) return "end of line";
  size_t n = (size_t)(ps->end - ps->p);
  return quote_token(ps->p, n > 20 ? 20 : n, buf);
}

static size_t scan_ident(parser *ps) {
  skip_blanks(ps);
  const char *s = ps->p;
  while (s < ps->end && is_ident_char(*s)) s++;
  return (size_t)(s - ps->p);
}

static bool token_is(const char *s, size_t n, const char *word) {
  return strlen(word) == n && memcmp(s, word, n) == 0;
}

/* Optional sign and decimal digits, exact range check. */
static cm_status parse_i64(parser *ps, const char *what, int64_t *out) {
  skip_blanks(ps);
  const char *s = ps->p;
  bool neg = false;
  if (s < ps->end && (*s == '-' || *s == '+')) neg = *s++ == '-';
  if (s >= ps->end || !is_digit(*s)) {
    char buf[80];
    return fail_at(ps, ps->p, "%s: expected an integer, found %s", what, rest_token(ps, buf));
  }
  uint64_t limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX, v = 0;
  while (s < ps->end && is_digit(*s)) {
    uint64_t digit = (uint64_t)(*s - '0');
    if (v > (limit - digit) / 10) return fail_at(ps, ps->p, "%s: integer out of range", what);
    v = v * 10 + digit;
    s++;
  }
  if (s < ps->end && (is_ident_char(*s) || *s == '.'))
    return fail_at(ps, ps->p, "%s: expected an integer", what);
  *out = neg ? (int64_t)(0 - v) : (int64_t)v;
  ps->p = s;
  return CM_OK;
}

static cm_status parse_int(parser *ps, const char *what, int *out) {
  const char *at = (skip_blanks(ps), ps->p);
  int64_t v;
  cm_status st = parse_i64(ps, what, &v);
  if (st) return st;
  if (v < INT_MIN || v > INT_MAX) return fail_at(ps, at, "%s: integer out of range", what);
  *out = (int)v;
  return CM_OK;
}

/* Decimal numbers (sign, digits, point, exponent), inf and nan. Scanned here
 * so that strtod never sees hex floats or locale surprises. */
static cm_status parse_double(parser *ps, const char *what, double *out) {
  skip_blanks(ps);
  const char *start = ps->p, *s = ps->p, *e = ps->end;
  bool neg = false;
  if (s < e && (*s == '-' || *s == '+')) neg = *s++ == '-';
  size_t word = 0;
  while (s + word < e && is_ident_char(s[word])) word++;
  if (token_is(s, word, "inf") || token_is(s, word, "nan")) {
    *out = s[0] == 'i' ? (neg ? -INFINITY : INFINITY) : (neg ? -NAN : NAN);
    ps->p = s + word;
    return CM_OK;
  }
  size_t digits = 0;
  while (s < e && is_digit(*s)) s++, digits++;
  if (s < e && *s == '.') {
    s++;
    while (s < e && is_digit(*s)) s++, digits++;
  }
  if (digits == 0) {
    char buf[80];
    return fail_at(ps, start, "%s: expected a number, found %s", what, rest_token(ps, buf));
  }
  if (s < e && (*s == 'e' || *s == 'E')) {
    const char *x = s + 1;
    if (x < e && (*x == '-' || *x == '+')) x++;
    if (x >= e || !is_digit(*x)) return fail_at(ps, start, "%s: bad exponent", what);
    while (x < e && is_digit(*x)) x++;
    s = x;
  }
  if (s < e && (is_ident_char(*s) || *s == '.'))
    return fail_at(ps, start, "%s: malformed number", what);
  char buf[512];
  size_t n = (size_t)(s - start);
  if (n >= sizeof buf) return fail_at(ps, start, "%s: number longer than 511 characters", what);
  memcpy(buf, start, n);
  buf[n] = '\0';
  errno = 0;
  char *endp;
  double v = strtod(buf, &endp);
  if (endp != buf + n) return fail_at(ps, start, "%s: malformed number", what);
  if (isinf(v)) return fail_at(ps, start, "%s: number out of range (write inf)", what);
  *out = v;
  ps->p = s;
  return CM_OK;
}

/* Checks dims the way every type is checked: rank <= 6, each >= 1, product
 * <= CM_MAX_ELEMENTS. */
static cm_status check_dims(parser *ps, const char *at, const char *what, const int64_t *dims,
                            int rank) {
  int64_t numel = 1;
  for (int i = 0; i < rank; i++) {
    if (dims[i] < 1)
      return fail_at(ps, at, "%s: dimension %d is %lld, must be >= 1", what, i, (long long)dims[i]);
    if (dims[i] > CM_MAX_ELEMENTS / numel)
      return fail_at(ps, at, "%s: more than 2^40 elements", what);
    numel *= dims[i];
  }
  return CM_OK;
}

/* "[a,b,...]" of at most max integers. */
static cm_status parse_i64_list(parser *ps, const char *what, int max, int64_t *v, int *n) {
  skip_blanks(ps);
  const char *open = ps->p;
  if (!accept(ps, '[')) {
    char buf[80];
    return fail_at(ps, ps->p, "%s: expected a list '[...]', found %s", what, rest_token(ps, buf));
  }
  *n = 0;
  if (accept(ps, ']')) return CM_OK;
  for (;;) {
    if (*n >= max) return fail_at(ps, open, "%s: more than %d entries", what, max);
    cm_status st = parse_i64(ps, what, &v[*n]);
    if (st) return st;
    (*n)++;
    if (accept(ps, ']')) return CM_OK;
    if (accept(ps, ',')) continue;
    if (ps->p >= ps->end) return fail_at(ps, open, "%s: unterminated list", what);
    char buf[80];
    return fail_at(ps, ps->p, "%s: expected ',' or ']', found %s", what, rest_token(ps, buf));
  }
}

static cm_status parse_int_list(parser *ps, const char *what, int max, int *v, int *n) {
  int64_t wide[CM_MAX_RANK];
  const char *at = (skip_blanks(ps), ps->p);
  if (max > CM_MAX_RANK) max = CM_MAX_RANK;
  cm_status st = parse_i64_list(ps, what, max, wide, n);
  if (st) return st;
  for (int i = 0; i < *n; i++) {
    if (wide[i] < INT_MIN || wide[i] > INT_MAX)
      return fail_at(ps, at, "%s: integer out of range", what);
    v[i] = (int)wide[i];
  }
  return CM_OK;
}

static cm_status parse_type(parser *ps, cm_type *out) {
  skip_blanks(ps);
  const char *at = ps->p;
  size_t n = scan_ident(ps);
  char name[16], buf[80];
  if (n == 0)
    return fail_at(ps, at, "expected a type such as f32[4,8], found %s", rest_token(ps, buf));
  cm_dtype dt = CM_F32;
  if (n >= sizeof name) return fail_at(ps, at, "unknown dtype %s", quote_token(at, n, buf));
  memcpy(name, at, n);
  name[n] = '\0';
  if (!cm_dtype_from_name(name, &dt))
    return fail_at(ps, at, "unknown dtype %s", quote_token(at, n, buf));
  ps->p += n;
  if (!accept(ps, '['))
    return fail_at(ps, ps->p, "expected '[' after dtype %s (a scalar is %s[])", name, name);
  memset(out, 0, sizeof *out);
  out->dtype = dt;
  int64_t dims[CM_MAX_RANK];
  int rank = 0;
  if (!accept(ps, ']')) {
    for (;;) {
      if (rank >= CM_MAX_RANK)
        return fail_at(ps, at, "type: rank exceeds the maximum %d", CM_MAX_RANK);
      cm_status st = parse_i64(ps, "type", &dims[rank]);
      if (st) return st;
      rank++;
      if (accept(ps, ']')) break;
      if (accept(ps, ',')) continue;
      if (ps->p >= ps->end) return fail_at(ps, at, "type: unterminated dimension list");
      return fail_at(ps, ps->p, "type: expected ',' or ']', found %s", rest_token(ps, buf));
    }
  }
  cm_status st = check_dims(ps, at, "type", dims, rank);
  if (st) return st;
  *out = cm_type_make(dt, rank, dims);
  return CM_OK;
}

static cm_status parse_bool(parser *ps, const char *what, bool *out) {
  const char *at = (skip_blanks(ps), ps->p);
  size_t n = scan_ident(ps);
  if (token_is(at, n, "true") || token_is(at, n, "false")) {
    *out = at[0] == 't';
    ps->p += n;
    return CM_OK;
  }
  char buf[80];
  return fail_at(ps, at, "%s: expected true or false, found %s", what, rest_token(ps, buf));
}

/* kind or kind(field=value, ...); missing fields take the documented defaults. */
static cm_status parse_init(parser *ps, cm_init *out) {
  const char *at = (skip_blanks(ps), ps->p);
  size_t n = scan_ident(ps);
  char name[32], buf[80];
  cm_init_kind kind = CM_INIT_NONE;
  if (n == 0 || n >= sizeof name)
    return fail_at(ps, at, "init: expected an init kind, found %s", rest_token(ps, buf));
  memcpy(name, at, n);
  name[n] = '\0';
  if (!cm_init_kind_from_name(name, &kind))
    return fail_at(ps, at, "init: unknown kind \"%s\"", name);
  ps->p += n;
  init_fields f = init_fields_of(kind);
  double v[2] = {f.fallback[0], f.fallback[1]};
  bool seen[2] = {false, false};
  if (accept(ps, '(')) {
    const char *open = ps->p - 1;
    if (!accept(ps, ')')) {
      for (;;) {
        const char *fat = (skip_blanks(ps), ps->p);
        size_t fn = scan_ident(ps);
        int which = -1;
        for (int i = 0; i < f.n; i++)
          if (token_is(fat, fn, f.name[i])) which = i;
        if (which < 0) {
          if (fn == 0)
            return fail_at(ps, fat, "init: expected a field name, found %s", rest_token(ps, buf));
          return fail_at(ps, fat, "init: %s has no field %s", name, quote_token(fat, fn, buf));
        }
        if (seen[which]) return fail_at(ps, fat, "init: duplicate field \"%s\"", f.name[which]);
        seen[which] = true;
        ps->p += fn;
        if (!accept(ps, '='))
          return fail_at(ps, ps->p, "init: expected '=' after \"%s\"", f.name[which]);
        cm_status st = parse_double(ps, "init", &v[which]);
        if (st) return st;
        if (accept(ps, ')')) break;
        if (accept(ps, ',')) continue;
        if (ps->p >= ps->end) return fail_at(ps, open, "init: unterminated field list");
        return fail_at(ps, ps->p, "init: expected ',' or ')', found %s", rest_token(ps, buf));
      }
    }
  }
  out->kind = kind;
  out->a = v[0];
  out->b = v[1];
  return CM_OK;
}

/* A growable array of doubles (const data). */
typedef struct double_buf {
  double *v;
  int64_t n, cap;
  const char *at; /* where "data=" was read on this line, or NULL */
} double_buf;

static cm_status parse_data(parser *ps, double_buf *db) {
  skip_blanks(ps);
  const char *open = ps->p;
  char buf[80];
  if (!accept(ps, '['))
    return fail_at(ps, ps->p, "data: expected a list '[...]', found %s", rest_token(ps, buf));
  db->n = 0;
  if (accept(ps, ']')) return CM_OK;
  for (;;) {
    if (db->n == db->cap) {
      int64_t cap = db->cap ? db->cap * 2 : 16;
      double *v = realloc(db->v, (size_t)cap * sizeof *v);
      if (!v) return cm_errorf(ps->err, CM_EINTERNAL, "line %d: out of memory", ps->lineno);
      db->v = v;
      db->cap = cap;
    }
    cm_status st = parse_double(ps, "data", &db->v[db->n]);
    if (st) return st;
    db->n++;
    if (accept(ps, ']')) return CM_OK;
    if (accept(ps, ',')) continue;
    if (ps->p >= ps->end) return fail_at(ps, open, "data: unterminated list");
    return fail_at(ps, ps->p, "data: expected ',' or ']', found %s", rest_token(ps, buf));
  }
}

/* A per-axis list (perm, start, ..., hi) has one entry per axis of the input. */
static cm_status check_per_axis(parser *ps, const char *at, const char *what, int n, int in_rank) {
  if (n != in_rank)
    return fail_at(ps, at, "%s has %d entries but the input has rank %d", what, n, in_rank);
  return CM_OK;
}

static cm_status parse_attr_value(parser *ps, attr_key key, int in_rank, cm_attrs *a,
                                  double_buf *data) {
  const char *what = attr_keys[key].name;
  const char *at = (skip_blanks(ps), ps->p);
  cm_status st = CM_OK;
  int n = 0;
  switch (key) {
  case K_DTYPE: {
    size_t len = scan_ident(ps);
    char name[16], buf[80];
    if (len == 0 || len >= sizeof name)
      return fail_at(ps, at, "dtype: expected a dtype, found %s", rest_token(ps, buf));
    memcpy(name, at, len);
    name[len] = '\0';
    if (!cm_dtype_from_name(name, &a->dtype))
      return fail_at(ps, at, "dtype: unknown dtype \"%s\"", name);
    ps->p += len;
    return CM_OK;
  }
  case K_SHAPE:
    st = parse_i64_list(ps, what, CM_MAX_RANK, a->shape, &n);
    if (st) return st;
    a->rank = n;
    return check_dims(ps, at, what, a->shape, n);
  case K_INIT: return parse_init(ps, &a->init);
  case K_VALUE: return parse_double(ps, what, &a->value);
  case K_DATA: data->at = at; return parse_data(ps, data);
  case K_AXIS: return parse_int(ps, what, &a->axis);
  case K_AXES:
    st = parse_int_list(ps, what, CM_MAX_RANK, a->axes, &n);
    a->n_axes = n;
    return st;
  case K_KEEPDIMS: return parse_bool(ps, what, &a->keepdims);
  case K_PERM:
    st = parse_int_list(ps, what, CM_MAX_RANK, a->perm, &n);
    return st ? st : check_per_axis(ps, at, what, n, in_rank);
  case K_START:
  case K_STOP:
  case K_STEP:
  case K_LO:
  case K_HI: {
    int64_t *dst = key == K_START  ? a->start
                   : key == K_STOP ? a->stop
                   : key == K_STEP ? a->step
                   : key == K_LO   ? a->lo
                                   : a->hi;
    st = parse_i64_list(ps, what, CM_MAX_RANK, dst, &n);
    return st ? st : check_per_axis(ps, at, what, n, in_rank);
  }
  case K_TRANSPOSE_A: return parse_bool(ps, what, &a->transpose_a);
  case K_TRANSPOSE_B: return parse_bool(ps, what, &a->transpose_b);
  case K_STRIDE:
  case K_PADDING:
  case K_DILATION: {
    int *dst = key == K_STRIDE ? a->stride : key == K_PADDING ? a->padding : a->dilation;
    int pair[CM_MAX_RANK];
    st = parse_int_list(ps, what, CM_MAX_RANK, pair, &n);
    if (st) return st;
    if (n != 2) return fail_at(ps, at, "%s: expected 2 entries (h, w), found %d", what, n);
    dst[0] = pair[0];
    dst[1] = pair[1];
    return CM_OK;
  }
  case K_GROUPS: return parse_int(ps, what, &a->groups);
  case K_MODE: {
    size_t len = scan_ident(ps);
    char buf[80];
    if (token_is(at, len, "sum") || token_is(at, len, "mean")) {
      a->mode = at[0] == 's' ? CM_MODE_SUM : CM_MODE_MEAN;
      ps->p += len;
      return CM_OK;
    }
    return fail_at(ps, at, "mode: expected sum or mean, found %s", rest_token(ps, buf));
  }
  case K_RANKS: return parse_int(ps, what, &a->ranks);
  default: return fail_at(ps, at, "internal: attribute key %d", (int)key);
  }
}

static cm_status parse_attrs(parser *ps, cm_op op, int in_rank, cm_attrs *a, double_buf *data) {
  const cm_op_info *info = cm_op_get_info(op);
  const char *open = ps->p - 1; /* the '{' */
  bool seen[K_COUNT] = {false};
  char buf[80];
  if (accept(ps, '}')) return CM_OK;
  for (;;) {
    const char *at = (skip_blanks(ps), ps->p);
    size_t n = scan_ident(ps);
    if (n == 0) {
      if (ps->p >= ps->end) return fail_at(ps, open, "unterminated attribute list");
      return fail_at(ps, at, "expected an attribute name, found %s", rest_token(ps, buf));
    }
    int key = -1;
    for (int k = 0; k < K_COUNT; k++)
      if (token_is(at, n, attr_keys[k].name)) key = k;
    if (key < 0) return fail_at(ps, at, "unknown attribute %s", quote_token(at, n, buf));
    if (!(info->attrs & attr_keys[key].bit))
      return fail_at(ps, at, "op %s has no attribute \"%s\"", info->name, attr_keys[key].name);
    if (info->category == CM_CAT_SOURCE && (key == K_DTYPE || key == K_SHAPE))
      return fail_at(ps, at, "attribute \"%s\" of a source comes from the type annotation",
                     attr_keys[key].name);
    if (seen[key]) return fail_at(ps, at, "duplicate attribute \"%s\"", attr_keys[key].name);
    seen[key] = true;
    ps->p += n;
    if (!accept(ps, '='))
      return fail_at(ps, ps->p, "expected '=' after attribute \"%s\"", attr_keys[key].name);
    if ((key == K_VALUE && seen[K_DATA]) || (key == K_DATA && seen[K_VALUE]))
      return fail_at(ps, at, "\"value\" and \"data\" are both given (a const takes one)");
    cm_status st = parse_attr_value(ps, (attr_key)key, in_rank, a, data);
    if (st) return st;
    if (accept(ps, '}')) return CM_OK;
    if (accept(ps, ',')) continue;
    if (ps->p >= ps->end) return fail_at(ps, open, "unterminated attribute list");
    return fail_at(ps, ps->p, "expected ',' or '}', found %s", rest_token(ps, buf));
  }
}

/* Scans a value name and resolves it to a node id. */
static cm_status parse_reference(parser *ps, int *id) {
  skip_blanks(ps);
  const char *s = ps->p;
  while (s < ps->end && is_name_char(*s)) s++;
  size_t n = (size_t)(s - ps->p);
  char buf[80];
  if (n == 0) return fail_at(ps, ps->p, "expected a value name, found %s", rest_token(ps, buf));
  char *name = strndup(ps->p, n);
  if (!name) return cm_errorf(ps->err, CM_EINTERNAL, "line %d: out of memory", ps->lineno);
  *id = cm_graph_find(ps->g, name);
  free(name);
  if (*id < 0) return fail_at(ps, ps->p, "no value named %s", quote_token(ps->p, n, buf));
  ps->p = s;
  return CM_OK;
}

/* A growable array of node ids. */
typedef struct id_list {
  int *v;
  int n, cap;
} id_list;

/* "(a, b, ...)" after the '(' has been read; terminator is ')'. */
static cm_status parse_reference_list(parser *ps, const char *open, id_list *ids) {
  char buf[80];
  ids->n = 0;
  if (accept(ps, ')')) return CM_OK;
  for (;;) {
    if (ids->n == ids->cap) {
      int cap = ids->cap ? ids->cap * 2 : 8;
      int *v = realloc(ids->v, (size_t)cap * sizeof *v);
      if (!v) return cm_errorf(ps->err, CM_EINTERNAL, "line %d: out of memory", ps->lineno);
      ids->v = v;
      ids->cap = cap;
    }
    cm_status st = parse_reference(ps, &ids->v[ids->n]);
    if (st) return st;
    ids->n++;
    if (accept(ps, ')')) return CM_OK;
    if (accept(ps, ',')) continue;
    if (ps->p >= ps->end) return fail_at(ps, open, "unterminated list of values");
    return fail_at(ps, ps->p, "expected ',' or ')', found %s", rest_token(ps, buf));
  }
}

static cm_status expect_line_end(parser *ps, const char *after) {
  skip_blanks(ps);
  if (ps->p < ps->end) {
    char buf[80];
    return fail_at(ps, ps->p, "unexpected %s after %s", rest_token(ps, buf), after);
  }
  return CM_OK;
}

static cm_status parse_outputs_line(parser *ps, id_list *ids) {
  const char *open = ps->p - 1;
  cm_status st = parse_reference_list(ps, open, ids);
  if (st) return st;
  st = expect_line_end(ps, "the outputs list");
  if (st) return st;
  for (int i = 0; i < ids->n; i++) {
    st = cm_graph_add_output(ps->g, ids->v[i], ps->err);
    if (st) return cm_err_prefix(ps->err, "line %d: ", ps->lineno);
  }
  return CM_OK;
}

/* name: type = op(inputs) {attrs} */
static cm_status parse_node_line(parser *ps, id_list *ids, double_buf *data) {
  char buf[80];
  /* Names may contain ':' but neither names nor types contain '=', so the
   * name ends at the last ':' before the first '='. */
  const char *eq = memchr(ps->line, '=', (size_t)(ps->end - ps->line));
  if (!eq)
    return cm_errorf(ps->err, CM_EINVALID, "line %d: missing '=' after the type", ps->lineno);
  const char *colon = NULL;
  for (const char *c = ps->p; c < eq; c++)
    if (*c == ':') colon = c;
  if (!colon)
    return fail_at(ps, ps->p, "expected \"name: type = op\" (missing ':' after the name)");
  const char *name_end = colon;
  while (name_end > ps->p && is_blank(name_end[-1])) name_end--;
  const char *name_at = ps->p;
  size_t name_len = (size_t)(name_end - name_at);
  char *name = strndup(name_at, name_len);
  if (!name) return cm_errorf(ps->err, CM_EINTERNAL, "line %d: out of memory", ps->lineno);
  cm_status st = CM_OK;
  if (name_len == 0 || !cm_name_is_valid(name)) {
    st = name_len == 0
             ? fail_at(ps, name_at, "missing the value name")
             : fail_at(ps, name_at, "invalid name %s", quote_token(name_at, name_len, buf));
    goto done;
  }
  if (cm_graph_find(ps->g, name) >= 0) {
    st = fail_at(ps, name_at, "duplicate name %s", quote_token(name_at, name_len, buf));
    goto done;
  }

  ps->p = colon + 1;
  cm_type annotated;
  if ((st = parse_type(ps, &annotated))) goto done;
  skip_blanks(ps);
  if (ps->p != eq) {
    st = fail_at(ps, ps->p, "expected '=' after the type, found %s", rest_token(ps, buf));
    goto done;
  }
  ps->p = eq + 1;

  const char *op_at = (skip_blanks(ps), ps->p);
  size_t op_len = scan_ident(ps);
  cm_op op = CM_OP_INPUT;
  char op_name[32];
  if (op_len == 0) {
    st = fail_at(ps, op_at, "expected an op name, found %s", rest_token(ps, buf));
    goto done;
  }
  bool known = op_len < sizeof op_name;
  if (known) {
    memcpy(op_name, op_at, op_len);
    op_name[op_len] = '\0';
    known = cm_op_from_name(op_name, &op);
  }
  if (!known) {
    st = fail_at(ps, op_at, "unknown op %s", quote_token(op_at, op_len, buf));
    goto done;
  }
  ps->p += op_len;

  ids->n = 0;
  if (accept(ps, '(') && (st = parse_reference_list(ps, ps->p - 1, ids))) goto done;

  const cm_op_info *info = cm_op_get_info(op);
  cm_attrs attrs;
  cm_attrs_default(&attrs);
  if (info->category == CM_CAT_SOURCE) {
    attrs.dtype = annotated.dtype;
    attrs.rank = annotated.rank;
    for (int i = 0; i < CM_MAX_RANK; i++)
      attrs.shape[i] = i < annotated.rank ? annotated.dims[i] : 0;
  }
  int in_rank = ids->n > 0 ? ps->g->nodes[ids->v[0]].type.rank : 0;
  data->n = 0;
  data->at = NULL;
  if (accept(ps, '{') && (st = parse_attrs(ps, op, in_rank, &attrs, data))) goto done;
  if ((st = expect_line_end(ps, "the node"))) goto done;
  if (data->at) {
    int64_t numel = cm_type_numel(&annotated);
    if (data->n != numel) {
      st = fail_at(ps, data->at, "data has %lld numbers but %s has %lld elements",
                   (long long)data->n, cm_type_str(&annotated, buf, sizeof buf), (long long)numel);
      goto done;
    }
    attrs.data = data->v;
    attrs.n_data = data->n;
  }

  int id = cm_graph_add(ps->g, op, name, ids->v, ids->n, &attrs, ps->err);
  if (id < 0) {
    st = cm_err_prefix(ps->err, "line %d: ", ps->lineno);
    if (st == CM_OK)
      st = cm_errorf(ps->err, CM_EINTERNAL, "line %d: cm_graph_add failed", ps->lineno);
    goto done;
  }
  const cm_type *inferred = &ps->g->nodes[id].type;
  if (!cm_type_equal(inferred, &annotated)) {
    char t1[128], t2[128];
    st = cm_errorf(ps->err, CM_EINVALID, "line %d: \"%s\" (%s): annotated %s but inferred %s",
                   ps->lineno, name, info->name, cm_type_str(&annotated, t1, sizeof t1),
                   cm_type_str(inferred, t2, sizeof t2));
  }
done:
  free(name);
  return st;
}

cm_status cm_graph_parse(const char *text, cm_graph **out, cm_err *err) {
  if (out) *out = NULL;
  if (!text || !out) return cm_errorf(err, CM_EINVALID, "cm_graph_parse: no text or no result");
  cm_err local;
  if (!err) err = &local;
  cm_graph *g = cm_graph_new();
  if (!g) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  parser ps = {.g = g, .err = err};
  id_list ids = {NULL, 0, 0};
  double_buf data = {NULL, 0, 0, NULL};
  cm_status st = CM_OK;
  bool have_outputs = false;
  int last_line = 0, outputs_line = 0;
  int *node_line = NULL, cap_lines = 0; /* the line of each node, for the verifier's errors */
  const char *s = text;
  if (strncmp(s, "\xef\xbb\xbf", 3) == 0) s += 3; /* a UTF-8 byte-order mark */
  for (int lineno = 1; *s; lineno++) {
    const char *nl = strchr(s, '\n');
    const char *eol = nl ? nl : s + strlen(s);
    const char *hash = memchr(s, '#', (size_t)(eol - s));
    const char *end = hash ? hash : eol;
    while (end > s && is_blank(end[-1])) end--;
    ps.line = s;
    ps.end = end;
    ps.p = s;
    ps.lineno = lineno;
    last_line = lineno;
    s = nl ? nl + 1 : eol;
    skip_blanks(&ps);
    if (ps.p == ps.end) continue;
    if (have_outputs) {
      st = fail_at(&ps, ps.p, "nothing may follow the outputs(...) line");
      break;
    }
    /* "outputs(" starts the outputs line; a node named outputs reads "outputs: ...". */
    const char *word = ps.p;
    size_t n = scan_ident(&ps);
    ps.p = word + n;
    if (token_is(word, n, "outputs") && accept(&ps, '(')) {
      st = parse_outputs_line(&ps, &ids);
      have_outputs = true;
      outputs_line = lineno;
    } else {
      ps.p = word;
      st = parse_node_line(&ps, &ids, &data);
      if (st == CM_OK && g->n_nodes > cap_lines) {
        int cap = cap_lines ? 2 * cap_lines : 64;
        int *v = realloc(node_line, sizeof(int) * (size_t)cap);
        if (!v)
          st = cm_errorf(err, CM_EINTERNAL, "line %d: out of memory", lineno);
        else
          node_line = v, cap_lines = cap;
      }
      if (st == CM_OK) node_line[g->n_nodes - 1] = lineno;
    }
    if (st) break;
  }
  if (st == CM_OK && !have_outputs)
    st = cm_errorf(err, CM_EINVALID, "line %d: missing the final outputs(...) line", last_line);
  /* Each line was checked as it was added; the rules of the whole graph (one
   * assign per target) are the verifier's, as for every reader. */
  if (st == CM_OK) {
    int bad = -1;
    st = cm_graph_verify_at(g, &bad, err);
    if (st && bad >= 0)
      cm_err_prefix(err, "line %d: \"%s\" (%s): ", node_line[bad], g->nodes[bad].name,
                    cm_op_name(g->nodes[bad].op));
    else if (st)
      cm_err_prefix(err, "line %d: ", outputs_line);
  }
  free(node_line);
  free(ids.v);
  free(data.v);
  if (st) {
    cm_graph_free(g);
    return st;
  }
  *out = g;
  return CM_OK;
}
