/*
 * loramoe.core — the Lua 5.4 C module over native/include/loramoe.h.
 *
 * Handles follow liolib's file handle: the userdata box is created marked closed
 * (h == NULL) before the C object is acquired, one function serves __gc and __close,
 * methods on a closed handle raise "attempt to use a closed <kind>", __tostring says
 * "(closed)". Misuse raises "bad argument #n to 'f' (...)"; a non-OK status from the
 * library returns nil, "CODE: message", "CODE". No C globals: metatables live in the
 * registry. The LuaJIT binding (loramoe/ffi_core.lua) exposes the same API; docs/lua.md
 * documents both.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */

#include "loramoe.h"

#include <lauxlib.h>
#include <lua.h>

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define LMOE_LUA_NAME "loramoe.core"

enum { K_CONTEXT, K_BUFFER, K_LAYER, K_POOL, K_BATCH, K_SAFETENSORS, K_PEFT, K_CHECKPOINT, K_GRAPH, K_COUNT };

static const char *const kind_mt[K_COUNT] = {"loramoe.context", "loramoe.buffer", "loramoe.layer",
                                             "loramoe.pool",    "loramoe.batch",  "loramoe.safetensors",
                                             "loramoe.peft",    "loramoe.checkpoint", "loramoe.graph"};
static const char *const kind_name[K_COUNT] = {"context", "buffer",      "layer", "pool",
                                               "batch",   "safetensors", "peft",  "checkpoint",
                                               "graph"};

/* Registry key of the presets table (filled by the pure-Lua layer). */
#define PRESETS_KEY "loramoe.presets"

static const char *const dtype_names[] = {"bf16", "f16", "f32", "f64", "i32", NULL};
static const char *const memory_names[] = {"host", "device", NULL};
static const char *const backend_names[] = {"auto", "cpu", "cuda", NULL};
static const char *const guard_names[] = {"host", "device_sync", "always", NULL};
static const char *const weight_names[] = {"w13", "w2", NULL};

/* A handle. h is NULL once closed. ctx is the context the object was made through,
   borrowed: the C object holds a reference to it, so it is valid while h is. aux is
   a borrowed parent pointer (a pool's layer). A borrowed box (layer:weights()) does
   not own h and is usable only while its parent box (uservalue 1) is open. */
typedef struct lbox {
  void *h;
  lmoe_context *ctx;
  void *aux;
  int owned;
  int borrowed;
} lbox;

/* ------------------------------------------------------------------ errors */

static const char *status_code(lmoe_status st) {
  switch (st) {
  case LMOE_OK: return "OK";
  case LMOE_ERR_INVALID_ARGUMENT: return "INVALID_ARGUMENT";
  case LMOE_ERR_OUT_OF_MEMORY: return "OUT_OF_MEMORY";
  case LMOE_ERR_UNSUPPORTED: return "UNSUPPORTED";
  case LMOE_ERR_BACKEND: return "BACKEND";
  case LMOE_ERR_STATE: return "STATE";
  case LMOE_ERR_NOT_FOUND: return "NOT_FOUND";
  case LMOE_ERR_FULL: return "FULL";
  case LMOE_ERR_IO: return "IO";
  case LMOE_ERR_FORMAT: return "FORMAT";
  }
  return "UNKNOWN";
}

/* t[key] = v for the table on the top of the stack */
static void set_int(lua_State *L, const char *key, lua_Integer v) {
  lua_pushinteger(L, v);
  lua_setfield(L, -2, key);
}

static void set_num(lua_State *L, const char *key, lua_Number v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, key);
}

static void set_bool(lua_State *L, const char *key, int v) {
  lua_pushboolean(L, v);
  lua_setfield(L, -2, key);
}

static void set_str(lua_State *L, const char *key, const char *v) {
  lua_pushstring(L, v);
  lua_setfield(L, -2, key);
}

/* nil, "CODE: message", "CODE" */
static int push_fail_msg(lua_State *L, lmoe_status st, const char *msg) {
  if (!msg || !*msg) msg = lmoe_status_string(st);
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s", status_code(st), msg);
  lua_pushstring(L, status_code(st));
  return 3;
}

static int push_fail(lua_State *L, lmoe_status st, const lmoe_context *ctx) {
  return push_fail_msg(L, st, ctx ? lmoe_context_last_error(ctx) : NULL);
}

/* true, or the failure triple. */
static int push_status(lua_State *L, lmoe_status st, const lmoe_context *ctx) {
  if (st != LMOE_OK) return push_fail(L, st, ctx);
  lua_pushboolean(L, 1);
  return 1;
}

/* ------------------------------------------------------------------ boxes */

static lbox *newbox(lua_State *L, int kind, int parent) {
  if (parent) parent = lua_absindex(L, parent);
  lbox *b = (lbox *)lua_newuserdatauv(L, sizeof *b, 2);
  memset(b, 0, sizeof *b);
  luaL_setmetatable(L, kind_mt[kind]);
  if (parent) {
    lua_pushvalue(L, parent);
    lua_setiuservalue(L, -2, 1);
  }
  return b;
}

static lbox *tobox(lua_State *L, int idx, int kind) {
  return (lbox *)luaL_checkudata(L, idx, kind_mt[kind]);
}

/* A borrowed box is open only while its parent box is. */
static int box_open(lua_State *L, int idx, lbox *b) {
  if (!b->h) return 0;
  if (!b->borrowed) return 1;
  lua_getiuservalue(L, idx, 1);
  lbox *p = (lbox *)lua_touserdata(L, -1);
  lua_pop(L, 1);
  if (!p || !p->h) {
    b->h = NULL;
    return 0;
  }
  return 1;
}

/* Raises "attempt to use a closed <kind>" with the position of the first caller
   outside loramoe's own Lua files (the pure-Lua layer calls the core for users). */
static int closed_error(lua_State *L, int kind) {
  lua_Debug ar;
  int level = 1;
  for (int l = 1; lua_getstack(L, l, &ar); l++) {
    lua_getinfo(L, "S", &ar);
    const char *src = ar.source, *slash = src ? strrchr(src, '/') : NULL;
    int internal = slash && slash - src >= 7 && strncmp(slash - 7, "loramoe/", 8) == 0 &&
                   strlen(slash) > 4 && strcmp(slash + strlen(slash) - 4, ".lua") == 0;
    if (!internal) {
      level = l;
      break;
    }
  }
  luaL_where(L, level);
  lua_pushfstring(L, "attempt to use a closed %s", kind_name[kind]);
  lua_concat(L, 2);
  return lua_error(L);
}

static lbox *checkbox(lua_State *L, int idx, int kind) {
  lbox *b = tobox(L, idx, kind);
  if (!box_open(L, idx, b)) closed_error(L, kind);
  return b;
}

static void box_release(int kind, lbox *b) {
  void *h = b->h;
  b->h = NULL;
  if (!h || !b->owned) return;
  switch (kind) {
  case K_CONTEXT: lmoe_context_release((lmoe_context *)h); break;
  case K_BUFFER: lmoe_buffer_release((lmoe_buffer *)h); break;
  case K_LAYER: lmoe_layer_release((lmoe_layer *)h); break;
  case K_POOL: lmoe_pool_release((lmoe_pool *)h); break;
  case K_BATCH: lmoe_batch_release((lmoe_batch *)h); break;
  case K_SAFETENSORS: lmoe_safetensors_close((lmoe_safetensors *)h); break;
  case K_PEFT: lmoe_peft_close((lmoe_peft *)h); break;
  case K_CHECKPOINT: lmoe_checkpoint_close((lmoe_checkpoint *)h); break;
  case K_GRAPH: lmoe_graph_release((lmoe_graph *)h); break;
  }
}

/* __gc and __close: never raise, closed handles are left alone. */
static int obj_gc(lua_State *L) {
  int kind = (int)lua_tointeger(L, lua_upvalueindex(1));
  lbox *b = (lbox *)luaL_testudata(L, 1, kind_mt[kind]);
  if (b) box_release(kind, b);
  return 0;
}

/* obj:close(): raises on a closed handle, like file:close(). */
static int obj_close(lua_State *L) {
  int kind = (int)lua_tointeger(L, lua_upvalueindex(1));
  lbox *b = checkbox(L, 1, kind);
  box_release(kind, b);
  lua_pushboolean(L, 1);
  return 1;
}

static int obj_tostring(lua_State *L) {
  int kind = (int)lua_tointeger(L, lua_upvalueindex(1));
  lbox *b = tobox(L, 1, kind);
  if (!box_open(L, 1, b))
    lua_pushfstring(L, "%s (closed)", kind_mt[kind]);
  else
    lua_pushfstring(L, "%s (%p)", kind_mt[kind], b->h);
  return 1;
}

static int obj_is_closed(lua_State *L) {
  int kind = (int)lua_tointeger(L, lua_upvalueindex(1));
  lbox *b = tobox(L, 1, kind);
  lua_pushboolean(L, !box_open(L, 1, b));
  return 1;
}

/* Extra GC work in proportion to memory the collector cannot see, before a large
   allocation, so forgotten layers and pools are finalised before new ones pile up. */
static void report_pressure(lua_State *L, double bytes) {
  if (bytes < 1 << 20 || !lua_gc(L, LUA_GCISRUNNING)) return;
  double kb = bytes / 1024.0;
  lua_gc(L, LUA_GCSTEP, kb > INT_MAX ? INT_MAX : (int)kb);
}

/* ------------------------------------------------------------------ argument helpers */

static int field_type(lua_State *L, int t, const char *k) { return lua_getfield(L, t, k); }

/* An integer from a number value only: strings are not coerced (the FFI binding
   does not coerce either). */
static lua_Integer strict_int(lua_State *L, int idx, int *isint) {
  if (lua_type(L, idx) != LUA_TNUMBER) {
    *isint = 0;
    return 0;
  }
  return lua_tointegerx(L, idx, isint);
}

static int field_error(lua_State *L, int arg, const char *k, const char *what) {
  return luaL_argerror(L, arg, lua_pushfstring(L, "field '%s' %s", k, what));
}

static lua_Integer opt_field_int(lua_State *L, int t, int arg, const char *k, lua_Integer def) {
  int ty = field_type(L, t, k);
  lua_Integer v = def;
  if (ty != LUA_TNIL) {
    int isint = 0;
    v = strict_int(L, -1, &isint);
    if (!isint) field_error(L, arg, k, "must be an integer");
  }
  lua_pop(L, 1);
  return v;
}

static double opt_field_num(lua_State *L, int t, int arg, const char *k, double def) {
  int ty = field_type(L, t, k);
  double v = def;
  if (ty != LUA_TNIL) {
    if (ty != LUA_TNUMBER) field_error(L, arg, k, "must be a number");
    v = lua_tonumber(L, -1);
  }
  lua_pop(L, 1);
  return v;
}

static int opt_field_bool(lua_State *L, int t, int arg, const char *k, int def) {
  int ty = field_type(L, t, k);
  int v = def;
  if (ty != LUA_TNIL) {
    if (ty != LUA_TBOOLEAN) field_error(L, arg, k, "must be a boolean");
    v = lua_toboolean(L, -1);
  }
  lua_pop(L, 1);
  return v;
}

static int opt_field_option(lua_State *L, int t, int arg, const char *k, const char *const *names,
                            int def) {
  int ty = field_type(L, t, k);
  int v = def;
  if (ty != LUA_TNIL) {
    const char *s = lua_tostring(L, -1);
    if (ty != LUA_TSTRING) field_error(L, arg, k, "must be a string");
    for (v = 0; names[v] && strcmp(names[v], s) != 0; v++) {
    }
    if (!names[v]) field_error(L, arg, k, lua_pushfstring(L, "has invalid option '%s'", s));
  }
  lua_pop(L, 1);
  return v;
}

