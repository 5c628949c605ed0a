// The JavaScript face (wasm/loramoe.mjs) under Node: Lua code and scripts, files in and
// out, a PEFT adapter put in as bytes by the host, and bad input (a script that errors,
// a missing file, a malformed adapter, out of memory) as LoramoeError exceptions with
// the message, the module usable afterwards. Called by tests/wasm/run.mjs.
import fs from 'fs';
import path from 'path';
import { pathToFileURL } from 'url';

export async function runFaceTests(build, record) {
  const { load, LoramoeError } = await import(pathToFileURL(path.join(build, 'loramoe.mjs')).href);
  const check = async (name, fn) => {
    try {
      await fn();
      record(true, `face: ${name}`);
    } catch (e) {
      record(false, `face: ${name}`, String(e && e.stack || e));
    }
  };
  const expect = (cond, what) => { if (!cond) throw new Error(what); };
  const raises = (fn, re) => {
    try {
      fn();
    } catch (e) {
      expect(e instanceof LoramoeError, `not a LoramoeError: ${e}`);
      expect(re.test(e.message), `message ${JSON.stringify(e.message)} does not match ${re}`);
      return e;
    }
    throw new Error(`no exception (wanted ${re})`);
  };

  for (const threads of [1, 2]) {
    const lines = [];
    let lm;
    await check(`load (threads=${threads})`, async () => {
      lm = await load({ threads, print: (s) => lines.push(s), printErr: (s) => lines.push(s) });
      expect(lm.threads === threads, `threads ${lm.threads}`);
    });
    if (!lm) continue;
    const tag = `(threads=${threads})`;

    await check(`run returns the first result ${tag}`, () => {
      expect(lm.run('return 6 * 7') === '42', 'return 6 * 7');
      expect(lm.run('local lm = require "loramoe"; return lm._VERSION').match(/^\d+\.\d+\.\d+$/), 'version');
      expect(lm.run('x = 1') === '', 'no result');
      lm.run('print("hello from lua")');
      expect(lines.includes('hello from lua'), `print reached the host: ${lines}`);
    });

    await check(`forward vs the float64 reference ${tag}`, () => {
      const out = lm.run(`
        local lm = require "loramoe"
        local ctx = lm.assert(lm.context { backend = "cpu" })
        local layer = lm.assert(ctx:layer { preset = "tiny", max_tokens = 128 })
        lm.assert(layer:randomize(5, 0.05))
        local pool = lm.assert(layer:pool { slots = 2, max_rank = 8 })
        lm.assert(pool:load_random(0, { rank = 8, alpha = 16, seed = 1 }))
        lm.assert(pool:load_random(1, { rank = 4, alpha = 4, seed = 2, fused = true }))
        local batch = lm.assert(ctx:batch())
        lm.assert(batch:set(pool, { { tokens = 40, adapter = 0 }, { tokens = 40 }, { tokens = 48, adapter = 1 } }))
        local args = lm.assert(layer:inputs(128, 9))
        args.pool, args.batch = pool, batch
        lm.assert(layer:forward(args))
        local c = lm.assert(layer:check(args))
        assert(c.rel_l2 < 1e-2, "rel_l2 " .. c.rel_l2)
        return ctx.threads or ""`);
      expect(out !== undefined, 'ran');
    });

    await check(`a script that errors: exception with the message, usable afterwards ${tag}`, () => {
      const e = raises(() => lm.run('local function inner() error("deliberate failure") end inner()',
        { name: '=script' }), /script:1: deliberate failure[\s\S]*stack traceback/);
      expect(e.message.includes("in local 'inner'") || e.message.includes("'inner'"), 'traceback names inner');
      raises(() => lm.run('return +'), /unexpected symbol|expected/);
      raises(() => lm.run('os.exit(3)'), /os\.exit\(3\) called/);
      expect(lm.run('return 1 + 1') === '2', 'usable after errors');
    });

    await check(`loramoe's own errors come through ${tag}`, () => {
      raises(() => lm.run('local lm = require "loramoe"; lm.assert(lm.context { backend = "cuda" })'),
        /UNSUPPORTED|cuda|CUDA/);
      raises(() => lm.run('local lm = require "loramoe"; local c = lm.context(); c:layer { preset = "nope" }'),
        /nope/);
    });

    await check(`files in and out, scripts by path ${tag}`, () => {
      lm.writeFile('/work/in/data.txt', 'abc');
      lm.writeFile('/work/script.lua', 'local a, b = ...\nlocal f = assert(io.open("/work/in/data.txt"))\n' +
        'local s = f:read("a") f:close()\nlocal o = assert(io.open("/work/out.txt", "w")) o:write(s .. a .. b) o:close()\n' +
        'return #arg');
      expect(lm.runFile('/work/script.lua', ['x', 'y']) === '2', 'runFile result');
      expect(lm.readFile('/work/out.txt', { encoding: 'utf8' }) === 'abcxy', 'readFile');
      expect(lm.readFile('/work/out.txt') instanceof Uint8Array, 'bytes');
    });

    await check(`a missing file ${tag}`, () => {
      raises(() => lm.runFile('/work/nope.lua'), /cannot open \/work\/nope\.lua/);
      raises(() => lm.readFile('/work/nope.txt'), /nope\.txt: cannot read \(no such file/);
      raises(() => lm.run('local lm = require "loramoe"; lm.assert(lm.context():safetensors("/nope.safetensors"))'),
        /nope\.safetensors/);
      expect(lm.run('return "still here"') === 'still here', 'usable');
    });

    await check(`a PEFT adapter given as bytes loads and runs ${tag}`, () => {
      const fix = 'tests/formats/fixtures/qwen/fused';
      for (const f of ['adapter_config.json', 'adapter_model.safetensors'])
        lm.writeFile(`/adapters/qwen/${f}`, fs.readFileSync(path.join(fix, f)));
      const out = lm.run(`
        local lm = require "loramoe"
        local ctx = lm.assert(lm.context { backend = "cpu" })
        local peft = lm.assert(ctx:peft("/adapters/qwen"))
        local info = peft:info()
        local layer = lm.assert(ctx:layer { experts = 4, hidden = 64, intermediate = 32,
                                             top_k = 2, max_tokens = 64 })
        lm.assert(layer:randomize(3, 0.05))
        local pool = lm.assert(layer:pool { slots = 1, max_rank = info.rank })
        local slot = lm.assert(lm.adapter.load("/adapters/qwen", { pool = pool, layer = info.min_layer }))
        local batch = lm.assert(ctx:batch())
        lm.assert(batch:set(pool, { { tokens = 24, adapter = slot }, { tokens = 8 } }))
        local args = lm.assert(layer:inputs(32, 4))
        args.pool, args.batch = pool, batch
        lm.assert(layer:forward(args))
        local c = lm.assert(layer:check(args))
        assert(c.rel_l2 < 1e-2, "rel_l2 " .. c.rel_l2)
        return info.rank .. " " .. info.layout`);
      expect(/^4 /.test(out), `info: ${out}`);
    });

    await check(`a malformed adapter ${tag}`, () => {
      lm.writeFile('/adapters/bad/adapter_config.json', fs.readFileSync(
        'tests/formats/fixtures/qwen/fused/adapter_config.json'));
      lm.writeFile('/adapters/bad/adapter_model.safetensors', 'this is not a safetensors file');
      raises(() => lm.run('local lm = require "loramoe"; lm.assert(lm.context():peft("/adapters/bad"))'),
        /adapter_model\.safetensors/);
      lm.writeFile('/adapters/bad2/adapter_config.json', '{ "r": "four"');
      raises(() => lm.run('local lm = require "loramoe"; lm.assert(lm.context():peft("/adapters/bad2"))'),
        /bad2/);
      expect(lm.run('return "still here"') === 'still here', 'usable');
    });

    await check(`out of memory ${tag}`, () => {
      raises(() => lm.run('local t = {} for i = 1, 64 do t[i] = string.rep("x", 1 << 27, tostring(i)) end'),
        /not enough memory/);
      raises(() => lm.run(`local lm = require "loramoe"
        local ctx = lm.assert(lm.context { backend = "cpu" })
        lm.assert(ctx:layer { experts = 64, hidden = 8192, intermediate = 8192, top_k = 2, max_tokens = 16 })`),
        /OUT_OF_MEMORY: shape of \d+ elements is more than this platform can address/);
      raises(() => lm.run(`local lm = require "loramoe"
        local ctx = lm.assert(lm.context { backend = "cpu" })
        local l = lm.assert(ctx:layer { experts = 48, hidden = 4096, intermediate = 4096, top_k = 2, max_tokens = 16 })
        lm.assert(l:randomize(1, 0.1))`), /OUT_OF_MEMORY/);
      expect(lm.run('collectgarbage() return "still here"') === 'still here', 'usable');
    });

    await check(`reset makes a fresh state ${tag}`, () => {
      lm.run('kept = 5');
      expect(lm.run('return kept') === '5', 'kept');
      lm.reset();
      expect(lm.run('return tostring(kept)') === 'nil', 'fresh');
    });
  }

  // env, and stdout/stderr as raw writes: what the web page's worker uses for progress.
  for (const threads of [1, 2]) {
    await check(`env and raw stdout/stderr (threads=${threads})`, async () => {
      const got = { out: [], err: [] };
      const dec = (b) => { expect(b instanceof Uint8Array, `not bytes: ${b}`); return new TextDecoder().decode(b); };
      const lm = await load({ threads, env: { LORAMOE_FACE_TEST: 'from the host' },
        stdout: (b) => got.out.push(dec(b)), stderr: (b) => got.err.push(dec(b)) });
      expect(lm.run('return os.getenv("LORAMOE_FACE_TEST")') === 'from the host', 'env not seen by os.getenv');
      lm.run('io.stderr:write("\\r", "step 1/2") io.stderr:write("\\r", "step 2/2") print("héllo")');
      // each write as it comes, before any newline on stderr
      expect(got.err.join('') === '\rstep 1/2\rstep 2/2', `stderr ${JSON.stringify(got.err)}`);
      expect(got.err.includes('step 1/2'), `writes merged: ${JSON.stringify(got.err)}`);
      expect(got.out.join('') === 'héllo\n', `stdout ${JSON.stringify(got.out)}`);
    });
  }
}
