#!/usr/bin/env node
// The `loramoe` command under Node.js: the native CLI's main (cli/main.c) built into the
// WebAssembly module, with the same arguments:
//
//   node build-wasm/node-runner.mjs run SCRIPT [ARGS...]     (or build-wasm/loramoe ...)
//
// The host's file system is visible at the same paths (each top-level directory is
// mounted), the working directory and the environment are the host's, and the exit
// status is the command's. LORAMOE_WASM_THREADS=1 picks the single-threaded build
// (default: the threaded one, with one thread per core).
import { load } from './loramoe.mjs';
import fs from 'fs';
import path from 'path';

const threadsEnv = process.env.LORAMOE_WASM_THREADS;
const lines = { out: [], err: [] };
let lm;
try {
  lm = await load({
    threads: threadsEnv ? Number(threadsEnv) : 'auto',
    print: (s) => fs.writeSync(1, s + '\n'),
    printErr: (s) => fs.writeSync(2, s + '\n'),
  });
} catch (e) {
  process.stderr.write(`loramoe: cannot load the WebAssembly module: ${e.message}\n`);
  process.exit(1);
}
const m = lm.module;
const FS = m.FS;

// NODEFS (3.1.6) turns a relative link target into a path relative to the mount's root
// as seen from Node's working directory, which breaks links like Debian's
// /usr/share/lua/5.4/x.lua -> ../5.1/x.lua. The host's paths are the module's paths
// here, so the target can be given as it is.
m.NODEFS.node_ops.readlink = (node) => {
  try {
    return fs.readlinkSync(m.NODEFS.realPath(node));
  } catch (e) {
    if (!e.code) throw e;
    throw new FS.ErrnoError(m.NODEFS.convertNodeCode(e));
  }
};

// Mount the host's top-level directories over the module's own root, except those the
// module needs for itself (/dev, /proc) and the one that holds the built-in Lua files.
for (const name of fs.readdirSync('/')) {
  if (['dev', 'proc', 'sys', 'loramoe'].includes(name)) continue;
  const host = '/' + name;
  let st;
  try { st = fs.statSync(host); } catch { continue; }
  if (!st.isDirectory()) continue;
  try {
    if (!FS.analyzePath(host).exists) FS.mkdir(host);
    FS.mount(m.NODEFS, { root: host }, host);
  } catch { /* a directory the module cannot take over: not visible */ }
}
try { FS.chdir(process.cwd()); } catch { /* cwd outside the mounts: stay at / */ }
Object.assign(m.ENV, process.env);

const status = m.callMain(process.argv.slice(2));
m._fflush(0);
// Lines the module's stdio still holds (io.write without a newline).
for (const fd of [1, 2]) {
  const stream = FS.getStream(fd);
  if (stream && stream.tty && stream.tty.output && stream.tty.output.length) {
    fs.writeSync(fd, Buffer.from(stream.tty.output));
    stream.tty.output = [];
  }
}
process.exit(typeof status === 'number' ? status : 1);
