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
  if (n < 0 || (lua_Unsigned)n > lua_rawlen(L, 2)) luaL_argerror(L, 3, "more than the table holds");
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

/* Field k of the table at t as an int32 (def when nil). */
static int32_t field_i32(lua_State *L, int t, const char *k, int32_t def) {
  lua_Integer v = def;
  if (lua_getfield(L, t, k) != LUA_TNIL) {
    int isint = 0;
    v = lua_tointegerx(L, -1, &isint);
    if (!isint || lua_type(L, -1) != LUA_TNUMBER || v < INT32_MIN || v > INT32_MAX)
      luaL_error(L, "loramoe.core: field '%s' must be an int32", k);
  }
  lua_pop(L, 1);
  return (int32_t)v;
}

static double field_num(lua_State *L, int t, const char *k, double def) {
  double v = def;
  if (lua_getfield(L, t, k) != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TNUMBER) luaL_error(L, "loramoe.core: field '%s' must be a number", k);
    v = lua_tonumber(L, -1);
  }
  lua_pop(L, 1);
  return v;
}

static uint64_t field_u64(lua_State *L, int t, const char *k, uint64_t def) {
  uint64_t v = def;
  if (lua_getfield(L, t, k) != LUA_TNIL) {
    int isint = 0;
    v = (uint64_t)lua_tointegerx(L, -1, &isint);
    if (!isint || lua_type(L, -1) != LUA_TNUMBER) luaL_error(L, "loramoe.core: field '%s' must be an integer", k);
  }
  lua_pop(L, 1);
  return v;
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

static void set_int(lua_State *L, const char *k, lua_Integer v) { lua_pushinteger(L, v); lua_setfield(L, -2, k); }
static void set_num(lua_State *L, const char *k, lua_Number v) { lua_pushnumber(L, v); lua_setfield(L, -2, k); }
static void set_str(lua_State *L, const char *k, const char *v) { lua_pushstring(L, v ? v : ""); lua_setfield(L, -2, k); }

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

/* ------------------------------------------------------------------ library */

static int l_version(lua_State *L) { lua_pushstring(L, lmoe_version()); return 1; }
static int l_status_string(lua_State *L) { lua_pushstring(L, lmoe_status_string((lmoe_status)check_i32(L, 1))); return 1; }
static int l_has_cuda(lua_State *L) { lua_pushinteger(L, lmoe_has_cuda()); return 1; }
static int l_device_count(lua_State *L) {
  int32_t n = 0;
  lmoe_status st = lmoe_device_count(&n);
  lua_pushinteger(L, n);
  return ret(L, st, 1);
}
static int l_device_get_info(lua_State *L) {
  lmoe_device_info i;
  memset(&i, 0, sizeof i);
  i.struct_size = sizeof i;
  lmoe_status st = lmoe_device_get_info(check_i32(L, 1), &i);
  lua_newtable(L);
  i.name[sizeof i.name - 1] = 0;
  set_str(L, "name", i.name);
  set_int(L, "cc_major", i.cc_major);
  set_int(L, "cc_minor", i.cc_minor);
  set_int(L, "sm_count", i.sm_count);
  set_int(L, "memory_bytes", i.memory_bytes);
  set_int(L, "l2_bytes", i.l2_bytes);
  return ret(L, st, 1);
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

/* context_create{backend=, device=, threads=, guard=, stream=} -> st, box | st, message */
static int l_context_create(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  cfg.backend = field_i32(L, 1, "backend", cfg.backend);
  cfg.device = field_i32(L, 1, "device", cfg.device);
  cfg.threads = field_i32(L, 1, "threads", cfg.threads);
  cfg.guard = field_i32(L, 1, "guard", cfg.guard);
  lua_getfield(L, 1, "stream");
  cfg.stream = opt_ptr(L, -1);
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

/* context_retain(ptr) -> box: a new reference to a live context (the API checks it
   with context_is_live first). */
static int l_context_retain(lua_State *L) {
  void *p = opt_ptr(L, 1);
  if (!p || !lmoe_context_is_live(p)) luaL_argerror(L, 1, "not a live loramoe context");
  lbox *b = newbox(L, "context", rel_context_release, 0);
  lmoe_context_retain((lmoe_context *)p);
  b->h = p;
  return 1;
}

static int l_context_is_live(lua_State *L) {
  lua_pushboolean(L, lua_islightuserdata(L, 1) && lmoe_context_is_live(lua_touserdata(L, 1)));
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
static int l_context_set_guard(lua_State *L) { return ret_st(L, lmoe_context_set_guard(CTX(1), check_i32(L, 2))); }
static int l_context_stream(lua_State *L) {
  void *s = lmoe_context_stream(CTX(1));
  if (!s) return 0;
  lua_pushlightuserdata(L, s);
  return 1;
}
static int l_context_synchronize(lua_State *L) { return ret_st(L, lmoe_context_synchronize(CTX(1), opt_ptr(L, 2))); }
static int l_context_reset_counters(lua_State *L) { lmoe_context_reset_counters(CTX(1)); return 0; }
static int l_context_counters(lua_State *L) {
  lmoe_counters c;
  memset(&c, 0, sizeof c);
  lmoe_status st = lmoe_context_counters(CTX(1), &c);
  lua_newtable(L);
  set_int(L, "forwards", (lua_Integer)c.forwards);
  set_int(L, "launches", (lua_Integer)c.launches);
  set_int(L, "lora_launches", (lua_Integer)c.lora_launches);
  set_int(L, "host_waits", (lua_Integer)c.host_waits);
  set_int(L, "uploads", (lua_Integer)c.uploads);
  set_int(L, "bytes_uploaded", (lua_Integer)c.bytes_uploaded);
  set_int(L, "downloads", (lua_Integer)c.downloads);
  return ret(L, st, 1);
}

/* ------------------------------------------------------------------ buffers */

#define BUF(i) ((lmoe_buffer *)checkh(L, i, "buffer"))

static int l_buffer_create(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  int32_t dtype = check_i32(L, 2), memory = check_i32(L, 3);
  int64_t shape[LMOE_MAX_DIMS];
  int nd = check_shape(L, 4, shape, LMOE_MAX_DIMS);
  lbox *b = newbox(L, "buffer", rel_buffer_release, 0);
  lmoe_buffer *out = NULL;
  lmoe_status st = lmoe_buffer_create(ctx, dtype, memory, nd, shape, &out);
  b->h = out;
  return ret(L, st, 1);
}

/* buffer_wrap(ctx, dtype, memory, shape, ptr, owner): the API checks that ptr lies in
   owner's memory; owner is kept alive by the box. */
static int l_buffer_wrap(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  int32_t dtype = check_i32(L, 2), memory = check_i32(L, 3);
  int64_t shape[LMOE_MAX_DIMS];
  int nd = check_shape(L, 4, shape, LMOE_MAX_DIMS);
  void *p = opt_ptr(L, 5);
  lbox *b = newbox(L, "buffer", rel_buffer_release, 6);
  lmoe_buffer *out = NULL;
  lmoe_status st = lmoe_buffer_wrap(ctx, dtype, memory, nd, shape, p, &out);
  b->h = out;
  return ret(L, st, 1);
}

static int l_buffer_describe(lua_State *L) {
  lmoe_buffer_desc d;
  memset(&d, 0, sizeof d);
  lmoe_status st = lmoe_buffer_describe(BUF(1), &d);
  lua_newtable(L);
  set_int(L, "dtype", d.dtype);
  set_int(L, "memory", d.memory);
  set_int(L, "ndim", d.ndim);
  set_int(L, "numel", d.numel);
  set_int(L, "bytes", (lua_Integer)d.bytes);
  lua_createtable(L, d.ndim, 0);
  for (int i = 0; i < d.ndim && i < LMOE_MAX_DIMS; i++) {
    lua_pushinteger(L, d.shape[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "shape");
  lua_pushlightuserdata(L, d.data);
  lua_setfield(L, -2, "data");
  return ret(L, st, 1);
}

/* buffer_write(buf, offset, mem, count) / buffer_read(...): f64 values. */
static int l_buffer_write(lua_State *L) {
  lmoe_buffer *b = BUF(1);
  lua_Integer off = luaL_checkinteger(L, 2), n = luaL_checkinteger(L, 4);
  const void *src = checkmem(L, 3, M_F64, n);
  return ret_st(L, lmoe_buffer_write(b, off, src, LMOE_DTYPE_F64, n));
}
static int l_buffer_read(lua_State *L) {
  lmoe_buffer *b = BUF(1);
  lua_Integer off = luaL_checkinteger(L, 2), n = luaL_checkinteger(L, 4);
  void *dst = checkmem(L, 3, M_F64, n);
  return ret_st(L, lmoe_buffer_read(b, off, dst, LMOE_DTYPE_F64, n));
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
static int l_buffer_compare(lua_State *L) {
  lmoe_compare_result r;
  memset(&r, 0, sizeof r);
  lmoe_status st = lmoe_buffer_compare(BUF(1), BUF(2), &r);
  lua_newtable(L);
  set_num(L, "rel_l2", r.rel_l2);
  set_num(L, "max_abs", r.max_abs);
  set_num(L, "ref_l2", r.ref_l2);
  set_int(L, "nonfinite", (lua_Integer)r.nonfinite);
  set_int(L, "numel", (lua_Integer)r.numel);
  return ret(L, st, 1);
}

/* ------------------------------------------------------------------ layers */

#define LAYER(i) ((lmoe_layer *)checkh(L, i, "layer"))

static int l_layer_create(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  luaL_checktype(L, 2, LUA_TTABLE);
  lmoe_layer_config c;
  lmoe_layer_config_init(&c);
  c.num_experts = field_i32(L, 2, "num_experts", c.num_experts);
  c.hidden = field_i32(L, 2, "hidden", c.hidden);
  c.intermediate = field_i32(L, 2, "intermediate", c.intermediate);
  c.top_k = field_i32(L, 2, "top_k", c.top_k);
  c.renormalize = field_i32(L, 2, "renormalize", c.renormalize);
  c.max_tokens = field_i32(L, 2, "max_tokens", c.max_tokens);
  lbox *b = newbox(L, "layer", rel_layer_release, 0);
  lmoe_layer *out = NULL;
  lmoe_status st = lmoe_layer_create(ctx, &c, &out);
  b->h = out;
  return ret(L, st, 1);
}

static lmoe_status layer_config(lmoe_layer *l, lmoe_layer_config *c) {
  memset(c, 0, sizeof *c);
  c->struct_size = sizeof *c;
  return lmoe_layer_get_config(l, c);
}

static int l_layer_get_config(lua_State *L) {
  lmoe_layer_config c;
  lmoe_status st = layer_config(LAYER(1), &c);
  lua_newtable(L);
  set_int(L, "num_experts", c.num_experts);
  set_int(L, "hidden", c.hidden);
  set_int(L, "intermediate", c.intermediate);
  set_int(L, "top_k", c.top_k);
  set_int(L, "renormalize", c.renormalize);
  set_int(L, "max_tokens", c.max_tokens);
  return ret(L, st, 1);
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
  int64_t n = mul3(c.intermediate, c.hidden, 1);
  const void *p[3];
  for (int i = 0; i < 3; i++) p[i] = lua_isnoneornil(L, 3 + i) ? NULL : checkmem(L, 3 + i, M_F64, n);
  return ret_st(L, lmoe_layer_set_expert(l, e, p[0], p[1], p[2], LMOE_DTYPE_F64));
}

/* layer_weights(layer, which) -> st, box borrowed from the layer (kept alive). */
static int l_layer_weights(lua_State *L) {
  lmoe_layer *l = LAYER(1);
  int32_t which = check_i32(L, 2);
  lbox *b = newbox(L, "buffer", NULL, 1);
  lmoe_buffer *out = NULL;
  lmoe_status st = lmoe_layer_weights(l, which, &out);
  b->h = out;
  return ret(L, st, 1);
}

/* ------------------------------------------------------------------ pools */

#define POOL(i) ((lmoe_pool *)checkh(L, i, "pool"))

/* pool_create(layer, {num_slots=, max_rank=}) -> st, box. The box keeps the layer's
   shapes (E, H, I as an i32 mem): pool_load checks arrays against them, and they stay
   right when the layer's own box is closed (the library keeps the layer for the pool). */
static int l_pool_create(lua_State *L) {
  lmoe_layer *l = LAYER(1);
  luaL_checktype(L, 2, LUA_TTABLE);
  lmoe_pool_config c;
  lmoe_pool_config_init(&c);
  c.num_slots = field_i32(L, 2, "num_slots", c.num_slots);
  c.max_rank = field_i32(L, 2, "max_rank", c.max_rank);
  lmoe_layer_config lc;
  if (layer_config(l, &lc)) luaL_error(L, "loramoe.core: the layer has no config");
  int32_t *dims = (int32_t *)newmem(L, M_I32, 3)->data;
  dims[0] = lc.num_experts;
  dims[1] = lc.hidden;
  dims[2] = lc.intermediate;
  lbox *b = newbox(L, "pool", rel_pool_release, -1);
  lmoe_pool *out = NULL;
  lmoe_status st = lmoe_pool_create(l, &c, &out);
  b->h = out;
  return ret(L, st, 1);
}

static int l_pool_get_config(lua_State *L) {
  lmoe_pool_config c;
  memset(&c, 0, sizeof c);
  c.struct_size = sizeof c;
  lmoe_status st = lmoe_pool_get_config(POOL(1), &c);
  lua_newtable(L);
  set_int(L, "num_slots", c.num_slots);
  set_int(L, "max_rank", c.max_rank);
  return ret(L, st, 1);
}

static int l_pool_load_random(lua_State *L) {
  lmoe_pool *p = POOL(1);
  int32_t slot = check_i32(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  lmoe_random_adapter s;
  lmoe_random_adapter_init(&s);
  s.targets = field_i32(L, 3, "targets", s.targets);
  s.fused = field_i32(L, 3, "fused", s.fused);
  s.rank = field_i32(L, 3, "rank", s.rank);
  s.alpha = (float)field_num(L, 3, "alpha", s.alpha);
  s.use_rslora = field_i32(L, 3, "use_rslora", s.use_rslora);
  s.seed = field_u64(L, 3, "seed", s.seed);
  s.scale = (float)field_num(L, 3, "scale", s.scale);
  return ret_st(L, lmoe_pool_load_random(p, slot, &s));
}

/* The adapter description at t ({gate=, up=, gate_up=, down=}, each {a=mem, b=mem,
   rank=, scale=}) for the pool at idx: every array is checked to hold what C reads
   for the pool's layer (its shapes are the pool box's uservalue). The mems stay referenced
   by t, on the stack, during the call. */
static void check_desc(lua_State *L, int pool, int t, lmoe_adapter_desc *d) {
  luaL_checktype(L, t, LUA_TTABLE);
  lua_getiuservalue(L, pool, 1);
  const int32_t *dims = (const int32_t *)checkmem(L, -1, M_I32, 3);
  lmoe_layer_config c = {.num_experts = dims[0], .hidden = dims[1], .intermediate = dims[2]};
  lua_pop(L, 1); /* the box keeps it */
  lmoe_adapter_desc_init(d);
  d->dtype = LMOE_DTYPE_F64;
  static const char *const names[] = {"gate", "up", "gate_up", "down"};
  lmoe_lora_part *parts[] = {&d->gate, &d->up, &d->gate_up, &d->down};
  int64_t in[] = {c.hidden, c.hidden, c.hidden, c.intermediate};
  int64_t out[] = {c.intermediate, c.intermediate, 2 * (int64_t)c.intermediate, c.hidden};
  for (int i = 0; i < 4; i++) {
    if (lua_getfield(L, t, names[i]) == LUA_TTABLE) {
      int pi = lua_gettop(L);
      int32_t r = field_i32(L, pi, "rank", 0);
      lua_getfield(L, pi, "a");
      lua_getfield(L, pi, "b");
      parts[i]->a = checkmem(L, pi + 1, M_F64, mul3(c.num_experts, r, in[i]));
      parts[i]->b = checkmem(L, pi + 2, M_F64, mul3(c.num_experts, out[i], r));
      parts[i]->rank = r;
      parts[i]->scale = (float)field_num(L, pi, "scale", 1.0);
      lua_pop(L, 2);
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

static int l_pool_unload(lua_State *L) { lmoe_pool *p = POOL(1); return ret_st(L, lmoe_pool_unload(p, check_i32(L, 2))); }

static int l_pool_slot_info(lua_State *L) {
  lmoe_pool *p = POOL(1);
  lmoe_slot_info s;
  memset(&s, 0, sizeof s);
  lmoe_status st = lmoe_pool_slot_info(p, check_i32(L, 2), &s);
  lua_newtable(L);
  set_int(L, "loaded", s.loaded);
  set_int(L, "targets", s.targets);
  set_int(L, "fused", s.fused);
  set_int(L, "rank_gate", s.rank_gate);
  set_int(L, "rank_up", s.rank_up);
  set_int(L, "rank_down", s.rank_down);
  set_num(L, "scale_gate", s.scale_gate);
  set_num(L, "scale_up", s.scale_up);
  set_num(L, "scale_down", s.scale_down);
  set_int(L, "max_rank", s.max_rank);
  set_int(L, "bytes", s.bytes);
  set_int(L, "generation", (lua_Integer)s.generation);
  return ret(L, st, 1);
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
static int l_pool_unload_named(lua_State *L) { lmoe_pool *p = POOL(1); return ret_st(L, lmoe_pool_unload_named(p, luaL_checkstring(L, 2))); }
static int l_pool_find(lua_State *L) {
  lmoe_pool *p = POOL(1);
  int32_t slot = -1;
  lmoe_status st = lmoe_pool_find(p, luaL_checkstring(L, 2), &slot);
  lua_pushinteger(L, slot);
  return ret(L, st, 1);
}
static int l_pool_slot_name(lua_State *L) {
  lmoe_pool *p = POOL(1);
  lua_pushstring(L, lmoe_pool_slot_name(p, check_i32(L, 2)));
  return 1;
}
static int l_pool_pin(lua_State *L) { lmoe_pool *p = POOL(1); return ret_st(L, lmoe_pool_pin(p, check_i32(L, 2))); }
static int l_pool_unpin(lua_State *L) { lmoe_pool *p = POOL(1); return ret_st(L, lmoe_pool_unpin(p, check_i32(L, 2))); }
static int l_pool_touch(lua_State *L) { lmoe_pool *p = POOL(1); return ret_st(L, lmoe_pool_touch(p, check_i32(L, 2))); }
static int l_pool_pin_count(lua_State *L) {
  lmoe_pool *p = POOL(1);
  lua_pushinteger(L, lmoe_pool_pin_count(p, check_i32(L, 2)));
  return 1;
}
static int l_pool_get_memory(lua_State *L) {
  lmoe_pool_memory m;
  memset(&m, 0, sizeof m);
  lmoe_status st = lmoe_pool_get_memory(POOL(1), &m);
  lua_newtable(L);
  set_int(L, "slot_bytes", m.slot_bytes);
  set_int(L, "total_bytes", m.total_bytes);
  set_int(L, "num_slots", m.num_slots);
  set_int(L, "loaded_slots", m.loaded_slots);
  set_int(L, "loaded_bytes", m.loaded_bytes);
  set_int(L, "used_bytes", m.used_bytes);
  set_int(L, "evictions", m.evictions);
  return ret(L, st, 1);
}

/* ------------------------------------------------------------------ batches, forwards, graphs */

#define BATCH(i) ((lmoe_batch *)checkh(L, i, "batch"))

static int l_batch_create(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  lbox *b = newbox(L, "batch", rel_batch_release, 0);
  lmoe_batch *out = NULL;
  lmoe_status st = lmoe_batch_create(ctx, &out);
  b->h = out;
  return ret(L, st, 1);
}

/* batch_set(batch, pool?, n, tokens_i32, slots_i32) */
static int l_batch_set(lua_State *L) {
  lmoe_batch *b = BATCH(1);
  lmoe_pool *p = (lmoe_pool *)opth(L, 2, "pool");
  int32_t n = check_i32(L, 3);
  const int32_t *tokens = (const int32_t *)checkmem(L, 4, M_I32, n);
  const int32_t *slots = (const int32_t *)checkmem(L, 5, M_I32, n);
  return ret_st(L, lmoe_batch_set(b, p, n, tokens, slots));
}

static int l_batch_get_info(lua_State *L) {
  lmoe_batch_info i;
  memset(&i, 0, sizeof i);
  lmoe_status st = lmoe_batch_get_info(BATCH(1), &i);
  lua_newtable(L);
  set_int(L, "num_requests", i.num_requests);
  set_int(L, "num_tokens", i.num_tokens);
  set_int(L, "has_active", i.has_active);
  set_int(L, "num_active", i.num_active);
  set_int(L, "max_rank", i.max_rank);
  set_int(L, "max_slot", i.max_slot);
  return ret(L, st, 1);
}

/* batch_offsets(batch, mem_i64, capacity) -> written */
static int l_batch_offsets(lua_State *L) {
  lmoe_batch *b = BATCH(1);
  int32_t cap = check_i32(L, 3);
  int64_t *out = (int64_t *)checkmem(L, 2, M_I64, cap);
  lua_pushinteger(L, lmoe_batch_offsets(b, out, cap));
  return 1;
}

/* batch_active_slots(batch, mem_i32, mem_i64, capacity) -> written */
static int l_batch_active_slots(lua_State *L) {
  lmoe_batch *b = BATCH(1);
  int32_t cap = check_i32(L, 4);
  int32_t *s = (int32_t *)checkmem(L, 2, M_I32, cap);
  int64_t *t = (int64_t *)checkmem(L, 3, M_I64, cap);
  lua_pushinteger(L, lmoe_batch_active_slots(b, s, t, cap));
  return 1;
}

/* The forward arguments at t: {layer=, pool=, batch=, x=, router_logits=, topk_ids=,
   topk_weights=, out=} as boxes. */
static void check_args(lua_State *L, int t, lmoe_forward_args *a) {
  luaL_checktype(L, t, LUA_TTABLE);
  lmoe_forward_args_init(a);
  static const char *const k[] = {"layer", "pool", "batch", "x", "router_logits", "topk_ids", "topk_weights", "out"};
  static const char *const kind[] = {"layer", "pool", "batch", "buffer", "buffer", "buffer", "buffer", "buffer"};
  void *h[8];
  for (int i = 0; i < 8; i++) {
    lua_getfield(L, t, k[i]);
    h[i] = opth(L, -1, kind[i]);
    lua_pop(L, 1); /* the table holds the box */
  }
  a->layer = h[0];
  a->pool = h[1];
  a->batch = h[2];
  a->x = h[3];
  a->router_logits = h[4];
  a->topk_ids = h[5];
  a->topk_weights = h[6];
  a->out = h[7];
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

static int l_graph_begin(lua_State *L) { lmoe_context *c = CTX(1); return ret_st(L, lmoe_graph_begin(c, opt_ptr(L, 2))); }
static int l_graph_end(lua_State *L) {
  lmoe_context *c = CTX(1);
  void *s = opt_ptr(L, 2);
  lbox *b = newbox(L, "graph", rel_graph_release, 0);
  lmoe_graph *g = NULL;
  lmoe_status st = lmoe_graph_end(c, s, &g);
  b->h = g;
  return ret(L, st, 1);
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
  lbox *b = newbox(L, "safetensors", rel_safetensors_close, 0);
  lmoe_safetensors *out = NULL;
  lmoe_status st = lmoe_safetensors_open(ctx, path, &out);
  b->h = out;
  return ret(L, st, 1);
}

static int l_safetensors_open_memory(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  size_t len = 0;
  const char *data = luaL_checklstring(L, 2, &len);
  const char *name = luaL_checkstring(L, 3);
  lbox *b = newbox(L, "safetensors", rel_safetensors_close, 0);
  lmoe_safetensors *out = NULL;
  lmoe_status st = lmoe_safetensors_open_memory(ctx, data, len, name, &out);
  b->h = out;
  return ret(L, st, 1);
}

static int l_safetensors_count(lua_State *L) { lua_pushinteger(L, lmoe_safetensors_count(ST(1))); return 1; }

static int l_safetensors_tensor(lua_State *L) {
  lmoe_safetensors *s = ST(1);
  lmoe_tensor_info i;
  memset(&i, 0, sizeof i);
  lmoe_status st = lmoe_safetensors_tensor(s, check_i32(L, 2), &i);
  lua_newtable(L);
  set_str(L, "name", i.name);
  set_str(L, "dtype_name", i.dtype_name);
  set_int(L, "dtype", i.dtype);
  set_int(L, "numel", i.numel);
  set_int(L, "offset", (lua_Integer)i.offset);
  set_int(L, "bytes", (lua_Integer)i.bytes);
  lua_createtable(L, i.ndim, 0);
  for (int d = 0; d < i.ndim && d < LMOE_TENSOR_MAX_DIMS; d++) {
    lua_pushinteger(L, i.shape[d]);
    lua_rawseti(L, -2, d + 1);
  }
  lua_setfield(L, -2, "shape");
  return ret(L, st, 1);
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
  void *dst = checkmem(L, 3, M_F64, n);
  return ret_st(L, lmoe_safetensors_read(s, idx, dst, LMOE_DTYPE_F64, n));
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
    e[i].dtype = field_i32(L, ti, "dtype", 0);
    lua_getfield(L, ti, "shape");
    e[i].ndim = check_shape(L, lua_gettop(L), e[i].shape, LMOE_TENSOR_MAX_DIMS);
    lua_getfield(L, ti, "data");
    lmoe_buffer_desc d;
    memset(&d, 0, sizeof d);
    if (lmoe_buffer_describe((lmoe_buffer *)checkh(L, -1, "buffer"), &d)) luaL_argerror(L, 3, "a buffer without a description");
    int64_t numel = 1;
    for (int k = 0; k < e[i].ndim; k++)
      if (numel >= 0) numel = mul3(numel, e[i].shape[k], 1);
    if (d.memory != LMOE_MEMORY_HOST && lmoe_context_backend(ctx) != LMOE_BACKEND_CPU) luaL_argerror(L, 3, "data not in host memory");
    if (d.dtype != e[i].dtype || numel < 0 || numel > d.numel) luaL_argerror(L, 3, "data smaller than its shape");
    e[i].data = d.data;
    lua_pop(L, 4); /* the entry table at 3 keeps name, shape and buffer referenced */
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
  lbox *b = newbox(L, "peft", rel_peft_close, 0);
  lmoe_peft *out = NULL;
  lmoe_status st = lmoe_peft_open(ctx, path, &out);
  b->h = out;
  return ret(L, st, 1);
}

static int l_peft_get_info(lua_State *L) {
  lmoe_peft_info i;
  lmoe_peft_info_init(&i);
  lmoe_status st = lmoe_peft_get_info(PEFT(1), &i);
  lua_newtable(L);
  set_int(L, "family", i.family);
  set_int(L, "layout", i.layout);
  set_int(L, "rank", i.rank);
  set_num(L, "alpha", i.alpha);
  set_int(L, "use_rslora", i.use_rslora);
  set_int(L, "targets", i.targets);
  set_int(L, "num_layers", i.num_layers);
  set_int(L, "min_layer", i.min_layer);
  set_int(L, "max_layer", i.max_layer);
  set_int(L, "num_experts", i.num_experts);
  set_int(L, "max_rank", i.max_rank);
  set_int(L, "has_patterns", i.has_patterns);
  set_int(L, "num_tensors", i.num_tensors);
  set_int(L, "bytes", i.bytes);
  return ret(L, st, 1);
}

/* peft_layers(peft, mem_i32, capacity) -> written */
static int l_peft_layers(lua_State *L) {
  lmoe_peft *p = PEFT(1);
  int32_t cap = check_i32(L, 3);
  int32_t *out = (int32_t *)checkmem(L, 2, M_I32, cap);
  lua_pushinteger(L, lmoe_peft_layers(p, out, cap));
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
   parts {a=, b=, rank=, scale=} as tables of numbers (copied out of the library's
   arrays, whose sizes follow from E, H, I and the rank it reports). */
static int l_peft_layer_desc(lua_State *L) {
  lmoe_peft *p = PEFT(1);
  int32_t layer = check_i32(L, 2), E = check_i32(L, 3), H = check_i32(L, 4), I = check_i32(L, 5);
  lmoe_adapter_desc d;
  lmoe_adapter_desc_init(&d);
  lmoe_status st = lmoe_peft_layer_desc(p, layer, E, H, I, &d);
  if (st) return ret_st(L, st);
  if (d.dtype != LMOE_DTYPE_F32) return ret_st(L, LMOE_ERR_UNSUPPORTED);
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
      const float *v = (const float *)(ab ? q->b : q->a);
      if (n < 0 || n > INT32_MAX) luaL_error(L, "loramoe.core: adapter part too large");
      lua_createtable(L, (int)n, 0);
      for (int64_t k = 0; k < n; k++) {
        lua_pushnumber(L, v[k]);
        lua_rawseti(L, -2, k + 1);
      }
      lua_setfield(L, -2, ab ? "b" : "a");
    }
    set_int(L, "rank", q->rank);
    set_num(L, "scale", q->scale);
    lua_setfield(L, -2, names[i]);
  }
  return ret(L, st, 1);
}

/* peft_write_synthetic(ctx, dir, spec): spec with the C field names; the pattern keys
   are strings of spec, referenced by it during the call. */
static int l_peft_write_synthetic(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  const char *dir = luaL_checkstring(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  lmoe_peft_synthetic s;
  lmoe_peft_synthetic_init(&s);
  s.family = field_i32(L, 3, "family", s.family);
  s.layout = field_i32(L, 3, "layout", s.layout);
  s.num_layers = field_i32(L, 3, "num_layers", s.num_layers);
  s.num_experts = field_i32(L, 3, "num_experts", s.num_experts);
  s.hidden = field_i32(L, 3, "hidden", s.hidden);
  s.intermediate = field_i32(L, 3, "intermediate", s.intermediate);
  s.targets = field_i32(L, 3, "targets", s.targets);
  s.rank = field_i32(L, 3, "rank", s.rank);
  s.alpha = (float)field_num(L, 3, "alpha", s.alpha);
  s.use_rslora = field_i32(L, 3, "use_rslora", s.use_rslora);
  s.dtype = field_i32(L, 3, "dtype", s.dtype);
  s.seed = field_u64(L, 3, "seed", s.seed);
  s.scale = (float)field_num(L, 3, "scale", s.scale);
  if (lua_getfield(L, 3, "rank_pattern_key") == LUA_TSTRING) {
    s.rank_pattern_key = lua_tostring(L, -1);
    s.rank_pattern_value = field_i32(L, 3, "rank_pattern_value", 0);
  }
  if (lua_getfield(L, 3, "alpha_pattern_key") == LUA_TSTRING) {
    s.alpha_pattern_key = lua_tostring(L, -1);
    s.alpha_pattern_value = (float)field_num(L, 3, "alpha_pattern_value", 0);
  }
  /* both keys stay on the stack until the call returns */
  return ret_st(L, lmoe_peft_write_synthetic(ctx, dir, &s));
}

/* ------------------------------------------------------------------ checkpoints */

#define CK(i) ((lmoe_checkpoint *)checkh(L, i, "checkpoint"))

static int l_checkpoint_open(lua_State *L) {
  lmoe_context *ctx = CTX(1);
  const char *path = luaL_checkstring(L, 2);
  lbox *b = newbox(L, "checkpoint", rel_checkpoint_close, 0);
  lmoe_checkpoint *out = NULL;
  lmoe_status st = lmoe_checkpoint_open(ctx, path, &out);
  b->h = out;
  return ret(L, st, 1);
}

static int l_checkpoint_get_layer_info(lua_State *L) {
  lmoe_checkpoint *c = CK(1);
  lmoe_checkpoint_layer_info i;
  lmoe_checkpoint_layer_info_init(&i);
  lmoe_status st = lmoe_checkpoint_get_layer_info(c, check_i32(L, 2), &i);
  lua_newtable(L);
  set_int(L, "family", i.family);
  set_int(L, "num_experts", i.num_experts);
  set_int(L, "hidden", i.hidden);
  set_int(L, "intermediate", i.intermediate);
  set_int(L, "has_router", i.has_router);
  return ret(L, st, 1);
}

/* checkpoint_load_layer(ck, index, layer, with_router) -> st, router box | nil */
static int l_checkpoint_load_layer(lua_State *L) {
  lmoe_checkpoint *c = CK(1);
  int32_t idx = check_i32(L, 2);
  lmoe_layer *l = LAYER(3);
  int want = lua_toboolean(L, 4);
  lbox *b = newbox(L, "buffer", rel_buffer_release, 0);
  lmoe_buffer *router = NULL;
  lmoe_status st = lmoe_checkpoint_load_layer(c, idx, l, want ? &router : NULL);
  b->h = router; /* owned by the box even when the load failed after making it */
  return ret(L, st, 1);
}

/* ------------------------------------------------------------------ registration */

static const luaL_Reg lib[] = {
    {"version", l_version}, {"status_string", l_status_string}, {"has_cuda", l_has_cuda},
    {"device_count", l_device_count}, {"device_get_info", l_device_get_info},
    {"dtype_size", l_dtype_size}, {"dtype_name", l_dtype_name}, {"lora_scale", l_lora_scale},
    {"now", l_now}, {"close", box_gc}, {"pointer", l_pointer}, {"address", l_address},
    {"mem", l_mem}, {"pack", l_pack}, {"unpack", l_unpack},
    {"context_create", l_context_create}, {"context_retain", l_context_retain},
    {"context_is_live", l_context_is_live}, {"context_last_error", l_context_last_error},
    {"context_backend", l_context_backend}, {"context_threads", l_context_threads},
    {"context_guard", l_context_guard}, {"context_set_guard", l_context_set_guard},
    {"context_stream", l_context_stream}, {"context_synchronize", l_context_synchronize},
    {"context_counters", l_context_counters}, {"context_reset_counters", l_context_reset_counters},
    {"buffer_create", l_buffer_create}, {"buffer_wrap", l_buffer_wrap},
    {"buffer_describe", l_buffer_describe}, {"buffer_write", l_buffer_write},
    {"buffer_read", l_buffer_read}, {"buffer_fill_random", l_buffer_fill_random},
    {"buffer_fill", l_buffer_fill}, {"buffer_compare", l_buffer_compare},
    {"layer_create", l_layer_create}, {"layer_get_config", l_layer_get_config},
    {"layer_randomize", l_layer_randomize}, {"layer_set_weights", l_layer_set_weights},
    {"layer_set_expert", l_layer_set_expert}, {"layer_weights", l_layer_weights},
    {"pool_create", l_pool_create}, {"pool_get_config", l_pool_get_config},
    {"pool_load_random", l_pool_load_random}, {"pool_load", l_pool_load},
    {"pool_unload", l_pool_unload}, {"pool_slot_info", l_pool_slot_info},
    {"pool_load_named", l_pool_load_named}, {"pool_load_peft", l_pool_load_peft},
    {"pool_unload_named", l_pool_unload_named}, {"pool_find", l_pool_find},
    {"pool_slot_name", l_pool_slot_name}, {"pool_pin", l_pool_pin}, {"pool_unpin", l_pool_unpin},
    {"pool_pin_count", l_pool_pin_count}, {"pool_touch", l_pool_touch},
    {"pool_get_memory", l_pool_get_memory},
    {"batch_create", l_batch_create}, {"batch_set", l_batch_set}, {"batch_get_info", l_batch_get_info},
    {"batch_offsets", l_batch_offsets}, {"batch_active_slots", l_batch_active_slots},
    {"forward", l_forward}, {"reference_forward", l_reference_forward},
    {"graph_begin", l_graph_begin}, {"graph_end", l_graph_end}, {"graph_launch", l_graph_launch},
    {"safetensors_open", l_safetensors_open}, {"safetensors_open_memory", l_safetensors_open_memory},
    {"safetensors_count", l_safetensors_count}, {"safetensors_tensor", l_safetensors_tensor},
    {"safetensors_find", l_safetensors_find}, {"safetensors_read", l_safetensors_read},
    {"safetensors_metadata_count", l_safetensors_metadata_count},
    {"safetensors_metadata", l_safetensors_metadata}, {"safetensors_write", l_safetensors_write},
    {"peft_open", l_peft_open}, {"peft_get_info", l_peft_get_info}, {"peft_layers", l_peft_layers},
    {"peft_inspect", l_peft_inspect}, {"peft_layer_desc", l_peft_layer_desc},
    {"peft_write_synthetic", l_peft_write_synthetic},
    {"checkpoint_open", l_checkpoint_open}, {"checkpoint_get_layer_info", l_checkpoint_get_layer_info},
    {"checkpoint_load_layer", l_checkpoint_load_layer},
    {NULL, NULL}};

/* Bound through other calls: lmoe_context_config_init (context_create),
   lmoe_layer_config_init, lmoe_pool_config_init, lmoe_adapter_desc_init,
   lmoe_random_adapter_init, lmoe_forward_args_init, lmoe_peft_info_init,
   lmoe_peft_synthetic_init, lmoe_checkpoint_layer_info_init (the table defaults),
   lmoe_*_release / *_close (the box's release function).
   not bound: lmoe_context_config_init's allocator field (C callbacks; Lua never runs
   from C callbacks). */

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