/* An integer argument in [lo, hi]. */
static lua_Integer check_range(lua_State *L, int arg, lua_Integer lo, lua_Integer hi,
                               const char *what) {
  lua_Integer v = luaL_checkinteger(L, arg);
  if (v < lo || v > hi)
    luaL_argerror(L, arg, lua_pushfstring(L, "%s must be %I..%I, got %I", what, lo, hi, v));
  return v;
}

/* A stream argument: nil or a light userdata (a cudaStream_t). */
static void *opt_stream(lua_State *L, int arg) {
  if (lua_isnoneornil(L, arg)) return NULL;
  luaL_argexpected(L, lua_islightuserdata(L, arg), arg, "light userdata (a stream) or nil");
  return lua_touserdata(L, arg);
}

/* Shape table {d0, d1, ...} of 1..LMOE_MAX_DIMS non-negative integers. */
static int check_shape(lua_State *L, int arg, int64_t *shape) {
  luaL_checktype(L, arg, LUA_TTABLE);
  lua_Integer n = luaL_len(L, arg);
  if (n < 1 || n > LMOE_MAX_DIMS)
    luaL_argerror(L, arg, lua_pushfstring(L, "shape must have 1..%d dimensions", LMOE_MAX_DIMS));
  for (lua_Integer i = 1; i <= n; i++) {
    int isint = 0;
    lua_geti(L, arg, i);
    lua_Integer d = strict_int(L, -1, &isint);
    lua_pop(L, 1);
    if (!isint || d < 0)
      luaL_argerror(L, arg, lua_pushfstring(L, "shape[%I] must be a non-negative integer", i));
    shape[i - 1] = d;
  }
  return (int)n;
}

/* Copies a Lua array of numbers (the table at t, exactly n entries) into doubles held
   by a userdata pushed on the stack, so a raise on a bad entry leaks nothing. */
static double *table_to_doubles(lua_State *L, int t, int arg, const char *what, lua_Integer n) {
  t = lua_absindex(L, t);
  if (!lua_istable(L, t))
    luaL_argerror(L, arg, lua_pushfstring(L, "%s must be a table of numbers", what));
  lua_Integer len = luaL_len(L, t);
  if (len != n)
    luaL_argerror(L, arg, lua_pushfstring(L, "%s has %I values, expected %I", what, len, n));
  double *d = (double *)lua_newuserdatauv(L, (size_t)(n ? n : 1) * sizeof(double), 0);
  for (lua_Integer i = 0; i < n; i++) {
    lua_geti(L, t, i + 1);
    int isnum = 0;
    d[i] = lua_tonumberx(L, -1, &isnum);
    lua_pop(L, 1);
    if (!isnum)
      luaL_argerror(L, arg, lua_pushfstring(L, "%s[%I] is not a number", what, i + 1));
  }
  return d;
}

/* ------------------------------------------------------------------ library */

static int l_version(lua_State *L) {
  lua_pushstring(L, lmoe_version());
  return 1;
}

static int l_status_string(lua_State *L) {
  lua_pushstring(L, lmoe_status_string((lmoe_status)luaL_checkinteger(L, 1)));
  return 1;
}

static int l_has_cuda(lua_State *L) {
  lua_pushboolean(L, lmoe_has_cuda());
  return 1;
}

static int l_device_count(lua_State *L) {
  int32_t n = 0;
  lmoe_status st = lmoe_device_count(&n);
  if (st) return push_fail(L, st, NULL);
  lua_pushinteger(L, n);
  return 1;
}

static int l_device_info(lua_State *L) {
  int32_t dev = (int32_t)check_range(L, 1, 0, INT32_MAX, "device");
  lmoe_device_info info;
  memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  lmoe_status st = lmoe_device_get_info(dev, &info);
  if (st) return push_fail(L, st, NULL);
  lua_createtable(L, 0, 6);
  info.name[sizeof info.name - 1] = '\0';
  set_str(L, "name", info.name);
  set_int(L, "cc_major", info.cc_major);
  set_int(L, "cc_minor", info.cc_minor);
  set_int(L, "sm_count", info.sm_count);
  set_int(L, "memory_bytes", info.memory_bytes);
  set_int(L, "l2_bytes", info.l2_bytes);
  return 1;
}

static int l_dtype_size(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)lmoe_dtype_size(luaL_checkoption(L, 1, NULL, dtype_names)));
  return 1;
}

static int l_dtype_name(lua_State *L) {
  lua_pushstring(L, lmoe_dtype_name((int32_t)luaL_checkinteger(L, 1)));
  return 1;
}

static int l_lora_scale(lua_State *L) {
  float alpha = (float)luaL_checknumber(L, 1);
  int32_t rank = (int32_t)check_range(L, 2, 1, INT32_MAX, "rank");
  int rs = lua_toboolean(L, 3);
  lua_pushnumber(L, lmoe_lora_scale(alpha, rank, rs));
  return 1;
}

/* Seconds on a monotonic clock, for timing from scripts. */
static int l_now(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec * 1e-9);
  return 1;
}

/* ------------------------------------------------------------------ context */

static int l_context(lua_State *L) {
  lmoe_context_config cfg;
  lmoe_context_config_init(&cfg);
  if (!lua_isnoneornil(L, 1)) {
    luaL_checktype(L, 1, LUA_TTABLE);
    cfg.backend = opt_field_option(L, 1, 1, "backend", backend_names, cfg.backend);
    lua_Integer dev = opt_field_int(L, 1, 1, "device", 0);
    if (dev < 0 || dev > INT32_MAX) field_error(L, 1, "device", "must be >= 0");
    cfg.device = (int32_t)dev;
    lua_Integer th = opt_field_int(L, 1, 1, "threads", 0);
    if (th < 0 || th > 1024) field_error(L, 1, "threads", "must be 0 (one per core) .. 1024");
    cfg.threads = (int32_t)th;
    cfg.guard = opt_field_option(L, 1, 1, "guard", guard_names, cfg.guard);
    int ty = lua_getfield(L, 1, "stream");
    if (ty != LUA_TNIL && ty != LUA_TLIGHTUSERDATA)
      field_error(L, 1, "stream", "must be a light userdata (a cudaStream_t) or nil");
    cfg.stream = lua_touserdata(L, -1);
    lua_pop(L, 1);
  }
  lbox *b = newbox(L, K_CONTEXT, 0);
  char err[256];
  lmoe_context *ctx = NULL;
  lmoe_status st = lmoe_context_create(&cfg, &ctx, err, sizeof err);
  if (st) return push_fail_msg(L, st, err);
  b->h = ctx;
  b->ctx = ctx;
  b->owned = 1;
  return 1;
}

/* lm.adopt_context(p): a context object over a context someone else made (an
   embedding host), holding its own reference, so closing or collecting it never frees
   the host's context. p must point to a live context (a freed one cannot be told
   apart); NULL and pointers to other loramoe objects are refused. */
static int l_adopt_context(lua_State *L) {
  luaL_argexpected(L, lua_islightuserdata(L, 1), 1, "light userdata (an lmoe_context *)");
  lmoe_context *ctx = (lmoe_context *)lua_touserdata(L, 1);
  luaL_argcheck(L, ctx != NULL, 1, "context pointer is NULL");
  /* The library checks the magic of every handle; this is its message for a handle
     of another kind. */
  if (strcmp(lmoe_context_last_error(ctx), "not a loramoe context") == 0)
    luaL_argerror(L, 1, "not a loramoe context");
  lbox *b = newbox(L, K_CONTEXT, 0); /* may raise: before the reference is taken */
  lmoe_context_retain(ctx);
  b->h = ctx;
  b->ctx = ctx;
  b->owned = 1;
  return 1;
}

static lmoe_context *checkctx(lua_State *L, int idx) {
  return (lmoe_context *)checkbox(L, idx, K_CONTEXT)->h;
}

/* ctx:pointer(): the lmoe_context * as a light userdata, for C code and
   lm.adopt_context; valid while some reference to the context is held. */
static int ctx_pointer(lua_State *L) {
  lua_pushlightuserdata(L, checkctx(L, 1));
  return 1;
}

static int ctx_set_guard(lua_State *L) {
  lmoe_context *ctx = checkctx(L, 1);
  return push_status(L, lmoe_context_set_guard(ctx, luaL_checkoption(L, 2, NULL, guard_names)), ctx);
}

static int ctx_stream(lua_State *L) {
  void *s = lmoe_context_stream(checkctx(L, 1));
  if (s)
    lua_pushlightuserdata(L, s);
  else
    lua_pushnil(L);
  return 1;
}

static int ctx_synchronize(lua_State *L) {
  lmoe_context *ctx = checkctx(L, 1);
  return push_status(L, lmoe_context_synchronize(ctx, opt_stream(L, 2)), ctx);
}

static int ctx_counters(lua_State *L) {
  lmoe_context *ctx = checkctx(L, 1);
  lmoe_counters c;
  lmoe_status st = lmoe_context_counters(ctx, &c);
  if (st) return push_fail(L, st, ctx);
  lua_createtable(L, 0, 7);
#define SETC(f) set_int(L, #f, (lua_Integer)c.f)
  SETC(forwards);
  SETC(launches);
  SETC(lora_launches);
  SETC(host_waits);
  SETC(uploads);
  SETC(bytes_uploaded);
  SETC(downloads);
#undef SETC
  return 1;
}

static int ctx_reset_counters(lua_State *L) {
  lmoe_context_reset_counters(checkctx(L, 1));
  return 0;
}

static int ctx_last_error(lua_State *L) {
  lua_pushstring(L, lmoe_context_last_error(checkctx(L, 1)));
  return 1;
}

static int ctx_buffer(lua_State *L) {
  lmoe_context *ctx = checkctx(L, 1);
  int dtype = luaL_checkoption(L, 2, NULL, dtype_names);
  int64_t shape[LMOE_MAX_DIMS];
  int nd = check_shape(L, 3, shape);
  int memory = luaL_checkoption(L, 4, "device", memory_names);
  double bytes = (double)lmoe_dtype_size(dtype);
  for (int i = 0; i < nd; i++) bytes *= (double)shape[i];
  report_pressure(L, bytes);
  lbox *b = newbox(L, K_BUFFER, 1);
  lmoe_buffer *buf = NULL;
  lmoe_status st = lmoe_buffer_create(ctx, dtype, memory, nd, shape, &buf);
  if (st) return push_fail(L, st, ctx);
  b->h = buf;
  b->ctx = ctx;
  b->owned = 1;
  return 1;
}

/* ctx:wrap(dtype, shape, ptr, memory?, owner?): a buffer over memory someone else
   owns; owner (any value) is kept alive as long as the buffer. */
static int ctx_wrap(lua_State *L) {
  lmoe_context *ctx = checkctx(L, 1);
  int dtype = luaL_checkoption(L, 2, NULL, dtype_names);
  int64_t shape[LMOE_MAX_DIMS];
  int nd = check_shape(L, 3, shape);
  luaL_argexpected(L, lua_islightuserdata(L, 4), 4, "light userdata (a pointer)");
  void *data = lua_touserdata(L, 4);
  int memory = luaL_checkoption(L, 5, "host", memory_names);
  lbox *b = newbox(L, K_BUFFER, 1);
  lua_pushvalue(L, 6);
  lua_setiuservalue(L, -2, 2);
  lmoe_buffer *buf = NULL;
  lmoe_status st = lmoe_buffer_wrap(ctx, dtype, memory, nd, shape, data, &buf);
  if (st) return push_fail(L, st, ctx);
  b->h = buf;
  b->ctx = ctx;
  b->owned = 1;
  return 1;
}

