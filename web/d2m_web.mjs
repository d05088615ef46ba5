// Runs a `d2m-export --target web` folder through transformers.js, as an app in Node runs it.
//
//   node d2m_web.mjs generate DIR (--ids 1,2,3 | --prompt TEXT) [--max-new-tokens N] [--threads N] [--backend node|wasm]
//       greedy generation with transformers.js `generate`; prints one JSON object (tokens, text, timings)
//   node d2m_web.mjs serve
//       one JSON request per line on stdin, one JSON reply per line on stdout (the parity check's runner):
//       {"cmd": "load", "dir": D, "threads": N, "backend": "node"|"wasm"}   -> model class, dtype, versions
//       {"cmd": "prefill", "ids": [...]} / {"cmd": "decode", "id": T}         -> last position's logits
//                                        (float32, little-endian, base64), the KV cache kept between calls
//       {"cmd": "generate", "ids": [...], "max_new_tokens": N}               -> greedy tokens and timings
//       {"cmd": "tokenize", "text": S}                                       -> the tokenizer's ids
//       {"cmd": "stats"}                                                     -> this process's peak RSS (MB)
//
// backend "node" is transformers.js's own choice in Node (onnxruntime-node, CPU execution provider); "wasm"
// hands it onnxruntime-web instead (the WebAssembly build browsers run), still in Node.
// Everything is loaded from the folder (local_files_only); nothing is downloaded.
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';

const require = createRequire(import.meta.url);
// stdout carries replies only: whatever a library prints goes to stderr. A reply is written whole before the
// next request is read (stdout is a pipe: a partial write must wait for the reader)
const reply = (obj) => new Promise((resolve, reject) =>
    process.stdout.write(JSON.stringify(obj) + '\n', (err) => (err ? reject(err) : resolve())));
console.log = console.info = console.warn = console.debug = console.error;

let T = null;            // the transformers.js module
let state = null;        // {model, tokenizer, cache, length, settings}

async function loadLibrary(backend) {
    if (T) return T;
    if (backend === 'wasm') {
        // transformers.js takes an ONNX Runtime that the host registers under this symbol
        const ort = await import('onnxruntime-web');
        // its wasm files from the installed package (transformers.js would otherwise point at a CDN)
        const dist = path.dirname(require.resolve('onnxruntime-web'));
        ort.env.wasm.wasmPaths = pathToFileURL(dist).href + '/';
        globalThis[Symbol.for('onnxruntime')] = ort;
    } else if (backend !== 'node') {
        throw new Error(`backend must be node or wasm, not ${backend}`);
    }
    T = await import('@huggingface/transformers');
    T.env.allowRemoteModels = false;
    T.env.useBrowserCache = false;
    T.env.logLevel = T.LogLevel?.ERROR ?? T.env.logLevel;
    return T;
}

function packageVersion(name) {
    try {
        let dir = path.dirname(require.resolve(name));
        while (!fs.existsSync(path.join(dir, 'package.json'))) dir = path.dirname(dir);
        return JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')).version;
    } catch {
        return null;
    }
}

const SUFFIX = { fp32: '', fp16: '_fp16', q8: '_quantized', q4: '_q4' };

// onnxruntime-web reads external data only from buffers it is handed (a browser has no file system); in Node
// transformers.js hands it paths, so the wasm backend gets the folder's data files here, as a page fetches them
function externalData(dir) {
    const custom = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'))['transformers.js_config'] ?? {};
    const file = `model${SUFFIX[custom.dtype] ?? ''}.onnx`;
    const spec = custom.use_external_data_format;
    const chunks = typeof spec === 'object' && spec !== null ? +(spec[file] ?? spec.model ?? 0) : +(spec ?? 0);
    return Array.from({ length: chunks }, (_, i) => {
        const name = `${file}_data${i ? '_' + i : ''}`;
        return { path: name, data: fs.readFileSync(path.join(dir, 'onnx', name)) };
    });
}

async function load(dir, threads = 1, backend = 'node') {
    await loadLibrary(backend);
    // an absolute path is never a Hub model id: transformers.js reads the files from it as they are
    const abs = path.resolve(dir);
    const name = abs;
    const options = { local_files_only: true };
    if (backend === 'wasm') {
        // registered this way, transformers.js lists no devices of its own: name the provider directly
        T.env.backends.onnx.wasm.numThreads = threads;
        options.device = 'auto';
        options.session_options = { executionProviders: ['wasm'], externalData: externalData(abs) };
    } else {
        options.device = 'cpu';
        options.session_options = { intraOpNumThreads: threads, interOpNumThreads: 1 };
    }
    const t0 = performance.now();
    const model = await T.AutoModelForCausalLM.from_pretrained(name, options);
    const tokenizer = await T.AutoTokenizer.from_pretrained(name, { local_files_only: true });
    const settings = {
        runtime: backend === 'wasm' ? 'transformers.js + onnxruntime-web (wasm)' : 'transformers.js + onnxruntime-node (cpu)',
        transformers_js: packageVersion('@huggingface/transformers'),
        onnxruntime: packageVersion(backend === 'wasm' ? 'onnxruntime-web' : 'onnxruntime-node'),
        threads, model_class: model.constructor.name,
        dtype: model.config['transformers.js_config']?.dtype ?? null,
        load_ms: Math.round(performance.now() - t0),
    };
    state = { model, tokenizer, cache: null, length: 0, settings };
    return settings;
}

