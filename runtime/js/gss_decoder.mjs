// Greedy generation on a gss-export decoder with state (decoder.onnx, prefill.onnx), shared by runtime/node
// and runtime/web.
//
// It does not import onnxruntime: the caller passes its `ort` namespace (onnxruntime-node or -web) and a
// `load(name)` function returning a file of the model folder as bytes, so the same loop runs in both.
// Same algorithm as runtime/gss_runtime/decoder.py (batch 1): the state is slot-major (slots, 1, width)
// per layer; the graph returns only the new slots' entries and we append them to preallocated buffers,
// handing the filled part back as a subarray view (nothing is copied that grows with the context).
// A prompt of more than PREFILL_ABOVE tokens goes through prefill.onnx in one call (same interface; its
// convolution runs the full-sequence form over every slot, the cost of one forward of the prompt);
// exports without prefill.onnx take it in chunks through decoder.onnx.

export const PREFILL_ABOVE = 128; // as gss_runtime.decoder.PREFILL_ABOVE
export const PREFILL_CHUNK = 256; // without prefill.onnx: keeps each chunk's kernel taps cache-sized (see decoder.py)
const CONFIG_KEYS = ['num_tokens', 'dim', 'depth', 'heads', 'dim_dsconv', 'max_seq_len'];

/** A bad argument, model folder or prompt: callers show `message` (no stack) and stop. */
export class GssInputError extends Error {
  constructor(message) {
    super(message);
    this.name = 'GssInputError';
  }
}

/** "1, 2,3" -> [1, 2, 3]; every id an integer in [0, numTokens). */
export function parseIds(text, numTokens) {
  if (text.trim() === '') throw new GssInputError('the prompt is empty: give at least one token id');
  const ids = text.split(',').map((item, i) => {
    const s = item.trim();
    if (!/^[+-]?\d+$/.test(s)) throw new GssInputError(`prompt id ${i + 1} (${JSON.stringify(s)}) is not an integer`);
    return Number(s);
  });
  checkIds(ids, numTokens);
  return ids;
}

export function checkIds(ids, numTokens) {
  if (ids.length === 0) throw new GssInputError('the prompt is empty: give at least one token id');
  ids.forEach((id, i) => {
    if (!Number.isInteger(id)) throw new GssInputError(`prompt id ${i + 1} (${id}) is not an integer`);
    if (id < 0 || id >= numTokens) {
      throw new GssInputError(`prompt id ${i + 1} (${id}) is out of range: ids must be in [0, ${numTokens})`);
    }
  });
}

/** A positive integer from a string such as a command-line value or a form field. */
export function parsePositiveInt(text, what) {
  const s = String(text).trim();
  if (!/^\+?\d+$/.test(s) || Number(s) < 1 || !Number.isSafeInteger(Number(s))) {
    throw new GssInputError(`${what} must be a positive integer, got ${JSON.stringify(String(text))}`);
  }
  return Number(s);
}

/** Text -> UTF-8 bytes as token ids: only for byte-level models (num_tokens 256). */
export function textToIds(text, numTokens) {
  if (numTokens !== 256) {
    throw new GssInputError(`this model has ${numTokens} tokens, not bytes: enter the prompt as token ids`);
  }
  const ids = Array.from(new TextEncoder().encode(text));
  if (ids.length === 0) throw new GssInputError('the prompt is empty: type some text');
  return ids;
}

export class GssDecoder {
  /**
   * Open a model folder's `config.json`, `decoder.onnx` and, where config.json lists it, `prefill.onnx`.
   * load(name) -> Promise<Uint8Array> of that file; for the .onnx files it may instead give a path or URL
   * for ort to open itself (Node: then a decoder.onnx.data holding the weights of a big export is found
   * beside it). sessionOptions go to ort.InferenceSession.create.
   */
  static async open(ort, load, sessionOptions = {}) {
    const configBytes = await loadFile(load, 'config.json');
    let config, exported;
    try {
      ({ model: config, export: exported } = JSON.parse(new TextDecoder().decode(configBytes)));
    } catch (e) {
      throw new GssInputError(`config.json is not valid JSON: ${e.message}`);
    }
    const missing = CONFIG_KEYS.filter((k) => !Number.isInteger(config?.[k]));
    if (missing.length) throw new GssInputError(`config.json lacks model.${missing.join(', model.')}; export with gss-export`);
    const session = await openSession(ort, load, 'decoder.onnx', sessionOptions);
    const prefillFile = exported?.prefill?.file;
    const prefill = prefillFile ? await openSession(ort, load, prefillFile, sessionOptions) : null;
    return new GssDecoder(ort, session, config, prefill);
  }

