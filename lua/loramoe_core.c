/*
 * loramoe.core — the raw Lua 5.4 core: the C functions of native/include/loramoe.h one
 * to one, for the pure-Lua API in lua/loramoe/api.lua (the LuaJIT FFI core,
 * lua/loramoe/ffi_core.lua, exposes the same functions). Names drop the lmoe_ prefix;
 * out-parameters become results (status first); structs become plain tables with the
 * C field names; arrays are "mem" userdata (core.mem / core.pack / core.unpack).
 *
 * One owning box serves every handle, as liolib's file handle does: created empty
 * before the C object is acquired, it stores the handle and its release function, and
 * its uservalue keeps what it depends on alive (a wrapped buffer's owner, a borrowed
 * buffer's layer) or, for a pool, the layer's shapes that pool_load checks arrays
 * against (the library itself keeps a pool's layer). __gc releases; core.close
 * releases now.
 *
 * Everything a caller can pass is checked here before use even though the Lua API has
 * checked it already with its own messages: handle kinds, integer ranges (no
 * truncation), array sizes against what C will read or write, strings kept on the
 * stack while C holds them. A failed check here raises a plain error: the API's
 * messages are written once, in Lua.
 *
 * Most functions are regular (check the arguments, call, push the result): each is a
 * row of a list under "regular functions". The rows of the functions whose parameters
 * and result all map by type (by the rules the FFI core's wrappers follow), the field
 * lists of the structs and the kinds of boxes are generated from the header at build
 * time: lua/gen_core_rows.cmake writes them to loramoe_core_rows.h (GEN_ lists). The
 * rows of the other regular functions and the functions that are not regular are
 * written out here, each saying why; the generator skips every name this file lists.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, strnlen */

#include "loramoe.h"
#include "loramoe_core_rows.h" /* generated, see above */

#include <lauxlib.h>
#include <lua.h>

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define BOX_MT "loramoe.box"
#define MEM_MT "loramoe.mem"

/* ------------------------------------------------------------------ boxes */

typedef struct lbox {
  void *h;                  /* NULL once closed */
  void (*release)(void *);  /* NULL: borrowed, nothing to release */
  const char *kind;
} lbox;

/* The release functions, as the box stores them: rel_<kind>. */
#define REL(letter, K, release) static void rel_##K(void *p) { release((lmoe_##K *)p); }
GEN_BOXES(REL)

/* A new, empty box; keep (a stack index, or 0) becomes its uservalue. */
static lbox *newbox(lua_State *L, const char *kind, void (*release)(void *), int keep) {
  if (keep) keep = lua_absindex(L, keep);
  lbox *b = (lbox *)lua_newuserdatauv(L, sizeof *b, 1);
  b->h = NULL;
  b->release = release;
  b->kind = kind;
  luaL_setmetatable(L, BOX_MT);
  if (keep) {
    lua_pushvalue(L, keep);
    lua_setiuservalue(L, -2, 1);
  }
  return b;
}

static void *checkh(lua_State *L, int idx, const char *kind) {
  lbox *b = (lbox *)luaL_checkudata(L, idx, BOX_MT);
  if (strcmp(b->kind, kind) != 0)
    luaL_argerror(L, idx, lua_pushfstring(L, "%s box expected, got %s", kind, b->kind));
  if (!b->h) luaL_argerror(L, idx, lua_pushfstring(L, "closed %s", kind));
  return b->h;
}

static void *opth(lua_State *L, int idx, const char *kind) {
  return lua_isnoneornil(L, idx) ? NULL : checkh(L, idx, kind);
}

static int box_gc(lua_State *L) {
  lbox *b = (lbox *)luaL_checkudata(L, 1, BOX_MT);
  void *h = b->h;
  b->h = NULL;
  if (h && b->release) b->release(h);
  return 0;
}

/* core.pointer(box): the handle as a light userdata (nil once closed). */
static int l_pointer(lua_State *L) {
  lbox *b = (lbox *)luaL_checkudata(L, 1, BOX_MT);
  if (!b->h) return 0;
  lua_pushlightuserdata(L, b->h);
  return 1;
}

/* ------------------------------------------------------------------ mem: arrays for C */

enum { M_F64, M_F32, M_I32, M_I64 };
static const char *const mem_names[] = {"f64", "f32", "i32", "i64", NULL};
static const size_t mem_size[] = {8, 4, 4, 8};

typedef struct lmem {
  lua_Integer n;
  int ct;
  double data[]; /* 8-aligned; viewed as the element type */
} lmem;

static lmem *newmem(lua_State *L, int ct, lua_Integer n) {
  /* 2^40 elements bounds the byte count far from any overflow. */
  if (n < 0 || n > ((lua_Integer)1 << 40)) luaL_error(L, "loramoe.core: array of %I elements", n);
  lmem *m = (lmem *)lua_newuserdatauv(L, sizeof *m + (size_t)n * mem_size[ct], 0);
  m->n = n;
  m->ct = ct;
  memset(m->data, 0, (size_t)n * mem_size[ct]);
  luaL_setmetatable(L, MEM_MT);
  return m;
}

/* A mem of type ct holding at least n elements. */
static void *checkmem(lua_State *L, int idx, int ct, lua_Integer n) {
  lmem *m = (lmem *)luaL_checkudata(L, idx, MEM_MT);
  if (m->ct != ct) luaL_argerror(L, idx, "array of the wrong element type");
  if (n < 0 || n > m->n)
    luaL_argerror(L, idx, lua_pushfstring(L, "array of %I elements, %I needed", m->n, n));
  return m->data;
}