const ids2d = (ids) => new T.Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [1, ids.length]);
const ones = (n) => new T.Tensor('int64', new BigInt64Array(n).fill(1n), [1, n]);

function lastLogits(logits) {
    const [, seq, vocab] = logits.dims;
    const row = Float32Array.from(logits.data.subarray((seq - 1) * vocab, seq * vocab));
    return Buffer.from(row.buffer).toString('base64');
}

// One forward step of the model with its own cache handling, as `generate` does it: the present.* outputs
// become the next step's past_key_values.*; the past length is read from dims[-2].
async function step(ids) {
    const { model } = state;
    const inputs = { input_ids: ids2d(ids), attention_mask: ones(state.length + ids.length) };
    if (state.cache) inputs.past_key_values = state.cache;
    const out = await model.forward(inputs);
    const entries = {};
    for (const key of Object.keys(out)) {
        if (key.startsWith('present')) entries[key.replace('present', 'past_key_values')] = out[key];
    }
    state.cache = new T.DynamicCache(entries);
    state.length += ids.length;
    if (state.cache.get_seq_length() !== state.length) {
        throw new Error(`the KV cache holds ${state.cache.get_seq_length()} positions after ${state.length} tokens`);
    }
    return lastLogits(out.logits);
}

async function generate(ids, maxNewTokens) {
    const { model } = state;
    const stamps = [];
    const streamer = new (class extends T.BaseStreamer {
        put(value) { stamps.push(performance.now()); }
        end() {}
    })();
    const t0 = performance.now();
    const out = await model.generate({
        input_ids: ids2d(ids), attention_mask: ones(ids.length), max_new_tokens: maxNewTokens,
        do_sample: false, eos_token_id: null, streamer,     // exactly max_new_tokens greedy tokens
    });
    const tokens = out.tolist()[0].slice(ids.length).map(Number);
    const times = stamps.slice(1);       // the first put() is the prompt itself
    const decodeMs = times.length > 1 ? times[times.length - 1] - times[0] : null;
    return {
        tokens,
        prefill_ms: times.length ? times[0] - t0 : null,           // the prompt's forward pass and its token
        decode_ms: decodeMs,
        decode_tokens_per_s: decodeMs ? (1000 * (times.length - 1)) / decodeMs : null,
    };
}

async function handle(req) {
    switch (req.cmd) {
        case 'load':
            return { settings: await load(req.dir, req.threads ?? 1, req.backend ?? 'node') };
        case 'prefill':
            if (!state) throw new Error('load a model first');
            state.cache = null;
            state.length = 0;
            return { logits: await step(req.ids) };
        case 'decode':
            if (!state?.cache) throw new Error('decode needs a prefilled sequence');
            return { logits: await step([req.id]) };
        case 'generate':
            if (!state) throw new Error('load a model first');
            return await generate(req.ids, req.max_new_tokens);
        case 'stats':
            return { peak_rss_mb: process.resourceUsage().maxRSS / 1024 };
        case 'tokenize':
            if (!state) throw new Error('load a model first');
            return { ids: state.tokenizer.encode(req.text) };
        default:
            throw new Error(`unknown command ${JSON.stringify(req.cmd)}`);
    }
}

async function serve() {
    const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
    for await (const line of lines) {
        if (!line.trim()) continue;
        try {
            const result = await handle(JSON.parse(line));
            await reply({ ok: true, ...result });
        } catch (e) {
            await reply({ ok: false, error: String(e?.message ?? e).split('\n')[0] });
        }
    }
}

function flag(args, name, fallback = undefined) {
    const i = args.indexOf(name);
    return i >= 0 && i + 1 < args.length ? args[i + 1] : fallback;
}

async function main() {
    const [command, ...args] = process.argv.slice(2);
    if (command === 'serve') return await serve();
    if (command !== 'generate' || !args.length || args[0].startsWith('--')) {
        process.stderr.write('usage: node d2m_web.mjs generate DIR (--ids 1,2,3 | --prompt TEXT) [--max-new-tokens N] ' +
                             '[--threads N] [--backend node|wasm]\n       node d2m_web.mjs serve\n');
        process.exit(2);
    }
    const settings = await load(args[0], Number(flag(args, '--threads', '1')), flag(args, '--backend', 'node'));
    const prompt = flag(args, '--prompt');
    const ids = prompt !== undefined ? state.tokenizer.encode(prompt) : flag(args, '--ids', '').split(',').filter(Boolean).map(Number);
    if (!ids.length) throw new Error('give --ids or --prompt');
    const result = await generate(ids, Number(flag(args, '--max-new-tokens', '32')));
    result.text = state.tokenizer.decode(result.tokens, { skip_special_tokens: false });
    await reply({ prompt_ids: ids, ...result, settings });
}

main().catch((e) => {
    process.stderr.write(`d2m_web: ${String(e?.message ?? e).split('\n')[0]}\n`);
    process.exit(1);
});
