#!/usr/bin/env node
// Serves the web page (examples/web/) on this machine's loopback, with the headers that
// make it cross-origin isolated (so the threaded module can share memory), and nothing
// outside these three places:
//
//   /                 examples/web/          the page, its worker and styles
//   /examples/        examples/*.lua         the scripts the page preloads, and
//                     index.json             their list (name, file, first comment line)
//   /loramoe/         BUILD (build-wasm/)    the JavaScript face and the module (st/, mt/)
//
//   node examples/web/serve.mjs [--build DIR] [--port N] [--host ADDR]
//
// Defaults: build-wasm, port 8011 (0: any free port), 127.0.0.1. Prints the page's URL.
// tests/web/run.mjs imports serve() to run the page in a headless browser.
import fs from 'fs';
import http from 'http';
import path from 'path';
import { fileURLToPath } from 'url';

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, '..', '..');

const TYPES = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8',
  '.wasm': 'application/wasm', '.lua': 'text/plain; charset=utf-8',
  '.json': 'application/json; charset=utf-8', '.svg': 'image/svg+xml', '.png': 'image/png',
};

// Every response: cross-origin isolation (SharedArrayBuffer for the threaded module)
// and no caching (a rebuilt module is picked up on reload).
const HEADERS = {
  'Cross-Origin-Opener-Policy': 'same-origin',
  'Cross-Origin-Embedder-Policy': 'require-corp',
  'Cross-Origin-Resource-Policy': 'same-origin',
  'X-Content-Type-Options': 'nosniff',
  'Cache-Control': 'no-store',
};

/** The scripts of examples/ in the order the page lists them: the quickstart first. */
export function listExamples(dir = path.join(repo, 'examples')) {
  const names = fs.readdirSync(dir).filter((f) => f.endsWith('.lua')).sort();
  const order = (f) => (f === 'quickstart.lua' ? 0 : 1);
  return names.sort((a, b) => order(a) - order(b)).map((f) => {
    // the first sentence of the leading comment
    const lines = fs.readFileSync(path.join(dir, f), 'utf8').split('\n');
    const para = [];
    for (const l of lines) {
      const m = l.match(/^--\s?(.*)$/);
      if (!m || !m[1].trim()) break;
      para.push(m[1].trim());
    }
    const text = para.join(' ');
    const end = text.search(/[.?](\s|$)/);
    return { name: f.replace(/\.lua$/, ''), file: `examples/${f}`, about: end < 0 ? text : text.slice(0, end + 1) };
  });
}

/** A file under root for a URL path, or null (outside root, hidden, or not a file). */
function under(root, rel) {
  const p = path.resolve(root, '.' + path.posix.normalize('/' + rel));
  if (p !== root && !p.startsWith(root + path.sep)) return null;
  if (path.relative(root, p).split(path.sep).some((s) => s.startsWith('.'))) return null;
  try {
    return fs.statSync(p).isFile() ? p : null;
  } catch {
    return null;
  }
}

function resolve(urlPath, build) {
  if (urlPath === '/examples/index.json') return { json: listExamples() };
  if (urlPath.startsWith('/examples/')) {
    const rel = urlPath.slice('/examples/'.length);
    return rel.includes('/') || !rel.endsWith('.lua') ? null : under(path.join(repo, 'examples'), rel);
  }
  if (urlPath.startsWith('/loramoe/')) {
    const rel = urlPath.slice('/loramoe/'.length);
    const ok = rel === 'loramoe.mjs' || /^(st|mt)\/loramoe\.(mjs|wasm|worker\.js)$/.test(rel);
    return ok ? under(build, rel) : null;
  }
  return under(here, urlPath === '/' ? 'index.html' : urlPath.slice(1));
}

/**
 * Starts the server; resolves to { server, url } once it listens.
 *   build  the WebAssembly build directory (default build-wasm under the repository)
 *   port   0 for any free port;  host  the address to listen on (loopback by default)
 */
export function serve({ build = path.join(repo, 'build-wasm'), port = 8011, host = '127.0.0.1', log } = {}) {
  build = path.resolve(build);
  if (!fs.existsSync(path.join(build, 'loramoe.mjs')))
    throw new Error(`${build}/loramoe.mjs is missing: run make wasm first`);
  return listen((urlPath) => resolve(urlPath, build), { port, host, log });
}

/** Serves the files of one directory the same way (wasm/bench-browser.mjs). */
export function serveDir(root, { port = 0, host = '127.0.0.1', log } = {}) {
  root = path.resolve(root);
  return listen((urlPath) => under(root, urlPath === '/' ? 'index.html' : urlPath.slice(1)), { port, host, log });
}

function listen(resolveUrl, { port, host, log }) {
  const server = http.createServer((req, res) => {
    let urlPath;
    try {
      urlPath = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    } catch {
      urlPath = null;
    }
    const found = urlPath && (req.method === 'GET' || req.method === 'HEAD') ? resolveUrl(urlPath) : null;
    if (!found) {
      res.writeHead(404, { ...HEADERS, 'Content-Type': 'text/plain; charset=utf-8' });
      res.end('not found\n');
      if (log) log(`404 ${req.url}`);
      return;
    }
    const body = found.json ? Buffer.from(JSON.stringify(found.json)) : fs.readFileSync(found);
    const type = found.json ? TYPES['.json'] : TYPES[path.extname(found)] || 'application/octet-stream';
    res.writeHead(200, { ...HEADERS, 'Content-Type': type, 'Content-Length': body.length });
    res.end(req.method === 'HEAD' ? undefined : body);
  });
  return new Promise((ok, fail) => {
    server.once('error', fail);
    server.listen(port, host, () => {
      const a = server.address();
      ok({ server, url: `http://${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}/` });
    });
  });
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const opt = { build: 'build-wasm', port: 8011, host: '127.0.0.1' };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const m = argv[i].match(/^--(build|port|host)(?:=(.*))?$/);
    if (!m) {
      console.error('usage: node examples/web/serve.mjs [--build DIR] [--port N] [--host ADDR]');
      process.exit(2);
    }
    opt[m[1]] = m[2] !== undefined ? m[2] : argv[++i];
  }
  try {
    const { url } = await serve({ build: opt.build, port: Number(opt.port), host: opt.host,
      log: (s) => console.error(s) });
    console.log(`loramoe web page: ${url}  (Ctrl-C stops the server)`);
  } catch (e) {
    console.error(`serve: ${e.message}`);
    process.exit(1);
  }
}
