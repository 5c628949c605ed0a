/*
 * loramoe.core — the raw Lua 5.4 core: the C functions of native/include/loramoe.h one
 * to one, for the pure-Lua API in lua/loramoe/api.lua (the LuaJIT FFI core,
 * lua/loramoe/ffi_core.lua, exposes the same functions). Names drop the lmoe_ prefix;
 * out-parameters become results (status first); structs become plain tables with the
 * C field names; arrays are "mem" userdata (core.mem / core.pack / core.unpack).
 *
 * One owning box serves every handle, as liolib's file handle does: created empty
 * before the C object is acquired, it stores the handle and its release function, and
 * its uservalue keeps the parent (a pool's layer, a wrapped buffer's owner, a borrowed
 * buffer's layer) alive. __gc releases; core.close releases now.
 *
 * Everything a caller can pass is checked here before use even though the Lua API has
 * checked it already with its own messages: handle kinds, integer ranges (no
 * truncation), array sizes against what C will read or write, strings kept on the
 * stack while C holds them. A failed check here raises a plain error: the API's
 * messages are written once, in Lua.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */

#include "loramoe.h"

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

/* The release functions, as the box stores them. */
static void rel_context_release(void *p) { lmoe_context_release((lmoe_context *)p); }
static void rel_buffer_release(void *p) { lmoe_buffer_release((lmoe_buffer *)p); }
static void rel_layer_release(void *p) { lmoe_layer_release((lmoe_layer *)p); }
static void rel_pool_release(void *p) { lmoe_pool_release((lmoe_pool *)p); }
static void rel_batch_release(void *p) { lmoe_batch_release((lmoe_batch *)p); }
static void rel_graph_release(void *p) { lmoe_graph_release((lmoe_graph *)p); }
static void rel_safetensors_close(void *p) { lmoe_safetensors_close((lmoe_safetensors *)p); }
static void rel_peft_close(void *p) { lmoe_peft_close((lmoe_peft *)p); }
static void rel_checkpoint_close(void *p) { lmoe_checkpoint_close((lmoe_checkpoint *)p); }
static void rel_comm_release(void *p) { lmoe_comm_release((lmoe_comm *)p); }

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

/* Structs <-> tables by field lists: name, offset, type ('i' int32, 'I' int64, 'u'
   uint64, 'z' size_t, 'f' float, 'd' double, 's' const char *, 'p' pointer). */
typedef struct fld { const char *k; size_t off; char t; } fld;
#define F(S, m, t) {#m, offsetof(S, m), t}

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
    default: lua_pushlightuserdata(L, *(void *const *)v); break;
    }
    lua_setfield(L, -2, f->k);
  }
}

/* Sets the fields of s that the table at t has (others keep the defaults); strings
   stay referenced by the table, which the caller keeps on the stack. */
static void get_struct(lua_State *L, int t, const fld *f, void *s) {
  char *b = (char *)s;
  luaL_checktype(L, t, LUA_TTABLE);
  for (; f->k; f++) {
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
    } else {
      if (ty != LUA_TLIGHTUSERDATA) luaL_error(L, "loramoe.core: field '%s' must be a pointer", f->k);
      *(void **)v = lua_touserdata(L, -1);
    }
    lua_pop(L, 1);
  }
}

/* status, then the n values already pushed (or nothing but the status on failure). */
static int ret(lua_State *L, lmoe_status st, int n) {
  if (st != LMOE_OK) {
    lua_pushinteger(L, st);
    return 1;
  }
  lua_pushinteger(L, st);
  lua_insert(L, -1 - n);
  return n + 1;
}

static int ret_st(lua_State *L, lmoe_status st) { return ret(L, st, 0); }

/* status, then the struct s as a table (only the status on failure). */
static int ret_struct(lua_State *L, lmoe_status st, const fld *f, const void *s) {
  if (st == LMOE_OK) push_struct(L, f, s);
  return ret(L, st, st == LMOE_OK);
}

/* An empty box of kind, then call with &out: status, box. */
#define CREATE(kind, rel, keep, T, call)                                                   \
  do {                                                                                     \
    lbox *b_ = newbox(L, kind, rel, keep);                                                 \
    T *out = NULL;                                                                         \
    lmoe_status st_ = (call);                                                              \
    b_->h = out;                                                                           \
    return ret(L, st_, 1);                                                                 \
  } while (0)

/* ------------------------------------------------------------------ library */

static int l_version(lua_State *L) { lua_pushstring(L, lmoe_version()); return 1; }
static int l_status_string(lua_State *L) { lua_pushstring(L, lmoe_status_string((lmoe_status)check_i32(L, 1))); return 1; }
static int l_has_cuda(lua_State *L) { lua_pushinteger(L, lmoe_has_cuda()); return 1; }
static int l_has_nccl(lua_State *L) { lua_pushinteger(L, lmoe_has_nccl()); return 1; }
static int l_device_count(lua_State *L) {
  int32_t n = 0;
  lmoe_status st = lmoe_device_count(&n);
  lua_pushinteger(L, n);
  return ret(L, st, 1);
}
static const fld device_f[] = {F(lmoe_device_info, cc_major, 'i'), F(lmoe_device_info, cc_minor, 'i'),
  F(lmoe_device_info, sm_count, 'i'), F(lmoe_device_info, memory_bytes, 'I'), F(lmoe_device_info, l2_bytes, 'I'), {0}};