/* core.mem(ct, n): n zeroed elements. */
static int l_mem(lua_State *L) {
  newmem(L, luaL_checkoption(L, 1, NULL, mem_names), luaL_checkinteger(L, 2));
  return 1;
}

/* core.pack(ct, t, n): t[1..n] read raw (no metamethods, no string coercion) into a
   mem; nil, i at the first entry that is not a number (of int32 range for i32). */
static int l_pack(lua_State *L) {
  int ct = luaL_checkoption(L, 1, NULL, mem_names);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_Integer n = luaL_checkinteger(L, 3);
  /* bounded by the table: a list's first hole is at most its border + 1 */
  if (n < 0 || (lua_Unsigned)n > lua_rawlen(L, 2) + 1) luaL_argerror(L, 3, "more than the table holds");
  lmem *m = newmem(L, ct, n);
  for (lua_Integer i = 0; i < n; i++) {
    int ok = lua_rawgeti(L, 2, i + 1) == LUA_TNUMBER;
    if (ok) {
      if (ct == M_F64 || ct == M_F32) {
        double v = lua_tonumber(L, -1);
        if (ct == M_F64) m->data[i] = v;
        else ((float *)m->data)[i] = (float)v;
      } else {
        int isint = 0;
        lua_Integer v = lua_tointegerx(L, -1, &isint);
        ok = isint && (ct == M_I64 || (v >= INT32_MIN && v <= INT32_MAX));
        if (ok && ct == M_I32) ((int32_t *)m->data)[i] = (int32_t)v;
        else if (ok) ((int64_t *)m->data)[i] = (int64_t)v;
      }
    }
    lua_pop(L, 1);
    if (!ok) {
      lua_pushnil(L);
      lua_pushinteger(L, i + 1);
      return 2;
    }
  }
  return 1;
}

