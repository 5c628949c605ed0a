#!/usr/bin/env node
// Runs bench_cpu built for the browser (wasm/bench.sh --chromium) in headless Chromium:
// serves DIR (bench_cpu.mjs and the page) on the loopback with the cross-origin
// isolation headers, opens the page with the arguments, prints its output when main
// exits. Exit status: main's, or 1 when the page did not finish within 30 minutes.
//
//   node wasm/bench-browser.mjs DIR [threads] [preset]
import path from 'path';
import { pathToFileURL } from 'url';

const here = path.dirname(new URL(import.meta.url).pathname);
const { launch } = await import(pathToFileURL(path.join(here, '..', 'tools', 'chromium.mjs')).href);
const { serveDir } = await import(pathToFileURL(path.join(here, '..', 'examples', 'web', 'serve.mjs')).href);
const [dir, ...args] = process.argv.slice(2);
if (!dir) {
  console.error('usage: node wasm/bench-browser.mjs DIR [threads] [preset]');
  process.exit(2);
}
const { server, url } = await serveDir(dir);
let browser;
let status = 1;
try {
  browser = await launch();
  console.log(browser.full);
  const page = await browser.open(`${url}?args=${encodeURIComponent(args.join(' '))}`);
  const exit = await page.until('document.documentElement.dataset.exit', 1800, 'bench_cpu ends',
    'document.getElementById("out")?.textContent');
  console.log(`hardwareConcurrency ${await page.eval('navigator.hardwareConcurrency')}, crossOriginIsolated ${
    await page.eval('crossOriginIsolated')}`);
  process.stdout.write(await page.eval('document.getElementById("out").textContent'));
  status = exit === '0' ? 0 : 1;
} catch (e) {
  console.error(`bench-browser: ${e.message}`);
} finally {
  if (browser) await browser.close();
  server.close();
}
process.exit(status);
