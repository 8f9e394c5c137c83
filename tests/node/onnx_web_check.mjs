// Runs in the browser, not in node: tests/web_helpers.py serves this file, onnxruntime-web's dist/
// folder (as /ort/) and an export folder (as /model/) from one loopback server and calls logits()
// from a page. The README's browser snippet is these lines, with the export's path for modelUrl.
import * as ort from "/ort/ort.wasm.min.mjs";

ort.env.wasm.numThreads = 1; // more threads need a cross-origin-isolated page (SharedArrayBuffer)

export async function logits(modelUrl, ids) {
  const session = await ort.InferenceSession.create(modelUrl, { executionProviders: ["wasm"] });
  const input_ids = new ort.Tensor("int64", BigInt64Array.from(ids.map(BigInt)), [1, ids.length]);
  const { logits } = await session.run({ input_ids }); // (1, T, V) float32
  return { version: ort.env.versions.web, dims: logits.dims, data: Array.from(logits.data) };
}