/* core.unpack(mem, n?): its first n elements as a table. */
static int l_unpack(lua_State *L) {
  lmem *m = (lmem *)luaL_checkudata(L, 1, MEM_MT);
  lua_Integer n = luaL_optinteger(L, 2, m->n);
  if (n < 0 || n > m->n) luaL_argerror(L, 2, "more than the array holds");
  lua_createtable(L, n < INT32_MAX ? (int)n : 0, 0);
  for (lua_Integer i = 0; i < n; i++) {
    switch (m->ct) {
    case M_F64: lua_pushnumber(L, m->data[i]); break;
    case M_F32: lua_pushnumber(L, ((float *)m->data)[i]); break;
    case M_I32: lua_pushinteger(L, ((int32_t *)m->data)[i]); break;
    default: lua_pushinteger(L, ((int64_t *)m->data)[i]); break;
    }
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

/* ------------------------------------------------------------------ argument helpers */

static int32_t check_i32(lua_State *L, int idx) {
  lua_Integer v = luaL_checkinteger(L, idx);
  if (v < INT32_MIN || v > INT32_MAX) luaL_argerror(L, idx, "out of the int32 range");
  return (int32_t)v;
}

/* A string argument: a string only (no number coerced into one, as the FFI core
   refuses numbers too); it stays on the stack, so alive, during the call. */
static const char *check_str(lua_State *L, int idx) {
  luaL_checktype(L, idx, LUA_TSTRING);
  return lua_tostring(L, idx);
}

static void *opt_ptr(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return NULL;
  luaL_checktype(L, idx, LUA_TLIGHTUSERDATA);
  return lua_touserdata(L, idx);
}

/* A shape list of 1..max non-negative integers (read raw). */
static int check_shape(lua_State *L, int idx, int64_t *shape, int max) {
  luaL_checktype(L, idx, LUA_TTABLE);
  lua_Unsigned n = lua_rawlen(L, idx);
  if (n < 1 || n > (lua_Unsigned)max) luaL_argerror(L, idx, "shape of the wrong rank");
  for (int i = 0; i < (int)n; i++) {
    int isint = 0;
    lua_rawgeti(L, idx, i + 1);
    lua_Integer d = lua_tointegerx(L, -1, &isint);
    lua_pop(L, 1);
    if (!isint || d < 0) luaL_argerror(L, idx, "shape entries must be non-negative integers");
    shape[i] = d;
  }
  return (int)n;
}

/* a * b * c without overflow, or -1. */
static int64_t mul3(int64_t a, int64_t b, int64_t c) {
  int64_t ab, abc;
  if (a < 0 || b < 0 || c < 0 || __builtin_mul_overflow(a, b, &ab) || __builtin_mul_overflow(ab, c, &abc))
    return -1;
  return abc;
}

/* The kinds of boxes, by the letter that stands for each in field lists and argument
   letters (below). */
#define BOX_LETTER(letter, K, release) #letter
#define BOX_KIND(letter, K, release) #K,
static const char box_letters[] = GEN_BOXES(BOX_LETTER);
static const char *const box_kinds[] = {GEN_BOXES(BOX_KIND)};

/* Structs <-> tables by field lists (generated): name, offset, size, type ('i' int32,
   'I' int64, 'u' uint64, 'z' size_t, 'f' float, 'd' double, 's' const char *, 'P'
   pointer, 'a' a char array holding a string, 'S' a shape: the first ndim entries of
   an int64 array, ndim being the field before it; or a box letter: the handle of a box
   of that kind). Tables set every field but z, a and S; tables get every field but
   the boxes (a pointer from C is no box). */
typedef struct fld { const char *k; size_t off, size; char t; } fld;
#define F(S, m, t) {#m, offsetof(lmoe_##S, m), sizeof(((lmoe_##S *)0)->m), t},
#define DEF_FIELDS(S) static const fld S##_f[] = {GEN_FIELDS_##S(F){0}};
GEN_FIELD_LISTS(DEF_FIELDS)

static void push_struct(lua_State *L, const fld *f, const void *s) {
  const char *b = (const char *)s;
  lua_newtable(L);
  for (; f->k; f++) {
    const void *v = b + f->off;
    switch (f->t) {
    case 'i': lua_pushinteger(L, *(const int32_t *)v); break;
    case 'I': lua_pushinteger(L, *(const int64_t *)v); break;
    case 'u': lua_pushinteger(L, (lua_Integer) * (const uint64_t *)v); break;
    case 'z': lua_pushinteger(L, (lua_Integer) * (const size_t *)v); break;
    case 'f': lua_pushnumber(L, *(const float *)v); break;
    case 'd': lua_pushnumber(L, *(const double *)v); break;
    case 's': lua_pushstring(L, *(const char *const *)v ? *(const char *const *)v : ""); break;
    case 'P': lua_pushlightuserdata(L, *(void *const *)v); break;
    case 'a': lua_pushlstring(L, (const char *)v, strnlen((const char *)v, f->size - 1)); break;
    case 'S': {
      lua_getfield(L, -1, "ndim");
      lua_Integer n = lua_tointeger(L, -1), max = (lua_Integer)(f->size / sizeof(int64_t));
      lua_pop(L, 1);
      n = n < 0 ? 0 : n < max ? n : max;
      lua_createtable(L, (int)n, 0);
      for (int i = 0; i < (int)n; i++) {
        lua_pushinteger(L, ((const int64_t *)v)[i]);
        lua_rawseti(L, -2, i + 1);
      }
      break;
    }
    default: continue; /* a box */
    }
    lua_setfield(L, -2, f->k);
  }
}

/* Moves the value on top of the stack into the anchor list at stack index a. Whatever
   C gets a pointer into (a string, a box, a mem) is anchored there as soon as it is
   read, so it stays referenced until the function returns, whatever metamethods (a
   fresh string from __index) or finalizers do to the tables it came from. */
static void anchor(lua_State *L, int a) { lua_rawseti(L, a, (lua_Integer)lua_rawlen(L, a) + 1); }

/* Sets the fields of s that the table at t has (others keep the defaults); strings
   and boxes are anchored in the list at a. */
static void get_struct(lua_State *L, int t, const fld *f, void *s, int a) {
  char *b = (char *)s;
  luaL_checktype(L, t, LUA_TTABLE);
  for (; f->k; f++) {
    if (strchr("zaS", f->t)) continue; /* never set from a table */
    int ty = lua_getfield(L, t, f->k), isint = 1;
    void *v = b + f->off;
    lua_Integer i = f->t == 'i' || f->t == 'u' || f->t == 'I' ? lua_tointegerx(L, -1, &isint) : 0;
    if (ty == LUA_TNIL) {
    } else if ((f->t == 'i' || f->t == 'u' || f->t == 'I') && (ty != LUA_TNUMBER || !isint)) {
      luaL_error(L, "loramoe.core: field '%s' must be an integer", f->k);
    } else if (f->t == 'i') {
      if (i < INT32_MIN || i > INT32_MAX) luaL_error(L, "loramoe.core: field '%s' out of the int32 range", f->k);
      *(int32_t *)v = (int32_t)i;
    } else if (f->t == 'u' || f->t == 'I') {
      *(int64_t *)v = (int64_t)i;
    } else if (f->t == 'f' || f->t == 'd') {
      if (ty != LUA_TNUMBER) luaL_error(L, "loramoe.core: field '%s' must be a number", f->k);
      if (f->t == 'f') *(float *)v = (float)lua_tonumber(L, -1);
      else *(double *)v = lua_tonumber(L, -1);
    } else if (f->t == 's') {
      if (ty != LUA_TSTRING) luaL_error(L, "loramoe.core: field '%s' must be a string", f->k);
      *(const char **)v = lua_tostring(L, -1);
    } else if (f->t == 'P') {
      if (ty != LUA_TLIGHTUSERDATA) luaL_error(L, "loramoe.core: field '%s' must be a pointer", f->k);
      *(void **)v = lua_touserdata(L, -1);
    } else {
      *(void **)v = checkh(L, lua_gettop(L), box_kinds[strchr(box_letters, f->t) - box_letters]);
    }
    if (ty == LUA_TSTRING || ty == LUA_TUSERDATA) anchor(L, a);
    else lua_pop(L, 1);
  }
}

/* status, then the n values already pushed (or nothing but the status on failure). */
static int ret(lua_State *L, lmoe_status st, int n) {
  lua_pushinteger(L, st);
  if (st != LMOE_OK) return 1;
  lua_insert(L, -1 - n);
  return n + 1;
}

static int ret_st(lua_State *L, lmoe_status st) { return ret(L, st, 0); }

/* The same, but on failure the status and the library's message err (NULL: none). */
static int ret_msg(lua_State *L, lmoe_status st, const char *err, int n) {
  if (st == LMOE_OK || !err) return ret(L, st, n);
  lua_pushinteger(L, st);
  lua_pushstring(L, err);
  return 2;
}

/* status, then the struct s as a table (only the status on failure). */
static int ret_struct(lua_State *L, lmoe_status st, const fld *f, const void *s) {
  if (st == LMOE_OK) push_struct(L, f, s);
  return ret(L, st, st == LMOE_OK);
}

/* An empty box of kind K (its type lmoe_K), then call with &out: status, box (the
   message err after the status on failure, see ret_msg). The box comes first, so that
   nothing leaks when Lua runs out of memory making it. */
#define CREATE(K, rel, keep, err, call)                                                            \
  do {                                                                                             \
    lbox *b_ = newbox(L, #K, rel, keep);                                                           \
    lmoe_##K *out = NULL;                                                                          \
    lmoe_status st_ = (call);                                                                      \
    b_->h = out;                                                                                   \
    return ret_msg(L, st_, err, 1);                                                                \
  } while (0)

#define CTX(i) ((lmoe_context *)checkh(L, i, "context"))
#define LAYER(i) ((lmoe_layer *)checkh(L, i, "layer"))
#define PEFT(i) ((lmoe_peft *)checkh(L, i, "peft"))

/* The adapter description at t ({gate=, up=, gate_up=, down=}, each {a=mem, b=mem,
   rank=, scale=}) for the pool at idx: every array is checked to hold what C reads
   for the pool's layer (its shapes are the pool box's uservalue). The mems are
   anchored in the list at a. */
static void check_desc(lua_State *L, int pool, int t, lmoe_adapter_desc *d, int a) {
  luaL_checktype(L, t, LUA_TTABLE);
  lua_getiuservalue(L, pool, 1);
  const int32_t *dims = (const int32_t *)checkmem(L, -1, M_I32, 3);
  int64_t E = dims[0], H = dims[1], I = dims[2];
  lua_pop(L, 1); /* the box keeps it */
  lmoe_adapter_desc_init(d);
  d->dtype = LMOE_DTYPE_F64;
  static const char *const names[] = {"gate", "up", "gate_up", "down"};
  lmoe_lora_part *parts[] = {&d->gate, &d->up, &d->gate_up, &d->down};
  int64_t in[] = {H, H, H, I}, out[] = {I, I, 2 * I, H};
  for (int i = 0; i < 4; i++) {
    if (lua_getfield(L, t, names[i]) == LUA_TTABLE) {
      int pi = lua_gettop(L);
      lua_getfield(L, pi, "rank");
      lua_getfield(L, pi, "scale");
      lua_getfield(L, pi, "a");
      lua_getfield(L, pi, "b");
      int32_t r = check_i32(L, pi + 1);
      parts[i]->rank = r;
      parts[i]->scale = (float)luaL_checknumber(L, pi + 2);
      parts[i]->a = checkmem(L, pi + 3, M_F64, mul3(E, r, in[i]));
      parts[i]->b = checkmem(L, pi + 4, M_F64, mul3(E, out[i], r));
      anchor(L, a);
      anchor(L, a);
      lua_pop(L, 2);
    }
    lua_pop(L, 1);
  }
}

/* ------------------------------------------------------------------ regular functions */

/* Most functions are regular: check the arguments, call, push what C gave. Each is one
   row of a list below (GEN_ lists generated, the others written out here), which
   defines l_<name>. A row's argument letters say how argument k+1 is checked into a[k]:
     c context  b buffer  l layer  p pool  B batch  g graph  t safetensors  e peft
     k checkpoint  m comm: a box of that kind, open (.p); o a pool box or nil (.p)
     i int32 (.i)  I integer (.I)  n number (.n)  s string (.s; the argument keeps it
     alive during the call)  P light userdata or nil (.p)
     S a shape list of 1..LMOE_MAX_DIMS entries (.i: the rank; the entries in shp)
     K an int32 count (.i), N an integer count (.I): the row's arrays, checked after the
     other arguments, must hold that many elements: f an f64 mem, w an i32 mem, q an
     i64 mem (.p)
     a table for a struct, initialised, then the fields of its field list that the table
     sets (their strings and boxes anchored during the call, see anchor), into the member
     of s that has the letter's name (GEN_STRUCT_ARGS: C lmoe_context_config, L
     lmoe_layer_config, O lmoe_pool_config, ...); D an adapter description for the pool
     that is argument 1 (lmoe_adapter_desc, see check_desc) */
typedef union arg { void *p; int32_t i; lua_Integer I; lua_Number n; const char *s; } arg;
#define SARG(l, S) lmoe_##S l;
typedef union sarg { GEN_STRUCT_ARGS(SARG) lmoe_adapter_desc D; } sarg;
#define SARG_LETTER(l, S) #l
#define GET_SARG(l, S) else if (spec[k] == #l[0]) lmoe_##S##_init(&s->l), get_struct(L, k + 1, S##_f, &s->l, anc);
static const char mem_letters[] = "fwq";
static const int mem_types[] = {M_F64, M_I32, M_I64};

static void checkargs(lua_State *L, const char *spec, arg *a, int64_t *shp, sarg *s) {
  lua_Integer count = 0;
  int anc = 0;
  if (strpbrk(spec, GEN_STRUCT_ARGS(SARG_LETTER) "D")) { /* the anchor list goes above every argument */
    if (lua_gettop(L) < (int)strlen(spec)) lua_settop(L, (int)strlen(spec));
    lua_newtable(L);
    anc = lua_gettop(L);
  }
  for (int k = 0; spec[k]; k++) {
    const char *box = strchr(box_letters, spec[k]);
    if (box) a[k].p = checkh(L, k + 1, box_kinds[box - box_letters]);
    else if (spec[k] == 'o') a[k].p = opth(L, k + 1, "pool");
    else if (spec[k] == 'i') a[k].i = check_i32(L, k + 1);
    else if (spec[k] == 'K') count = a[k].i = check_i32(L, k + 1);
    else if (spec[k] == 'I') a[k].I = luaL_checkinteger(L, k + 1);
    else if (spec[k] == 'N') count = a[k].I = luaL_checkinteger(L, k + 1);
    else if (spec[k] == 'n') a[k].n = luaL_checknumber(L, k + 1);
    else if (spec[k] == 's') a[k].s = check_str(L, k + 1);
    else if (spec[k] == 'S') a[k].i = check_shape(L, k + 1, shp, LMOE_MAX_DIMS);
    else if (spec[k] == 'P') a[k].p = opt_ptr(L, k + 1);
    GEN_STRUCT_ARGS(GET_SARG)
    else if (spec[k] == 'D') check_desc(L, 1, k + 1, &s->D, anc);
  }
  for (int k = 0; spec[k]; k++) {
    const char *mem = strchr(mem_letters, spec[k]);
    if (mem) a[k].p = checkmem(L, k + 1, mem_types[mem - mem_letters], count);
  }
}

/* A pointer as a light userdata; nil for NULL (one result either way, as from the FFI). */
static int push_ptr(lua_State *L, void *p) {
  if (p) lua_pushlightuserdata(L, p);
  else lua_pushnil(L);
  return 1;
}

/* How the rows of GEN_FUNCS and FUNCS push what their call returns. */
#define R_ST(call) return ret_st(L, call)
#define R_INT(call) lua_pushinteger(L, (lua_Integer)(call)); return 1
#define R_NUM(call) lua_pushnumber(L, call); return 1
#define R_STR(call) lua_pushstring(L, call); return 1
#define R_NONE(call) call; return 0
#define R_PTR(call) return push_ptr(L, call)

/* What every row's function starts with: its arguments checked into a, a shape's
   entries into shp, a struct argument into s. */
#define ARGS(spec)                                                                                 \
  arg a[sizeof spec];                                                                              \
  int64_t shp[LMOE_MAX_DIMS];                                                                      \
  sarg s;                                                                                          \
  checkargs(L, spec, a, shp, &s)

/* (name, argument letters, how the result is pushed, call). Written out: batch_set,
   whose pool may be nil and whose arrays' length is its number of requests. */
#define FUNCS(X) X(batch_set, "BoKww", R_ST, lmoe_batch_set(a[0].p, a[1].p, a[2].i, a[3].p, a[4].p))
#define DEF_FUNC(name, spec, R, call) static int l_##name(lua_State *L) { ARGS(spec); R(call); }
GEN_FUNCS(DEF_FUNC)
FUNCS(DEF_FUNC)

/* Functions with one struct out-parameter o: status, then o as a table by its field
   list (GEN_STRUCTS only). (name, argument letters, the struct lmoe_S, how o is
   initialised after zeroing, call with &o) */
#define DEF_STRUCT(name, spec, S, init, call)                                                      \
  static int l_##name(lua_State *L) {                                                              \
    ARGS(spec);                                                                                    \
    lmoe_##S o;                                                                                    \
    memset(&o, 0, sizeof o);                                                                       \
    init;                                                                                          \
    return ret_struct(L, (call), S##_f, &o);                                                       \
  }
GEN_STRUCTS(DEF_STRUCT)

/* buffer_wrap's call: a view of dtype a[1] and shape shp (a[3] dims) at a[4] only where
   it lies inside the owner buffer a[5] and has its memory kind (pure Lua holds pointers
   to every buffer's data: a larger shape would read past it). */
static lmoe_status wrap_inside(lua_State *L, const arg *a, const int64_t *shp, lmoe_buffer **out) {
  lmoe_buffer_desc d;
  if (lmoe_buffer_describe(a[5].p, &d) != LMOE_OK) luaL_argerror(L, 6, "owner buffer cannot be described");
  int64_t bytes = (int64_t)lmoe_dtype_size(a[1].i);
  for (int i = 0; i < a[3].i && bytes >= 0; i++) bytes = mul3(bytes, shp[i], 1);
  uintptr_t p = (uintptr_t)a[4].p, lo = (uintptr_t)d.data;
  if (a[2].i != d.memory) luaL_argerror(L, 3, "memory differs from the owner's");
  if (bytes < 0 || !lo || p < lo || p - lo > d.bytes || (uint64_t)bytes > d.bytes - (p - lo))
    luaL_argerror(L, 5, "the view does not lie inside the owner's memory");
  return lmoe_buffer_wrap(a[0].p, a[1].i, a[2].i, a[3].i, shp, a[4].p, out);
}

/* Functions that make a handle: status, a box of kind K owning it (with release
   function rel, and keep, a stack index or 0, as the box's uservalue; on failure the
   message err, or NULL for none; see CREATE). (name, argument letters, K, rel, keep,
   err, call with &out). Written out: the functions whose box or call differs from the
   rule, each saying how. */
#define MAKERS(X)                                                                                  \
  /* buffer_wrap(ctx, dtype, memory, shape, ptr, owner): the view must lie inside owner's        \
     memory (wrap_inside); owner (argument 6) is kept alive by the box */                          \
  X(buffer_wrap, "ciiSPb", buffer, rel_buffer, 6, NULL, wrap_inside(L, a, shp, &out))             \
  /* a borrowed buffer: nothing to release; the box keeps the layer */                           \
  X(layer_weights, "li", buffer, NULL, 1, NULL, lmoe_layer_weights(a[0].p, a[1].i, &out))          \
  /* checkpoint_load_layer(ck, index, layer, with_router): the box (empty without) owns a          \
     router made even when the load then failed */                                                 \
  X(checkpoint_load_layer, "kil", buffer, rel_buffer, 0, NULL,                                     \
    lmoe_checkpoint_load_layer(a[0].p, a[1].i, a[2].p, lua_toboolean(L, 4) ? &out : NULL))
#define DEF_MAKER(name, spec, K, rel, keep, msg, call)                                             \
  static int l_##name(lua_State *L) {                                                              \
    ARGS(spec);                                                                                    \
    char err[256] = "";                                                                            \
    (void)err;                                                                                     \
    CREATE(K, rel, keep, msg, call);                                                               \
  }
GEN_MAKERS(DEF_MAKER)
MAKERS(DEF_MAKER)

/* Functions with out-parameters o[0], o[1] of the kinds their letters say (i an int32,
   .i; s a string, .s, "" for NULL): status, their values (GEN_OUTS only). (name,
   argument letters, out letters, call with &o[j]) */
static int ret_outs(lua_State *L, lmoe_status st, const char *outs, const arg *o) {
  for (int j = 0; outs[j]; j++) {
    if (outs[j] == 'i') lua_pushinteger(L, o[j].i);
    else lua_pushstring(L, o[j].s ? o[j].s : "");
  }
  return ret(L, st, (int)strlen(outs));
}
#define DEF_OUT(name, spec, outs, call)                                                            \
  static int l_##name(lua_State *L) {                                                              \
    ARGS(spec);                                                                                    \
    arg o[sizeof outs];                                                                            \
    memset(o, 0, sizeof o);                                                                        \
    return ret_outs(L, (call), outs, o);                                                           \
  }
GEN_OUTS(DEF_OUT)

/* ------------------------------------------------------------------ library */

static int l_now(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec * 1e-9);
  return 1;
}

