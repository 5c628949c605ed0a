// The WebAssembly tests, under Node: run from the repository root after `make wasm`.
//
//   node tests/wasm/run.mjs [BUILD]        (BUILD defaults to build-wasm)
//
//   1. the spec files (spec/*_spec.lua) unchanged, through tests/wasm/spec_runner.lua,
//      under the threaded build and the numeric ones under the one-thread build too:
//      the cpu backend against the float64 reference (shapes, mixed ranks, fused and
//      separate adapters, adapters from PEFT files), files, pools, experiments
//   2. the malformed-file corpus (tests/corpus): each a clear error, never a trap
//   3. the command: the native CLI's tests (cli/tests) and the examples, unchanged
//   4. the JavaScript face (wasm/loramoe.mjs): tests/wasm/face.mjs
//
// Ends with "N passed, N failed"; exits 1 when anything failed.
import { spawnSync } from 'child_process';
import fs from 'fs';
import os from 'os';
import path from 'path';
import { runFaceTests } from './face.mjs';

const build = path.resolve(process.argv[2] || 'build-wasm');
const runner = path.join(build, 'node-runner.mjs');
if (!fs.existsSync(runner)) {
  console.error(`tests/wasm: ${runner} is missing (make wasm)`);
  process.exit(1);
}
let passed = 0;
let failed = 0;
const t0 = Date.now();

function record(ok, name, detail) {
  if (ok) passed++;
  else failed++;
  console.log(`${ok ? 'ok  ' : 'FAIL'}  ${name}`);
  if (!ok && detail) console.log(detail.replace(/^/gm, '      '));
}

function loramoe(args, { threads, timeout = 300 } = {}) {
  const env = { ...process.env };
  delete env.LORAMOE_PROGRESS;
  if (threads) env.LORAMOE_WASM_THREADS = String(threads);
  const r = spawnSync(process.execPath, [runner, ...args], { env, encoding: 'utf8', timeout: timeout * 1000 });
  return { status: r.status, out: r.stdout || '', err: r.stderr || '', all: (r.stdout || '') + (r.stderr || '') };
}

// ---------------------------------------------------------------- 1. specs
// Skipped here, and why: they start a native interpreter (lua5.4/luajit) in a child
// process; the examples themselves run under wasm in part 3.
const skips = ['--skip=stays silent when stderr is not a terminal', '--skip=example scripts'];
const specs = fs.readdirSync('spec').filter((f) => f.endsWith('_spec.lua')).sort().map((f) => `spec/${f}`);
const numeric = ['spec/forward_spec.lua', 'spec/adapter_load_spec.lua', 'spec/files_spec.lua',
  'spec/pool_spec.lua'].filter((f) => fs.existsSync(f));
for (const [label, threads, files] of [['threads', 0, specs], ['one thread', 1, numeric]]) {
  const r = loramoe(['run', 'tests/wasm/spec_runner.lua', ...skips, ...files], { threads, timeout: 600 });
  const m = r.out.match(/^(\d+) passed, (\d+) failed, (\d+) skipped$/m);
  if (!m) {
    record(false, `specs (${label})`, r.all.slice(-3000));
    continue;
  }
  for (const line of r.out.split('\n')) {
    const t = line.match(/^(ok|FAIL) +(.*)$/);
    if (t) record(t[1] === 'ok', `spec (${label}): ${t[2]}`, t[1] === 'FAIL' ? r.err.slice(-3000) : '');
  }
  if (r.status !== 0 && Number(m[2]) === 0) record(false, `specs (${label}) exit status ${r.status}`, r.all.slice(-2000));
}

// ---------------------------------------------------------------- 2. corpus
for (const threads of [0, 1]) {
  const r = loramoe(['run', 'tests/wasm/corpus.lua', 'tests/corpus'], { threads });
  const m = r.out.match(/^(\d+) passed, (\d+) failed$/m);
  record(r.status === 0 && m && Number(m[2]) === 0 && Number(m[1]) > 50,
    `corpus (${threads ? 'one thread' : 'threads'}): ${m ? m[0] : 'no summary'}`, r.all.slice(-3000));
}

