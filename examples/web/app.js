// The page: a script editor over loramoe's WebAssembly module. The module lives in a
// worker (worker.js), so the page stays responsive while a forward runs; this file
// only edits, sends files and scripts to the worker, and shows what comes back:
// output lines, the progress line, the SVG plots and other files a script wrote.
//
// URL parameters: ?threads=1 (the one-thread module), ?autorun=quickstart,rank_sweep
// (run these scripts, with their default arguments, once the module is loaded).

const $ = (sel) => document.querySelector(sel);
const params = new URLSearchParams(location.search);
const html = document.documentElement;

const scripts = new Map(); // name -> { name, file, about, code (as edited) }
let worker = null;
let ready = false;
let running = null; // { id, el, resolve }
let nextId = 1;
let adapter = null; // { name, files: [{ path, data }] }: put again into a new worker

function setState(state, text) {
  html.dataset.state = state;
  if (text !== undefined) $('#status').textContent = text;
  $('#run').disabled = state !== 'ready';
  $('#stop').disabled = state !== 'running';
  $('#threads').disabled = state === 'running';
}

// ---------------------------------------------------------------- the worker

function startWorker() {
  ready = false;
  setState('loading', 'loading the module…');
  worker = new Worker('worker.js', { type: 'module' });
  worker.onmessage = (e) => onWorker(e.data);
  worker.onerror = (e) => {
    e.preventDefault();
    fatal(`the worker failed: ${e.message || 'no message (see the browser console)'}`);
  };
  worker.postMessage({ type: 'init', threads: $('#threads').value === 'auto' ? 'auto' : Number($('#threads').value) });
}

function fatal(message) {
  setState('fatal', message);
  if (running) finish({ ok: false, error: message, files: [], ms: 0 });
}

function onWorker(m) {
  switch (m.type) {
    case 'ready':
      ready = true;
      setState('ready', `module loaded: ${m.threads} thread${m.threads > 1 ? 's' : ''} (${m.variant === 'mt'
        ? 'threaded build' : 'one-thread build'}${m.isolated ? '' : ', page not cross-origin isolated'})`);
      html.dataset.threads = m.threads;
      if (adapter) worker.postMessage({ type: 'put', files: adapter.files });
      break;
    case 'fatal':
      fatal(`cannot load the module: ${m.message}`);
      break;
    case 'line':
      if (running && m.id === running.id) {
        const span = document.createElement('span');
        if (m.stream === 'stderr') span.className = 'stderr';
        span.textContent = m.text + '\n';
        running.el.querySelector('pre.out').append(span);
      }
      break;
    case 'progress':
      showProgress(m.text);
      break;
    case 'put-done':
      $('#adapter-status').textContent = `in the module at /adapters/${adapter.name} (${adapter.files.length} files, ${
        kb(adapter.files.reduce((n, f) => n + f.data.byteLength, 0))})`;
      html.dataset.adapter = `/adapters/${adapter.name}`;
      break;
    case 'put-failed':
      $('#adapter-status').textContent = `not loaded: ${m.message}`;
      break;
    case 'done':
      if (running && m.id === running.id) finish(m);
      break;
    default:
      break;
  }
}

// The experiments' progress line, as text and as a bar: "[i/n] point ... rep j/m" is
// (i - 1 + j/m) / n done; a line without those numbers leaves the bar indeterminate.
function showProgress(text) {
  const box = $('#progress');
  const bar = box.querySelector('progress');
  box.hidden = text === '';
  box.querySelector('code').textContent = text;
  if (!text) return;
  box.dataset.updates = Number(box.dataset.updates || 0) + 1;
  const point = text.match(/^\[(\d+)\/(\d+)\]/);
  const rep = text.match(/rep (\d+)\/(\d+)/);
  const frac = rep ? rep[1] / rep[2] : 0;
  if (point || rep) bar.value = point ? (point[1] - 1 + frac) / point[2] : frac;
  else bar.removeAttribute('value');
}

// ---------------------------------------------------------------- runs