/* ------------------------------------------------------------------ context */

static int l_context_is_live(lua_State *L) {
  lua_pushboolean(L, lua_islightuserdata(L, 1) && lmoe_context_is_live(lua_touserdata(L, 1)));
  return 1;
}

/* context_retain(ptr) -> box: a new reference to a live context. */
static int l_context_retain(lua_State *L) {
  void *p = opt_ptr(L, 1);
  if (!p || !lmoe_context_is_live(p)) luaL_argerror(L, 1, "not a live loramoe context");
  lbox *b = newbox(L, "context", rel_context, 0);
  lmoe_context_retain((lmoe_context *)p);
  b->h = p;
  return 1;
}

/* core.address(p): a light userdata's address as an integer (nil for anything else),
   so the API can check that a pointer lies inside the memory that owns it. */
static int l_address(lua_State *L) {
  if (!lua_islightuserdata(L, 1)) return 0;
  lua_pushinteger(L, (lua_Integer)(uintptr_t)lua_touserdata(L, 1));
  return 1;
}

/* ------------------------------------------------------------------ layers */

static lmoe_status layer_config(lmoe_layer *l, lmoe_layer_config *c) {
  memset(c, 0, sizeof *c);
  c->struct_size = sizeof *c;
  return lmoe_layer_get_config(l, c);
}