static int ctx_batch(lua_State *L) {
  lmoe_context *ctx = checkctx(L, 1);
  lbox *b = newbox(L, K_BATCH, 1);
  lmoe_batch *batch = NULL;
  lmoe_status st = lmoe_batch_create(ctx, &batch);
  if (st) return push_fail(L, st, ctx);
  b->h = batch;
  b->ctx = ctx;
  b->owned = 1;
  return 1;
}

/* ctx:layer(cfg): cfg is a preset name, or a table {experts=, hidden=, intermediate=,
   top_k=, renormalize=, max_tokens=, preset=}; fields override the preset's. */
static int ctx_layer(lua_State *L) {
  lmoe_context *ctx = checkctx(L, 1);
  lmoe_layer_config cfg;
  lmoe_layer_config_init(&cfg);
  int preset = 0;
  lua_settop(L, 2);
  if (lua_type(L, 2) == LUA_TSTRING) {
    lua_pushvalue(L, 2);
  } else {
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_getfield(L, 2, "preset");
    if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING) field_error(L, 2, "preset", "must be a string");
  }
  if (!lua_isnil(L, 3)) { /* stack 3: preset name; look it up */
    lua_getfield(L, LUA_REGISTRYINDEX, PRESETS_KEY);
    lua_pushvalue(L, 3);
    if (lua_gettable(L, -2) != LUA_TTABLE)
      luaL_argerror(L, 2, lua_pushfstring(L, "unknown preset '%s'", lua_tostring(L, 3)));
    preset = lua_gettop(L);
  }
  int t = lua_istable(L, 2) ? 2 : 0;
#define LAYER_FIELD(dst, key)                                                     \
  do {                                                                            \
    lua_Integer v_ = dst;                                                         \
    if (preset) v_ = opt_field_int(L, preset, 2, key, v_);                        \
    if (t) v_ = opt_field_int(L, t, 2, key, v_);                                  \
    if (v_ < INT32_MIN || v_ > INT32_MAX) field_error(L, 2, key, "is out of range"); \
    dst = (int32_t)v_;                                                            \
  } while (0)
  cfg.num_experts = 0;
  cfg.hidden = 0;
  cfg.intermediate = 0;
  LAYER_FIELD(cfg.num_experts, "experts");
  LAYER_FIELD(cfg.hidden, "hidden");
  LAYER_FIELD(cfg.intermediate, "intermediate");
  LAYER_FIELD(cfg.top_k, "top_k");
  LAYER_FIELD(cfg.max_tokens, "max_tokens");
#undef LAYER_FIELD
  if (preset) cfg.renormalize = opt_field_bool(L, preset, 2, "renormalize", cfg.renormalize);
  if (t) cfg.renormalize = opt_field_bool(L, t, 2, "renormalize", cfg.renormalize);
  if (cfg.num_experts == 0) field_error(L, 2, "experts", "is missing");
  if (cfg.hidden == 0) field_error(L, 2, "hidden", "is missing");
  if (cfg.intermediate == 0) field_error(L, 2, "intermediate", "is missing");
  report_pressure(L, 6.0 * cfg.num_experts * (double)cfg.hidden * (double)cfg.intermediate);
  lbox *b = newbox(L, K_LAYER, 1);
  lmoe_layer *layer = NULL;
  lmoe_status st = lmoe_layer_create(ctx, &cfg, &layer);
  if (st) return push_fail(L, st, ctx);
  b->h = layer;
  b->ctx = ctx;
  b->owned = 1;
  return 1;
}

/* ------------------------------------------------------------------ buffer */

static lbox *checkbuf(lua_State *L, int idx) { return checkbox(L, idx, K_BUFFER); }

static lmoe_buffer_desc describe(lua_State *L, lbox *b) {
  lmoe_buffer_desc d;
  if (lmoe_buffer_describe((lmoe_buffer *)b->h, &d) != LMOE_OK)
    luaL_error(L, "loramoe: could not describe a buffer");
  return d;
}

static void push_shape(lua_State *L, const lmoe_buffer_desc *d) {
  lua_createtable(L, d->ndim, 0);
  for (int i = 0; i < d->ndim; i++) {
    lua_pushinteger(L, (lua_Integer)d->shape[i]);
    lua_rawseti(L, -2, i + 1);
  }
}

static int buf_shape(lua_State *L) {
  lmoe_buffer_desc d = describe(L, checkbuf(L, 1));
  push_shape(L, &d);
  return 1;
}

static int buf_describe(lua_State *L) {
  lmoe_buffer_desc d = describe(L, checkbuf(L, 1));
  lua_createtable(L, 0, 5);
  set_str(L, "dtype", dtype_names[d.dtype]);
  set_str(L, "memory", memory_names[d.memory]);
  push_shape(L, &d);
  lua_setfield(L, -2, "shape");
  set_int(L, "numel", d.numel);
  set_int(L, "bytes", d.bytes);
  return 1;
}

static int buf_data(lua_State *L) {
  lmoe_buffer_desc d = describe(L, checkbuf(L, 1));
  lua_pushlightuserdata(L, d.data);
  return 1;
}

