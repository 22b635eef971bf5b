/* tests/test.h — a minimal test harness: CHECK macros that count failures and
 * say where, and TEST_MAIN to run a list of test functions, or those its
 * arguments select (see "selection" below). */
#ifndef CMAEC_TEST_H
#define CMAEC_TEST_H

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int test_failures;
static int test_checks;

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    test_checks++;                                                                                 \
    if (!(cond)) {                                                                                 \
      test_failures++;                                                                             \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);                     \
    }                                                                                              \
  } while (0)

#define CHECK_MSG(cond, ...)                                                                       \
  do {                                                                                             \
    test_checks++;                                                                                 \
    if (!(cond)) {                                                                                 \
      test_failures++;                                                                             \
      fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond);                     \
      fprintf(stderr, __VA_ARGS__);                                                                \
      fputc('\n', stderr);                                                                         \
    }                                                                                              \
  } while (0)

/* |a - b| <= tol * max(1, |b|) */
#define CHECK_NEAR(a, b, tol)                                                                      \
  do {                                                                                             \
    double check_a_ = (double)(a), check_b_ = (double)(b);                                         \
    double check_s_ = fabs(check_b_) > 1.0 ? fabs(check_b_) : 1.0;                                 \
    test_checks++;                                                                                 \
    if (!(fabs(check_a_ - check_b_) <= (tol)*check_s_)) {                                          \
      test_failures++;                                                                             \
      fprintf(stderr, "%s:%d: CHECK_NEAR failed: %s = %.17g, %s = %.17g\n", __FILE__, __LINE__,    \
              #a, check_a_, #b, check_b_);                                                         \
    }                                                                                              \
  } while (0)

#define CHECK_STR_CONTAINS(haystack, needle)                                                       \
  CHECK_MSG(strstr((haystack), (needle)) != NULL, "\"%s\" does not contain \"%s\"", (haystack),    \
            (needle))

typedef void (*test_fn)(void);
typedef struct {
  const char *name;
  test_fn fn;
} test_case;

/* ---- selection ------------------------------------------------------------
 * A test binary's arguments pick what it runs (none: everything):
 *   NAME          the TEST(NAME), all of its cases
 *   NAME:A,B      the TEST(NAME), only its cases A and B (a test asks test_case_wanted("A"))
 *   -NAME         every TEST but NAME (when no argument selects one)
 * so that one binary can be registered as several ctest entries (the heavy
 * TESTs one entry each, and "-HEAVY1 -HEAVY2" the rest: a TEST added later
 * is not left out). Arguments that leave nothing to run exit 2. An argument
 * that names no test, or a case its test never asks about, fails the run:
 * a selection that checks nothing does not pass. */
#define TEST_MAX_CASES 32
static struct {
  const char *list; /* the current test's case list; NULL: every case */
  int n;
  const char *name[TEST_MAX_CASES];
  size_t len[TEST_MAX_CASES];
  bool seen[TEST_MAX_CASES];
} test_sel_;

/* Is case name of the running test selected? (Counts it as asked about.) */
static inline bool test_case_wanted(const char *name) {
  if (!test_sel_.list) return true;
  bool hit = false;
  for (int i = 0; i < test_sel_.n; i++)
    if (strlen(name) == test_sel_.len[i] && !memcmp(name, test_sel_.name[i], test_sel_.len[i]))
      hit = test_sel_.seen[i] = true;
  return hit;
}
/* True when the running test was given a case list (NAME:A,B). */
static inline bool test_cases_selected(void) {
  return test_sel_.list != NULL;
}

static inline int test_select_cases_(const char *list) {
  memset(&test_sel_, 0, sizeof test_sel_);
  test_sel_.list = list;
  for (const char *p = list; p && *p;) {
    size_t n = strcspn(p, ",");
    if (test_sel_.n == TEST_MAX_CASES) return -1;
    test_sel_.name[test_sel_.n] = p;
    test_sel_.len[test_sel_.n++] = n;
    p += n + (p[n] == ',');
  }
  return list && test_sel_.n == 0 ? -1 : 0;
}
/* After a test ran: the cases it was asked for and never asked about. */
static inline int test_unseen_cases_(const char *test) {
  int bad = 0;
  for (int i = 0; i < test_sel_.n; i++)
    if (!test_sel_.seen[i]) {
      fprintf(stderr, "%s: no case \"%.*s\" (selected, but the test has no such case)\n", test,
              (int)test_sel_.len[i], test_sel_.name[i]);
      bad++;
    }
  return bad;
}

#define TEST_MAIN(...)                                                                             \
  int main(int argc, char **argv) {                                                                \
    test_case cases[] = {__VA_ARGS__};                                                             \
    int n = (int)(sizeof cases / sizeof cases[0]);                                                 \
    bool any_positive_ = false;                                                                    \
    int ran_ = 0;                                                                                  \
    for (int a_ = 1; a_ < argc; a_++) {                                                            \
      const char *arg_ = argv[a_] + (argv[a_][0] == '-');                                          \
      size_t len_ = strcspn(arg_, ":");                                                            \
      bool known_ = false;                                                                         \
      for (int i = 0; i < n; i++)                                                                  \
        known_ |= strlen(cases[i].name) == len_ && !memcmp(cases[i].name, arg_, len_);             \
      if (!known_ || (argv[a_][0] == '-' && arg_[len_])) {                                         \
        fprintf(stderr, "%s: no test \"%s\" (NAME, NAME:CASE,... or -NAME); tests:", argv[0],      \
                argv[a_]);                                                                         \
        for (int i = 0; i < n; i++) fprintf(stderr, " %s", cases[i].name);                         \
        fputc('\n', stderr);                                                                       \
        return 2;                                                                                  \
      }                                                                                            \
      any_positive_ |= argv[a_][0] != '-';                                                         \
    }                                                                                              \
    for (int i = 0; i < n; i++) {                                                                  \
      bool run_ = !any_positive_;                                                                  \
      const char *list_ = NULL;                                                                    \
      for (int a_ = 1; a_ < argc; a_++) {                                                          \
        const char *arg_ = argv[a_] + (argv[a_][0] == '-');                                        \
        size_t len_ = strcspn(arg_, ":");                                                          \
        if (strlen(cases[i].name) != len_ || memcmp(cases[i].name, arg_, len_)) continue;          \
        if (argv[a_][0] == '-') {                                                                  \
          run_ = run_ && any_positive_;                                                            \
          continue;                                                                                \
        }                                                                                          \
        run_ = true;                                                                               \
        list_ = arg_[len_] == ':' ? arg_ + len_ + 1 : NULL;                                        \
      }                                                                                            \
      if (!run_) continue;                                                                         \
      ran_++;                                                                                      \
      if (test_select_cases_(list_) != 0) {                                                        \
        fprintf(stderr, "%s: bad case list \"%s\" (1..%d names, comma-separated)\n",               \
                cases[i].name, list_, TEST_MAX_CASES);                                             \
        return 2;                                                                                  \
      }                                                                                            \
      int before = test_failures;                                                                  \
      cases[i].fn();                                                                               \
      test_failures += test_unseen_cases_(cases[i].name);                                          \
      fprintf(stderr, "%-40s %s\n", cases[i].name, test_failures == before ? "ok" : "FAILED");     \
    }                                                                                              \
    if (ran_ == 0) {                                                                               \
      fprintf(stderr, "%s: the arguments leave no test to run\n", argv[0]);                        \
      return 2;                                                                                    \
    }                                                                                              \
    fprintf(stderr, "%d checks, %d failures\n", test_checks, test_failures);                       \
    return test_failures ? 1 : 0;                                                                  \
  }
#define TEST(fn)                                                                                   \
  { #fn, fn }

#endif
