// The page's worker: it holds the WebAssembly module (through the JavaScript face,
// loramoe.mjs) and runs the scripts, so a forward never blocks the page. Messages:
//
//   page -> worker   { type: 'init', threads }             load the module
//                    { type: 'put', files: [{ path, data }] }  files into its file system
//                    { type: 'run', id, name, code, args }     run a script
//   worker -> page   { type: 'ready', threads, variant, isolated }  or { type: 'fatal', message }
//                    { type: 'line', id, stream, text }      a line of stdout or stderr
//                    { type: 'progress', id, text }          the current progress line ('' clears)
//                    { type: 'put-done', paths } / { type: 'put-failed', message }
//                    { type: 'done', id, ok, result, error, files, ms }
//
// Only one message is handled at a time: a run holds this worker until it returns (the
// page's Stop button terminates the worker and starts another).

let lm;
let current = null; // the id of the run in progress: output lines carry it

// Splits the module's stdout and stderr into lines; a '\r' starts a progress line
// (loramoe's experiments rewrite one line with '\r' while they run).
function sink(stream) {
  const decoder = new TextDecoder();
  let line = '';
  let progress = false;
  let shown = '';
  return (bytes) => {
    const text = decoder.decode(bytes, { stream: true });
    for (const ch of text) {
      if (ch === '\n') {
        if (line.trim() !== '' || !progress) postMessage({ type: 'line', id: current, stream, text: line });
        line = '';
        progress = false;
      } else if (ch === '\r') {
        line = '';
        progress = true;
      } else {
        line += ch;
      }
    }
    if (progress && line.trimEnd() !== shown) {
      shown = line.trimEnd();
      postMessage({ type: 'progress', id: current, text: shown });
    }
  };
}

// Every file under dir, with its size and modification time.
function walk(FS, dir, out = new Map()) {
  let names;
  try {
    names = FS.readdir(dir);
  } catch {
    return out;
  }
  for (const name of names) {
    if (name === '.' || name === '..') continue;
    const p = dir === '/' ? `/${name}` : `${dir}/${name}`;
    if (['/dev', '/proc', '/tmp', '/loramoe', '/scripts', '/home'].includes(p)) continue;
    let st;
    try {
      st = FS.lstat(p);
    } catch {
      continue;
    }
    if (FS.isDir(st.mode)) walk(FS, p, out);
    else if (FS.isFile(st.mode)) out.set(p, `${st.size}:${st.mtime.getTime()}`);
  }
  return out;
}

const MAX_FILE = 4 << 20; // files larger than this are listed, not sent to the page

function handle(msg) {
  if (msg.type === 'init') {
    return import('./loramoe/loramoe.mjs').then(({ load, threadsAvailable }) => load({
      threads: msg.threads,
      env: { LORAMOE_PROGRESS: '1' },
      stdout: sink('stdout'),
      stderr: sink('stderr'),
    }).then((m) => {
      lm = m;
      postMessage({ type: 'ready', threads: lm.threads, variant: lm.threads > 1 ? 'mt' : 'st',
        isolated: threadsAvailable() });
    })).catch((e) => postMessage({ type: 'fatal', message: String(e && e.message || e) }));
  }
  if (msg.type === 'put') {
    try {
      for (const f of msg.files) lm.writeFile(f.path, new Uint8Array(f.data));
      postMessage({ type: 'put-done', paths: msg.files.map((f) => f.path) });
    } catch (e) {
      postMessage({ type: 'put-failed', message: e.message });
    }
    return undefined;
  }
  if (msg.type === 'run') {
    current = msg.id;
    const FS = lm.FS;
    const path = `/scripts/${msg.name}.lua`;
    const before = walk(FS, '/');
    const t0 = performance.now();
    let ok = true;
    let result = '';
    let error = '';
    try {
      lm.writeFile(path, msg.code);
      lm.reset(); // each run in a new Lua state, as each `loramoe run` is a new process
      result = lm.runFile(path, msg.args);
    } catch (e) {
      ok = false;
      error = e.message;
    }
    const ms = performance.now() - t0;
    // What the run wrote (new or changed files): SVG plots, JSON, CSV.
    const files = [];
    for (const [p, stamp] of walk(FS, '/')) {
      if (before.get(p) === stamp) continue;
      const size = Number(stamp.split(':')[0]);
      files.push({ path: p, size, data: size <= MAX_FILE ? FS.readFile(p) : null });
    }
    files.sort((a, b) => (a.path < b.path ? -1 : 1));
    postMessage({ type: 'done', id: msg.id, ok, result, error, files, ms },
      files.filter((f) => f.data).map((f) => f.data.buffer));
    current = null;
  }
  return undefined;
}

let queue = Promise.resolve();
onmessage = (e) => {
  queue = queue.then(() => handle(e.data));
};