function kb(n) {
  return n < 1024 ? `${n} B` : n < 1 << 20 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1048576).toFixed(1)} MB`;
}

function splitArgs(s) {
  return (s.match(/"[^"]*"|'[^']*'|\S+/g) || []).map((a) => a.replace(/^(["'])(.*)\1$/, '$2'));
}

/** Runs the editor's script with the arguments field; resolves when it is done. */
function run() {
  if (!ready || running) return Promise.resolve(null);
  const name = $('#script').value;
  const args = splitArgs($('#args').value);
  const el = document.createElement('article');
  el.className = 'run';
  el.dataset.name = name;
  el.dataset.status = 'running';
  const h = document.createElement('h2');
  h.textContent = `${name}.lua `;
  const meta = document.createElement('span');
  meta.className = 'meta';
  meta.textContent = `${args.join(' ')}${args.length ? ' · ' : ''}${html.dataset.threads} thread(s) · running…`;
  h.append(meta);
  const out = document.createElement('pre');
  out.className = 'out';
  const plots = document.createElement('div');
  plots.className = 'plots';
  const files = document.createElement('div');
  files.className = 'files';
  el.append(h, out, plots, files);
  $('#runs').prepend(el);
  setState('running');
  return new Promise((resolve) => {
    running = { id: nextId++, el, meta, args, resolve };
    worker.postMessage({ type: 'run', id: running.id, name, code: $('#code').value, args });
  });
}

function finish(m) {
  const { el, meta, args, resolve } = running;
  running = null;
  $('#progress').hidden = true;
  el.dataset.status = m.ok ? 'ok' : 'error';
  meta.textContent = `${args.join(' ')}${args.length ? ' · ' : ''}${html.dataset.threads} thread(s) · ${
    m.ok ? 'done' : 'failed'} in ${(m.ms / 1000).toFixed(2)} s`;
  if (m.ok && m.result) el.querySelector('pre.out').append(`→ ${m.result}\n`);
  if (!m.ok) {
    const err = document.createElement('pre');
    err.className = 'error';
    err.textContent = m.error;
    el.querySelector('pre.out').after(err);
  }
  for (const f of m.files) {
    if (f.data && f.path.endsWith('.svg')) {
      const svg = parseSvg(new TextDecoder().decode(f.data));
      if (svg) {
        svg.dataset.path = f.path;
        el.querySelector('.plots').append(svg);
      }
    }
    const a = document.createElement(f.data ? 'a' : 'span');
    a.textContent = `${f.path} (${kb(f.size)})`;
    if (f.data) {
      a.href = URL.createObjectURL(new Blob([f.data]));
      a.download = f.path.split('/').pop();
    }
    el.querySelector('.files').append(a);
  }
  if (html.dataset.state === 'running') setState('ready');
  resolve(m);
}

// An SVG a script wrote, as an element of this page: parsed as XML, with scripts,
// foreign content and event handlers taken out (the page shows plots, nothing else).
function parseSvg(text) {
  const doc = new DOMParser().parseFromString(text, 'image/svg+xml');
  const root = doc.documentElement;
  if (root.nodeName !== 'svg' || doc.querySelector('parsererror')) return null;
  for (const bad of root.querySelectorAll('script, foreignObject, iframe, object, embed')) bad.remove();
  for (const node of [root, ...root.querySelectorAll('*')]) {
    for (const at of [...node.attributes]) {
      if (/^on/i.test(at.name) || (/href$/i.test(at.name) && !at.value.startsWith('#'))) node.removeAttribute(at.name);
    }
  }
  return document.importNode(root, true);
}

function stop() {
  if (!running) return;
  worker.terminate();
  fatal('stopped');
  startWorker();
}

// ---------------------------------------------------------------- scripts

async function loadScripts() {
  const list = await (await fetch('examples/index.json')).json();
  list.push({ name: 'load_adapter', file: 'load_adapter.lua', about: 'Load a PEFT adapter from disk (pick one below) and check a forward that uses it.' });
  for (const s of list) {
    scripts.set(s.name, { ...s, code: null });
    const o = document.createElement('option');
    o.value = s.name;
    o.textContent = `${s.name}.lua`;
    $('#script').append(o);
  }
}

async function pick(name, args = '') {
  const cur = scripts.get($('#script').value);
  if (cur && cur.code !== null) cur.code = $('#code').value; // keep edits per script
  const s = scripts.get(name);
  $('#script').value = name;
  $('#about').textContent = s.about;
  if (s.code === null) s.code = await (await fetch(s.file)).text();
  $('#code').value = s.code;
  $('#args').value = args;
}

// ---------------------------------------------------------------- adapters

// Files picked from the user's disk into the module's file system, under /adapters:
// a directory keeps its name and layout, loose files go to /adapters/picked.
async function putAdapter(fileList) {
  const files = [...fileList];
  if (!files.length) return;
  const rel = (f) => f.webkitRelativePath || `picked/${f.name}`;
  const name = rel(files[0]).split('/')[0].replace(/[^\w.-]/g, '_');
  $('#adapter-status').textContent = 'reading…';
  const put = [];
  for (const f of files) {
    const parts = rel(f).split('/').slice(1).map((p) => p.replace(/[^\w.-]/g, '_'));
    put.push({ path: `/adapters/${name}/${parts.join('/')}`, data: await f.arrayBuffer() });
  }
  adapter = { name, files: put };
  if (!files.some((f) => f.name === 'adapter_config.json'))
    $('#adapter-status').textContent = 'no adapter_config.json among the files picked';
  if (ready) worker.postMessage({ type: 'put', files: put.map((f) => ({ path: f.path, data: f.data.slice(0) })) });
  if (!running) await pick('load_adapter', `/adapters/${name}`);
}

// ---------------------------------------------------------------- start

async function main() {
  if (params.get('threads') === '1') $('#threads').value = '1';
  $('#run').onclick = () => run();
  $('#stop').onclick = () => stop();
  $('#clear').onclick = () => { $('#runs').textContent = ''; };
  $('#threads').onchange = () => { worker.terminate(); startWorker(); };
  $('#script').onchange = () => pick($('#script').value);
  $('#adapter-dir').onchange = (e) => putAdapter(e.target.files);
  $('#adapter-files').onchange = (e) => putAdapter(e.target.files);
  $('#code').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); run(); }
    if (e.key === 'Tab') { e.preventDefault(); document.execCommand('insertText', false, '  '); }
  });
  startWorker();
  try {
    await loadScripts();
    await pick('quickstart');
  } catch (e) {
    fatal(`cannot list the scripts: ${e.message}`);
    return;
  }
  const autorun = (params.get('autorun') || '').split(',').filter((s) => scripts.has(s));
  if (autorun.length) {
    await new Promise((ok) => { const t = setInterval(() => { if (ready || html.dataset.state === 'fatal') { clearInterval(t); ok(); } }, 50); });
    for (const name of autorun) {
      await pick(name);
      await run();
    }
    html.dataset.autorun = 'done';
  }
}

main();
