// The page's logic: open the model folder, turn the prompt into ids, stream greedy tokens into the page.
// onnxruntime-web's WebAssembly backend, single-threaded (no cross-origin isolation needed), and the export's
// Hugging Face tokenizer (if it has one) through @huggingface/tokenizers; files served from this package's
// node_modules: nothing is fetched from the internet.
import * as ort from './node_modules/onnxruntime-web/dist/ort.wasm.min.mjs';
import { Tokenizer } from './node_modules/@huggingface/tokenizers/dist/tokenizers.min.mjs';
import { GssDecoder, GssInputError, parseIds, parsePositiveInt } from '../js/gss_decoder.mjs';
import { eosFor, openVocabulary } from '../js/gss_text.mjs';

ort.env.wasm.wasmPaths = new URL('./node_modules/onnxruntime-web/dist/', import.meta.url).href;
ort.env.wasm.numThreads = 1; // more threads need SharedArrayBuffer (COOP/COEP headers); ort warns otherwise
ort.env.logLevel = 'error';

const $ = (id) => document.getElementById(id);
const fields = { model: $('model'), prompt: $('prompt'), asIds: $('as-ids'), maxNew: $('max-new-tokens') };
const query = new URLSearchParams(location.search);
if (query.has('model')) fields.model.value = query.get('model');

// the last model folder opened (its decoder and vocabulary), reused while the URL stays the same
let opened = { url: null, decoder: null, vocab: null };

async function openModel(value) {
  const base = new URL(value.trim().endsWith('/') ? value.trim() : `${value.trim()}/`, location.href);
  if (opened.url !== base.href) {
    const load = async (name) => {
      const response = await fetch(new URL(name, base));
      if (!response.ok) throw new GssInputError(`cannot load ${name} from ${base.href}: HTTP ${response.status} ${response.statusText}`);
      return new Uint8Array(await response.arrayBuffer());
    };
    opened = { url: null, decoder: null, vocab: null };
    const decoder = await GssDecoder.open(ort, load, { executionProviders: ['wasm'] });
    opened = { url: base.href, decoder, vocab: await openVocabulary(decoder, load, Tokenizer) };
  }
  return opened;
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
    const { decoder, vocab } = await openModel(fields.model.value);
    document.body.dataset.vocabulary = vocab.kind; // "tokenizer", "bytes" or "ids"
    // text through the export's tokenizer, or as UTF-8 bytes for a byte-level model; ids-only models refuse it
    const promptIds = fields.asIds.checked ? parseIds(fields.prompt.value, decoder.config.num_tokens) : vocab.encode(fields.prompt.value);
    const maxNew = parsePositiveInt(fields.maxNew.value, 'max new tokens');
    decoder.check(promptIds, maxNew);
    const eosId = eosFor(vocab); // the tokenizer's end-of-text token: generation stops there (not shown)
    // models with text show text (a character held back until it is complete), others show ids
    const stream = vocab.text ? vocab.stream() : null;
    const promptSpan = Object.assign(document.createElement('span'), { className: 'prompt' });
    promptSpan.textContent = vocab.text ? vocab.decode(promptIds) : promptIds.join(' ');
    const generated = Object.assign(document.createElement('span'), { className: 'generated' });
    output.append(promptSpan, generated);
    setState('running', 'Generating...');
    const start = performance.now();
    const tokens = await decoder.generate(promptIds, maxNew, async (token, i) => {
      generated.textContent += stream ? stream.add(token) : ` ${token}`;
      output.dataset.count = String(i + 1);
      $('status').textContent = `Generating... ${i + 1} / ${maxNew}`;
      await new Promise((resolve) => setTimeout(resolve, 0)); // yield: let the browser paint this token
    }, { eosId });
    if (stream) generated.textContent += stream.end(); // a trailing incomplete character, if any (as U+FFFD)
    const seconds = (performance.now() - start) / 1000;
    $('tokens').textContent = JSON.stringify(tokens);
    document.body.dataset.prompt = decoder.promptPath; // "prefill" (one call) or "step" (chunks)
    document.body.dataset.family = decoder.family; // "dsconv", "gss" or "mhesa"
    document.body.dataset.stop = decoder.stopReason; // "eos" or "max_new_tokens"
    const why = decoder.stopReason === 'eos' ? ', stopped at the end-of-text token' : '';
    setState('done', `Done: ${tokens.length} tokens${why} in ${seconds.toFixed(2)} s (${(tokens.length / seconds).toFixed(1)} tokens/s).`);
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
