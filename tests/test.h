/* tests/test.h — a minimal test harness: CHECK macros that count failures and
 * say where, and TEST_MAIN to run a list of test functions. */
#ifndef CMAEC_TEST_H
#define CMAEC_TEST_H

#include <math.h>
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

#define TEST_MAIN(...)                                                                             \
  int main(int argc, char **argv) {                                                                \
    test_case cases[] = {__VA_ARGS__};                                                             \
    int n = (int)(sizeof cases / sizeof cases[0]);                                                 \
    for (int i = 0; i < n; i++) {                                                                  \
      if (argc > 1 && strcmp(argv[1], cases[i].name) != 0) continue;                               \
      int before = test_failures;                                                                  \
      cases[i].fn();                                                                               \
      fprintf(stderr, "%-40s %s\n", cases[i].name, test_failures == before ? "ok" : "FAILED");     \
    }                                                                                              \
    fprintf(stderr, "%d checks, %d failures\n", test_checks, test_failures);                       \
    return test_failures ? 1 : 0;                                                                  \
  }
#define TEST(fn)                                                                                   \
  { #fn, fn }

#endif
