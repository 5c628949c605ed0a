/* rank_pattern / alpha_pattern keys of PEFT configs: Python regexes from an untrusted
   file, checked for what they would cost before POSIX regcomp sees them. */
#include "files.h"

#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* PEFT matches rank_pattern / alpha_pattern keys as Python regexes against the module
   name: re.match(rf"(.*\.)?({key})$", name). POSIX extended regexes agree on the
   syntax such keys use once \d \w \s and (?: are spelled out.

   A key is compiled only when its size after repetitions are expanded stays small:
   glibc's regcomp copies the parse tree for repetitions (x{m,n} m to n times, x+ as
   x x*), so a key such as "((a{255}){255}){255}" or "a++++" (each + doubling the
   last) from an untrusted config would take gigabytes to compile. The estimate counts
   atoms, multiplying those under x{m,n} by max(m, n) + 1 and under x+ by 2; it is an
   upper bound up to a constant for the patterns regcomp accepts. A repetition of a
   repetition (a++, a*{2}; Python refuses most of them too) is refused outright, except
   Python's lazy x*?, x+?, x??, x{m,n}? (the same match for a whole-name regex). So are
   back-references (Python's \1 and POSIX's differ, and matching them can take
   exponential time). */
enum { PATTERN_MAX_LEN = 1024, PATTERN_MAX_ATOMS = 4096, PATTERN_MAX_DEPTH = 32 };

const char *lmoe_pattern_unusable(const char *k) {
  size_t n = strlen(k);
  if (n > PATTERN_MAX_LEN) return "is longer than 1024 characters";
  double stack[PATTERN_MAX_DEPTH], cur = 0, last = 0;
  int depth = 0, after_rep = 0, lazy = 0;
  for (size_t i = 0; i < n; i++) {
    char c = k[i];
    /* a repetition: *, +, ?, or a well-formed {m}, {m,}, {m,n} */
    double rep = 0;
    size_t end = i;
    if (c == '*' || c == '?') {
      rep = 1;
    } else if (c == '+') {
      rep = 2;
    } else if (c == '{') {
      double m = 0, hi = 0;
      size_t j = i + 1;
      while (j < n && k[j] >= '0' && k[j] <= '9' && m < 1e6) m = m * 10 + (k[j++] - '0');
      if (j < n && k[j] == ',') {
        j++;
        while (j < n && k[j] >= '0' && k[j] <= '9' && hi < 1e6) hi = hi * 10 + (k[j++] - '0');
      }
      if (j < n && k[j] == '}') rep = (m > hi ? m : hi) + 1, end = j;
    }
    if (rep > 0) {
      if (after_rep) {
        if (c != '?' || lazy) return "repeats a repetition (such as a++ or a*{2})";
        lazy = 1; /* x*? and the like: lazy, the same whole-name match */
        continue;
      }
      cur += last * (rep - 1);
      last *= rep;
      after_rep = 1;
      i = end;
    } else {
      after_rep = lazy = 0;
      if (c == '\\') {
        if (i + 1 < n && k[i + 1] >= '0' && k[i + 1] <= '9') return "uses a back-reference";
        i++;
        last = 1, cur += 1;
      } else if (c == '[') {
        size_t j = i + 1;
        if (j < n && k[j] == '^') j++;
        if (j < n && k[j] == ']') j++;
        while (j < n && k[j] != ']') j++;
        i = j < n ? j : n;
        last = 1, cur += 1;
      } else if (c == '(') {
        if (depth == PATTERN_MAX_DEPTH) return "nests groups more than 32 deep";
        stack[depth++] = cur;
        cur = 0, last = 0;
      } else if (c == ')' && depth > 0) {
        last = cur;
        cur = stack[--depth] + last;
      } else if (c == '|' || c == '^' || c == '$') {
        last = 0;
      } else {
        last = 1, cur += 1;
      }
    }
    double total = cur;
    for (int d = 0; d < depth; d++) total += stack[d];
    if (total > PATTERN_MAX_ATOMS) return "expands to more than 4096 atoms once its repetitions are unrolled";
  }
  return NULL;
}

bool lmoe_pattern_compile(regex_t *re, const char *key, bool suffix) {
  if (lmoe_pattern_unusable(key)) return false;
  size_t n = strlen(key);
  char *s = malloc(n * 12 + 32);
  if (!s) return false;
  char *o = s;
  o += sprintf(o, suffix ? "^(.*\\.)?(" : "^(");
  for (size_t i = 0; i < n; i++) {
    if (key[i] == '\\' && i + 1 < n) {
      char c = key[++i];
      if (c == 'd') o += sprintf(o, "[0-9]");
      else if (c == 'w') o += sprintf(o, "[A-Za-z0-9_]");
      else if (c == 's') o += sprintf(o, "[[:space:]]");
      else *o++ = '\\', *o++ = c;
    } else if (key[i] == '(' && i + 2 < n && key[i + 1] == '?' && key[i + 2] == ':') {
      *o++ = '(';
      i += 2;
    } else {
      *o++ = key[i];
    }
  }
  o += sprintf(o, ")$");
  bool ok = regcomp(re, s, REG_EXTENDED | REG_NOSUB) == 0;
  free(s);
  return ok;
}