// ---------------------------------------------------------------- 3. the command
const t = 'cli/tests';
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'loramoe-wasm-'));
const cli = [
  ['--version', ['--version'], 0, /^loramoe \d+\.\d+\.\d+\n/],
  ['help', ['--help'], 0, /loramoe run SCRIPT/],
  ['unknown command', ['frobnicate'], 2, /unknown command 'frobnicate'/],
  ['info', ['info'], 0, /CUDA:[^\n]*no[\s\S]*devices:[\s\S]*Lua 5\.4/],
  ['run args', ['run', `${t}/args.lua`, 'one', 'two words', '3'], 0, /args ok/],
  ['run error', ['run', `${t}/error.lua`], 1,
    /loramoe: [^\n]*error.lua:\d+: deliberate failure[\s\S]*stack traceback:[\s\S]*in [a-z]* 'inner'/],
  ['run missing', ['run', `${t}/does-not-exist.lua`], 1, /cannot open/],
  ['run exit', ['run', `${t}/exit.lua`], 3, /^$/],
  ['run forward', ['run', `${t}/forward.lua`], 0, /forward ok/],
  ['adapter make', ['adapter', 'make', `${tmp}/adapter_fused`, '--layout', 'fused', '--experts', '4',
    '--rank', '4', '--alpha', '8', '--rslora', '--layers', '2'], 0, /wrote/],
  ['adapter inspect', ['adapter', 'inspect', `${tmp}/adapter_fused`], 0,
    /layout: fused experts[\s\S]*rank: 4 [\s\S]*alpha: 8 [\s\S]*rslora: yes[\s\S]*layers: 2 /],
  ['adapter missing', ['adapter', 'inspect', `${t}/no-such-adapter`], 1, /adapter_config.json: cannot open/],
  ['quickstart', ['run', 'examples/quickstart.lua'], 0, /check vs float64 reference[^\n]*: ok/],
];
for (const [name, args, status, re] of cli) {
  const r = loramoe(args);
  record(r.status === status && re.test(r.all), `command: ${name}`,
    `status ${r.status} (want ${status})\n${r.all.slice(-2000)}`);
}
// The examples with the smallest settings (as spec/experiment_spec.lua runs them natively):
// each exits cleanly and writes JSON with one row per point.
const examples = [
  ['sync_study', 'layers=2 tokens=32 requests=4', 9],
  ['adapter_fraction', 'tokens=32 requests=4 adapter_fraction=0,1', 2],
  ['rank_sweep', 'tokens=32 requests=4 rank=4,8', 4],
  ['distinct_adapters', 'tokens=32 requests=4 adapters=1,2', 2],
  ['tokens_sweep', 'tokens=16,32', 4],
];
for (const [name, settings, rows] of examples) {
  if (!fs.existsSync(`examples/${name}.lua`)) continue;
  const out = path.join(tmp, name);
  const r = loramoe(['run', `examples/${name}.lua`, 'backend=cpu', 'threads=2', 'reps=1', 'warmup=0',
    ...settings.split(' '), `out=${out}`]);
  let ok = r.status === 0 && r.out.includes('|');
  let detail = r.all.slice(-2000);
  try {
    const doc = JSON.parse(fs.readFileSync(path.join(out, `${name}.json`), 'utf8'));
    ok = ok && doc.results.length === rows;
    detail += `\nresults: ${doc.results.length} (want ${rows})`;
  } catch (e) {
    ok = false;
    detail += `\n${e.message}`;
  }
  record(ok, `example: ${name}.lua`, detail);
}
fs.rmSync(tmp, { recursive: true, force: true });

// ---------------------------------------------------------------- 4. the JavaScript face
await runFaceTests(build, record);

console.log(`wasm tests: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
