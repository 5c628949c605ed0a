// The web page (examples/web/) in a real browser: headless Chromium, driven through the
// DevTools protocol over a pipe (tools/chromium.mjs), the page served from this
// machine's loopback by examples/web/serve.mjs. Run from the repository root after
// `make wasm`:
//
//   node tests/web/run.mjs [BUILD]        (BUILD defaults to build-wasm)
//
// Checks, in one page: the quickstart runs (autorun) and its check against the float64
// reference passes, with the threaded build when the machine has more than one core;
// an experiment script draws its SVG plot as an <svg> element, shows progress, and
// offers its JSON; a script that raises shows the error and the next run works; a PEFT
// adapter put through the page's file input loads and its forward passes the check.
// In a second page, the quickstart on the one-thread build. Writes a screenshot to
// BUILD/web-page.png. CHROMIUM names the browser (default: chromium on PATH).
// Ends with "N passed, N failed"; exits 1 when anything failed or the browser is missing.
import { spawnSync } from 'child_process';
import fs from 'fs';
import os from 'os';
import path from 'path';
import { pathToFileURL } from 'url';

const build = path.resolve(process.argv[2] || 'build-wasm');
const LIMIT_S = Number(process.env.LORAMOE_WEB_TIMEOUT || 420); // the whole test
const RUN_S = 240; // one script in the page
const t0 = Date.now();
let passed = 0;
let failed = 0;

