/*
 * loramoe — the command-line host: Lua 5.4 with the loramoe library built in.
 *
 * This file is also the model for embedding loramoe in your own Lua host. The steps
 * that matter are in new_state():
 *   1. open the standard libraries;
 *   2. register the C module under package.preload["loramoe.core"], so `require`
 *      finds it without a shared object on package.cpath;
 *   3. put the pure-Lua half of the binding (lua/loramoe/...) on package.path.
 * Everything else here is command-line plumbing.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "loramoe.h"

/* The Lua C module (lua/loramoe_core.c), linked in statically. */
int luaopen_loramoe_core(lua_State *L);

/* Set by cli/CMakeLists.txt; the defaults keep the file compilable on its own. */
#ifndef LMOE_LUA_BUILD_DIR
#define LMOE_LUA_BUILD_DIR ""
#endif
#ifndef LMOE_LUA_SOURCE_DIR
#define LMOE_LUA_SOURCE_DIR ""
#endif
#ifndef LMOE_LUA_INSTALL_DIR
#define LMOE_LUA_INSTALL_DIR "/usr/local/share/lua/5.4"
#endif

enum { EXIT_USAGE = 2 };

/* ------------------------------------------------------------------ Lua state */

/* Adds each ';'-separated entry of `dirs` to the buffer as "dir/?.lua;dir/?/init.lua;".
   An entry that contains '?' is already a template and is added as it is. */
static void add_path(luaL_Buffer *b, const char *dirs) {
  while (dirs && *dirs) {
    size_t n = strcspn(dirs, ";");
    if (n > 0) {
      if (memchr(dirs, '?', n)) {
        luaL_addlstring(b, dirs, n);
      } else {
        luaL_addlstring(b, dirs, n);
        luaL_addstring(b, "/?.lua;");
        luaL_addlstring(b, dirs, n);
        luaL_addstring(b, "/?/init.lua");
      }
      luaL_addchar(b, ';');
    }
    dirs += n + (dirs[n] == ';');
  }
}

/* package.path = $LORAMOE_LUA_PATH ; build tree ; install location ; the default. */
static int set_package_path(lua_State *L) {
  lua_getglobal(L, "package");
  int pkg = lua_gettop(L);
  /* The default (which honours LUA_PATH), read before the buffer may use the stack. */
  lua_getfield(L, pkg, "path");
  const char *def = lua_tostring(L, -1);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  add_path(&b, getenv("LORAMOE_LUA_PATH"));
  add_path(&b, LMOE_LUA_BUILD_DIR);
  add_path(&b, LMOE_LUA_SOURCE_DIR);
  add_path(&b, LMOE_LUA_INSTALL_DIR);
  if (def) luaL_addstring(&b, def);
  luaL_pushresult(&b);
  lua_setfield(L, pkg, "path");
  lua_settop(L, pkg - 1);
  return 0;
}

/* Runs in protected mode (see new_state), so an out-of-memory error can't escape. */
static int init_state(lua_State *L) {
  luaL_openlibs(L);
  /* package.preload["loramoe.core"] = luaopen_loramoe_core */
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_loramoe_core);
  lua_setfield(L, -2, "loramoe.core");
  lua_pop(L, 1);
  return set_package_path(L);
}

static lua_State *new_state(void) {
  lua_State *L = luaL_newstate();
  if (!L) {
    fputs("loramoe: cannot create a Lua state: out of memory\n", stderr);
    return NULL;
  }
  lua_pushcfunction(L, init_state);
  if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
    fprintf(stderr, "loramoe: %s\n", lua_tostring(L, -1));
    lua_close(L);
    return NULL;
  }
  return L;
}

/* Message handler: append a traceback to the error (as the lua interpreter does). */
static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (!msg) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
    msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* Prints the error on top of the stack; returns the exit status for a failure. */
static int report(lua_State *L) {
  const char *msg = lua_tostring(L, -1);
  fprintf(stderr, "loramoe: %s\n", msg ? msg : "(error without message)");
  lua_pop(L, 1);
  return EXIT_FAILURE;
}

/* ------------------------------------------------------------------ commands */

typedef int (*command_fn)(int argc, char **argv); /* argv[0] is the command's name */

static int cmd_help(int argc, char **argv);

/* loramoe run SCRIPT [ARGS...]: like `lua SCRIPT ARGS...`. The script sees the global
   `arg` (arg[0] = SCRIPT, arg[1..] = ARGS, arg[-1] = "run", arg[-2] = the program) and
   gets ARGS as `...`. SCRIPT "-" reads standard input. */
static int run_script(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = lua_touserdata(L, 2); /* argv[0] = "run", argv[-1] = the program */
  lua_createtable(L, argc - 2, 2);
  for (int i = -1; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - 1);
  }
  lua_setglobal(L, "arg");

  lua_pushcfunction(L, traceback);
  int handler = lua_gettop(L);
  const char *script = argv[1];
  if (luaL_loadfile(L, strcmp(script, "-") == 0 ? NULL : script) != LUA_OK) return lua_error(L);
  luaL_checkstack(L, argc, "too many arguments");
  for (int i = 2; i < argc; i++) lua_pushstring(L, argv[i]);
  if (lua_pcall(L, argc - 2, 0, handler) != LUA_OK) return lua_error(L); /* with traceback */
  return 0;
}

