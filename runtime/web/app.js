// The page's logic: open the model folder, turn the prompt into ids, stream greedy tokens into the page.
// onnxruntime-web's WebAssembly backend, single-threaded (no cross-origin isolation needed), files served
// from this package's node_modules: nothing is fetched from the internet.
import * as ort from './node_modules/onnxruntime-web/dist/ort.wasm.min.mjs';
import { GssDecoder, GssInputError, parseIds, parsePositiveInt, textToIds } from '../js/gss_decoder.mjs';

ort.env.wasm.wasmPaths = new URL('./node_modules/onnxruntime-web/dist/', import.meta.url).href;
ort.env.wasm.numThreads = 1; // more threads need SharedArrayBuffer (COOP/COEP headers); ort warns otherwise
ort.env.logLevel = 'error';

const $ = (id) => document.getElementById(id);
const fields = { model: $('model'), prompt: $('prompt'), asIds: $('as-ids'), maxNew: $('max-new-tokens') };
const query = new URLSearchParams(location.search);
if (query.has('model')) fields.model.value = query.get('model');

let opened = { url: null, decoder: null }; // the last model folder opened, reused while the URL stays the same

async function openModel(value) {
  const base = new URL(value.trim().endsWith('/') ? value.trim() : `${value.trim()}/`, location.href);
  if (opened.url !== base.href) {
    const load = async (name) => {
      const response = await fetch(new URL(name, base));
      if (!response.ok) throw new GssInputError(`cannot load ${name} from ${base.href}: HTTP ${response.status} ${response.statusText}`);
      return new Uint8Array(await response.arrayBuffer());
    };
    opened = { url: null, decoder: null };
    opened = { url: base.href, decoder: await GssDecoder.open(ort, load, { executionProviders: ['wasm'] }) };
  }
  return opened.decoder;
}

function setState(state, message) {
  document.body.dataset.state = state; // idle | running | done | error: what tests wait for
  $('status').textContent = message;
}

async function generate() {
  const output = $('output');
  output.replaceChildren();
  output.dataset.count = '0';
  $('tokens').textContent = '';
  $('generate').disabled = true;
  setState('running', 'Loading the model...');
  try {
    const decoder = await openModel(fields.model.value);
    const vocab = decoder.config.num_tokens;
    const promptIds = fields.asIds.checked ? parseIds(fields.prompt.value, vocab) : textToIds(fields.prompt.value, vocab);
    const maxNew = parsePositiveInt(fields.maxNew.value, 'max new tokens');
    decoder.check(promptIds, maxNew);
    // byte-level models show text (UTF-8 decoded as bytes stream in), others show ids
    const asText = vocab === 256;
    const utf8 = new TextDecoder();
    const promptSpan = Object.assign(document.createElement('span'), { className: 'prompt' });
    promptSpan.textContent = asText ? utf8.decode(Uint8Array.from(promptIds)) : promptIds.join(' ');
    const generated = document.createElement('span');
    output.append(promptSpan, generated);
    setState('running', 'Generating...');
    const start = performance.now();
    const tokens = await decoder.generate(promptIds, maxNew, async (token, i) => {
      generated.textContent += asText ? utf8.decode(Uint8Array.of(token), { stream: true }) : ` ${token}`;
      output.dataset.count = String(i + 1);
      $('status').textContent = `Generating... ${i + 1} / ${maxNew}`;
      await new Promise((resolve) => setTimeout(resolve, 0)); // yield: let the browser paint this token
    });
    if (asText) generated.textContent += utf8.decode(); // a trailing incomplete UTF-8 sequence, if any
    const seconds = (performance.now() - start) / 1000;
    $('tokens').textContent = JSON.stringify(tokens);
    document.body.dataset.prompt = decoder.promptPath; // "prefill" (one call) or "step" (chunks)
    document.body.dataset.family = decoder.family; // "dsconv", "gss" or "mhesa"
    setState('done', `Done: ${tokens.length} tokens in ${seconds.toFixed(2)} s (${(tokens.length / seconds).toFixed(1)} tokens/s).`);
  } catch (e) {
    setState('error', e instanceof GssInputError ? e.message : `Error: ${e?.message ?? e}`);
  } finally {
    $('generate').disabled = false;
  }
}

$('form').addEventListener('submit', (event) => {
  event.preventDefault();
  generate();
});