function record(ok, name, detail) {
  if (ok) passed++;
  else failed++;
  console.log(`${ok ? 'ok  ' : 'FAIL'}  ${name}`);
  if (!ok && detail) console.log(String(detail).replace(/^/gm, '      '));
}
const done = (code) => {
  console.log(`web tests: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(code);
};
const expect = (cond, what) => { if (!cond) throw new Error(what); };
const check = async (name, fn) => {
  try {
    const detail = await fn();
    record(true, name + (detail ? ` (${detail})` : ''));
  } catch (e) {
    record(false, name, e.stack || String(e));
  }
};

const shown = `document.querySelector('#status').textContent + '\\n' +
  (document.querySelector('#runs .run')?.innerText || '(no run)')`;

/** Picks a script in the page, sets the arguments (and the code), clicks Run, waits for
    the run to finish; returns what the run's view shows. */
async function runScript(page, name, args, code = null) {
  const before = await page.eval(`document.querySelectorAll('#runs .run').length`);
  await page.eval(`(async () => {
    const sel = document.querySelector('#script');
    sel.value = ${JSON.stringify(name)};
    sel.dispatchEvent(new Event('change'));
    const code = document.querySelector('#code');
    for (let i = 0; i < 200 && document.querySelector('#about').textContent === ''; i++) await new Promise((ok) => setTimeout(ok, 25));
    await new Promise((ok) => setTimeout(ok, 100)); // the script's text arrives
    ${code === null ? '' : `code.value = ${JSON.stringify(code)};`}
    document.querySelector('#args').value = ${JSON.stringify(args)};
    document.querySelector('#run').click();
  })()`);
  await page.until(`document.querySelectorAll('#runs .run').length > ${before} &&
    document.querySelector('#runs .run').dataset.status !== 'running'`, RUN_S, `${name} finishes`, shown);
  return page.eval(`(() => {
    const el = document.querySelector('#runs .run');
    return {
      name: el.dataset.name, status: el.dataset.status, out: el.querySelector('pre.out').textContent,
      error: el.querySelector('pre.error')?.textContent || '',
      svgs: [...el.querySelectorAll('.plots svg')].map((s) => ({
        path: s.dataset.path, lines: s.querySelectorAll('path, polyline, line').length,
        text: s.textContent, width: s.getBoundingClientRect().width })),
      files: [...el.querySelectorAll('.files a')].map((a) => a.textContent),
      progressUpdates: Number(document.querySelector('#progress').dataset.updates || 0),
    };
  })()`);
}

// ---------------------------------------------------------------- the test
const { launch } = await import(pathToFileURL(path.resolve('tools/chromium.mjs')).href);
let browser;
try {
  browser = await launch();
} catch (e) {
  record(false, 'a Chromium to run the page in', e.message);
  done(1);
}
record(true, `browser answers over the DevTools pipe (${browser.full})`);

const { serve } = await import(pathToFileURL(path.resolve('examples/web/serve.mjs')).href);
const { server, url } = await serve({ build, port: 0 });
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'loramoe-web-'));
const watchdog = setTimeout(() => {
  record(false, `the whole test within ${LIMIT_S} s`, `browser stderr:\n${browser.stderr()}`);
  browser.kill();
  done(1);
}, LIMIT_S * 1000);

try {
  // A PEFT adapter on "the user's disk", written by the command under Node.
  const adapterDir = path.join(tmp, 'my-adapter');
  const made = spawnSync(process.execPath, [path.join(build, 'node-runner.mjs'), 'adapter', 'make', adapterDir,
    '--experts', '8', '--hidden', '64', '--intermediate', '32', '--rank', '4', '--alpha', '8'],
  { encoding: 'utf8', timeout: 120000, env: { ...process.env, LORAMOE_WASM_THREADS: '1' } });
  expect(made.status === 0, `adapter make: ${made.stdout}${made.stderr}`);

  // tall enough for the screenshot to show the quickstart's check under the plot
  const page = await browser.open(`${url}?autorun=quickstart`, { width: 1280, height: 1100 });

  await check('page loads the module in its worker', async () => {
    await page.until(`['ready', 'running', 'fatal'].includes(document.documentElement.dataset.state)`, 120,
      'module loaded', shown);
    const status = await page.eval(`document.querySelector('#status').textContent`);
    const cores = await page.eval('navigator.hardwareConcurrency');
    expect(!/cannot|failed/.test(status), status);
    const isolated = await page.eval('crossOriginIsolated');
    expect(isolated, 'the page is not cross-origin isolated (the server\'s COOP/COEP headers)');
    if (cores > 1) expect(/threaded build/.test(status), `${cores} cores but: ${status}`);
    return status;
  });

  await check('quickstart (autorun): the check against the float64 reference passes', async () => {
    await page.until(`document.documentElement.dataset.autorun === 'done'`, RUN_S, 'autorun', shown);
    const r = await page.eval(`(() => { const el = document.querySelector('#runs .run[data-name="quickstart"]');
      return el && { status: el.dataset.status, out: el.querySelector('pre.out').textContent,
        error: el.querySelector('pre.error')?.textContent || '' }; })()`);
    expect(r, 'no quickstart run in the page');
    expect(r.status === 'ok', `status ${r.status}: ${r.error}\n${r.out}`);
    const m = r.out.match(/check vs float64 reference[^\n]*: ok/);
    expect(m, `no passing check in:\n${r.out}`);
    expect(/backend cpu, layer tiny/.test(r.out), `not the cpu backend's tiny layer:\n${r.out}`);
    return m[0];
  });

  await check('experiment: rank_sweep draws its SVG plot in the page, with progress and its JSON', async () => {
    const r = await runScript(page, 'rank_sweep', 'rank=4,16 reps=2 warmup=0 tokens=64 requests=4');
    expect(r.status === 'ok', `status ${r.status}: ${r.error}\n${r.out}`);
    expect(/\|\s*rank\s*\|/.test(r.out) && /wrote out\/rank_sweep/.test(r.out), `no table or 'wrote' line:\n${r.out}`);
    expect(r.svgs.length === 1, `${r.svgs.length} <svg> elements in the run`);
    const s = r.svgs[0];
    expect(s.path === '/out/rank_sweep/rank_sweep.svg', `plot from ${s.path}`);
    expect(s.lines >= 4 && /LoRA rank/.test(s.text) && s.width > 200, `plot not drawn: ${JSON.stringify(s)}`);
    expect(r.files.some((f) => f.startsWith('/out/rank_sweep/rank_sweep.json')), `files: ${r.files}`);
    expect(r.progressUpdates > 0, 'no progress line shown while it ran');
    fs.writeFileSync(path.join(build, 'web-page.png'), await page.screenshot());
    return `${s.lines} lines drawn, ${r.progressUpdates} progress updates`;
  });

  await check('a script that raises: the error in the page, the next run works', async () => {
    const r = await runScript(page, 'quickstart', '', 'local function inner() error("deliberate failure") end\ninner()');
    expect(r.status === 'error' && /deliberate failure[\s\S]*stack traceback/.test(r.error), JSON.stringify(r));
    const again = await runScript(page, 'quickstart', '', 'print("still " .. (6 * 7))');
    expect(again.status === 'ok' && /still 42/.test(again.out), JSON.stringify(again));
  });

  await check('a PEFT adapter from the file input loads and passes the check', async () => {
    const { root } = await page.send('DOM.getDocument');
    const { nodeId } = await page.send('DOM.querySelector', { nodeId: root.nodeId, selector: '#adapter-files' });
    await page.send('DOM.setFileInputFiles', { nodeId, files: fs.readdirSync(adapterDir).map((f) => path.join(adapterDir, f)) });
    await page.until(`document.documentElement.dataset.adapter === '/adapters/picked' &&
      document.querySelector('#script').value === 'load_adapter'`, 30, 'adapter put into the module', shown);
    const args = await page.eval(`document.querySelector('#args').value`);
    expect(args === '/adapters/picked', `arguments ${args}`);
    const r = await runScript(page, 'load_adapter', args);
    expect(r.status === 'ok', `status ${r.status}: ${r.error}\n${r.out}`);
    expect(/rank: 4 {2}alpha: 8/.test(r.out) && /E=8 H=64 I=32/.test(r.out), `not the adapter made:\n${r.out}`);
    const m = r.out.match(/check vs float64 reference[^\n]*: ok/);
    expect(m, r.out);
    return m[0];
  });

  const one = await browser.open(`${url}?threads=1&autorun=quickstart`);
  await check('quickstart on the one-thread build', async () => {
    await one.until(`document.documentElement.dataset.autorun === 'done'`, RUN_S, 'autorun', shown);
    const r = await one.eval(`({ threads: document.documentElement.dataset.threads,
      status: document.querySelector('#status').textContent,
      run: document.querySelector('#runs .run[data-name="quickstart"]')?.dataset.status,
      out: document.querySelector('#runs .run pre.out')?.textContent || '' })`);
    expect(r.threads === '1' && /one-thread build/.test(r.status), r.status);
    expect(r.run === 'ok' && /check vs float64 reference[^\n]*: ok/.test(r.out), JSON.stringify(r));
  });
  if (failed) console.log(`page console:\n${[...page.log, ...one.log].join('\n') || '(nothing)'}`);
} catch (e) {
  record(false, 'the browser session', `${e.stack || e}\nbrowser stderr:\n${browser.stderr()}`);
}
clearTimeout(watchdog);
await browser.close();
server.close();
fs.rmSync(tmp, { recursive: true, force: true });
done(failed ? 1 : 0);