static int l_device_get_info(lua_State *L) {
  lmoe_device_info i = {.struct_size = sizeof i};
  lmoe_status st = lmoe_device_get_info(check_i32(L, 1), &i);
  int n = ret_struct(L, st, device_f, &i);
  if (st == LMOE_OK) {
    i.name[sizeof i.name - 1] = 0;
    lua_pushstring(L, i.name);
    lua_setfield(L, -2, "name");
  }
  return n;
}
static int l_dtype_size(lua_State *L) { lua_pushinteger(L, (lua_Integer)lmoe_dtype_size(check_i32(L, 1))); return 1; }
static int l_dtype_name(lua_State *L) { lua_pushstring(L, lmoe_dtype_name(check_i32(L, 1))); return 1; }
static int l_lora_scale(lua_State *L) {
  lua_pushnumber(L, lmoe_lora_scale((float)luaL_checknumber(L, 1), check_i32(L, 2), check_i32(L, 3)));
  return 1;
}
static int l_now(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec * 1e-9);
  return 1;
}

/* ------------------------------------------------------------------ context */

static const fld context_f[] = {F(lmoe_context_config, backend, 'i'), F(lmoe_context_config, device, 'i'),
  F(lmoe_context_config, threads, 'i'), F(lmoe_context_config, guard, 'i'), F(lmoe_context_config, stream, 'p'), {0}};

/* context_create{backend=, device=, threads=, guard=, stream=} -> st, box | st, message */
static int l_context_create(lua_State *L) {
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  get_struct(L, 1, context_f, &cfg);
  lbox *b = newbox(L, "context", rel_context_release, 0);
  char err[256] = "";
  lmoe_context *ctx = NULL;
  lmoe_status st = lmoe_context_create(&cfg, &ctx, err, sizeof err);
  if (st != LMOE_OK) {
    lua_pushinteger(L, st);
    lua_pushstring(L, err);
    return 2;
  }
  b->h = ctx;
  return ret(L, st, 1);
}

static int l_context_is_live(lua_State *L) {
  lua_pushboolean(L, lua_islightuserdata(L, 1) && lmoe_context_is_live(lua_touserdata(L, 1)));
  return 1;
}

