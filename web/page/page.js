// The page of a d2m-export web folder: runs the model beside it with transformers.js in this browser tab,
// greedy, streaming the text as tokens come, with the backend and the decode speed shown.
//
// Query parameters (all optional; with `prompt`, generation starts as soon as the model is loaded):
//   prompt=TEXT  max_new_tokens=N (default 64)  min_new_tokens=N (no end-of-sequence before N tokens)
//   device=wasm|webgpu (default: WebGPU when navigator.gpu gives an adapter, else WebAssembly)
//   threads=N (WebAssembly threads; default onnxruntime-web's choice, 1 where the page is not cross-origin isolated)
//   score_ids=ID,ID,... (instead of generating: one teacher-forced forward pass over these token ids; #top1-ids
//   gets each position's argmax, for checking a quantized export in the browser against its reference)
// When done, #token-ids holds the generated token ids as JSON, #tok-s the decode speed (tokens/s) and
// #status "done" (or "error: ..."): scripts and tests read these.
import { AutoModelForCausalLM, AutoTokenizer, Tensor, TextStreamer, env } from '@huggingface/transformers';

// onnxruntime-web's own files (its .mjs glue and .wasm binary), from the installed npm package that
// `d2m-export serve` serves under this prefix; transformers.js would otherwise fetch them from a CDN
const ORT_WASM_PREFIX = '/d2m-runtime/onnxruntime-web/';
const MODEL = '.';     // this page's own folder: config.json, tokenizer.json, onnx/model*.onnx(_data)

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const positiveInt = (name, fallback) => {
    const text = params.get(name);
    if (text === null || text === '') return fallback;
    const n = Number(text);
    if (!Number.isInteger(n) || n < 1) throw new Error(`${name} must be a positive integer, not ${JSON.stringify(text)}`);
    return n;
};

env.allowLocalModels = true;       // the page's folder
env.allowRemoteModels = false;     // never the Hugging Face Hub
env.useBrowserCache = false;       // the files are local already: no second copy in the Cache Storage
env.backends.onnx.wasm.wasmPaths = ORT_WASM_PREFIX;

async function chooseDevice() {
    const asked = params.get('device');
    if (asked !== null && asked !== 'wasm' && asked !== 'webgpu') throw new Error(`device must be wasm or webgpu, not ${JSON.stringify(asked)}`);
    if (asked) return asked;
    const adapter = navigator.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null;
    return adapter ? 'webgpu' : 'wasm';
}

function tokenIdOf(name, text) {
    const n = Number(text);
    if (text === '' || !Number.isInteger(n) || n < 0) throw new Error(`${name} holds token ids, not ${JSON.stringify(text)}`);
    return n;
}

let model, tokenizer;

async function load() {
    const device = await chooseDevice();
    const threads = positiveInt('threads', undefined);
    if (threads !== undefined) env.backends.onnx.wasm.numThreads = threads;
    $('status').textContent = 'loading the model';
    tokenizer = await AutoTokenizer.from_pretrained(MODEL, { local_files_only: true });
    // the dtype and the external data files are named by config.json's transformers.js_config
    model = await AutoModelForCausalLM.from_pretrained(MODEL, { local_files_only: true, device });
    // onnxruntime-web runs one thread where the page is not cross-origin isolated (no SharedArrayBuffer)
    const n = crossOriginIsolated ? env.backends.onnx.wasm.numThreads || 1 : 1;
    $('backend').textContent = device === 'webgpu' ? 'WebGPU' : `WASM (${n} thread${n === 1 ? '' : 's'})`;
}

async function generate(prompt, maxNewTokens, minNewTokens) {
    $('run').disabled = true;
    $('status').textContent = 'generating';
    $('output').textContent = prompt;
    for (const id of ['token-ids', 'tok-s']) $(id).textContent = '';
    const stamps = [];                   // when each generated token arrived; the first one ends the prefill
    const streamer = new TextStreamer(tokenizer, {
        skip_prompt: true, skip_special_tokens: true,
        callback_function: (text) => $('output').append(text),
        token_callback_function: () => stamps.push(performance.now()),
    });
    const inputs = tokenizer(prompt);
    const promptLength = inputs.input_ids.dims[1];
    const out = await model.generate({
        ...inputs, max_new_tokens: maxNewTokens, do_sample: false, streamer,
        ...(minNewTokens ? { min_new_tokens: minNewTokens } : {}),
    });
    const ids = out.tolist()[0].slice(promptLength).map(Number);
    const decodeMs = stamps.length > 1 ? stamps[stamps.length - 1] - stamps[0] : null;
    $('tok-s').textContent = decodeMs ? ((1000 * (stamps.length - 1)) / decodeMs).toFixed(2) : '';
    $('token-ids').textContent = JSON.stringify(ids);
    $('status').textContent = 'done';
    $('run').disabled = false;
}

async function score(ids) {
    $('status').textContent = 'scoring';
    const n = ids.length;
    const input_ids = new Tensor('int64', BigInt64Array.from(ids, BigInt), [1, n]);
    const attention_mask = new Tensor('int64', new BigInt64Array(n).fill(1n), [1, n]);
    const { logits } = await model({ input_ids, attention_mask });
    const vocab = logits.dims[2], data = logits.data, top1 = [];
    for (let row = 0; row < n; row++) {
        let best = 0;
        for (let j = 1; j < vocab; j++) if (data[row * vocab + j] > data[row * vocab + best]) best = j;
        top1.push(best);
    }
    $('top1-ids').textContent = JSON.stringify(top1);
    $('status').textContent = 'done';
}

function fail(e) {
    $('status').textContent = `error: ${String(e?.message ?? e).split('\n')[0]}`;
    $('run').disabled = false;
}

$('form').addEventListener('submit', (event) => {
    event.preventDefault();
    generate($('prompt').value, Number($('max-new-tokens').value) || 64).catch(fail);
});

try {
    const prompt = params.get('prompt');
    const maxNewTokens = positiveInt('max_new_tokens', 64);
    const minNewTokens = positiveInt('min_new_tokens', undefined);
    if (prompt !== null) $('prompt').value = prompt;
    $('max-new-tokens').value = maxNewTokens;
    const scoreIds = params.get('score_ids');
    await load();
    $('run').disabled = false;
    $('status').textContent = 'ready';
    if (scoreIds !== null) await score(scoreIds.split(',').map((t) => tokenIdOf('score_ids', t)));
    else if (prompt !== null) await generate(prompt, maxNewTokens, minNewTokens);
} catch (e) {
    fail(e);
}