/* Arrays are checked against the layer's own shapes: C reads exactly that much. */
static int l_layer_set_weights(lua_State *L) {
  lmoe_layer *l = LAYER(1);
  lmoe_layer_config c;
  lmoe_status st = layer_config(l, &c);
  if (st) return ret_st(L, st);
  int64_t n = mul3(c.num_experts, 2 * (int64_t)c.intermediate, c.hidden);
  const void *a = lua_isnoneornil(L, 2) ? NULL : checkmem(L, 2, M_F64, n);
  const void *b = lua_isnoneornil(L, 3) ? NULL : checkmem(L, 3, M_F64, n / 2);
  return ret_st(L, lmoe_layer_set_weights(l, a, b, LMOE_DTYPE_F64));
}

static int l_layer_set_expert(lua_State *L) {
  lmoe_layer *l = LAYER(1);
  int32_t e = check_i32(L, 2);
  lmoe_layer_config c;
  lmoe_status st = layer_config(l, &c);
  if (st) return ret_st(L, st);
  const void *p[3];
  for (int i = 0; i < 3; i++)
    p[i] = lua_isnoneornil(L, 3 + i) ? NULL : checkmem(L, 3 + i, M_F64, mul3(c.intermediate, c.hidden, 1));
  return ret_st(L, lmoe_layer_set_expert(l, e, p[0], p[1], p[2], LMOE_DTYPE_F64));
}