  constructor(ort, session, config, prefill = null) {
    this.ort = ort;
    this.session = session;
    this.prefill = prefill;
    this.config = config;
    const layers = [...Array(config.depth).keys()];
    this.pastNames = [...layers.map((i) => `past_u.${i}`), ...layers.map((i) => `past_k.${i}`)];
    this.newNames = [...layers.map((i) => `new_u.${i}`), ...layers.map((i) => `new_k.${i}`)];
    this.widths = [...layers.map(() => config.dim_dsconv), ...layers.map(() => config.heads)];
    const want = [['input_ids', 'pad', ...this.pastNames], ['logits', ...this.newNames]];
    for (const [name, s] of [['decoder.onnx', session], ['prefill.onnx', prefill]]) {
      if (s && (String(s.inputNames) !== String(want[0]) || String(s.outputNames) !== String(want[1]))) {
        throw new GssInputError(
          `${name} is not a gss-export decoder with state for this config.json: found inputs ` +
            `${s.inputNames.join(', ')} and outputs ${s.outputNames.join(', ')}`,
        );
      }
    }
  }

  /** Throws GssInputError unless promptIds / maxNewTokens fit this model. */
  check(promptIds, maxNewTokens) {
    checkIds(promptIds, this.config.num_tokens);
    if (!Number.isSafeInteger(maxNewTokens) || maxNewTokens < 1) {
      throw new GssInputError(`max new tokens must be a positive integer, got ${maxNewTokens}`);
    }
    const total = promptIds.length + maxNewTokens;
    if (total > this.config.max_seq_len) {
      throw new GssInputError(
        `prompt (${promptIds.length} tokens) + max new tokens (${maxNewTokens}) = ${total} exceeds ` +
          `the model's max_seq_len ${this.config.max_seq_len}`,
      );
    }
  }

  /** Greedy ids after promptIds (prompt excluded); `await onToken(id, index)` sees each as it is made. */
  async generate(promptIds, maxNewTokens, onToken = null) {
    this.check(promptIds, maxNewTokens);
    // one zero padding slot first: onnxruntime dies (SIGFPE) on a zero-length past; pad = [1] says
    // position 0 is at slot 1, so that slot is never read. Capacity for everything that will be fed.
    const capacity = 1 + promptIds.length + maxNewTokens;
    const state = { filled: 1, buffers: this.widths.map((w) => new Float32Array(capacity * w)) };
    let logits;
    if (this.prefill && promptIds.length > PREFILL_ABOVE) {
      this.promptPath = 'prefill';
      logits = await this.#feed(promptIds, state, this.prefill);
    } else {
      this.promptPath = 'step';
      for (let start = 0; start < promptIds.length; start += PREFILL_CHUNK) {
        logits = await this.#feed(promptIds.slice(start, start + PREFILL_CHUNK), state);
      }
    }
    const tokens = [];
    for (;;) {
      const token = argmax(logits);
      tokens.push(token);
      if (onToken) await onToken(token, tokens.length - 1);
      if (tokens.length === maxNewTokens) return tokens;
      logits = await this.#feed([token], state);
    }
  }

  /** Feed ids for the next slots through `session`, append their state entries; the logits after the last id. */
  async #feed(ids, state, session = this.session) {
    const { Tensor } = this.ort;
    const feeds = {
      input_ids: new Tensor('int64', BigInt64Array.from(ids, BigInt), [1, ids.length]),
      pad: new Tensor('int64', BigInt64Array.of(1n), [1]),
    };
    this.pastNames.forEach((name, i) => {
      const w = this.widths[i];
      feeds[name] = new Tensor('float32', state.buffers[i].subarray(0, state.filled * w), [state.filled, 1, w]);
    });
    const out = await session.run(feeds);
    this.newNames.forEach((name, i) => state.buffers[i].set(out[name].data, state.filled * this.widths[i]));
    state.filled += ids.length;
    const vocab = this.config.num_tokens;
    return out.logits.data.subarray((ids.length - 1) * vocab, ids.length * vocab);
  }
}

/** Index of the largest value; ties -> the lowest index (as numpy / torch argmax). */
export function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

async function openSession(ort, load, name, sessionOptions) {
  const model = await loadFile(load, name);
  try {
    return await ort.InferenceSession.create(model, sessionOptions);
  } catch (e) {
    throw new GssInputError(`cannot open ${name} with onnxruntime: ${e.message}`);
  }
}

async function loadFile(load, name) {
  try {
    return await load(name);
  } catch (e) {
    throw e instanceof GssInputError ? e : new GssInputError(`cannot load ${name}: ${e.message}`);
  }
}