/* buf:write(values, offset?) */
static int buf_write(lua_State *L) {
  lbox *b = checkbuf(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_Integer off = luaL_optinteger(L, 3, 0);
  lua_Integer n = luaL_len(L, 2);
  double *v = table_to_doubles(L, 2, 2, "values", n);
  return push_status(L, lmoe_buffer_write((lmoe_buffer *)b->h, off, v, LMOE_DTYPE_F64, n), b->ctx);
}

/* buf:read(offset?, count?) -> table */
static int buf_read(lua_State *L) {
  lbox *b = checkbuf(L, 1);
  lmoe_buffer_desc d = describe(L, b);
  lua_Integer off = luaL_optinteger(L, 2, 0);
  if (off < 0 || off > d.numel)
    luaL_argerror(L, 2, lua_pushfstring(L, "offset must be 0..%I", (lua_Integer)d.numel));
  lua_Integer n = luaL_optinteger(L, 3, d.numel - off);
  if (n < 0 || n > d.numel - off)
    luaL_argerror(L, 3, lua_pushfstring(L, "count must be 0..%I", (lua_Integer)(d.numel - off)));
  if (n > INT_MAX) luaL_argerror(L, 3, "count is too large for a table");
  double *v = (double *)lua_newuserdatauv(L, (size_t)(n ? n : 1) * sizeof(double), 0);
  lmoe_status st = lmoe_buffer_read((lmoe_buffer *)b->h, off, v, LMOE_DTYPE_F64, n);
  if (st) return push_fail(L, st, b->ctx);
  lua_createtable(L, (int)n, 0);
  for (lua_Integer i = 0; i < n; i++) {
    if (d.dtype == LMOE_DTYPE_I32)
      lua_pushinteger(L, (lua_Integer)v[i]);
    else
      lua_pushnumber(L, v[i]);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

static int buf_fill_random(lua_State *L) {
  lbox *b = checkbuf(L, 1);
  uint64_t seed = (uint64_t)luaL_checkinteger(L, 2);
  float lo = (float)luaL_optnumber(L, 3, -1.0);
  float hi = (float)luaL_optnumber(L, 4, 1.0);
  void *s = opt_stream(L, 5);
  return push_status(L, lmoe_buffer_fill_random((lmoe_buffer *)b->h, seed, lo, hi, s), b->ctx);
}

static int buf_fill(lua_State *L) {
  lbox *b = checkbuf(L, 1);
  double v = luaL_checknumber(L, 2);
  void *s = opt_stream(L, 3);
  return push_status(L, lmoe_buffer_fill((lmoe_buffer *)b->h, v, s), b->ctx);
}

static int buf_compare(lua_State *L) {
  lbox *a = checkbuf(L, 1);
  lbox *r = checkbuf(L, 2);
  lmoe_compare_result res;
  lmoe_status st = lmoe_buffer_compare((lmoe_buffer *)a->h, (lmoe_buffer *)r->h, &res);
  if (st) return push_fail(L, st, a->ctx);
  lua_createtable(L, 0, 5);
  set_num(L, "rel_l2", res.rel_l2);
  set_num(L, "max_abs", res.max_abs);
  set_num(L, "ref_l2", res.ref_l2);
  set_int(L, "nonfinite", res.nonfinite);
  set_int(L, "numel", res.numel);
  return 1;
}

/* ------------------------------------------------------------------ layer */

static lbox *checklayer(lua_State *L, int idx) { return checkbox(L, idx, K_LAYER); }

static lmoe_layer_config layer_cfg(lua_State *L, lmoe_layer *layer) {
  lmoe_layer_config c;
  memset(&c, 0, sizeof c);
  c.struct_size = sizeof c;
  if (lmoe_layer_get_config(layer, &c) != LMOE_OK) luaL_error(L, "loramoe: could not read a layer's config");
  return c;
}

static int layer_config(lua_State *L) {
  lmoe_layer_config c = layer_cfg(L, (lmoe_layer *)checklayer(L, 1)->h);
  lua_createtable(L, 0, 6);
  set_int(L, "experts", c.num_experts);
  set_int(L, "hidden", c.hidden);
  set_int(L, "intermediate", c.intermediate);
  set_int(L, "top_k", c.top_k);
  set_bool(L, "renormalize", c.renormalize);
  set_int(L, "max_tokens", c.max_tokens);
  return 1;
}

static int layer_randomize(lua_State *L) {
  lbox *b = checklayer(L, 1);
  uint64_t seed = (uint64_t)luaL_checkinteger(L, 2);
  float scale = (float)luaL_optnumber(L, 3, 0.05);
  return push_status(L, lmoe_layer_randomize((lmoe_layer *)b->h, seed, scale), b->ctx);
}

/* layer:set_weights(w13 | nil, w2 | nil): flat tables [E, 2I, H] and [E, H, I]. */
static int layer_set_weights(lua_State *L) {
  lbox *b = checklayer(L, 1);
  lmoe_layer_config c = layer_cfg(L, (lmoe_layer *)b->h);
  lua_Integer n = (lua_Integer)c.num_experts * 2 * c.intermediate * c.hidden;
  const double *w13 = lua_isnoneornil(L, 2) ? NULL : table_to_doubles(L, 2, 2, "w13", n);
  const double *w2 = lua_isnoneornil(L, 3) ? NULL : table_to_doubles(L, 3, 3, "w2", n / 2);
  return push_status(L, lmoe_layer_set_weights((lmoe_layer *)b->h, w13, w2, LMOE_DTYPE_F64), b->ctx);
}

/* layer:set_expert(e, {gate=, up=, down=}): flat tables [I, H], [I, H], [H, I]. */
static int layer_set_expert(lua_State *L) {
  lbox *b = checklayer(L, 1);
  lmoe_layer_config c = layer_cfg(L, (lmoe_layer *)b->h);
  int32_t e = (int32_t)check_range(L, 2, 0, c.num_experts - 1, "expert");
  luaL_checktype(L, 3, LUA_TTABLE);
  lua_Integer n = (lua_Integer)c.intermediate * c.hidden;
  const double *p[3] = {NULL, NULL, NULL};
  static const char *const parts[3] = {"gate", "up", "down"};
  for (int i = 0; i < 3; i++) {
    if (lua_getfield(L, 3, parts[i]) != LUA_TNIL) p[i] = table_to_doubles(L, -1, 3, parts[i], n);
  }
  if (!p[0] && !p[1] && !p[2]) luaL_argerror(L, 3, "give at least one of gate, up, down");
  return push_status(L, lmoe_layer_set_expert((lmoe_layer *)b->h, e, p[0], p[1], p[2], LMOE_DTYPE_F64),
                     b->ctx);
}

/* layer:weights("w13" | "w2") -> a buffer borrowed from the layer (valid while the
   layer is open; closing it frees nothing). */
static int layer_weights(lua_State *L) {
  lbox *l = checklayer(L, 1);
  int which = luaL_checkoption(L, 2, NULL, weight_names);
  lmoe_buffer *buf = NULL;
  lmoe_status st = lmoe_layer_weights((lmoe_layer *)l->h, which, &buf);
  if (st) return push_fail(L, st, l->ctx);
  lbox *b = newbox(L, K_BUFFER, 1);
  b->h = buf;
  b->ctx = l->ctx;
  b->borrowed = 1;
  return 1;
}

static int layer_pool(lua_State *L) {
  lbox *l = checklayer(L, 1);
  lmoe_pool_config cfg;
  lmoe_pool_config_init(&cfg);
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_Integer s = opt_field_int(L, 2, 2, "slots", cfg.num_slots);
    lua_Integer r = opt_field_int(L, 2, 2, "max_rank", cfg.max_rank);
    if (s < INT32_MIN || s > INT32_MAX) field_error(L, 2, "slots", "is out of range");
    if (r < INT32_MIN || r > INT32_MAX) field_error(L, 2, "max_rank", "is out of range");
    cfg.num_slots = (int32_t)s;
    cfg.max_rank = (int32_t)r;
  }
  lmoe_layer_config c = layer_cfg(L, (lmoe_layer *)l->h);
  double R = cfg.max_rank > 0 ? cfg.max_rank : 0, S = cfg.num_slots > 0 ? cfg.num_slots : 0;
  report_pressure(L, 2.0 * S * c.num_experts * R * (3.0 * c.hidden + 5.0 * c.intermediate));
  lbox *b = newbox(L, K_POOL, 1);
  lmoe_pool *pool = NULL;
  lmoe_status st = lmoe_pool_create((lmoe_layer *)l->h, &cfg, &pool);
  if (st) return push_fail(L, st, l->ctx);
  b->h = pool;
  b->ctx = l->ctx;
  b->aux = l->h;
  b->owned = 1;
  return 1;
}

/* Buffer field of a forward's args table, or NULL when absent. */
static lmoe_buffer *args_buffer(lua_State *L, int t, const char *k, int required) {
  lmoe_buffer *p = NULL;
  if (lua_getfield(L, t, k) == LUA_TNIL) {
    if (required) field_error(L, t, k, "is missing (a loramoe.buffer)");
  } else {
    if (!luaL_testudata(L, -1, kind_mt[K_BUFFER])) field_error(L, t, k, "must be a loramoe.buffer");
    p = (lmoe_buffer *)checkbox(L, lua_gettop(L), K_BUFFER)->h;
  }
  lua_pop(L, 1);
  return p;
}

static lmoe_context *fill_forward_args(lua_State *L, lmoe_forward_args *a, void **stream) {
  lbox *l = checklayer(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  lmoe_forward_args_init(a);
  a->layer = (lmoe_layer *)l->h;
  if (lua_getfield(L, 2, "pool") != LUA_TNIL) {
    if (!luaL_testudata(L, -1, kind_mt[K_POOL])) field_error(L, 2, "pool", "must be a loramoe.pool");
    a->pool = (lmoe_pool *)checkbox(L, lua_gettop(L), K_POOL)->h;
  }
  lua_pop(L, 1);
  if (lua_getfield(L, 2, "batch") == LUA_TNIL || !luaL_testudata(L, -1, kind_mt[K_BATCH]))
    field_error(L, 2, "batch", "must be a loramoe.batch");
  a->batch = (lmoe_batch *)checkbox(L, lua_gettop(L), K_BATCH)->h;
  lua_pop(L, 1);
  a->x = args_buffer(L, 2, "x", 1);
  a->out = args_buffer(L, 2, "out", 1);
  a->router_logits = args_buffer(L, 2, "logits", 0);
  a->topk_ids = args_buffer(L, 2, "topk_ids", 0);
  a->topk_weights = args_buffer(L, 2, "topk_weights", 0);
  if (stream) {
    int ty = lua_getfield(L, 2, "stream");
    if (ty != LUA_TNIL && ty != LUA_TLIGHTUSERDATA)
      field_error(L, 2, "stream", "must be a light userdata (a cudaStream_t) or nil");
    *stream = lua_touserdata(L, -1);
    lua_pop(L, 1);
  }
  return l->ctx;
}

/* layer:forward{pool=, batch=, x=, logits= | topk_ids=, topk_weights=, out=, stream=} */
static int layer_forward(lua_State *L) {
  lmoe_forward_args a;
  void *stream = NULL;
  lmoe_context *ctx = fill_forward_args(L, &a, &stream);
  return push_status(L, lmoe_forward(ctx, &a, stream), ctx);
}

/* layer:reference{...}: the float64 reference; out is an f32/f64 host buffer. */
static int layer_reference(lua_State *L) {
  lmoe_forward_args a;
  lmoe_context *ctx = fill_forward_args(L, &a, NULL);
  return push_status(L, lmoe_reference_forward(ctx, &a), ctx);
}

/* ------------------------------------------------------------------ pool */

static lbox *checkpool(lua_State *L, int idx) { return checkbox(L, idx, K_POOL); }

static int pool_config(lua_State *L) {
  lbox *b = checkpool(L, 1);
  lmoe_pool_config c;
  memset(&c, 0, sizeof c);
  if (lmoe_pool_get_config((lmoe_pool *)b->h, &c) != LMOE_OK) return push_fail(L, LMOE_ERR_STATE, b->ctx);
  lua_createtable(L, 0, 2);
  set_int(L, "slots", c.num_slots);
  set_int(L, "max_rank", c.max_rank);
  return 1;
}

static int32_t targets_mask(lua_State *L, int t, int arg) {
  int ty = lua_getfield(L, t, "targets");
  int32_t mask = LMOE_TARGET_ALL;
  if (ty == LUA_TNUMBER) {
    int isint = 0;
    lua_Integer m = lua_tointegerx(L, -1, &isint);
    if (!isint || m < 1 || m > LMOE_TARGET_ALL) field_error(L, arg, "targets", "mask must be 1..7");
    mask = (int32_t)m;
  } else if (ty == LUA_TTABLE) {
    mask = 0;
    lua_Integer n = luaL_len(L, -1);
    for (lua_Integer i = 1; i <= n; i++) {
      lua_geti(L, -1, i);
      const char *s = lua_tostring(L, -1);
      if (lua_type(L, -1) != LUA_TSTRING) s = "";
      if (strcmp(s, "gate") == 0)
        mask |= LMOE_TARGET_GATE;
      else if (strcmp(s, "up") == 0)
        mask |= LMOE_TARGET_UP;
      else if (strcmp(s, "down") == 0)
        mask |= LMOE_TARGET_DOWN;
      else
        field_error(L, arg, "targets", "entries must be 'gate', 'up' or 'down'");
      lua_pop(L, 1);
    }
    if (!mask) field_error(L, arg, "targets", "is empty");
  } else if (ty != LUA_TNIL) {
    field_error(L, arg, "targets", "must be a list of 'gate', 'up', 'down' or a mask");
  }
  lua_pop(L, 1);
  return mask;
}

/* pool:load_random(slot, {rank=, alpha=, targets=, fused=, rslora=, seed=, scale=}) */
static int pool_load_random(lua_State *L) {
  lbox *b = checkpool(L, 1);
  int32_t slot = (int32_t)luaL_checkinteger(L, 2);
  lmoe_random_adapter spec;
  lmoe_random_adapter_init(&spec);
  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
    lua_Integer r = opt_field_int(L, 3, 3, "rank", spec.rank);
    if (r < INT32_MIN || r > INT32_MAX) field_error(L, 3, "rank", "is out of range");
    spec.rank = (int32_t)r;
    spec.alpha = (float)opt_field_num(L, 3, 3, "alpha", spec.alpha);
    spec.targets = targets_mask(L, 3, 3);
    spec.fused = opt_field_bool(L, 3, 3, "fused", 0);
    spec.use_rslora = opt_field_bool(L, 3, 3, "rslora", 0);
    spec.seed = (uint64_t)opt_field_int(L, 3, 3, "seed", (lua_Integer)spec.seed);
    spec.scale = (float)opt_field_num(L, 3, 3, "scale", spec.scale);
  }
  return push_status(L, lmoe_pool_load_random((lmoe_pool *)b->h, slot, &spec), b->ctx);
}

/* One part {a=, b=, rank=, scale= | alpha=, rslora=} of an adapter description (the
   table at di, argument arg). The scratch arrays stay on the stack until the load. */
static void load_part(lua_State *L, int di, int arg, const char *name, lmoe_lora_part *part,
                      lua_Integer E, lua_Integer in, lua_Integer out) {
  if (lua_getfield(L, di, name) == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  int t = lua_gettop(L);
  if (!lua_istable(L, t)) field_error(L, arg, name, "must be a table {a=, b=, rank=, scale=}");
  char what[32];
  snprintf(what, sizeof what, "%s.a", name);
  if (lua_getfield(L, t, "a") != LUA_TTABLE)
    luaL_argerror(L, arg, lua_pushfstring(L, "%s must be a table of numbers", what));
  lua_Integer na = luaL_len(L, -1);
  lua_pop(L, 1);
  lua_Integer rank = 0;
  if (lua_getfield(L, t, "rank") == LUA_TNIL) {
    if (na % (E * in) != 0 || na == 0)
      luaL_argerror(L, arg, lua_pushfstring(L, "%s has %I values: not a multiple of E*in = %I (give rank)",
                                            what, na, E * in));
    rank = na / (E * in);
  } else {
    int isint = 0;
    rank = strict_int(L, -1, &isint);
    if (!isint || rank < 1 || rank > INT32_MAX)
      luaL_argerror(L, arg, lua_pushfstring(L, "%s.rank must be a positive integer", name));
  }
  lua_pop(L, 1);
  double scale = 1.0;
  if (lua_getfield(L, t, "scale") != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TNUMBER)
      luaL_argerror(L, arg, lua_pushfstring(L, "%s.scale must be a number", name));
    scale = lua_tonumber(L, -1);
  } else if (lua_getfield(L, t, "alpha") != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TNUMBER)
      luaL_argerror(L, arg, lua_pushfstring(L, "%s.alpha must be a number", name));
    lua_getfield(L, t, "rslora");
    scale = lmoe_lora_scale((float)lua_tonumber(L, -2), (int32_t)rank, lua_toboolean(L, -1));
    lua_pop(L, 2);
  } else {
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  lua_getfield(L, t, "a");
  part->a = table_to_doubles(L, -1, arg, what, E * rank * in);
  lua_replace(L, -2); /* keep the scratch, drop the table */
  snprintf(what, sizeof what, "%s.b", name);
  lua_getfield(L, t, "b");
  part->b = table_to_doubles(L, -1, arg, what, E * out * rank);
  lua_replace(L, -2);
  part->rank = (int32_t)rank;
  part->scale = (float)scale;
}

/* Fills d from the description table at di (argument arg) for the pool's layer. */
static void fill_desc(lua_State *L, lbox *pool, int di, int arg, lmoe_adapter_desc *d) {
  luaL_checktype(L, di, LUA_TTABLE);
  lmoe_layer_config c = layer_cfg(L, (lmoe_layer *)pool->aux);
  lua_Integer E = c.num_experts, H = c.hidden, I = c.intermediate;
  lmoe_adapter_desc_init(d);
  d->dtype = LMOE_DTYPE_F64;
  luaL_checkstack(L, 16, "loramoe: adapter description");
  load_part(L, di, arg, "gate", &d->gate, E, H, I);
  load_part(L, di, arg, "up", &d->up, E, H, I);
  load_part(L, di, arg, "gate_up", &d->gate_up, E, H, 2 * I);
  load_part(L, di, arg, "down", &d->down, E, I, H);
}

/* pool:load(slot, {gate=, up=, gate_up=, down=}): each part {a=, b=, rank=, scale=}
   with a = flat [E, rank, in], b = flat [E, out, rank] (PEFT's layout per expert). */
static int pool_load(lua_State *L) {
  lbox *b = checkpool(L, 1);
  int32_t slot = (int32_t)luaL_checkinteger(L, 2);
  lmoe_adapter_desc d;
  fill_desc(L, b, 3, 3, &d);
  return push_status(L, lmoe_pool_load((lmoe_pool *)b->h, slot, &d), b->ctx);
}

static int pool_unload(lua_State *L) {
  lbox *b = checkpool(L, 1);
  int32_t slot = (int32_t)luaL_checkinteger(L, 2);
  return push_status(L, lmoe_pool_unload((lmoe_pool *)b->h, slot), b->ctx);
}

static int pool_slot_info(lua_State *L) {
  lbox *b = checkpool(L, 1);
  int32_t slot = (int32_t)luaL_checkinteger(L, 2);
  lmoe_slot_info s;
  lmoe_status st = lmoe_pool_slot_info((lmoe_pool *)b->h, slot, &s);
  if (st) return push_fail(L, st, b->ctx);
  lua_createtable(L, 0, 12);
  set_bool(L, "loaded", s.loaded);
  lua_createtable(L, 3, 0);
  int n = 0;
  if (s.targets & LMOE_TARGET_GATE) {
    lua_pushliteral(L, "gate");
    lua_rawseti(L, -2, ++n);
  }
  if (s.targets & LMOE_TARGET_UP) {
    lua_pushliteral(L, "up");
    lua_rawseti(L, -2, ++n);
  }
  if (s.targets & LMOE_TARGET_DOWN) {
    lua_pushliteral(L, "down");
    lua_rawseti(L, -2, ++n);
  }
  lua_setfield(L, -2, "targets");
  set_bool(L, "fused", s.fused);
  set_int(L, "rank_gate", s.rank_gate);
  set_int(L, "rank_up", s.rank_up);
  set_int(L, "rank_down", s.rank_down);
  set_num(L, "scale_gate", s.scale_gate);
  set_num(L, "scale_up", s.scale_up);
  set_num(L, "scale_down", s.scale_down);
  set_int(L, "rank", s.max_rank);
  set_int(L, "bytes", s.bytes);
  set_int(L, "generation", s.generation);
  return 1;
}

/* ------------------------------------------------------------------ batch */

static lbox *checkbatch(lua_State *L, int idx) { return checkbox(L, idx, K_BATCH); }

/* batch:set(pool | nil, {{tokens=, adapter=}, ...}); adapter absent or -1: none. */
static int batch_set(lua_State *L) {
  lbox *b = checkbatch(L, 1);
  lmoe_pool *pool = NULL;
  if (!lua_isnoneornil(L, 2)) {
    luaL_argexpected(L, luaL_testudata(L, 2, kind_mt[K_POOL]) != NULL, 2, "loramoe.pool or nil");
    pool = (lmoe_pool *)checkpool(L, 2)->h;
  }
  luaL_checktype(L, 3, LUA_TTABLE);
  lua_Integer n = luaL_len(L, 3);
  if (n > INT32_MAX) luaL_argerror(L, 3, "too many requests");
  int32_t *v = (int32_t *)lua_newuserdatauv(L, (size_t)(n ? n : 1) * 2 * sizeof(int32_t), 0);
  int32_t *tokens = v, *slots = v + n;
  for (lua_Integer i = 0; i < n; i++) {
    if (lua_geti(L, 3, i + 1) != LUA_TTABLE)
      luaL_argerror(L, 3, lua_pushfstring(L, "request %I must be a table {tokens=, adapter=}", i + 1));
    int isint = 0;
    lua_getfield(L, -1, "tokens");
    lua_Integer t = strict_int(L, -1, &isint);
    if (!isint || t < INT32_MIN || t > INT32_MAX)
      luaL_argerror(L, 3, lua_pushfstring(L, "request %I: tokens must be an integer", i + 1));
    lua_pop(L, 1);
    lua_Integer s = LMOE_NO_ADAPTER;
    if (lua_getfield(L, -1, "adapter") != LUA_TNIL) {
      s = strict_int(L, -1, &isint);
      if (!isint || s < INT32_MIN || s > INT32_MAX)
        luaL_argerror(L, 3, lua_pushfstring(L, "request %I: adapter must be a slot number or nil", i + 1));
    }
    lua_pop(L, 2);
    tokens[i] = (int32_t)t;
    slots[i] = (int32_t)s;
  }
  return push_status(L, lmoe_batch_set((lmoe_batch *)b->h, pool, (int32_t)n, tokens, slots), b->ctx);
}

static int batch_info(lua_State *L) {
  lbox *b = checkbatch(L, 1);
  lmoe_batch_info i;
  lmoe_status st = lmoe_batch_get_info((lmoe_batch *)b->h, &i);
  if (st) return push_fail(L, st, b->ctx);
  lua_createtable(L, 0, 6);
  set_int(L, "requests", i.num_requests);
  set_int(L, "tokens", i.num_tokens);
  set_bool(L, "has_active", i.has_active);
  set_int(L, "active", i.num_active);
  set_int(L, "max_rank", i.max_rank);
  set_int(L, "max_slot", i.max_slot);
  return 1;
}

static int batch_offsets(lua_State *L) {
  lbox *b = checkbatch(L, 1);
  lmoe_batch_info i;
  lmoe_status st = lmoe_batch_get_info((lmoe_batch *)b->h, &i);
  if (st) return push_fail(L, st, b->ctx);
  int32_t cap = i.num_requests + 1;
  int64_t *o = (int64_t *)lua_newuserdatauv(L, (size_t)cap * sizeof *o, 0);
  int32_t n = lmoe_batch_offsets((lmoe_batch *)b->h, o, cap);
  lua_createtable(L, n, 0);
  for (int32_t k = 0; k < n; k++) {
    lua_pushinteger(L, (lua_Integer)o[k]);
    lua_rawseti(L, -2, k + 1);
  }
  return 1;
}

/* batch:active_slots() -> slots, tokens (two arrays, slots increasing) */
static int batch_active_slots(lua_State *L) {
  lbox *b = checkbatch(L, 1);
  lmoe_batch_info i;
  lmoe_status st = lmoe_batch_get_info((lmoe_batch *)b->h, &i);
  if (st) return push_fail(L, st, b->ctx);
  int32_t cap = i.num_active > 0 ? i.num_active : 1;
  int32_t *s = (int32_t *)lua_newuserdatauv(L, (size_t)cap * sizeof *s, 0);
  int64_t *t = (int64_t *)lua_newuserdatauv(L, (size_t)cap * sizeof *t, 0);
  int32_t n = lmoe_batch_active_slots((lmoe_batch *)b->h, s, t, cap);
  lua_createtable(L, n, 0);
  lua_createtable(L, n, 0);
  for (int32_t k = 0; k < n; k++) {
    lua_pushinteger(L, s[k]);
    lua_rawseti(L, -3, k + 1);
    lua_pushinteger(L, (lua_Integer)t[k]);
    lua_rawseti(L, -2, k + 1);
  }
  return 2;
}

/* ------------------------------------------------------------------ pool by name */

static int push_slot(lua_State *L, lmoe_status st, int32_t slot, const lmoe_context *ctx) {
  if (st) return push_fail(L, st, ctx);
  lua_pushinteger(L, slot);
  return 1;
}

/* pool:load_named(name, desc) -> slot */
static int pool_load_named(lua_State *L) {
  lbox *b = checkpool(L, 1);
  const char *name = luaL_checkstring(L, 2);
  lmoe_adapter_desc d;
  fill_desc(L, b, 3, 3, &d);
  int32_t slot = -1;
  lmoe_status st = lmoe_pool_load_named((lmoe_pool *)b->h, name, &d, &slot);
  return push_slot(L, st, slot, b->ctx);
}

/* pool:load_peft(name, peft, layer_index) -> slot */
static int pool_load_peft(lua_State *L) {
  lbox *b = checkpool(L, 1);
  const char *name = luaL_checkstring(L, 2);
  lmoe_peft *peft = (lmoe_peft *)checkbox(L, 3, K_PEFT)->h;
  int32_t layer = (int32_t)check_range(L, 4, 0, INT32_MAX, "layer");
  int32_t slot = -1;
  lmoe_status st = lmoe_pool_load_peft((lmoe_pool *)b->h, name, peft, layer, &slot);
  return push_slot(L, st, slot, b->ctx);
}

static int pool_unload_named(lua_State *L) {
  lbox *b = checkpool(L, 1);
  return push_status(L, lmoe_pool_unload_named((lmoe_pool *)b->h, luaL_checkstring(L, 2)), b->ctx);
}

/* pool:find(name) -> slot, or nil, "NOT_FOUND: ...", "NOT_FOUND" */
static int pool_find(lua_State *L) {
  lbox *b = checkpool(L, 1);
  const char *name = luaL_checkstring(L, 2);
  int32_t slot = -1;
  lmoe_status st = lmoe_pool_find((lmoe_pool *)b->h, name, &slot);
  if (st == LMOE_ERR_NOT_FOUND) /* not recorded in the context: say it here */
    return push_fail_msg(L, st, lua_pushfstring(L, "no slot holds an adapter named '%s'", name));
  return push_slot(L, st, slot, b->ctx);
}

static int pool_slot_name(lua_State *L) {
  lbox *b = checkpool(L, 1);
  const char *n = lmoe_pool_slot_name((lmoe_pool *)b->h, (int32_t)luaL_checkinteger(L, 2));
  lua_pushstring(L, n ? n : "");
  return 1;
}

static int pool_pin(lua_State *L) {
  lbox *b = checkpool(L, 1);
  return push_status(L, lmoe_pool_pin((lmoe_pool *)b->h, (int32_t)luaL_checkinteger(L, 2)), b->ctx);
}

static int pool_unpin(lua_State *L) {
  lbox *b = checkpool(L, 1);
  return push_status(L, lmoe_pool_unpin((lmoe_pool *)b->h, (int32_t)luaL_checkinteger(L, 2)), b->ctx);
}

static int pool_pin_count(lua_State *L) {
  lbox *b = checkpool(L, 1);
  lua_pushinteger(L, lmoe_pool_pin_count((lmoe_pool *)b->h, (int32_t)luaL_checkinteger(L, 2)));
  return 1;
}

static int pool_touch(lua_State *L) {
  lbox *b = checkpool(L, 1);
  return push_status(L, lmoe_pool_touch((lmoe_pool *)b->h, (int32_t)luaL_checkinteger(L, 2)), b->ctx);
}

static int pool_memory(lua_State *L) {
  lbox *b = checkpool(L, 1);
  lmoe_pool_memory m;
  memset(&m, 0, sizeof m);
  lmoe_status st = lmoe_pool_get_memory((lmoe_pool *)b->h, &m);
  if (st) return push_fail(L, st, b->ctx);
  lua_createtable(L, 0, 7);
  set_int(L, "slot_bytes", m.slot_bytes);
  set_int(L, "total_bytes", m.total_bytes);
  set_int(L, "slots", m.num_slots);
  set_int(L, "loaded_slots", m.loaded_slots);
  set_int(L, "loaded_bytes", m.loaded_bytes);
  set_int(L, "used_bytes", m.used_bytes);
  set_int(L, "evictions", m.evictions);
  return 1;
}

/* ------------------------------------------------------------------ safetensors */

static const char *const family_names[] = {"unknown", "qwen", "mixtral", NULL};
static const char *const layout_names[] = {"per_expert", "fused", NULL};

static void push_targets(lua_State *L, int32_t mask) {
  lua_createtable(L, 3, 0);
  int n = 0;
  if (mask & LMOE_TARGET_GATE) {
    lua_pushliteral(L, "gate");
    lua_rawseti(L, -2, ++n);
  }
  if (mask & LMOE_TARGET_UP) {
    lua_pushliteral(L, "up");
    lua_rawseti(L, -2, ++n);
  }
  if (mask & LMOE_TARGET_DOWN) {
    lua_pushliteral(L, "down");
    lua_rawseti(L, -2, ++n);
  }
}

/* ctx:safetensors(path) -> file */
static int ctx_safetensors(lua_State *L) {
  lmoe_context *ctx = checkctx(L, 1);
  const char *path = luaL_checkstring(L, 2);
  lbox *b = newbox(L, K_SAFETENSORS, 1);
  lmoe_safetensors *st = NULL;
  lmoe_status s = lmoe_safetensors_open(ctx, path, &st);
  if (s) return push_fail(L, s, ctx);
  b->h = st;
  b->ctx = ctx;
  b->owned = 1;
  return 1;
}

/* ctx:safetensors_string(bytes, name?) -> file, from bytes in memory (copied) */
static int ctx_safetensors_string(lua_State *L) {
  lmoe_context *ctx = checkctx(L, 1);
  size_t len = 0;
  const char *data = luaL_checklstring(L, 2, &len);
  const char *name = luaL_optstring(L, 3, "(string)");
  lbox *b = newbox(L, K_SAFETENSORS, 1);
  lmoe_safetensors *st = NULL;
  lmoe_status s = lmoe_safetensors_open_memory(ctx, data, len, name, &st);
  if (s) return push_fail(L, s, ctx);
  b->h = st;
  b->ctx = ctx;
  b->owned = 1;
  return 1;
}

static lbox *checkst(lua_State *L, int idx) { return checkbox(L, idx, K_SAFETENSORS); }

static int st_count(lua_State *L) {
  lua_pushinteger(L, lmoe_safetensors_count((lmoe_safetensors *)checkst(L, 1)->h));
  return 1;
}

/* Tensor index from an argument: a 0-based index, or a name. Pushes the failure and
   returns -1 when the name is absent. */
static int32_t tensor_index(lua_State *L, lbox *b, int arg) {
  if (lua_type(L, arg) == LUA_TSTRING) {
    int32_t idx = -1;
    const char *name = lua_tostring(L, arg);
    lmoe_status st = lmoe_safetensors_find((lmoe_safetensors *)b->h, name, &idx);
    if (st == LMOE_ERR_NOT_FOUND) {
      push_fail_msg(L, st, lua_pushfstring(L, "no tensor named '%s'", name));
      return -1;
    }
    if (st) {
      push_fail(L, st, b->ctx);
      return -1;
    }
    return idx;
  }
  return (int32_t)check_range(L, arg, 0, INT32_MAX, "tensor index");
}

static void push_tensor_info(lua_State *L, const lmoe_tensor_info *ti) {
  lua_createtable(L, 0, 8);
  set_str(L, "name", ti->name ? ti->name : "");
  set_str(L, "file_dtype", ti->dtype_name ? ti->dtype_name : "");
  if (ti->dtype >= 0 && ti->dtype <= LMOE_DTYPE_I32) {
    set_str(L, "dtype", dtype_names[ti->dtype]);
  }
  lua_createtable(L, ti->ndim, 0);
  for (int i = 0; i < ti->ndim && i < LMOE_TENSOR_MAX_DIMS; i++) {
    lua_pushinteger(L, (lua_Integer)ti->shape[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "shape");
  set_int(L, "numel", ti->numel);
  set_int(L, "offset", ti->offset);
  set_int(L, "bytes", ti->bytes);
}

/* file:tensor(index | name) -> {name=, dtype=, file_dtype=, shape=, numel=, offset=, bytes=} */
static int st_tensor(lua_State *L) {
  lbox *b = checkst(L, 1);
  int32_t idx = tensor_index(L, b, 2);
  if (idx < 0) return 3;
  lmoe_tensor_info ti;
  memset(&ti, 0, sizeof ti);
  lmoe_status st = lmoe_safetensors_tensor((lmoe_safetensors *)b->h, idx, &ti);
  if (st) return push_fail(L, st, b->ctx);
  push_tensor_info(L, &ti);
  return 1;
}

/* file:tensors() -> list of tensor tables, in file order */
static int st_tensors(lua_State *L) {
  lbox *b = checkst(L, 1);
  int32_t n = lmoe_safetensors_count((lmoe_safetensors *)b->h);
  lua_createtable(L, n > 0 ? n : 0, 0);
  for (int32_t i = 0; i < n; i++) {
    lmoe_tensor_info ti;
    memset(&ti, 0, sizeof ti);
    lmoe_status st = lmoe_safetensors_tensor((lmoe_safetensors *)b->h, i, &ti);
    if (st) return push_fail(L, st, b->ctx);
    push_tensor_info(L, &ti);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

/* file:find(name) -> 0-based index, or nil, "NOT_FOUND: ...", "NOT_FOUND" */
static int st_find(lua_State *L) {
  lbox *b = checkst(L, 1);
  luaL_checkstring(L, 2);
  int32_t idx = tensor_index(L, b, 2);
  if (idx < 0) return 3;
  lua_pushinteger(L, idx);
  return 1;
}

/* file:read(index | name) -> flat table of the tensor's values */
static int st_read(lua_State *L) {
  lbox *b = checkst(L, 1);
  int32_t idx = tensor_index(L, b, 2);
  if (idx < 0) return 3;
  lmoe_tensor_info ti;
  memset(&ti, 0, sizeof ti);
  lmoe_status st = lmoe_safetensors_tensor((lmoe_safetensors *)b->h, idx, &ti);
  if (st) return push_fail(L, st, b->ctx);
  if (ti.numel > INT_MAX) return push_fail_msg(L, LMOE_ERR_UNSUPPORTED, "tensor is too large for a Lua table");
  double *v = (double *)lua_newuserdatauv(L, (size_t)(ti.numel ? ti.numel : 1) * sizeof(double), 0);
  st = lmoe_safetensors_read((lmoe_safetensors *)b->h, idx, v, LMOE_DTYPE_F64, ti.numel);
  if (st) return push_fail(L, st, b->ctx);
  lua_createtable(L, (int)ti.numel, 0);
  for (int64_t i = 0; i < ti.numel; i++) {
    lua_pushnumber(L, v[i]);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  return 1;
}

/* file:metadata() -> {key = value} of __metadata__ */
static int st_metadata(lua_State *L) {
  lbox *b = checkst(L, 1);
  int32_t n = lmoe_safetensors_metadata_count((lmoe_safetensors *)b->h);
  lua_createtable(L, 0, n > 0 ? n : 0);
  for (int32_t i = 0; i < n; i++) {
    const char *k = NULL, *v = NULL;
    lmoe_status st = lmoe_safetensors_metadata((lmoe_safetensors *)b->h, i, &k, &v);
    if (st) return push_fail(L, st, b->ctx);
    lua_pushstring(L, v ? v : "");
    lua_setfield(L, -2, k ? k : "");
  }
  return 1;
}

/* ctx:write_safetensors(path, {{name=, dtype=, shape=, data=}, ...}, metadata?)
   data is a flat table of numbers (converted to dtype) or a host loramoe.buffer (its
   dtype and shape unless given). */
static int ctx_write_safetensors(lua_State *L) {
  lmoe_context *ctx = checkctx(L, 1);
  const char *path = luaL_checkstring(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  int has_meta = !lua_isnoneornil(L, 4);
  if (has_meta) luaL_checktype(L, 4, LUA_TTABLE);
  lua_settop(L, 4);
  lua_Integer n = luaL_len(L, 3);
  if (n > INT32_MAX) luaL_argerror(L, 3, "too many tensors");
  lmoe_tensor_entry *e = (lmoe_tensor_entry *)lua_newuserdatauv(L, (size_t)(n ? n : 1) * sizeof *e, 0);
  memset(e, 0, (size_t)(n ? n : 1) * sizeof *e);
  lua_newtable(L); /* 6: temporary buffers, released after the write */
  int temps = lua_gettop(L);
  int ntemp = 0;
  /* Pass 1: validate everything (may raise; nothing acquired yet). */
  for (lua_Integer i = 0; i < n; i++) {
    if (lua_geti(L, 3, i + 1) != LUA_TTABLE)
      luaL_argerror(L, 3, lua_pushfstring(L, "tensor %I must be a table {name=, dtype=, shape=, data=}", i + 1));
    int t = lua_gettop(L);
    if (lua_getfield(L, t, "name") != LUA_TSTRING)
      luaL_argerror(L, 3, lua_pushfstring(L, "tensor %I: name must be a string", i + 1));
    e[i].name = lua_tostring(L, -1);
    lua_pop(L, 1);
    lbox *src = NULL;
    lmoe_buffer_desc bd;
    lua_getfield(L, t, "data");
    if (luaL_testudata(L, -1, kind_mt[K_BUFFER])) {
      src = checkbox(L, lua_gettop(L), K_BUFFER);
      bd = describe(L, src);
    } else if (!lua_istable(L, -1)) {
      luaL_argerror(L, 3, lua_pushfstring(L, "tensor %I: data must be a table of numbers or a loramoe.buffer", i + 1));
    }
    lua_pop(L, 1);
    e[i].dtype = src ? bd.dtype : LMOE_DTYPE_F32;
    e[i].dtype = opt_field_option(L, t, 3, "dtype", dtype_names, e[i].dtype);
    if (lua_getfield(L, t, "shape") != LUA_TNIL) {
      int64_t shape[LMOE_MAX_DIMS];
      int nd = check_shape(L, lua_gettop(L), shape);
      e[i].ndim = nd;
      for (int d = 0; d < nd; d++) e[i].shape[d] = shape[d];
    } else if (src) {
      e[i].ndim = bd.ndim;
      for (int d = 0; d < bd.ndim; d++) e[i].shape[d] = bd.shape[d];
    } else {
      luaL_argerror(L, 3, lua_pushfstring(L, "tensor %I: shape is missing", i + 1));
    }
    lua_pop(L, 1);
    if (src) {
      if (bd.dtype != e[i].dtype)
        luaL_argerror(L, 3, lua_pushfstring(L, "tensor %I: dtype differs from its buffer's", i + 1));
      if (bd.memory != LMOE_MEMORY_HOST && lmoe_context_backend(src->ctx) != LMOE_BACKEND_CPU)
        luaL_argerror(L, 3, lua_pushfstring(L, "tensor %I: the buffer must be in host memory", i + 1));
      e[i].data = bd.data;
    }
    lua_pop(L, 1);
  }
  int32_t nmeta = 0;
  const char **mk = NULL, **mv = NULL;
  if (has_meta) {
    for (lua_pushnil(L); lua_next(L, 4); lua_pop(L, 1)) {
      if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
        luaL_argerror(L, 4, "metadata keys and values must be strings");
      nmeta++;
    }
    mk = (const char **)lua_newuserdatauv(L, (size_t)(nmeta ? nmeta : 1) * 2 * sizeof *mk, 0);
    mv = mk + nmeta;
    int32_t j = 0;
    for (lua_pushnil(L); lua_next(L, 4); lua_pop(L, 1)) {
      mk[j] = lua_tostring(L, -2);
      mv[j] = lua_tostring(L, -1);
      j++;
    }
  }
  /* Pass 2: convert table data into temporary host buffers of the entry's dtype. */
  lmoe_status st = LMOE_OK;
  for (lua_Integer i = 0; i < n && !st; i++) {
    if (e[i].data) continue;
    lua_geti(L, 3, i + 1);
    lua_getfield(L, -1, "data");
    int64_t numel = 1;
    for (int d = 0; d < e[i].ndim; d++) numel *= e[i].shape[d];
    char what[40];
    snprintf(what, sizeof what, "tensor %d data", (int)(i + 1));
    double *v = table_to_doubles(L, -1, 3, what, (lua_Integer)numel);
    lbox *tb = newbox(L, K_BUFFER, 1);
    lmoe_buffer *buf = NULL;
    int64_t flat[1] = {numel};
    st = lmoe_buffer_create(ctx, e[i].dtype, LMOE_MEMORY_HOST, 1, flat, &buf);
    if (!st) {
      tb->h = buf;
      tb->ctx = ctx;
      tb->owned = 1;
      st = lmoe_buffer_write(buf, 0, v, LMOE_DTYPE_F64, numel);
      lmoe_buffer_desc bd;
      if (!st) st = lmoe_buffer_describe(buf, &bd);
      if (!st) e[i].data = bd.data;
    }
    lua_rawseti(L, temps, ++ntemp); /* the box: freed below, or by the GC */
    lua_pop(L, 3);
  }
  if (!st) st = lmoe_safetensors_write(ctx, path, (int32_t)n, e, nmeta, mk, mv);
  for (int i = 1; i <= ntemp; i++) {
    lua_rawgeti(L, temps, i);
    box_release(K_BUFFER, (lbox *)lua_touserdata(L, -1));
    lua_pop(L, 1);
  }
  return push_status(L, st, ctx);
}

/* ------------------------------------------------------------------ PEFT adapters */

/* ctx:peft(path) -> adapter (a directory or its adapter_config.json) */
static int ctx_peft(lua_State *L) {
  lmoe_context *ctx = checkctx(L, 1);
  const char *path = luaL_checkstring(L, 2);
  lbox *b = newbox(L, K_PEFT, 1);
  lmoe_peft *p = NULL;
  lmoe_status st = lmoe_peft_open(ctx, path, &p);
  if (st) return push_fail(L, st, ctx);
  b->h = p;
  b->ctx = ctx;
  b->owned = 1;
  return 1;
}

static lbox *checkpeft(lua_State *L, int idx) { return checkbox(L, idx, K_PEFT); }

static int peft_info(lua_State *L) {
  lbox *b = checkpeft(L, 1);
  lmoe_peft_info i;
  lmoe_peft_info_init(&i);
  lmoe_status st = lmoe_peft_get_info((lmoe_peft *)b->h, &i);
  if (st) return push_fail(L, st, b->ctx);
  lua_createtable(L, 0, 15);
  set_str(L, "family", i.family >= 0 && i.family <= 2 ? family_names[i.family] : "unknown");
  set_str(L, "layout", i.layout >= 0 && i.layout <= 1 ? layout_names[i.layout] : "unknown");
  set_int(L, "rank", i.rank);
  set_num(L, "alpha", i.alpha);
  set_bool(L, "rslora", i.use_rslora);
  push_targets(L, i.targets);
  lua_setfield(L, -2, "targets");
  set_int(L, "layers", i.num_layers);
  set_int(L, "min_layer", i.min_layer);
  set_int(L, "max_layer", i.max_layer);
  set_int(L, "experts", i.num_experts);
  set_int(L, "max_rank", i.max_rank);
  set_bool(L, "has_patterns", i.has_patterns);
  set_int(L, "tensors", i.num_tensors);
  set_int(L, "bytes", i.bytes);
  return 1;
}

static int peft_layers(lua_State *L) {
  lbox *b = checkpeft(L, 1);
  lmoe_peft_info i;
  lmoe_peft_info_init(&i);
  lmoe_status st = lmoe_peft_get_info((lmoe_peft *)b->h, &i);
  if (st) return push_fail(L, st, b->ctx);
  int32_t cap = i.num_layers > 0 ? i.num_layers : 1;
  int32_t *v = (int32_t *)lua_newuserdatauv(L, (size_t)cap * sizeof *v, 0);
  int32_t n = lmoe_peft_layers((lmoe_peft *)b->h, v, cap);
  lua_createtable(L, n, 0);
  for (int32_t k = 0; k < n; k++) {
    lua_pushinteger(L, v[k]);
    lua_rawseti(L, -2, k + 1);
  }
  return 1;
}

static int peft_inspect(lua_State *L) {
  lbox *b = checkpeft(L, 1);
  size_t need = 0;
  char probe[1];
  lmoe_status st = lmoe_peft_inspect((lmoe_peft *)b->h, probe, sizeof probe, &need);
  if (st) return push_fail(L, st, b->ctx);
  char *buf = (char *)lua_newuserdatauv(L, need + 1, 0);
  st = lmoe_peft_inspect((lmoe_peft *)b->h, buf, need + 1, NULL);
  if (st) return push_fail(L, st, b->ctx);
  lua_pushstring(L, buf);
  return 1;
}

static void push_part(lua_State *L, const char *name, const lmoe_lora_part *p, lua_Integer E,
                      lua_Integer in, lua_Integer out) {
  if (!p->a || !p->b) return;
  lua_Integer r = p->rank, na = E * r * in, nb = E * out * r;
  const float *a = (const float *)p->a, *bv = (const float *)p->b;
  lua_createtable(L, 0, 4);
  lua_createtable(L, na > INT_MAX ? 0 : (int)na, 0);
  for (lua_Integer i = 0; i < na; i++) {
    lua_pushnumber(L, a[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "a");
  lua_createtable(L, nb > INT_MAX ? 0 : (int)nb, 0);
  for (lua_Integer i = 0; i < nb; i++) {
    lua_pushnumber(L, bv[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "b");
  set_int(L, "rank", r);
  set_num(L, "scale", p->scale);
  lua_setfield(L, -2, name);
}

/* peft:layer_desc(layer_index, {experts=, hidden=, intermediate=}) -> a description
   for pool:load ({gate=, up=, gate_up=, down=}, parts as Lua tables). */
static int peft_layer_desc(lua_State *L) {
  lbox *b = checkpeft(L, 1);
  int32_t layer = (int32_t)check_range(L, 2, 0, INT32_MAX, "layer");
  luaL_checktype(L, 3, LUA_TTABLE);
  lua_Integer E = opt_field_int(L, 3, 3, "experts", 0), H = opt_field_int(L, 3, 3, "hidden", 0),
              I = opt_field_int(L, 3, 3, "intermediate", 0);
  if (E < 1 || E > INT32_MAX) field_error(L, 3, "experts", "must be a positive integer");
  if (H < 1 || H > INT32_MAX) field_error(L, 3, "hidden", "must be a positive integer");
  if (I < 1 || I > INT32_MAX) field_error(L, 3, "intermediate", "must be a positive integer");
  lmoe_adapter_desc d;
  lmoe_adapter_desc_init(&d);
  lmoe_status st = lmoe_peft_layer_desc((lmoe_peft *)b->h, layer, (int32_t)E, (int32_t)H, (int32_t)I, &d);
  if (st) return push_fail(L, st, b->ctx);
  if (d.dtype != LMOE_DTYPE_F32) return push_fail_msg(L, LMOE_ERR_UNSUPPORTED, "layer_desc gave non-f32 arrays");
  lua_createtable(L, 0, 4);
  push_part(L, "gate", &d.gate, E, H, I);
  push_part(L, "up", &d.up, E, H, I);
  push_part(L, "gate_up", &d.gate_up, E, H, 2 * I);
  push_part(L, "down", &d.down, E, I, H);
  return 1;
}

/* ctx:write_peft(dir, {family=, layout=, layers=, experts=, hidden=, intermediate=,
   targets=, rank=, alpha=, rslora=, dtype=, seed=, scale=, rank_pattern={key=r},
   alpha_pattern={key=a}}): a synthetic PEFT adapter on disk. */
static int ctx_write_peft(lua_State *L) {
  lmoe_context *ctx = checkctx(L, 1);
  const char *dir = luaL_checkstring(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  lmoe_peft_synthetic s;
  lmoe_peft_synthetic_init(&s);
  s.family = opt_field_option(L, 3, 3, "family", family_names, s.family);
  s.layout = opt_field_option(L, 3, 3, "layout", layout_names, s.layout);
#define SYN_INT(f, k)                                                          \
  do {                                                                         \
    lua_Integer v_ = opt_field_int(L, 3, 3, k, s.f);                           \
    if (v_ < INT32_MIN || v_ > INT32_MAX) field_error(L, 3, k, "is out of range"); \
    s.f = (int32_t)v_;                                                         \
  } while (0)
  SYN_INT(num_layers, "layers");
  SYN_INT(num_experts, "experts");
  SYN_INT(hidden, "hidden");
  SYN_INT(intermediate, "intermediate");
  SYN_INT(rank, "rank");
#undef SYN_INT
  s.targets = targets_mask(L, 3, 3);
  s.alpha = (float)opt_field_num(L, 3, 3, "alpha", s.alpha);
  s.use_rslora = opt_field_bool(L, 3, 3, "rslora", s.use_rslora);
  s.dtype = opt_field_option(L, 3, 3, "dtype", dtype_names, s.dtype);
  s.seed = (uint64_t)opt_field_int(L, 3, 3, "seed", (lua_Integer)s.seed);
  s.scale = (float)opt_field_num(L, 3, 3, "scale", s.scale);
  static const char *const pats[2] = {"rank_pattern", "alpha_pattern"};
  for (int p = 0; p < 2; p++) {
    int ty = lua_getfield(L, 3, pats[p]);
    if (ty == LUA_TTABLE) {
      lua_pushnil(L);
      if (lua_next(L, -2)) {
        if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TNUMBER)
          field_error(L, 3, pats[p], "must be {key = number}");
        if (p == 0) {
          s.rank_pattern_key = lua_tostring(L, -2);
          s.rank_pattern_value = (int32_t)lua_tointeger(L, -1);
        } else {
          s.alpha_pattern_key = lua_tostring(L, -2);
          s.alpha_pattern_value = (float)lua_tonumber(L, -1);
        }
        lua_pop(L, 2);
        if (lua_next(L, -2)) field_error(L, 3, pats[p], "takes one entry");
      }
    } else if (ty != LUA_TNIL) {
      field_error(L, 3, pats[p], "must be {key = number}");
    }
    lua_pop(L, 1); /* the keys stay referenced by the spec table */
  }
  return push_status(L, lmoe_peft_write_synthetic(ctx, dir, &s), ctx);
}

/* ------------------------------------------------------------------ checkpoints */

/* ctx:checkpoint(path) -> checkpoint (a .safetensors file, an index, or a directory) */
static int ctx_checkpoint(lua_State *L) {
  lmoe_context *ctx = checkctx(L, 1);
  const char *path = luaL_checkstring(L, 2);
  lbox *b = newbox(L, K_CHECKPOINT, 1);
  lmoe_checkpoint *ck = NULL;
  lmoe_status st = lmoe_checkpoint_open(ctx, path, &ck);
  if (st) return push_fail(L, st, ctx);
  b->h = ck;
  b->ctx = ctx;
  b->owned = 1;
  return 1;
}

static int ck_layer_info(lua_State *L) {
  lbox *b = checkbox(L, 1, K_CHECKPOINT);
  int32_t layer = (int32_t)check_range(L, 2, 0, INT32_MAX, "layer");
  lmoe_checkpoint_layer_info i;
  lmoe_checkpoint_layer_info_init(&i);
  lmoe_status st = lmoe_checkpoint_get_layer_info((lmoe_checkpoint *)b->h, layer, &i);
  if (st) return push_fail(L, st, b->ctx);
  lua_createtable(L, 0, 5);
  set_str(L, "family", i.family >= 0 && i.family <= 2 ? family_names[i.family] : "unknown");
  set_int(L, "experts", i.num_experts);
  set_int(L, "hidden", i.hidden);
  set_int(L, "intermediate", i.intermediate);
  set_bool(L, "has_router", i.has_router);
  return 1;
}

/* ck:load_layer(index, layer, with_router?) -> router buffer [E, H] f32 (host) when
   with_router, else true */
static int ck_load_layer(lua_State *L) {
  lbox *b = checkbox(L, 1, K_CHECKPOINT);
  int32_t idx = (int32_t)check_range(L, 2, 0, INT32_MAX, "layer");
  lmoe_layer *layer = (lmoe_layer *)checklayer(L, 3)->h;
  int want = lua_toboolean(L, 4);
  if (!want) return push_status(L, lmoe_checkpoint_load_layer((lmoe_checkpoint *)b->h, idx, layer, NULL), b->ctx);
  lua_getiuservalue(L, 1, 1); /* the context box: the router's parent */
  lbox *rb = newbox(L, K_BUFFER, -1);
  lmoe_buffer *router = NULL;
  lmoe_status st = lmoe_checkpoint_load_layer((lmoe_checkpoint *)b->h, idx, layer, &router);
  if (router) { /* owned by the box even if the call failed after making it */
    rb->h = router;
    rb->ctx = b->ctx;
    rb->owned = 1;
  }
  if (st) return push_fail(L, st, b->ctx);
  return 1;
}

/* ------------------------------------------------------------------ graphs */

/* ctx:graph_begin(stream?): start capturing (cuda backend only). */
static int ctx_graph_begin(lua_State *L) {
  lmoe_context *ctx = checkctx(L, 1);
  return push_status(L, lmoe_graph_begin(ctx, opt_stream(L, 2)), ctx);
}

/* ctx:graph_end(stream?) -> graph: end the capture and instantiate it. */
static int ctx_graph_end(lua_State *L) {
  lmoe_context *ctx = checkctx(L, 1);
  void *s = opt_stream(L, 2);
  lbox *b = newbox(L, K_GRAPH, 1);
  lmoe_graph *g = NULL;
  lmoe_status st = lmoe_graph_end(ctx, s, &g);
  if (st) return push_fail(L, st, ctx);
  b->h = g;
  b->ctx = ctx;
  b->owned = 1;
  return 1;
}

/* graph:launch(stream?): enqueue one replay. */
static int graph_launch(lua_State *L) {
  lbox *b = checkbox(L, 1, K_GRAPH);
  return push_status(L, lmoe_graph_launch((lmoe_graph *)b->h, opt_stream(L, 2)), b->ctx);
}

/* ------------------------------------------------------------------ parents */

/* layer:context(), batch:context(), buffer:context(), pool:layer(): the object this
   one was made from (kept alive through uservalue 1). A borrowed buffer's parent is
   its layer, whose parent is the context. */
static int obj_parent(lua_State *L) {
  int kind = (int)lua_tointeger(L, lua_upvalueindex(1));
  lbox *b = checkbox(L, 1, kind);
  lua_getiuservalue(L, 1, 1);
  if (kind == K_BUFFER && b->borrowed) lua_getiuservalue(L, -1, 1);
  return 1;
}

/* ------------------------------------------------------------------ properties */

/* __index: methods first, then read-only properties of an open handle. */
static int obj_index(lua_State *L) {
  int kind = (int)lua_tointeger(L, lua_upvalueindex(2));
  lua_pushvalue(L, 2);
  if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL) return 1;
  const char *k = lua_tostring(L, 2);
  if (!k || lua_type(L, 2) != LUA_TSTRING) return 1;
  if (kind == K_CONTEXT) {
    if (strcmp(k, "backend") == 0) {
      int32_t be = lmoe_context_backend(checkctx(L, 1));
      lua_pushstring(L, be >= 0 && be <= 2 ? backend_names[be] : "unknown");
    } else if (strcmp(k, "threads") == 0) {
      lua_pushinteger(L, lmoe_context_threads(checkctx(L, 1)));
    } else if (strcmp(k, "guard") == 0) {
      int32_t g = lmoe_context_guard(checkctx(L, 1));
      lua_pushstring(L, g >= 0 && g <= 2 ? guard_names[g] : "unknown");
    }
  } else if (kind == K_BUFFER) {
    int which = strcmp(k, "dtype") == 0 ? 1 : strcmp(k, "memory") == 0 ? 2
              : strcmp(k, "numel") == 0 ? 3 : strcmp(k, "ndim") == 0 ? 4
              : strcmp(k, "bytes") == 0 ? 5 : 0;
    if (which) {
      lmoe_buffer_desc d = describe(L, checkbuf(L, 1));
      switch (which) {
      case 1: lua_pushstring(L, dtype_names[d.dtype]); break;
      case 2: lua_pushstring(L, memory_names[d.memory]); break;
      case 3: lua_pushinteger(L, (lua_Integer)d.numel); break;
      case 4: lua_pushinteger(L, d.ndim); break;
      default: lua_pushinteger(L, (lua_Integer)d.bytes); break;
      }
    }
  }
  return 1;
}

/* ------------------------------------------------------------------ registration */

static const luaL_Reg ctx_methods[] = {
    {"set_guard", ctx_set_guard},   {"stream", ctx_stream},
    {"synchronize", ctx_synchronize}, {"counters", ctx_counters},
    {"reset_counters", ctx_reset_counters}, {"last_error", ctx_last_error},
    {"buffer", ctx_buffer},         {"wrap", ctx_wrap},
    {"layer", ctx_layer},           {"batch", ctx_batch},
    {"safetensors", ctx_safetensors}, {"safetensors_string", ctx_safetensors_string},
    {"write_safetensors", ctx_write_safetensors}, {"peft", ctx_peft},
    {"write_peft", ctx_write_peft}, {"checkpoint", ctx_checkpoint},
    {"pointer", ctx_pointer},
    {"graph_begin", ctx_graph_begin}, {"graph_end", ctx_graph_end},
    {NULL, NULL}};

static const luaL_Reg buf_methods[] = {
    {"shape", buf_shape},     {"describe", buf_describe},       {"data", buf_data},
    {"write", buf_write},     {"read", buf_read},               {"fill_random", buf_fill_random},
    {"fill", buf_fill},       {"compare", buf_compare},         {"context", obj_parent},
    {NULL, NULL}};

static const luaL_Reg layer_methods[] = {
    {"config", layer_config},   {"randomize", layer_randomize}, {"set_weights", layer_set_weights},
    {"set_expert", layer_set_expert}, {"weights", layer_weights}, {"pool", layer_pool},
    {"forward", layer_forward}, {"reference", layer_reference}, {"context", obj_parent},
    {NULL, NULL}};

static const luaL_Reg pool_methods[] = {
    {"config", pool_config}, {"load", pool_load}, {"load_random", pool_load_random},
    {"unload", pool_unload}, {"slot_info", pool_slot_info}, {"layer", obj_parent},
    {"load_named", pool_load_named}, {"load_peft", pool_load_peft},
    {"unload_named", pool_unload_named}, {"find", pool_find}, {"slot_name", pool_slot_name},
    {"pin", pool_pin}, {"unpin", pool_unpin}, {"pin_count", pool_pin_count},
    {"touch", pool_touch}, {"memory", pool_memory}, {NULL, NULL}};

static const luaL_Reg st_methods[] = {
    {"count", st_count}, {"tensor", st_tensor}, {"tensors", st_tensors}, {"find", st_find},
    {"read", st_read},   {"metadata", st_metadata}, {"context", obj_parent}, {NULL, NULL}};

static const luaL_Reg peft_methods[] = {
    {"info", peft_info}, {"layers", peft_layers}, {"inspect", peft_inspect},
    {"layer_desc", peft_layer_desc}, {"context", obj_parent}, {NULL, NULL}};

static const luaL_Reg ck_methods[] = {
    {"layer_info", ck_layer_info}, {"load_layer", ck_load_layer}, {"context", obj_parent},
    {NULL, NULL}};

static const luaL_Reg batch_methods[] = {
    {"set", batch_set}, {"info", batch_info}, {"offsets", batch_offsets},
    {"active_slots", batch_active_slots}, {"context", obj_parent}, {NULL, NULL}};

static const luaL_Reg graph_methods[] = {
    {"launch", graph_launch}, {"context", obj_parent}, {NULL, NULL}};

static const luaL_Reg *const kind_methods[K_COUNT] = {ctx_methods,  buf_methods, layer_methods,
                                                      pool_methods, batch_methods, st_methods,
                                                      peft_methods, ck_methods, graph_methods};

static const luaL_Reg lib[] = {
    {"version", l_version},       {"status_string", l_status_string}, {"has_cuda", l_has_cuda},
    {"device_count", l_device_count}, {"device_info", l_device_info}, {"dtype_size", l_dtype_size},
    {"dtype_name", l_dtype_name}, {"lora_scale", l_lora_scale},       {"now", l_now},
    {"context", l_context},       {"adopt_context", l_adopt_context}, {NULL, NULL}};

/* Metatable for one kind; the methods table goes into `methods` (at mi) too. */
static void make_kind(lua_State *L, int kind, int mi) {
  luaL_newmetatable(L, kind_mt[kind]);
  lua_newtable(L); /* methods */
  lua_pushinteger(L, kind);
  luaL_setfuncs(L, kind_methods[kind], 1); /* the upvalue is unused by most; harmless */
  static const char *const common[] = {"close", "is_closed"};
  lua_CFunction cf[] = {obj_close, obj_is_closed};
  for (int i = 0; i < 2; i++) {
    lua_pushinteger(L, kind);
    lua_pushcclosure(L, cf[i], 1);
    lua_setfield(L, -2, common[i]);
  }
  lua_pushvalue(L, -1);
  lua_setfield(L, mi, kind_name[kind]);
  lua_pushinteger(L, kind);
  lua_pushcclosure(L, obj_index, 2); /* upvalues: methods, kind */
  lua_setfield(L, -2, "__index");
  lua_pushinteger(L, kind);
  lua_pushcclosure(L, obj_gc, 1);
  lua_pushvalue(L, -1);
  lua_setfield(L, -3, "__gc");
  lua_setfield(L, -2, "__close");
  lua_pushinteger(L, kind);
  lua_pushcclosure(L, obj_tostring, 1);
  lua_setfield(L, -2, "__tostring");
  lua_pushliteral(L, "locked");
  lua_setfield(L, -2, "__metatable");
  lua_pop(L, 1);
}

#ifdef _WIN32
__declspec(dllexport)
#else
__attribute__((visibility("default")))
#endif
int luaopen_loramoe_core(lua_State *L) {
  luaL_checkversion(L);
  luaL_newlib(L, lib);
  lua_newtable(L);
  int mi = lua_gettop(L);
  for (int k = 0; k < K_COUNT; k++) make_kind(L, k, mi);
  lua_setfield(L, -2, "methods");
  /* Presets live in the registry so ctx:layer("name") finds them; the module exposes
     the same table for the pure-Lua layer to fill. */
  if (lua_getfield(L, LUA_REGISTRYINDEX, PRESETS_KEY) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, PRESETS_KEY);
  }
  lua_setfield(L, -2, "presets");
  lua_pushliteral(L, LMOE_LUA_NAME);
  lua_setfield(L, -2, "_NAME");
  lua_pushfstring(L, "%d.%d.%d", (int)LMOE_VERSION_MAJOR, (int)LMOE_VERSION_MINOR,
                  (int)LMOE_VERSION_PATCH);
  lua_setfield(L, -2, "_VERSION");
  lua_pushliteral(L, "lua5.4");
  lua_setfield(L, -2, "runtime");
  return 1;
}
