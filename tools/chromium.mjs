// Headless Chromium driven through the DevTools protocol over a pipe
// (--remote-debugging-pipe): no WebSocket client and no npm package, so Node 18 will do.
// Used by the browser test (tests/web/run.mjs) and the browser benchmark
// (wasm/bench-browser.mjs).
//
//   const b = await launch();                  // throws when no Chromium starts
//   const page = await b.open('http://127.0.0.1:8011/');
//   await page.until('document.readyState === "complete"', 30, 'the page loads');
//   const title = await page.eval('document.title');
//   await b.close();
import { spawn, spawnSync } from 'child_process';
import fs from 'fs';
import os from 'os';
import path from 'path';

/** The browser to run: $CHROMIUM, else chromium, chromium-browser or the snap's, the
    first that answers --version (Ubuntu's chromium-browser stub does not). */
export function findChromium() {
  const names = process.env.CHROMIUM ? [process.env.CHROMIUM] : ['chromium', 'chromium-browser', '/snap/bin/chromium'];
  for (const n of names) {
    const r = spawnSync(n, ['--version'], { encoding: 'utf8', timeout: 30000 });
    if (r.status === 0 && /chrom/i.test(r.stdout)) return { bin: n, version: r.stdout.trim() };
  }
  return null;
}

export const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

// Chromium reads commands from fd 3 and writes replies and events to fd 4, each a JSON
// text ended by a NUL byte.
class DevTools {
  constructor(proc) {
    this.out = proc.stdio[3];
    this.pending = new Map();
    this.handlers = [];
    this.id = 0;
    let buf = Buffer.alloc(0);
    proc.stdio[4].on('data', (chunk) => {
      buf = Buffer.concat([buf, chunk]);
      let nul;
      while ((nul = buf.indexOf(0)) >= 0) {
        const msg = JSON.parse(buf.subarray(0, nul).toString('utf8'));
        buf = buf.subarray(nul + 1);
        if (msg.id !== undefined && this.pending.has(msg.id)) {
          const { ok, fail, method } = this.pending.get(msg.id);
          this.pending.delete(msg.id);
          if (msg.error) fail(new Error(`${method}: ${msg.error.message}`));
          else ok(msg.result);
        } else {
          for (const h of this.handlers) h(msg);
        }
      }
    });
    proc.stdio[3].on('error', () => { /* the browser went away: pending calls time out */ });
  }

  send(method, params = {}, sessionId = undefined, timeoutS = 60) {
    const id = ++this.id;
    this.out.write(JSON.stringify({ id, method, params, sessionId }) + '\0');
    return new Promise((ok, fail) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        fail(new Error(`${method}: no answer in ${timeoutS} s`));
      }, timeoutS * 1000);
      this.pending.set(id, { method, ok: (r) => { clearTimeout(timer); ok(r); },
        fail: (e) => { clearTimeout(timer); fail(e); } });
    });
  }
}

/** A page (a tab): evaluate expressions in it, wait for conditions, send commands. */
export class Page {
  constructor(cdp, sessionId) {
    this.cdp = cdp;
    this.session = sessionId;
    this.log = []; // the page's console and uncaught exceptions
  }

  send(method, params = {}, timeoutS = 60) {
    return this.cdp.send(method, params, this.session, timeoutS);
  }

  /** The value of an expression (awaited when a promise); throws the page's exception. */
  async eval(expression) {
    const r = await this.send('Runtime.evaluate', { expression, returnByValue: true, awaitPromise: true });
    if (r.exceptionDetails) throw new Error(`in the page: ${r.exceptionDetails.exception?.description || r.exceptionDetails.text}`);
    return r.result.value;
  }