/* ------------------------------------------------------------------ pools */

/* pool_create(layer, {num_slots=, max_rank=}) -> st, box (st alone, as from the FFI
   core, when the layer's config can't be read). The box keeps the layer's shapes (E,
   H, I as an i32 mem): pool_load checks arrays against them, and they stay right when
   the layer's own box is closed (the library keeps the layer for the pool). */
static int l_pool_create(lua_State *L) {
  ARGS("lO");
  lmoe_layer *l = a[0].p;
  lmoe_layer_config lc;
  lmoe_status st = layer_config(l, &lc);
  if (st) return ret_st(L, st);
  int32_t *dims = (int32_t *)newmem(L, M_I32, 3)->data;
  dims[0] = lc.num_experts;
  dims[1] = lc.hidden;
  dims[2] = lc.intermediate;
  CREATE(pool, rel_pool, -1, NULL, lmoe_pool_create(l, &s.O, &out));
}

/* ------------------------------------------------------------------ batches, forwards */

/* forward_group({ctx, ...}, {args, ...}): one sharded layer's ranks from this thread.
   Every box read from the lists is anchored during the call. */
static int l_forward_group(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_Unsigned n = lua_rawlen(L, 1);
  if (n < 1 || n > 4096 || lua_rawlen(L, 2) != n) luaL_argerror(L, 2, "1..4096 contexts and as many args");
  lmoe_context **ctxs = (lmoe_context **)lua_newuserdatauv(L, n * sizeof *ctxs, 0);
  lmoe_forward_args *args = (lmoe_forward_args *)lua_newuserdatauv(L, n * sizeof *args, 0);
  const lmoe_forward_args **pa = (const lmoe_forward_args **)lua_newuserdatauv(L, n * sizeof *pa, 0);
  lua_newtable(L);
  int anc = lua_gettop(L);
  for (lua_Unsigned i = 0; i < n; i++) {
    lua_rawgeti(L, 1, (lua_Integer)i + 1);
    ctxs[i] = (lmoe_context *)checkh(L, lua_gettop(L), "context");
    anchor(L, anc);
    lua_rawgeti(L, 2, (lua_Integer)i + 1);
    lmoe_forward_args_init(&args[i]);
    get_struct(L, lua_gettop(L), forward_args_f, &args[i], anc);
    pa[i] = &args[i];
    lua_pop(L, 1);
  }
  return ret_st(L, lmoe_forward_group((int32_t)n, ctxs, pa, NULL));
}

