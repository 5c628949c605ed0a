// loramoe's JavaScript face: loads the WebAssembly module (Lua 5.4 with loramoe built
// in) and lets a host run Lua code and scripts, put files into the module's file system
// and read results back. Errors come back as LoramoeError exceptions carrying loramoe's
// (or Lua's) message; the module stays usable after one. docs/embedding.md documents it.
//
//   import { load } from './loramoe.mjs';
//   const lm = await load({ print: s => console.log(s) });
//   const out = lm.run('local lm = require "loramoe"; return lm._VERSION');
//
// Works in browsers (main thread or worker) and under Node.js 18+.

const isNode = typeof process === 'object' && !!(process.versions && process.versions.node);

/** Threads are possible when memory can be shared: Node, or a cross-origin-isolated page. */
export function threadsAvailable() {
  if (typeof SharedArrayBuffer !== 'function' || typeof Atomics !== 'object') return false;
  return isNode || globalThis.crossOriginIsolated === true;
}

function defaultThreads() {
  if (isNode) return 0; // filled in by load() from os.availableParallelism
  return (globalThis.navigator && navigator.hardwareConcurrency) || 1;
}

/** A failure inside the module: a Lua error (with its traceback) or a file-system error. */
export class LoramoeError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = 'LoramoeError';
  }
}

/**
 * Loads the module. Options:
 *   threads   'auto' (default): all cores when the host allows shared memory, else 1;
 *             1: the single-threaded build; n > 1: the threaded build with n threads
 *   print, printErr   receive each line written to stdout / stderr (default: console)
 *   stdout, stderr    receive the bytes written (a Uint8Array per write, '\r' kept)
 *             instead of print / printErr: for progress lines that rewrite themselves
 *   env       environment variables of the module ({ NAME: 'value' }), for os.getenv
 *   baseUrl   where st/ and mt/ lie (default: beside this file)
 *   thisProgram  argv[0] of the module's main (default 'loramoe')
 */
export async function load(options = {}) {
  const base = options.baseUrl ? new URL(options.baseUrl, import.meta.url) : new URL('./', import.meta.url);
  let threads = options.threads === undefined || options.threads === 'auto' ? 'auto' : Number(options.threads);
  if (threads === 'auto') {
    if (!threadsAvailable()) threads = 1;
    else if (isNode) threads = (await import('os')).availableParallelism?.() || (await import('os')).cpus().length;
    else threads = defaultThreads();
  }
  if (!(threads >= 1)) throw new LoramoeError(`threads must be 'auto' or a number >= 1, got ${options.threads}`);
  if (threads > 1 && !threadsAvailable())
    throw new LoramoeError('threads > 1 needs SharedArrayBuffer (a cross-origin-isolated page)');
  const variant = threads > 1 ? 'mt' : 'st';
  const dir = new URL(`${variant}/`, base);
  const { default: factory } = await import(new URL('loramoe.mjs', dir).href);
  const config = {
    loramoeThreads: threads,
    thisProgram: options.thisProgram || 'loramoe',
    locateFile: (path) => new URL(path, dir).href,
    print: options.print || ((s) => console.log(s)),
    printErr: options.printErr || ((s) => console.error(s)),
  };
  // The C library reads the environment once, as it starts: set it before that.
  if (options.env) config.preRun = [(m) => Object.assign(m.ENV, options.env)];
  if (isNode) {
    // The 3.1.6 glue would fetch() the .wasm under Node, which cannot fetch a file path.
    const { readFile } = await import('fs/promises');
    config.wasmBinary = await readFile(new URL('loramoe.wasm', dir));
    // mt: the workers load the worker script by path.
    config.locateFile = (path) => (path.endsWith('.js') || path.endsWith('.mjs')
      ? new URL(path, dir).pathname : new URL(path, dir).href);
  }
  const mod = await factory(config);
  for (const [fd, sink] of [[1, options.stdout], [2, options.stderr]]) {
    if (!sink) continue;
    // This stream alone writes to the sink, each write as it comes (the terminal
    // device would hold a line back until its newline).
    const stream = mod.FS.getStream(fd);
    stream.stream_ops = { ...stream.stream_ops,
      write: (s, buffer, offset, length) => {
        // a copy (not a view of the module's memory, which may be shared), as bytes
        if (length > 0) sink(new Uint8Array(buffer.slice(offset, offset + length).buffer));
        return length;
      } };
  }
  return new Loramoe(mod, threads);
}