  /** Polls expression until it is truthy and returns it; after timeoutS throws, with
      what `shown` (an expression) says about the page. */
  async until(expression, timeoutS, what, shown = 'document.body ? document.body.innerText.slice(0, 3000) : ""') {
    const end = Date.now() + timeoutS * 1000;
    for (;;) {
      // a page still navigating has no document yet: not an answer, ask again
      const v = await this.eval(expression).catch(() => false);
      if (v) return v;
      if (Date.now() > end) {
        const text = await this.eval(shown).catch((e) => e.message);
        throw new Error(`${what}: not within ${timeoutS} s; the page shows:\n${text}\n${this.log.slice(-20).join('\n')}`);
      }
      await sleep(250);
    }
  }

  /** A PNG of the viewport, as bytes. */
  async screenshot() {
    const shot = await this.send('Page.captureScreenshot', { format: 'png' });
    return Buffer.from(shot.data, 'base64');
  }
}

/**
 * Starts headless Chromium (a temporary profile, removed by close()). Returns
 * { version, open(url, { width, height }), close(), stderr() }. Throws when none starts.
 */
export async function launch() {
  const browser = findChromium();
  if (!browser) {
    throw new Error('no Chromium found (tried $CHROMIUM, chromium, chromium-browser, /snap/bin/chromium).\n' +
      'Debian: apt-get install chromium (make test-web installs it as root). Ubuntu ships it only as a\n' +
      'snap (snap install chromium). Or set CHROMIUM to a Chromium or Chrome binary.');
  }
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'loramoe-chromium-'));
  const flags = ['--headless', '--remote-debugging-pipe', `--user-data-dir=${profile}`,
    '--no-first-run', '--no-default-browser-check', '--disable-gpu', '--disable-dev-shm-usage',
    '--disable-extensions', '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--disable-features=Translate,MediaRouter', '--mute-audio', '--window-size=1280,900'];
  if (process.getuid && process.getuid() === 0) flags.push('--no-sandbox'); // its sandbox refuses root
  const proc = spawn(browser.bin, [...flags, 'about:blank'], { stdio: ['ignore', 'ignore', 'pipe', 'pipe', 'pipe'] });
  let stderr = '';
  proc.stderr.on('data', (d) => { stderr = (stderr + d).slice(-6000); });
  let exited = false;
  proc.on('exit', () => { exited = true; });
  const cdp = new DevTools(proc);
  const close = async () => {
    if (!exited) {
      try { await cdp.send('Browser.close', {}, undefined, 5); } catch { /* killed below */ }
      for (let i = 0; i < 50 && !exited; i++) await sleep(100);
      if (!exited) proc.kill('SIGKILL');
    }
    fs.rmSync(profile, { recursive: true, force: true });
  };
  let product;
  try {
    product = (await cdp.send('Browser.getVersion', {}, undefined, 60)).product;
  } catch (e) {
    await close();
    throw new Error(`${browser.bin} does not answer over the DevTools pipe: ${e.message}\n${stderr}`);
  }
  const open = async (url, { width = 1280, height = 900 } = {}) => {
    const { targetId } = await cdp.send('Target.createTarget', { url: 'about:blank' });
    const { sessionId } = await cdp.send('Target.attachToTarget', { targetId, flatten: true });
    const page = new Page(cdp, sessionId);
    cdp.handlers.push((m) => {
      if (m.sessionId !== sessionId) return;
      if (m.method === 'Runtime.consoleAPICalled')
        page.log.push(`console.${m.params.type}: ${m.params.args.map((a) => a.value ?? a.description).join(' ')}`);
      if (m.method === 'Runtime.exceptionThrown')
        page.log.push(`exception: ${m.params.exceptionDetails.exception?.description || m.params.exceptionDetails.text}`);
    });
    await page.send('Runtime.enable');
    await page.send('Page.enable');
    await page.send('Emulation.setDeviceMetricsOverride', { width, height, deviceScaleFactor: 1, mobile: false });
    await page.send('Page.navigate', { url });
    return page;
  };
  return { version: product, full: browser.version, open, close, stderr: () => stderr, kill: () => proc.kill('SIGKILL') };
}