/* context_retain(ptr) -> box: a new reference to a live context. */
static int l_context_retain(lua_State *L) {
  void *p = opt_ptr(L, 1);
  if (!p || !lmoe_context_is_live(p)) luaL_argerror(L, 1, "not a live loramoe context");
  lbox *b = newbox(L, "context", rel_context_release, 0);
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

#define CTX(i) ((lmoe_context *)checkh(L, i, "context"))
static int l_context_last_error(lua_State *L) { lua_pushstring(L, lmoe_context_last_error(CTX(1))); return 1; }
static int l_context_backend(lua_State *L) { lua_pushinteger(L, lmoe_context_backend(CTX(1))); return 1; }
static int l_context_threads(lua_State *L) { lua_pushinteger(L, lmoe_context_threads(CTX(1))); return 1; }
static int l_context_guard(lua_State *L) { lua_pushinteger(L, lmoe_context_guard(CTX(1))); return 1; }
static int l_context_set_guard(lua_State *L) { lmoe_context *c = CTX(1); return ret_st(L, lmoe_context_set_guard(c, check_i32(L, 2))); }
static int l_context_stream(lua_State *L) {
  void *s = lmoe_context_stream(CTX(1));
  if (!s) return 0;
  lua_pushlightuserdata(L, s);
  return 1;
}
static int l_context_synchronize(lua_State *L) { lmoe_context *c = CTX(1); return ret_st(L, lmoe_context_synchronize(c, opt_ptr(L, 2))); }
static int l_context_reset_counters(lua_State *L) { lmoe_context_reset_counters(CTX(1)); return 0; }
static const fld counters_f[] = {F(lmoe_counters, forwards, 'u'), F(lmoe_counters, launches, 'u'),
  F(lmoe_counters, lora_launches, 'u'), F(lmoe_counters, host_waits, 'u'), F(lmoe_counters, uploads, 'u'),
  F(lmoe_counters, bytes_uploaded, 'u'), F(lmoe_counters, downloads, 'u'), {0}};
static int l_context_counters(lua_State *L) {
  lmoe_counters c = {0};
  return ret_struct(L, lmoe_context_counters(CTX(1), &c), counters_f, &c);
}
static const fld waits_f[] = {F(lmoe_wait_counters, host_waits, 'u'), F(lmoe_wait_counters, forced, 'u'),
  F(lmoe_wait_counters, backpressure, 'u'), {0}};
static int l_context_wait_counters(lua_State *L) {
  lmoe_wait_counters w = {.struct_size = sizeof w};
  return ret_struct(L, lmoe_context_wait_counters(CTX(1), &w), waits_f, &w);
}

/* ------------------------------------------------------------------ buffers */

#define BUF(i) ((lmoe_buffer *)checkh(L, i, "buffer"))

static int l_buffer_create(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  int32_t dtype = check_i32(L, 2), memory = check_i32(L, 3);
  int64_t shape[LMOE_MAX_DIMS];
  int nd = check_shape(L, 4, shape, LMOE_MAX_DIMS);
  CREATE("buffer", rel_buffer_release, 0, lmoe_buffer, lmoe_buffer_create(ctx, dtype, memory, nd, shape, &out));
}

/* buffer_wrap(ctx, dtype, memory, shape, ptr, owner): the API checks that ptr lies in
   owner's memory; owner is kept alive by the box. */
static int l_buffer_wrap(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  int32_t dtype = check_i32(L, 2), memory = check_i32(L, 3);
  int64_t shape[LMOE_MAX_DIMS];
  int nd = check_shape(L, 4, shape, LMOE_MAX_DIMS);
  void *p = opt_ptr(L, 5);
  CREATE("buffer", rel_buffer_release, 6, lmoe_buffer, lmoe_buffer_wrap(ctx, dtype, memory, nd, shape, p, &out));
}

static const fld desc_f[] = {F(lmoe_buffer_desc, dtype, 'i'), F(lmoe_buffer_desc, memory, 'i'),
  F(lmoe_buffer_desc, ndim, 'i'), F(lmoe_buffer_desc, numel, 'I'), F(lmoe_buffer_desc, bytes, 'z'),
  F(lmoe_buffer_desc, data, 'p'), {0}};

/* A list of the first n entries of an int64 array, as field k of the table on top. */
static void set_dims(lua_State *L, const char *k, const int64_t *d, int n) {
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    lua_pushinteger(L, d[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, k);
}

static int l_buffer_describe(lua_State *L) {
  lmoe_buffer_desc d = {0};
  lmoe_status st = lmoe_buffer_describe(BUF(1), &d);
  int n = ret_struct(L, st, desc_f, &d);
  if (st == LMOE_OK) set_dims(L, "shape", d.shape, d.ndim < LMOE_MAX_DIMS ? d.ndim : LMOE_MAX_DIMS);
  return n;
}

/* buffer_write(buf, offset, mem, count) / buffer_read(...): f64 values. */
static int l_buffer_write(lua_State *L) {
  lmoe_buffer *b = BUF(1);
  lua_Integer off = luaL_checkinteger(L, 2), n = luaL_checkinteger(L, 4);
  return ret_st(L, lmoe_buffer_write(b, off, checkmem(L, 3, M_F64, n), LMOE_DTYPE_F64, n));
}
static int l_buffer_read(lua_State *L) {
  lmoe_buffer *b = BUF(1);
  lua_Integer off = luaL_checkinteger(L, 2), n = luaL_checkinteger(L, 4);
  return ret_st(L, lmoe_buffer_read(b, off, checkmem(L, 3, M_F64, n), LMOE_DTYPE_F64, n));
}
static int l_buffer_fill_random(lua_State *L) {
  lmoe_buffer *b = BUF(1);
  return ret_st(L, lmoe_buffer_fill_random(b, (uint64_t)luaL_checkinteger(L, 2), (float)luaL_checknumber(L, 3),
                                           (float)luaL_checknumber(L, 4), opt_ptr(L, 5)));
}
static int l_buffer_fill(lua_State *L) {
  lmoe_buffer *b = BUF(1);
  return ret_st(L, lmoe_buffer_fill(b, (float)luaL_checknumber(L, 2), opt_ptr(L, 3)));
}
static const fld compare_f[] = {F(lmoe_compare_result, rel_l2, 'd'), F(lmoe_compare_result, max_abs, 'd'),
  F(lmoe_compare_result, ref_l2, 'd'), F(lmoe_compare_result, nonfinite, 'I'), F(lmoe_compare_result, numel, 'I'), {0}};
static int l_buffer_compare(lua_State *L) {
  lmoe_compare_result r = {0};
  return ret_struct(L, lmoe_buffer_compare(BUF(1), BUF(2), &r), compare_f, &r);
}

/* ------------------------------------------------------------------ layers */

#define LAYER(i) ((lmoe_layer *)checkh(L, i, "layer"))
static const fld layer_f[] = {F(lmoe_layer_config, num_experts, 'i'), F(lmoe_layer_config, hidden, 'i'),
  F(lmoe_layer_config, intermediate, 'i'), F(lmoe_layer_config, top_k, 'i'),
  F(lmoe_layer_config, renormalize, 'i'), F(lmoe_layer_config, max_tokens, 'i'),
  F(lmoe_layer_config, shard_mode, 'i'), F(lmoe_layer_config, shard_rank, 'i'),
  F(lmoe_layer_config, shard_size, 'i'), F(lmoe_layer_config, weight_dtype, 'i'), {0}};

/* layer_create(ctx, {num_experts=, ..., shard_size=, comm=box}): comm is a comm box
   (the layer keeps the communicator). */
static int l_layer_create(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  lmoe_layer_config c;
  lmoe_layer_config_init(&c);
  get_struct(L, 2, layer_f, &c);
  if (lua_getfield(L, 2, "comm") != LUA_TNIL) c.comm = (lmoe_comm *)checkh(L, lua_gettop(L), "comm");
  lua_pop(L, 1);
  CREATE("layer", rel_layer_release, 0, lmoe_layer, lmoe_layer_create(ctx, &c, &out));
}

static lmoe_status layer_config(lmoe_layer *l, lmoe_layer_config *c) {
  memset(c, 0, sizeof *c);
  c->struct_size = sizeof *c;
  return lmoe_layer_get_config(l, c);
}

static int l_layer_get_config(lua_State *L) {
  lmoe_layer_config c;
  return ret_struct(L, layer_config(LAYER(1), &c), layer_f, &c);
}

static int l_layer_randomize(lua_State *L) {
  lmoe_layer *l = LAYER(1);
  return ret_st(L, lmoe_layer_randomize(l, (uint64_t)luaL_checkinteger(L, 2), (float)luaL_checknumber(L, 3)));
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

/* layer_weights(layer, which) -> st, box borrowed from the layer (kept alive). */
static int l_layer_weights(lua_State *L) {
  lmoe_layer *l = LAYER(1);
  int32_t which = check_i32(L, 2);
  CREATE("buffer", NULL, 1, lmoe_buffer, lmoe_layer_weights(l, which, &out));
}

/* ------------------------------------------------------------------ pools */

#define POOL(i) ((lmoe_pool *)checkh(L, i, "pool"))
static const fld pool_f[] = {F(lmoe_pool_config, num_slots, 'i'), F(lmoe_pool_config, max_rank, 'i'), {0}};

/* pool_create(layer, {num_slots=, max_rank=}) -> st, box. The box keeps the layer's
   shapes (E, H, I as an i32 mem): pool_load checks arrays against them, and they stay
   right when the layer's own box is closed (the library keeps the layer for the pool). */
static int l_pool_create(lua_State *L) {
  lmoe_layer *l = LAYER(1);
  lmoe_pool_config c;
  lmoe_pool_config_init(&c);
  get_struct(L, 2, pool_f, &c);
  lmoe_layer_config lc;
  if (layer_config(l, &lc)) luaL_error(L, "loramoe.core: the layer has no config");
  int32_t *dims = (int32_t *)newmem(L, M_I32, 3)->data;
  dims[0] = lc.num_experts;
  dims[1] = lc.hidden;
  dims[2] = lc.intermediate;
  CREATE("pool", rel_pool_release, -1, lmoe_pool, lmoe_pool_create(l, &c, &out));
}

static int l_pool_get_config(lua_State *L) {
  lmoe_pool_config c = {.struct_size = sizeof c};
  return ret_struct(L, lmoe_pool_get_config(POOL(1), &c), pool_f, &c);
}

static const fld random_f[] = {F(lmoe_random_adapter, targets, 'i'), F(lmoe_random_adapter, fused, 'i'),
  F(lmoe_random_adapter, rank, 'i'), F(lmoe_random_adapter, alpha, 'f'), F(lmoe_random_adapter, use_rslora, 'i'),
  F(lmoe_random_adapter, seed, 'u'), F(lmoe_random_adapter, scale, 'f'), {0}};
static int l_pool_load_random(lua_State *L) {
  lmoe_pool *p = POOL(1);
  int32_t slot = check_i32(L, 2);
  lmoe_random_adapter s;
  lmoe_random_adapter_init(&s);
  get_struct(L, 3, random_f, &s);
  return ret_st(L, lmoe_pool_load_random(p, slot, &s));
}

/* The adapter description at t ({gate=, up=, gate_up=, down=}, each {a=mem, b=mem,
   rank=, scale=}) for the pool at idx: every array is checked to hold what C reads
   for the pool's layer (its shapes are the pool box's uservalue). The mems stay
   referenced by t, on the stack, during the call. */
static void check_desc(lua_State *L, int pool, int t, lmoe_adapter_desc *d) {
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
      lua_pop(L, 4);
    }
    lua_pop(L, 1);
  }
}

static int l_pool_load(lua_State *L) {
  lmoe_pool *p = POOL(1);
  int32_t slot = check_i32(L, 2);
  lmoe_adapter_desc d;
  check_desc(L, 1, 3, &d);
  return ret_st(L, lmoe_pool_load(p, slot, &d));
}

static int l_pool_load_named(lua_State *L) {
  lmoe_pool *p = POOL(1);
  const char *name = luaL_checkstring(L, 2);
  lmoe_adapter_desc d;
  check_desc(L, 1, 3, &d);
  int32_t slot = -1;
  lmoe_status st = lmoe_pool_load_named(p, name, &d, &slot);
  lua_pushinteger(L, slot);
  return ret(L, st, 1);
}

static const fld slot_f[] = {F(lmoe_slot_info, loaded, 'i'), F(lmoe_slot_info, targets, 'i'),
  F(lmoe_slot_info, fused, 'i'), F(lmoe_slot_info, rank_gate, 'i'), F(lmoe_slot_info, rank_up, 'i'),
  F(lmoe_slot_info, rank_down, 'i'), F(lmoe_slot_info, scale_gate, 'f'), F(lmoe_slot_info, scale_up, 'f'),
  F(lmoe_slot_info, scale_down, 'f'), F(lmoe_slot_info, max_rank, 'i'), F(lmoe_slot_info, bytes, 'I'),
  F(lmoe_slot_info, generation, 'u'), {0}};
static int l_pool_slot_info(lua_State *L) {
  lmoe_pool *p = POOL(1);
  lmoe_slot_info s = {0};
  return ret_struct(L, lmoe_pool_slot_info(p, check_i32(L, 2), &s), slot_f, &s);
}

static int l_pool_load_peft(lua_State *L) {
  lmoe_pool *p = POOL(1);
  const char *name = luaL_checkstring(L, 2);
  lmoe_peft *peft = (lmoe_peft *)checkh(L, 3, "peft");
  int32_t slot = -1;
  lmoe_status st = lmoe_pool_load_peft(p, name, peft, check_i32(L, 4), &slot);
  lua_pushinteger(L, slot);
  return ret(L, st, 1);
}
static int l_pool_find(lua_State *L) {
  lmoe_pool *p = POOL(1);
  int32_t slot = -1;
  lmoe_status st = lmoe_pool_find(p, luaL_checkstring(L, 2), &slot);
  lua_pushinteger(L, slot);
  return ret(L, st, 1);
}
static int l_pool_unload_named(lua_State *L) { lmoe_pool *p = POOL(1); return ret_st(L, lmoe_pool_unload_named(p, luaL_checkstring(L, 2))); }
static int l_pool_unload(lua_State *L) { lmoe_pool *p = POOL(1); return ret_st(L, lmoe_pool_unload(p, check_i32(L, 2))); }
static int l_pool_pin(lua_State *L) { lmoe_pool *p = POOL(1); return ret_st(L, lmoe_pool_pin(p, check_i32(L, 2))); }
static int l_pool_unpin(lua_State *L) { lmoe_pool *p = POOL(1); return ret_st(L, lmoe_pool_unpin(p, check_i32(L, 2))); }
static int l_pool_touch(lua_State *L) { lmoe_pool *p = POOL(1); return ret_st(L, lmoe_pool_touch(p, check_i32(L, 2))); }
static int l_pool_pin_count(lua_State *L) { lmoe_pool *p = POOL(1); lua_pushinteger(L, lmoe_pool_pin_count(p, check_i32(L, 2))); return 1; }
static int l_pool_slot_name(lua_State *L) { lmoe_pool *p = POOL(1); lua_pushstring(L, lmoe_pool_slot_name(p, check_i32(L, 2))); return 1; }
static const fld memory_f[] = {F(lmoe_pool_memory, slot_bytes, 'I'), F(lmoe_pool_memory, total_bytes, 'I'),
  F(lmoe_pool_memory, num_slots, 'i'), F(lmoe_pool_memory, loaded_slots, 'i'), F(lmoe_pool_memory, loaded_bytes, 'I'),
  F(lmoe_pool_memory, used_bytes, 'I'), F(lmoe_pool_memory, evictions, 'I'), {0}};
static int l_pool_get_memory(lua_State *L) {
  lmoe_pool_memory m = {0};
  return ret_struct(L, lmoe_pool_get_memory(POOL(1), &m), memory_f, &m);
}

/* ------------------------------------------------------------------ batches, forwards, graphs */

#define BATCH(i) ((lmoe_batch *)checkh(L, i, "batch"))

static const fld batch_cfg_f[] = {F(lmoe_batch_config, staging_depth, 'i'), {0}};
/* batch_create(ctx, {staging_depth=}?) -> st, box */
static int l_batch_create(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  if (lua_isnoneornil(L, 2)) CREATE("batch", rel_batch_release, 0, lmoe_batch, lmoe_batch_create(ctx, &out));
  lmoe_batch_config c;
  lmoe_batch_config_init(&c);
  get_struct(L, 2, batch_cfg_f, &c);
  CREATE("batch", rel_batch_release, 0, lmoe_batch, lmoe_batch_create_with(ctx, &c, &out));
}

/* batch_set(batch, pool?, n, tokens_i32, slots_i32) */
static int l_batch_set(lua_State *L) {
  lmoe_batch *b = BATCH(1);
  lmoe_pool *p = (lmoe_pool *)opth(L, 2, "pool");
  int32_t n = check_i32(L, 3);
  const int32_t *tokens = (const int32_t *)checkmem(L, 4, M_I32, n);
  return ret_st(L, lmoe_batch_set(b, p, n, tokens, (const int32_t *)checkmem(L, 5, M_I32, n)));
}

static const fld batch_f[] = {F(lmoe_batch_info, num_requests, 'i'), F(lmoe_batch_info, num_tokens, 'I'),
  F(lmoe_batch_info, has_active, 'i'), F(lmoe_batch_info, num_active, 'i'), F(lmoe_batch_info, max_rank, 'i'),
  F(lmoe_batch_info, max_slot, 'i'), {0}};
static int l_batch_get_info(lua_State *L) {
  lmoe_batch_info i = {0};
  return ret_struct(L, lmoe_batch_get_info(BATCH(1), &i), batch_f, &i);
}

/* batch_offsets(batch, mem_i64, capacity) -> written */
static int l_batch_offsets(lua_State *L) {
  lmoe_batch *b = BATCH(1);
  int32_t cap = check_i32(L, 3);
  lua_pushinteger(L, lmoe_batch_offsets(b, (int64_t *)checkmem(L, 2, M_I64, cap), cap));
  return 1;
}

/* batch_active_slots(batch, mem_i32, mem_i64, capacity) -> written */
static int l_batch_active_slots(lua_State *L) {
  lmoe_batch *b = BATCH(1);
  int32_t cap = check_i32(L, 4);
  int32_t *s = (int32_t *)checkmem(L, 2, M_I32, cap);
  lua_pushinteger(L, lmoe_batch_active_slots(b, s, (int64_t *)checkmem(L, 3, M_I64, cap), cap));
  return 1;
}

/* The forward arguments at t, as boxes held by t during the call. */
static void check_args(lua_State *L, int t, lmoe_forward_args *a) {
  luaL_checktype(L, t, LUA_TTABLE);
  lmoe_forward_args_init(a);
  static const char *const k[] = {"layer", "pool", "batch", "x", "router_logits", "topk_ids", "topk_weights", "out"};
  static const char *const kind[] = {"layer", "pool", "batch", "buffer", "buffer", "buffer", "buffer", "buffer"};
  void *h[8];
  for (int i = 0; i < 8; i++) {
    lua_getfield(L, t, k[i]);
    h[i] = opth(L, -1, kind[i]);
    lua_pop(L, 1);
  }
  a->layer = h[0], a->pool = h[1], a->batch = h[2], a->x = h[3];
  a->router_logits = h[4], a->topk_ids = h[5], a->topk_weights = h[6], a->out = h[7];
}

static int l_forward(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  lmoe_forward_args a;
  check_args(L, 2, &a);
  return ret_st(L, lmoe_forward(ctx, &a, opt_ptr(L, 3)));
}

static int l_reference_forward(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  lmoe_forward_args a;
  check_args(L, 2, &a);
  return ret_st(L, lmoe_reference_forward(ctx, &a));
}

/* forward_group({ctx, ...}, {args, ...}): one sharded layer's ranks from this thread.
   The lists (and the boxes their tables hold) stay on the stack during the call. */
static int l_forward_group(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_Unsigned n = lua_rawlen(L, 1);
  if (n < 1 || n > 4096 || lua_rawlen(L, 2) != n) luaL_argerror(L, 2, "1..4096 contexts and as many args");
  lmoe_context **ctxs = (lmoe_context **)lua_newuserdatauv(L, n * sizeof *ctxs, 0);
  lmoe_forward_args *args = (lmoe_forward_args *)lua_newuserdatauv(L, n * sizeof *args, 0);
  const lmoe_forward_args **pa = (const lmoe_forward_args **)lua_newuserdatauv(L, n * sizeof *pa, 0);
  for (lua_Unsigned i = 0; i < n; i++) {
    lua_rawgeti(L, 1, (lua_Integer)i + 1);
    ctxs[i] = (lmoe_context *)checkh(L, lua_gettop(L), "context");
    lua_rawgeti(L, 2, (lua_Integer)i + 1);
    check_args(L, lua_gettop(L), &args[i]);
    pa[i] = &args[i];
    lua_pop(L, 2);
  }
  return ret_st(L, lmoe_forward_group((int32_t)n, ctxs, pa, NULL));
}

static int l_graph_begin(lua_State *L) { lmoe_context *c = CTX(1); return ret_st(L, lmoe_graph_begin(c, opt_ptr(L, 2))); }
static int l_graph_end(lua_State *L) {
  lmoe_context *c = CTX(1);
  void *s = opt_ptr(L, 2);
  CREATE("graph", rel_graph_release, 0, lmoe_graph, lmoe_graph_end(c, s, &out));
}
static int l_graph_launch(lua_State *L) {
  lmoe_graph *g = (lmoe_graph *)checkh(L, 1, "graph");
  return ret_st(L, lmoe_graph_launch(g, opt_ptr(L, 2)));
}

/* ------------------------------------------------------------------ safetensors */

#define ST(i) ((lmoe_safetensors *)checkh(L, i, "safetensors"))

static int l_safetensors_open(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  const char *path = luaL_checkstring(L, 2);
  CREATE("safetensors", rel_safetensors_close, 0, lmoe_safetensors, lmoe_safetensors_open(ctx, path, &out));
}

static int l_safetensors_open_memory(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  size_t len = 0;
  const char *data = luaL_checklstring(L, 2, &len), *name = luaL_checkstring(L, 3);
  CREATE("safetensors", rel_safetensors_close, 0, lmoe_safetensors,
         lmoe_safetensors_open_memory(ctx, data, len, name, &out));
}

static int l_safetensors_count(lua_State *L) { lua_pushinteger(L, lmoe_safetensors_count(ST(1))); return 1; }

static const fld tensor_f[] = {F(lmoe_tensor_info, name, 's'), F(lmoe_tensor_info, dtype_name, 's'),
  F(lmoe_tensor_info, dtype, 'i'), F(lmoe_tensor_info, numel, 'I'), F(lmoe_tensor_info, offset, 'u'),
  F(lmoe_tensor_info, bytes, 'u'), {0}};
static int l_safetensors_tensor(lua_State *L) {
  lmoe_safetensors *s = ST(1);
  lmoe_tensor_info i = {0};
  lmoe_status st = lmoe_safetensors_tensor(s, check_i32(L, 2), &i);
  int n = ret_struct(L, st, tensor_f, &i);
  if (st == LMOE_OK) set_dims(L, "shape", i.shape, i.ndim < LMOE_TENSOR_MAX_DIMS ? i.ndim : LMOE_TENSOR_MAX_DIMS);
  return n;
}

static int l_safetensors_find(lua_State *L) {
  lmoe_safetensors *s = ST(1);
  int32_t idx = -1;
  lmoe_status st = lmoe_safetensors_find(s, luaL_checkstring(L, 2), &idx);
  lua_pushinteger(L, idx);
  return ret(L, st, 1);
}

/* safetensors_read(st, index, mem_f64, count) */
static int l_safetensors_read(lua_State *L) {
  lmoe_safetensors *s = ST(1);
  int32_t idx = check_i32(L, 2);
  lua_Integer n = luaL_checkinteger(L, 4);
  return ret_st(L, lmoe_safetensors_read(s, idx, checkmem(L, 3, M_F64, n), LMOE_DTYPE_F64, n));
}

static int l_safetensors_metadata_count(lua_State *L) { lua_pushinteger(L, lmoe_safetensors_metadata_count(ST(1))); return 1; }
static int l_safetensors_metadata(lua_State *L) {
  lmoe_safetensors *s = ST(1);
  const char *k = NULL, *v = NULL;
  lmoe_status st = lmoe_safetensors_metadata(s, check_i32(L, 2), &k, &v);
  lua_pushstring(L, k ? k : "");
  lua_pushstring(L, v ? v : "");
  return ret(L, st, 2);
}

/* safetensors_write(ctx, path, entries, keys, values): entries {name=, dtype=, shape=,
   data=buffer box} whose buffers hold at least shape's elements of dtype in host
   memory; keys/values lists of strings. Every string and box stays referenced by the
   argument tables on the stack during the call. */
static int l_safetensors_write(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  const char *path = luaL_checkstring(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  luaL_checktype(L, 4, LUA_TTABLE);
  luaL_checktype(L, 5, LUA_TTABLE);
  lua_Unsigned n = lua_rawlen(L, 3), nm = lua_rawlen(L, 4);
  if (n > INT32_MAX || nm > INT32_MAX || lua_rawlen(L, 5) != nm) luaL_argerror(L, 3, "bad lengths");
  lmoe_tensor_entry *e = (lmoe_tensor_entry *)lua_newuserdatauv(L, (n ? n : 1) * sizeof *e, 0);
  const char **keys = (const char **)lua_newuserdatauv(L, (nm ? nm : 1) * sizeof(char *), 0);
  const char **vals = (const char **)lua_newuserdatauv(L, (nm ? nm : 1) * sizeof(char *), 0);
  for (lua_Unsigned i = 0; i < n; i++) {
    memset(&e[i], 0, sizeof e[i]);
    if (lua_rawgeti(L, 3, (lua_Integer)i + 1) != LUA_TTABLE) luaL_argerror(L, 3, "entries must be tables");
    int ti = lua_gettop(L);
    if (lua_getfield(L, ti, "name") != LUA_TSTRING) luaL_argerror(L, 3, "entry names must be strings");
    e[i].name = lua_tostring(L, -1);
    lua_getfield(L, ti, "dtype");
    e[i].dtype = check_i32(L, -1);
    lua_getfield(L, ti, "shape");
    e[i].ndim = check_shape(L, lua_gettop(L), e[i].shape, LMOE_TENSOR_MAX_DIMS);
    lua_getfield(L, ti, "data");
    lmoe_buffer_desc d = {0};
    if (lmoe_buffer_describe((lmoe_buffer *)checkh(L, -1, "buffer"), &d)) luaL_argerror(L, 3, "a buffer without a description");
    int64_t numel = 1;
    for (int k = 0; k < e[i].ndim; k++)
      if (numel >= 0) numel = mul3(numel, e[i].shape[k], 1);
    if (d.memory != LMOE_MEMORY_HOST && lmoe_context_backend(ctx) != LMOE_BACKEND_CPU) luaL_argerror(L, 3, "data not in host memory");
    if (d.dtype != e[i].dtype || numel < 0 || numel > d.numel) luaL_argerror(L, 3, "data smaller than its shape");
    e[i].data = d.data;
    lua_pop(L, 5); /* the entry table at 3 keeps name, shape and buffer referenced */
  }
  for (lua_Unsigned i = 0; i < nm; i++) {
    if (lua_rawgeti(L, 4, (lua_Integer)i + 1) != LUA_TSTRING || lua_rawgeti(L, 5, (lua_Integer)i + 1) != LUA_TSTRING)
      luaL_argerror(L, 4, "metadata must be strings");
    keys[i] = lua_tostring(L, -2);
    vals[i] = lua_tostring(L, -1);
    lua_pop(L, 2);
  }
  return ret_st(L, lmoe_safetensors_write(ctx, path, (int32_t)n, e, (int32_t)nm, keys, vals));
}

/* ------------------------------------------------------------------ PEFT adapters */

#define PEFT(i) ((lmoe_peft *)checkh(L, i, "peft"))

static int l_peft_open(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  const char *path = luaL_checkstring(L, 2);
  CREATE("peft", rel_peft_close, 0, lmoe_peft, lmoe_peft_open(ctx, path, &out));
}

static const fld peft_f[] = {F(lmoe_peft_info, family, 'i'), F(lmoe_peft_info, layout, 'i'),
  F(lmoe_peft_info, rank, 'i'), F(lmoe_peft_info, alpha, 'f'), F(lmoe_peft_info, use_rslora, 'i'),
  F(lmoe_peft_info, targets, 'i'), F(lmoe_peft_info, num_layers, 'i'), F(lmoe_peft_info, min_layer, 'i'),
  F(lmoe_peft_info, max_layer, 'i'), F(lmoe_peft_info, num_experts, 'i'), F(lmoe_peft_info, max_rank, 'i'),
  F(lmoe_peft_info, has_patterns, 'i'), F(lmoe_peft_info, num_tensors, 'i'), F(lmoe_peft_info, bytes, 'I'), {0}};
static int l_peft_get_info(lua_State *L) {
  lmoe_peft_info i;
  lmoe_peft_info_init(&i);
  return ret_struct(L, lmoe_peft_get_info(PEFT(1), &i), peft_f, &i);
}

/* peft_layers(peft, mem_i32, capacity) -> written */
static int l_peft_layers(lua_State *L) {
  lmoe_peft *p = PEFT(1);
  int32_t cap = check_i32(L, 3);
  lua_pushinteger(L, lmoe_peft_layers(p, (int32_t *)checkmem(L, 2, M_I32, cap), cap));
  return 1;
}

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

static const fld synthetic_f[] = {F(lmoe_peft_synthetic, family, 'i'), F(lmoe_peft_synthetic, layout, 'i'),
  F(lmoe_peft_synthetic, num_layers, 'i'), F(lmoe_peft_synthetic, num_experts, 'i'),
  F(lmoe_peft_synthetic, hidden, 'i'), F(lmoe_peft_synthetic, intermediate, 'i'), F(lmoe_peft_synthetic, targets, 'i'),
  F(lmoe_peft_synthetic, rank, 'i'), F(lmoe_peft_synthetic, alpha, 'f'), F(lmoe_peft_synthetic, use_rslora, 'i'),
  F(lmoe_peft_synthetic, dtype, 'i'), F(lmoe_peft_synthetic, seed, 'u'), F(lmoe_peft_synthetic, scale, 'f'),
  F(lmoe_peft_synthetic, rank_pattern_key, 's'), F(lmoe_peft_synthetic, rank_pattern_value, 'i'),
  F(lmoe_peft_synthetic, alpha_pattern_key, 's'), F(lmoe_peft_synthetic, alpha_pattern_value, 'f'), {0}};

/* peft_write_synthetic(ctx, dir, spec): spec with the C field names; the pattern keys
   are strings of spec, which stays on the stack during the call. */
static int l_peft_write_synthetic(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  const char *dir = luaL_checkstring(L, 2);
  lmoe_peft_synthetic s;
  lmoe_peft_synthetic_init(&s);
  get_struct(L, 3, synthetic_f, &s);
  return ret_st(L, lmoe_peft_write_synthetic(ctx, dir, &s));
}

/* ------------------------------------------------------------------ communicators */

#define COMM(i) ((lmoe_comm *)checkh(L, i, "comm"))

/* comm_create_local({ctx, ...}) -> st, {box, ...} | st, message. The boxes are made
   before the communicators, so none leaks when Lua runs out of memory. */
static int l_comm_create_local(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Unsigned n = lua_rawlen(L, 1);
  if (n < 1 || n > 4096) luaL_argerror(L, 1, "1..4096 contexts");
  lmoe_context **ctxs = (lmoe_context **)lua_newuserdatauv(L, n * sizeof *ctxs, 0);
  lmoe_comm **out = (lmoe_comm **)lua_newuserdatauv(L, n * sizeof *out, 0);
  for (lua_Unsigned i = 0; i < n; i++) {
    lua_rawgeti(L, 1, (lua_Integer)i + 1);
    ctxs[i] = (lmoe_context *)checkh(L, lua_gettop(L), "context");
    lua_pop(L, 1);
  }
  lua_createtable(L, (int)n, 0);
  int t = lua_gettop(L);
  lbox **boxes = (lbox **)lua_newuserdatauv(L, n * sizeof *boxes, 0);
  for (lua_Unsigned i = 0; i < n; i++) {
    boxes[i] = newbox(L, "comm", rel_comm_release, 0);
    lua_rawseti(L, t, (lua_Integer)i + 1);
  }
  char err[256] = "";
  lmoe_status st = lmoe_comm_create_local((int32_t)n, ctxs, out, err, sizeof err);
  if (st != LMOE_OK) {
    lua_pushinteger(L, st);
    lua_pushstring(L, err);
    return 2;
  }
  for (lua_Unsigned i = 0; i < n; i++) boxes[i]->h = out[i];
  lua_pushvalue(L, t);
  return ret(L, st, 1);
}

static int l_comm_wrap_nccl(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  void *p = opt_ptr(L, 2);
  CREATE("comm", rel_comm_release, 0, lmoe_comm, lmoe_comm_wrap_nccl(ctx, p, &out));
}
static int l_comm_rank(lua_State *L) { lua_pushinteger(L, lmoe_comm_rank(COMM(1))); return 1; }
static int l_comm_size(lua_State *L) { lua_pushinteger(L, lmoe_comm_size(COMM(1))); return 1; }

/* ------------------------------------------------------------------ checkpoints */

#define CK(i) ((lmoe_checkpoint *)checkh(L, i, "checkpoint"))

static int l_checkpoint_open(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  const char *path = luaL_checkstring(L, 2);
  CREATE("checkpoint", rel_checkpoint_close, 0, lmoe_checkpoint, lmoe_checkpoint_open(ctx, path, &out));
}

static const fld ck_f[] = {F(lmoe_checkpoint_layer_info, family, 'i'), F(lmoe_checkpoint_layer_info, num_experts, 'i'),
  F(lmoe_checkpoint_layer_info, hidden, 'i'), F(lmoe_checkpoint_layer_info, intermediate, 'i'),
  F(lmoe_checkpoint_layer_info, has_router, 'i'), F(lmoe_checkpoint_layer_info, weight_dtype, 'i'), {0}};
static int l_checkpoint_get_layer_info(lua_State *L) {
  lmoe_checkpoint *c = CK(1);
  lmoe_checkpoint_layer_info i;
  lmoe_checkpoint_layer_info_init(&i);
  return ret_struct(L, lmoe_checkpoint_get_layer_info(c, check_i32(L, 2), &i), ck_f, &i);
}

/* checkpoint_load_layer(ck, index, layer, with_router) -> st, router box (empty
   without). The box owns a router made even when the load then failed. */
static int l_checkpoint_load_layer(lua_State *L) {
  lmoe_checkpoint *c = CK(1);
  int32_t idx = check_i32(L, 2);
  lmoe_layer *l = LAYER(3);
  int want = lua_toboolean(L, 4);
  CREATE("buffer", rel_buffer_release, 0, lmoe_buffer, lmoe_checkpoint_load_layer(c, idx, l, want ? &out : NULL));
}

static int l_checkpoint_quantize_fp8(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  return ret_st(L, lmoe_checkpoint_quantize_fp8(ctx, luaL_checkstring(L, 2), luaL_checkstring(L, 3)));
}

/* ------------------------------------------------------------------ registration */

#define CORE_FUNCTIONS X(version) X(status_string) X(has_cuda) X(device_count) X(device_get_info) \
  X(dtype_size) X(dtype_name) X(lora_scale) X(now) X(pointer) X(address) X(mem) X(pack) X(unpack) \
  X(context_create) X(context_retain) X(context_is_live) X(context_last_error) X(context_backend) \
  X(context_threads) X(context_guard) X(context_set_guard) X(context_stream) X(context_synchronize) \
  X(context_counters) X(context_wait_counters) X(context_reset_counters) X(buffer_create) X(buffer_wrap) X(buffer_describe) \
  X(buffer_write) X(buffer_read) X(buffer_fill_random) X(buffer_fill) X(buffer_compare) X(layer_create) \
  X(layer_get_config) X(layer_randomize) X(layer_set_weights) X(layer_set_expert) X(layer_weights) \
  X(pool_create) X(pool_get_config) X(pool_load_random) X(pool_load) X(pool_unload) X(pool_slot_info) \
  X(pool_load_named) X(pool_load_peft) X(pool_unload_named) X(pool_find) X(pool_slot_name) X(pool_pin) \
  X(pool_unpin) X(pool_pin_count) X(pool_touch) X(pool_get_memory) X(batch_create) X(batch_set) \
  X(batch_get_info) X(batch_offsets) X(batch_active_slots) X(forward) X(reference_forward) X(graph_begin) \
  X(graph_end) X(graph_launch) X(safetensors_open) X(safetensors_open_memory) X(safetensors_count) \
  X(safetensors_tensor) X(safetensors_find) X(safetensors_read) X(safetensors_metadata_count) \
  X(safetensors_metadata) X(safetensors_write) X(peft_open) X(peft_get_info) X(peft_layers) X(peft_inspect) \
  X(peft_layer_desc) X(peft_write_synthetic) X(checkpoint_open) X(checkpoint_get_layer_info) \
  X(checkpoint_load_layer) X(checkpoint_quantize_fp8) X(has_nccl) X(comm_create_local) X(comm_wrap_nccl) X(comm_rank) X(comm_size) \
  X(forward_group)
#define X(n) {#n, l_##n},
static const luaL_Reg lib[] = {CORE_FUNCTIONS {"close", box_gc}, {NULL, NULL}};
#undef X

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
