// Runs GGUF files in llama.cpp through node-llama-cpp, for tests/test_gguf.py.
//
//   node gguf_check.mjs NODE_LLAMA_CPP_DIR JOBS.json
//
// JOBS.json: [{"model": path, "prompt": text, "steps": n, "context": n}, ...]. For each job the
// model is loaded on the CPU, the prompt tokenized exactly as llama.cpp does (no BOS, no special
// tokens), and `steps` tokens decoded greedily one at a time (temperature 0, no repeat penalty,
// an f32 KV cache; an end-of-generation token ends it, as for any user of the file). Prints one JSON array:
// [{"prompt_ids": [...], "ids": [...], "text": detokenized ids}, ...]. Exit code 3: the runtime
// itself could not start here (no binary for this machine), which the test reports as a skip.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [installDir, jobsPath] = process.argv.slice(2);
const entry = createRequire(join(installDir, "package.json")).resolve("node-llama-cpp");
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(entry).href);

let llama;
try {
    // prebuilt CPU binaries only: never compile, never download, never pick a GPU
    llama = await getLlama({ gpu: false, build: "never", skipDownload: true, logLevel: LlamaLogLevel.error });
} catch (error) {
    console.error(`llama.cpp could not start: ${error.message}`);
    process.exit(3);
}

const results = [];
for (const job of JSON.parse(readFileSync(jobsPath, "utf8"))) {
    const model = await llama.loadModel({ modelPath: job.model, gpuLayers: 0 });
    const context = await model.createContext({
        contextSize: job.context, sequences: 1, threads: 1,
        experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32",
    });
    const promptIds = Array.from(model.tokenize(job.prompt));
    const ids = [];
    if (job.steps > 0) {
        const sequence = context.getSequence();
        for await (const token of sequence.evaluate(promptIds, { temperature: 0, yieldEogToken: false })) {
            ids.push(token);
            if (ids.length >= job.steps) break;
        }
    }
    results.push({ prompt_ids: promptIds, ids, text: model.detokenize(ids) });
    await context.dispose();
    await model.dispose();
}
console.log(JSON.stringify(results));
await llama.dispose();