/** One loaded module with one Lua state (made on first use). */
export class Loramoe {
  constructor(mod, threads) {
    this.module = mod;
    this.FS = mod.FS;
    /** Threads the cpu backend uses by default (lm.context{} without threads). */
    this.threads = threads;
    this._L = 0;
  }

  _state() {
    if (!this._L) {
      const L = this.module._lmoe_wasm_new();
      if (!L) throw new LoramoeError(this.module.UTF8ToString(this.module._lmoe_wasm_text()));
      this._L = L;
    }
    return this._L;
  }

  _call(code, name, args) {
    const m = this.module;
    const L = this._state();
    const strs = [];
    const cstr = (s) => {
      const n = m.lengthBytesUTF8(s) + 1;
      const p = m._malloc(n);
      if (!p) throw new LoramoeError('out of memory');
      strs.push(p);
      m.stringToUTF8(s, p, n);
      return p;
    };
    try {
      let codePtr = 0;
      let codeLen = 0;
      if (code !== null) {
        const bytes = typeof code === 'string' ? new TextEncoder().encode(code) : code;
        codeLen = bytes.length;
        codePtr = m._malloc(codeLen + 1);
        if (!codePtr) throw new LoramoeError('out of memory');
        strs.push(codePtr);
        m.HEAPU8.set(bytes, codePtr);
      }
      const namePtr = cstr(name);
      const argv = m._malloc(4 * (args.length + 1));
      if (!argv) throw new LoramoeError('out of memory');
      strs.push(argv);
      args.forEach((a, i) => { m.HEAPU32[(argv >> 2) + i] = cstr(String(a)); });
      const st = m._lmoe_wasm_run(L, codePtr, codeLen, namePtr, args.length, argv);
      const text = m.UTF8ToString(m._lmoe_wasm_text());
      if (st !== 0) throw new LoramoeError(text);
      return text;
    } finally {
      for (const p of strs) m._free(p);
    }
  }

  /** Runs Lua code; returns its first result as a string ('' when none). */
  run(code, { name = '=(run)', args = [] } = {}) {
    return this._call(code, name, args);
  }

  /** Runs a Lua script of the module's file system, with args as `...` and `arg`. */
  runFile(path, args = []) {
    return this._call(null, path, args);
  }

  /** Writes a file (string or bytes), making its directories. */
  writeFile(path, data) {
    try {
      const dir = path.substring(0, path.lastIndexOf('/'));
      if (dir) this.FS.mkdirTree(dir);
      this.FS.writeFile(path, data);
    } catch (e) {
      throw new LoramoeError(`${path}: cannot write (${fsReason(e)})`);
    }
  }

  /** Reads a file: bytes, or a string with { encoding: 'utf8' }. */
  readFile(path, { encoding } = {}) {
    try {
      return this.FS.readFile(path, encoding ? { encoding } : undefined);
    } catch (e) {
      throw new LoramoeError(`${path}: cannot read (${fsReason(e)})`);
    }
  }

  /** Makes a directory and its parents. */
  mkdir(path) {
    try {
      this.FS.mkdirTree(path);
    } catch (e) {
      throw new LoramoeError(`${path}: cannot make the directory (${fsReason(e)})`);
    }
  }

  /** Closes the Lua state (its objects are released); the next run makes a new one. */
  reset() {
    if (this._L) this.module._lmoe_wasm_close(this._L);
    this._L = 0;
  }
}

function fsReason(e) {
  const codes = { 44: 'no such file or directory', 54: 'not a directory', 31: 'is a directory',
    20: 'exists', 2: 'permission denied', 48: 'out of memory', 51: 'no space' };
  if (e && typeof e.errno === 'number') return codes[e.errno] || `errno ${e.errno}`;
  return String(e && e.message || e);
}