/* ------------------------------------------------------------------ safetensors */

/* safetensors_write(ctx, path, entries, keys, values): entries {name=, dtype=, shape=,
   data=buffer box} whose buffers hold at least shape's elements of dtype in host
   memory; keys/values lists of strings. Every string and box is anchored during the
   call. */
static int l_safetensors_write(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  const char *path = check_str(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  luaL_checktype(L, 4, LUA_TTABLE);
  luaL_checktype(L, 5, LUA_TTABLE);
  lua_Unsigned n = lua_rawlen(L, 3), nm = lua_rawlen(L, 4);
  if (n > INT32_MAX || nm > INT32_MAX || lua_rawlen(L, 5) != nm) luaL_argerror(L, 3, "bad lengths");
  lmoe_tensor_entry *e = (lmoe_tensor_entry *)lua_newuserdatauv(L, (n ? n : 1) * sizeof *e, 0);
  const char **keys = (const char **)lua_newuserdatauv(L, (nm ? nm : 1) * sizeof(char *), 0);
  const char **vals = (const char **)lua_newuserdatauv(L, (nm ? nm : 1) * sizeof(char *), 0);
  lua_newtable(L);
  int anc = lua_gettop(L);
  for (lua_Unsigned i = 0; i < n; i++) {
    memset(&e[i], 0, sizeof e[i]);
    if (lua_rawgeti(L, 3, (lua_Integer)i + 1) != LUA_TTABLE) luaL_argerror(L, 3, "entries must be tables");
    int ti = lua_gettop(L);
    if (lua_getfield(L, ti, "name") != LUA_TSTRING) luaL_argerror(L, 3, "entry names must be strings");
    e[i].name = lua_tostring(L, -1);
    anchor(L, anc);
    lua_getfield(L, ti, "dtype");
    e[i].dtype = check_i32(L, -1);
    lua_getfield(L, ti, "shape");
    e[i].ndim = check_shape(L, lua_gettop(L), e[i].shape, LMOE_TENSOR_MAX_DIMS);
    lua_pop(L, 2);
    lua_getfield(L, ti, "data");
    lmoe_buffer_desc d = {0};
    if (lmoe_buffer_describe((lmoe_buffer *)checkh(L, -1, "buffer"), &d)) luaL_argerror(L, 3, "a buffer without a description");
    int64_t numel = 1;
    for (int k = 0; k < e[i].ndim; k++)
      if (numel >= 0) numel = mul3(numel, e[i].shape[k], 1);
    if (d.memory != LMOE_MEMORY_HOST && lmoe_context_backend(ctx) != LMOE_BACKEND_CPU) luaL_argerror(L, 3, "data not in host memory");
    if (d.dtype != e[i].dtype || numel < 0 || numel > d.numel) luaL_argerror(L, 3, "data smaller than its shape");
    e[i].data = d.data;
    anchor(L, anc);
    lua_pop(L, 1);
  }
  for (lua_Unsigned i = 0; i < nm; i++) {
    if (lua_rawgeti(L, 4, (lua_Integer)i + 1) != LUA_TSTRING || lua_rawgeti(L, 5, (lua_Integer)i + 1) != LUA_TSTRING)
      luaL_argerror(L, 4, "metadata must be strings");
    keys[i] = lua_tostring(L, -2);
    vals[i] = lua_tostring(L, -1);
    anchor(L, anc);
    anchor(L, anc);
  }
  return ret_st(L, lmoe_safetensors_write(ctx, path, (int32_t)n, e, (int32_t)nm, keys, vals));
}

/* ------------------------------------------------------------------ PEFT adapters */

/* peft_inspect(peft) -> st, text (sized by the library's answer) */
static int l_peft_inspect(lua_State *L) {
  lmoe_peft *p = PEFT(1);
  char probe[1];
  size_t need = 0;
  lmoe_status st = lmoe_peft_inspect(p, probe, 1, &need);
  if (st) return ret_st(L, st);
  luaL_Buffer b;
  char *s = luaL_buffinitsize(L, &b, need + 1);
  st = lmoe_peft_inspect(p, s, need + 1, NULL);
  luaL_pushresultsize(&b, st ? 0 : strlen(s));
  return ret(L, st, 1);
}

/* peft_layer_desc(peft, layer, E, H, I) -> st, {gate=, up=, gate_up=, down=} with
   parts {a=, b=, rank=, scale=}, a and b f32 mems copied out of the library's arrays
   (sizes from E, H, I and the rank it reports). */
static int l_peft_layer_desc(lua_State *L) {
  lmoe_peft *p = PEFT(1);
  int32_t layer = check_i32(L, 2), E = check_i32(L, 3), H = check_i32(L, 4), I = check_i32(L, 5);
  lmoe_adapter_desc d;
  lmoe_adapter_desc_init(&d);
  lmoe_status st = lmoe_peft_layer_desc(p, layer, E, H, I, &d);
  if (st || d.dtype != LMOE_DTYPE_F32) return ret_st(L, st ? st : LMOE_ERR_UNSUPPORTED);
  static const char *const names[] = {"gate", "up", "gate_up", "down"};
  const lmoe_lora_part *parts[] = {&d.gate, &d.up, &d.gate_up, &d.down};
  int64_t in[] = {H, H, H, I}, out[] = {I, I, 2 * (int64_t)I, H};
  lua_newtable(L);
  for (int i = 0; i < 4; i++) {
    const lmoe_lora_part *q = parts[i];
    if (!q->a || !q->b) continue;
    lua_newtable(L);
    for (int ab = 0; ab < 2; ab++) {
      int64_t n = ab ? mul3(E, out[i], q->rank) : mul3(E, q->rank, in[i]);
      memcpy(newmem(L, M_F32, n)->data, ab ? q->b : q->a, (size_t)n * sizeof(float));
      lua_setfield(L, -2, ab ? "b" : "a");
    }
    lua_pushinteger(L, q->rank);
    lua_setfield(L, -2, "rank");
    lua_pushnumber(L, q->scale);
    lua_setfield(L, -2, "scale");
    lua_setfield(L, -2, names[i]);
  }
  return ret(L, st, 1);
}

/* ------------------------------------------------------------------ communicators */

/* comm_create_local({ctx, ...}) -> st, {box, ...} | st, message. The boxes are made
   before the communicators, so none leaks when Lua runs out of memory. */
static int l_comm_create_local(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Unsigned n = lua_rawlen(L, 1);
  if (n < 1 || n > 4096) luaL_argerror(L, 1, "1..4096 contexts");
  lmoe_context **ctxs = (lmoe_context **)lua_newuserdatauv(L, n * sizeof *ctxs, 0);
  lmoe_comm **out = (lmoe_comm **)lua_newuserdatauv(L, n * sizeof *out, 0);
  lua_newtable(L);
  int anc = lua_gettop(L);
  for (lua_Unsigned i = 0; i < n; i++) {
    lua_rawgeti(L, 1, (lua_Integer)i + 1);
    ctxs[i] = (lmoe_context *)checkh(L, lua_gettop(L), "context");
    anchor(L, anc); /* the boxes, anchored during the call */
  }
  lua_createtable(L, (int)n, 0);
  int t = lua_gettop(L);
  lbox **boxes = (lbox **)lua_newuserdatauv(L, n * sizeof *boxes, 0);
  for (lua_Unsigned i = 0; i < n; i++) {
    boxes[i] = newbox(L, "comm", rel_comm, 0);
    lua_rawseti(L, t, (lua_Integer)i + 1);
  }
  char err[256] = "";
  lmoe_status st = lmoe_comm_create_local((int32_t)n, ctxs, out, err, sizeof err);
  for (lua_Unsigned i = 0; st == LMOE_OK && i < n; i++) boxes[i]->h = out[i];
  lua_pushvalue(L, t);
  return ret_msg(L, st, err, 1);
}

/* ------------------------------------------------------------------ registration */

/* The row lists register their functions; these are the ones written out, none of
   them regular: now, pointer, address, mem, pack and unpack are no functions of the
   header; context_retain takes a pointer and makes a box, context_is_live takes any
   value; layer_set_weights and layer_set_expert take arrays sized by the layer's
   shapes, which pool_create keeps with its box; forward_group, comm_create_local and
   safetensors_write take lists; peft_inspect sizes its text by the library's answer;
   peft_layer_desc copies the library's arrays out. */
#define OTHER_FUNCTIONS(X) X(now) X(pointer) X(address) X(mem) X(pack) X(unpack) X(context_retain) \
  X(context_is_live) X(layer_set_weights) X(layer_set_expert) X(pool_create) X(forward_group) \
  X(safetensors_write) X(peft_inspect) X(peft_layer_desc) X(comm_create_local)
#define REG(name, ...) {#name, l_##name},
#define REG1(name) {#name, l_##name},
static const luaL_Reg lib[] = {GEN_FUNCS(REG) FUNCS(REG) GEN_STRUCTS(REG) GEN_MAKERS(REG) MAKERS(REG)
  GEN_OUTS(REG) OTHER_FUNCTIONS(REG1) {"close", box_gc}, {NULL, NULL}};

/* The *_init functions are called where their structs are filled; the release and
   close functions are the boxes' release functions. not bound: the allocator hooks of
   lmoe_context_config (C callbacks; Lua never runs from C callbacks). */

#ifdef _WIN32
__declspec(dllexport)
#else
__attribute__((visibility("default")))
#endif
int luaopen_loramoe_core(lua_State *L) {
  luaL_checkversion(L);
  luaL_newmetatable(L, BOX_MT);
  lua_pushcfunction(L, box_gc);
  lua_pushvalue(L, -1);
  lua_setfield(L, -3, "__gc");
  lua_setfield(L, -2, "__close");
  lua_pushliteral(L, "locked");
  lua_setfield(L, -2, "__metatable");
  lua_pop(L, 1);
  luaL_newmetatable(L, MEM_MT);
  lua_pushliteral(L, "locked");
  lua_setfield(L, -2, "__metatable");
  lua_pop(L, 1);
  luaL_newlib(L, lib);
  lua_pushliteral(L, "loramoe.core");
  lua_setfield(L, -2, "_NAME");
  lua_pushfstring(L, "%d.%d.%d", (int)LMOE_VERSION_MAJOR, (int)LMOE_VERSION_MINOR, (int)LMOE_VERSION_PATCH);
  lua_setfield(L, -2, "_VERSION");
  lua_pushliteral(L, "lua5.4");
  lua_setfield(L, -2, "runtime");
  return 1;
}
