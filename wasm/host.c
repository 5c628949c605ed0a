/*
 * The C side of loramoe's JavaScript face (wasm/loramoe.mjs): a Lua 5.4 state with the
 * loramoe module preloaded, as in cli/main.c, and one call that runs a chunk (code or a
 * file of the module's file system) and leaves its result or error text for JavaScript.
 * Only built into the WebAssembly module.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "loramoe.h"

#define LMOE_WASM_EXPORT __attribute__((used, visibility("default")))

int luaopen_loramoe_core(lua_State *L);

/* The last result or error text, owned here, read by JavaScript. */
static char *last_text;

static void set_text(const char *s, size_t n) {
  free(last_text);
  last_text = malloc(n + 1);
  if (last_text) {
    memcpy(last_text, s, n);
    last_text[n] = '\0';
  }
}

/* os.exit would end the runtime under the host's feet: it raises instead. */
static int host_exit(lua_State *L) {
  lua_Integer code = lua_isboolean(L, 1) ? (lua_toboolean(L, 1) ? 0 : 1) : luaL_optinteger(L, 1, 0);
  return luaL_error(L, "os.exit(%d) called: exits are not available in this host", (int)code);
}

/* mkdir -p: the directory and its parents; 0 or -1 (errno set). */
static int mkdir_p(char *path) {
  for (char *p = path + 1;; p++) {
    if (*p != '/' && *p != '\0') continue;
    char c = *p;
    *p = '\0';
    struct stat st;
    int bad = mkdir(path, 0777) != 0 && (errno != EEXIST || stat(path, &st) != 0 || !S_ISDIR(st.st_mode));
    *p = c;
    if (bad) return -1;
    if (c == '\0') return 0;
  }
}

/* One shell word of s into b: plain characters, '...' and \x (how report.mkdir quotes
   a path). Returns where the word ends in s (a space or the end), or NULL at a
   character a shell would treat specially ($, `, ;, ...). */
static const char *shell_word(const char *s, luaL_Buffer *b) {
  while (*s && *s != ' ') {
    if (*s == '\'') {
      const char *e = strchr(s + 1, '\'');
      if (!e) return NULL;
      luaL_addlstring(b, s + 1, (size_t)(e - s - 1));
      s = e + 1;
    } else if (*s == '\\' && s[1]) {
      luaL_addchar(b, s[1]);
      s += 2;
    } else if (strchr("\"$`;&|<>()*?[]{}~#!\t\n", *s)) {
      return NULL;
    } else {
      luaL_addchar(b, *s++);
    }
  }
  return s;
}

/* os.execute where there is no shell (a browser: system() fails there). loramoe's Lua
   files run two commands, `mkdir -p DIR` (before writing results) and `test -t FD`
   (whether progress lines go to a terminal): this host does those two itself and
   answers the rest as a shell that cannot find them (fail, "exit", 127). */
static int host_execute(lua_State *L) {
  const char *cmd = luaL_optstring(L, 1, NULL);
  if (!cmd) {
    lua_pushboolean(L, 0); /* no shell */
    return 1;
  }
  int status = 127;
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  if (strncmp(cmd, "mkdir -p ", 9) == 0) {
    const char *e = shell_word(cmd + 9, &b);
    luaL_pushresult(&b);
    if (e && *e == '\0' && lua_rawlen(L, -1) > 0) {
      char *path = strdup(lua_tostring(L, -1));
      status = path && mkdir_p(path) == 0 ? 0 : 1;
      free(path);
    }
  } else if (strncmp(cmd, "test -t ", 8) == 0) {
    const char *e = shell_word(cmd + 8, &b);
    luaL_pushresult(&b);
    const char *fd = lua_tostring(L, -1);
    if (e && *e == '\0' && fd[0] >= '0' && fd[0] <= '9' && fd[1] == '\0')
      status = isatty(fd[0] - '0') ? 0 : 1;
  } else {
    luaL_pushresult(&b);
  }
  if (status == 0) lua_pushboolean(L, 1);
  else luaL_pushfail(L);
  lua_pushliteral(L, "exit");
  lua_pushinteger(L, status);
  return 3;
}

static int init_state(lua_State *L) {
  luaL_openlibs(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_loramoe_core);
  lua_setfield(L, -2, "loramoe.core");
  lua_pop(L, 1);
  lua_getglobal(L, "package");
  lua_pushliteral(L, "/loramoe/lua/?.lua;/loramoe/lua/?/init.lua;./?.lua;./?/init.lua");
  lua_setfield(L, -2, "path");
  lua_pop(L, 1);
  lua_getglobal(L, "os");
  lua_pushcfunction(L, host_exit);
  lua_setfield(L, -2, "exit");
  if (!system(NULL)) {
    lua_pushcfunction(L, host_execute);
    lua_setfield(L, -2, "execute");
  }
  lua_pop(L, 1);
  return 0;
}

/* A new state, or NULL (the text says why). */
LMOE_WASM_EXPORT lua_State *lmoe_wasm_new(void) {
  lua_State *L = luaL_newstate();
  if (!L) {
    set_text("cannot create a Lua state: out of memory", 40);
    return NULL;
  }
  lua_pushcfunction(L, init_state);
  if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
    size_t n;
    const char *m = lua_tolstring(L, -1, &n);
    set_text(m ? m : "?", m ? n : 1);
    lua_close(L);
    return NULL;
  }
  return L;
}

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (!msg) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
    msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* Runs `code` (len bytes, named `name`), or the file `name` when code is NULL, with
   the strings of args (nargs of them) as `...` and as the global `arg`. Returns 0 and
   the first result as text (tostring; empty when none), or 1 and the error with its
   traceback. The state stays usable either way. */
LMOE_WASM_EXPORT int lmoe_wasm_run(lua_State *L, const char *code, size_t len, const char *name,
                                   int nargs, const char **args) {
  int base = lua_gettop(L);
  lua_pushcfunction(L, traceback);
  int st = code ? luaL_loadbuffer(L, code, len, name) : luaL_loadfile(L, name);
  if (st == LUA_OK && !lua_checkstack(L, nargs + 4)) {
    lua_pushliteral(L, "too many arguments");
    st = LUA_ERRMEM;
  }
  if (st == LUA_OK) {
    lua_createtable(L, nargs, 1);
    lua_pushstring(L, name);
    lua_rawseti(L, -2, 0);
    for (int i = 0; i < nargs; i++) {
      lua_pushstring(L, args[i]);
      lua_rawseti(L, -2, i + 1);
    }
    lua_setglobal(L, "arg");
    for (int i = 0; i < nargs; i++) lua_pushstring(L, args[i]);
    st = lua_pcall(L, nargs, 1, base + 1);
  }
  size_t n = 0;
  const char *s = st == LUA_OK && lua_isnil(L, -1) ? "" : luaL_tolstring(L, -1, &n);
  set_text(s, n);
  lua_settop(L, base);
  /* What a script printed with io.write reaches the host now, not at the next newline. */
  fflush(stdout);
  fflush(stderr);
  return st == LUA_OK ? 0 : 1;
}

LMOE_WASM_EXPORT const char *lmoe_wasm_text(void) { return last_text ? last_text : ""; }

/* Runs the finalizers: the library's objects are released. Accepts NULL. */
LMOE_WASM_EXPORT void lmoe_wasm_close(lua_State *L) {
  if (L) lua_close(L);
}

/* The cpu backend's default thread count in this module (1 without threads). */
LMOE_WASM_EXPORT int lmoe_wasm_threads(void) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? (int)n : 1;
}