static int cmd_run(int argc, char **argv) {
  if (argc < 2) {
    fputs("loramoe: 'run' needs a script (loramoe run SCRIPT [ARGS...])\n", stderr);
    return EXIT_USAGE;
  }
  lua_State *L = new_state();
  if (!L) return EXIT_FAILURE;
  /* Everything that can raise runs under lua_pcall, as in the lua interpreter. */
  lua_pushcfunction(L, run_script);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  int status = lua_pcall(L, 2, 0, 0) == LUA_OK ? EXIT_SUCCESS : report(L);
  /* Closing the state runs the finalizers, which release the library's objects. */
  lua_close(L);
  return status;
}

/* loramoe info: what this build contains and what it can see. */
static int cmd_info(int argc, char **argv) {
  (void)argc, (void)argv;
  printf("loramoe %s\n", lmoe_version());
  int32_t has_cuda = lmoe_has_cuda();
  printf("CUDA:     %s\n", has_cuda ? "yes" : "no (CPU-only build)");
  printf("backends: cpu%s\n", has_cuda ? ", cuda" : "");

  int32_t n = 0;
  lmoe_status st = lmoe_device_count(&n);
  if (st != LMOE_OK) {
    printf("devices:  unknown (%s)\n", lmoe_status_string(st));
    n = 0;
  } else {
    printf("devices:  %d%s\n", (int)n, n == 0 && has_cuda ? " (the cpu backend will be used)" : "");
  }
  for (int32_t i = 0; i < n; i++) {
    lmoe_device_info d;
    memset(&d, 0, sizeof d);
    d.struct_size = sizeof d;
    st = lmoe_device_get_info(i, &d);
    if (st != LMOE_OK) {
      printf("  %d: (no information: %s)\n", (int)i, lmoe_status_string(st));
      continue;
    }
    printf("  %d: %s, sm_%d%d, %d SMs, %.1f GiB, L2 %.0f MiB\n", (int)i, d.name, (int)d.cc_major,
           (int)d.cc_minor, (int)d.sm_count, (double)d.memory_bytes / (1 << 30),
           (double)d.l2_bytes / (1 << 20));
  }
  printf("Lua:      %s\n", LUA_RELEASE);
  return EXIT_SUCCESS;
}

static int cmd_version(int argc, char **argv) {
  (void)argc, (void)argv;
  printf("loramoe %s\n", lmoe_version());
  return EXIT_SUCCESS;
}

/* `loramoe adapter ...` (cli/adapter.c). */
int lmoe_cli_adapter(int argc, char **argv);
/* `loramoe checkpoint ...` (cli/checkpoint.c). */
int lmoe_cli_checkpoint(int argc, char **argv);

/* Subcommands. To add one, write `static int cmd_x(int argc, char **argv)` and list it. */
static const struct command {
  const char *name;
  command_fn fn;
  const char *usage;
  const char *summary;
} commands[] = {
  {"run", cmd_run, "run SCRIPT [ARGS...]", "run a Lua script with loramoe available (- reads stdin)"},
  {"info", cmd_info, "info", "version, build options, CUDA devices, Lua version"},
  {"adapter", lmoe_cli_adapter, "adapter inspect|make", "inspect a PEFT adapter, or write a synthetic one"},
  {"checkpoint", lmoe_cli_checkpoint, "checkpoint quantize|info", "quantize a checkpoint to FP8, or describe a layer"},
  {"help", cmd_help, "help", "this text"},
  {"--help", cmd_help, NULL, NULL},
  {"-h", cmd_help, NULL, NULL},
  {"--version", cmd_version, "--version", "print the version"},
};
enum { NUM_COMMANDS = sizeof commands / sizeof commands[0] };

static void usage(FILE *f) {
  fprintf(f, "loramoe %s — MoE prefill with per-request LoRA adapters, scripted in Lua\n\n"
             "usage:\n", lmoe_version());
  for (int i = 0; i < NUM_COMMANDS; i++)
    if (commands[i].usage) fprintf(f, "  loramoe %-22s %s\n", commands[i].usage, commands[i].summary);
  fputs("\nenvironment:\n"
        "  LORAMOE_LUA_PATH  directories (or ?-templates, ';'-separated) searched first by\n"
        "                    require \"loramoe\"\n",
        f);
}

static int cmd_help(int argc, char **argv) {
  (void)argc, (void)argv;
  usage(stdout);
  return EXIT_SUCCESS;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    usage(stderr);
    return EXIT_USAGE;
  }
  for (int i = 0; i < NUM_COMMANDS; i++)
    if (strcmp(argv[1], commands[i].name) == 0) return commands[i].fn(argc - 1, argv + 1);
  fprintf(stderr, "loramoe: unknown command '%s' (see loramoe help)\n", argv[1]);
  return EXIT_USAGE;
}
