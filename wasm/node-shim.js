// Prepended to the emscripten glue (--extern-pre-js). The 3.1.6 glue, built as an ES
// module, still calls require() and reads __dirname under Node, which an ES module
// lacks: give it both, in the main thread and in each pthread worker.
if (typeof process == 'object' && process.versions && process.versions.node &&
    typeof require == 'undefined') {
  const { createRequire } = await import('module');
  const { fileURLToPath } = await import('url');
  const { dirname } = await import('path');
  globalThis.require = createRequire(import.meta.url);
  globalThis.__dirname = dirname(fileURLToPath(import.meta.url));
}
