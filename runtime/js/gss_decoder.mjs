// Greedy generation on a gss-export decoder with state (decoder.onnx, prefill.onnx), shared by runtime/node
// and runtime/web.
//
// It does not import onnxruntime: the caller passes its `ort` namespace (onnxruntime-node or -web) and a
// `load(name)` function returning a file of the model folder as bytes, so the same loop runs in both.
// Same algorithm as runtime/gss_runtime/decoder.py (batch 1). config.json's export.decoder says which of two
// kinds of state the family carries, with the state's names and shapes:
// - "append" (GatedDsConvLM): per layer u head-major (1, heads, capacity, head_dim) and k slot-major
//   (slots, 1, heads), in buffers with room for the tokens to come; the graph returns only the new slots'
//   entries, which we write into them. u goes in whole (its room is zeros, which the step never reads
//   into a result), k as a subarray view of its filled slots: no step copies what grows with the
//   context. The room is headroom() (a step multiplies its zeros too), grown by as much when it runs
//   out. The context is limited by max_seq_len. Exports made before this layout are refused.
// - "replace" (GatedStateSpacesLM, GatedExponentialSmoothingLM): per layer one tensor of a fixed shape,
//   batch first, which the graph returns whole and which replaces the old one; it starts from zeros and the
//   context is unlimited (only one call's new tokens are limited by max_seq_len).
// A prompt of more than PREFILL_ABOVE tokens goes through prefill.onnx (same interface; it runs the
// full-sequence form, the cost of one forward of the prompt); exports without prefill.onnx take it in
// chunks through decoder.onnx.

export const PREFILL_ABOVE = 128; // as gss_runtime.decoder.PREFILL_ABOVE; config.json's export.prefill says it too
export const PREFILL_CHUNK = 256; // without prefill.onnx: keeps each chunk's kernel taps cache-sized (see decoder.py)
const CONFIG_KEYS = ['num_tokens', 'dim', 'depth', 'max_seq_len'];
// what only the dsconv family's config has (its state's widths, for exports whose config.json lists no state)
const FAMILY_KEYS = { dsconv: ['heads', 'dim_dsconv'], gss: [], mhesa: [] };
const STATE_KINDS = ['append', 'replace'];
const PAST_LAYOUT = 'u_head_major'; // config.json's export.decoder.past_layout for the head-major past (decoder_io.py)
// as gss_runtime.decoder's: a step multiplies u's whole buffer, and untouched room costs about what filled
// slots do, so room past the filled slots is at most an eighth of them (at least ROOM_MIN)
const ROOM_MIN = 256;
const ROOM_SHARE = 8;

/** Free slots to keep past `slots` filled ones for `wanted` tokens to come. */
function headroom(slots, wanted) {
  return Math.min(Math.max(wanted, 0), Math.max(ROOM_MIN, Math.floor(slots / ROOM_SHARE)));
}

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

export class GssDecoder {
  /**
   * Open a model folder's `config.json`, `decoder.onnx` and, where config.json lists it, `prefill.onnx`.
   * load(name) -> Promise<Uint8Array> of that file; for the .onnx files it may instead give a path or URL
   * for ort to open itself (Node: then a decoder.onnx.data holding the weights of a big export is found
   * beside it). sessionOptions go to ort.InferenceSession.create.
   */
  static async open(ort, load, sessionOptions = {}) {
    const configBytes = await loadFile(load, 'config.json');
    let config, exported, tokenizer;
    try {
      ({ model: config, export: exported, tokenizer } = JSON.parse(new TextDecoder().decode(configBytes)));
    } catch (e) {
      throw new GssInputError(`config.json is not valid JSON: ${e.message}`);
    }
    const family = config?.family ?? 'dsconv'; // exports made before there were three families lack it
    if (!Object.hasOwn(FAMILY_KEYS, family)) {
      throw new GssInputError(
        `config.json names model.family ${JSON.stringify(family)}; this runtime knows ${Object.keys(FAMILY_KEYS).join(', ')}`,
      );
    }
    const missing = [...CONFIG_KEYS, ...FAMILY_KEYS[family]].filter((k) => !Number.isInteger(config?.[k]));
    if (missing.length) throw new GssInputError(`config.json lacks model.${missing.join(', model.')}; export with gss-export`);
    const model = { ...config, family };
    stateSpec(model, exported?.decoder); // a config.json without a usable state fails before the slow part
    const session = await openSession(ort, load, 'decoder.onnx', sessionOptions);
    const prefillFile = exported?.prefill?.file;
    const prefill = prefillFile ? await openSession(ort, load, prefillFile, sessionOptions) : null;
    const decoder = new GssDecoder(ort, session, model, prefill, exported);
    decoder.tokenizer = tokenizer ?? null; // config.json's record of the export's tokenizer (gss_text.mjs reads it)
    return decoder;
  }

  /** config: config.json's "model"; exported: its "export" (the state's kind, names and shapes, the prefill threshold). */
  constructor(ort, session, config, prefill = null, exported = {}) {
    this.ort = ort;
    this.session = session;
    this.prefill = prefill;
    this.config = { family: 'dsconv', ...config };
    this.family = this.config.family;
    this.tokenizer = null;
    ({ kind: this.kind, pastNames: this.pastNames, newNames: this.newNames, shapes: this.shapes } = stateSpec(
      this.config,
      exported?.decoder,
    ));
    this.sizes = this.shapes.map((shape) => shape.reduce((n, d) => n * d, 1)); // floats per row (per slot if appended)
    const above = exported?.prefill?.use_above_new_tokens;
    this.prefillAbove = Number.isInteger(above) ? above : PREFILL_ABOVE;
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

  /** Whether prompt + new tokens are limited by max_seq_len (an appended state); a recurrent one only limits each call. */
  get bounded() {
    return this.kind === 'append';
  }

  /** Throws GssInputError unless promptIds / maxNewTokens fit this model. */
  check(promptIds, maxNewTokens) {
    checkIds(promptIds, this.config.num_tokens);
    if (!Number.isSafeInteger(maxNewTokens) || maxNewTokens < 1) {
      throw new GssInputError(`max new tokens must be a positive integer, got ${maxNewTokens}`);
    }
    const total = promptIds.length + maxNewTokens;
    if (this.bounded && total > this.config.max_seq_len) {
      throw new GssInputError(
        `prompt (${promptIds.length} tokens) + max new tokens (${maxNewTokens}) = ${total} exceeds ` +
          `the model's max_seq_len ${this.config.max_seq_len}`,
      );
    }
  }

  /**
   * Greedy ids after promptIds (prompt excluded); `await onToken(id, index)` sees each as it is made. Stops
   * after maxNewTokens, or at eosId (not returned, not seen by onToken); stopReason then says "eos" or "max_new_tokens" (gss-run's names).
   */
  async generate(promptIds, maxNewTokens, onToken = null, { eosId = null } = {}) {
    this.check(promptIds, maxNewTokens);
    if (eosId !== null && !(Number.isInteger(eosId) && eosId >= 0 && eosId < this.config.num_tokens)) {
      throw new GssInputError(`eos id ${eosId} is not a token id in [0, ${this.config.num_tokens})`);
    }
    const state = this.#emptyState(promptIds.length, maxNewTokens);
    const whole = this.prefill !== null && promptIds.length > this.prefillAbove;
    this.promptPath = whole ? 'prefill' : 'step';
    // one call takes at most max_seq_len new tokens: only a recurrent state's prompt can be longer than that
    const chunk = Math.min(whole ? Infinity : PREFILL_CHUNK, this.config.max_seq_len);
    let logits;
    for (let start = 0; start < promptIds.length; start += chunk) {
      logits = await this.#feed(promptIds.slice(start, start + chunk), state, whole ? this.prefill : this.session);
    }
    const tokens = [];
    for (;;) {
      const token = argmax(logits);
      if (token === eosId) {
        this.stopReason = 'eos';
        return tokens;
      }
      tokens.push(token);
      if (onToken) await onToken(token, tokens.length - 1);
      if (tokens.length === maxNewTokens) {
        this.stopReason = 'max_new_tokens';
        return tokens;
      }
      logits = await this.#feed([token], state);
    }
  }

  /** The state before any token: room for the prompt, and for up to headroom() of the `more` tokens after it. */
  #emptyState(prompt, more) {
    if (this.kind === 'replace') return { arrays: this.sizes.map((n) => new Float32Array(n)) }; // zeros
    // one zero padding slot first: onnxruntime dies (SIGFPE) on a zero-length past; pad = [1] says
    // position 0 is at slot 1, so that slot is never read
    const capacity = 1 + prompt + headroom(1 + prompt, more);
    return { filled: 1, capacity, buffers: this.sizes.map((w) => new Float32Array(capacity * w)) };
  }

  /** Buffers of `capacity` slots holding the filled ones: u head by head (head-major), k as it is. */
  #grow(state, capacity) {
    const depth = this.config.depth;
    state.buffers = state.buffers.map((old, i) => {
      const grown = new Float32Array(capacity * this.sizes[i]);
      if (i >= depth) {
        grown.set(old.subarray(0, state.filled * this.sizes[i]));
      } else {
        const [heads, d] = this.shapes[i];
        for (let h = 0; h < heads; h++) {
          grown.set(old.subarray(h * state.capacity * d, (h * state.capacity + state.filled) * d), h * capacity * d);
        }
      }
      return grown;
    });
    state.capacity = capacity;
  }

  /** Feed ids through `session` and update the state with what it returns; the logits after the last id. */
  async #feed(ids, state, session = this.session) {
    const { Tensor } = this.ort;
    const append = this.kind === 'append';
    const feeds = {
      input_ids: new Tensor('int64', BigInt64Array.from(ids, BigInt), [1, ids.length]),
      // appended: the slot of position 0 (after the padding slot); recurrent: this call's leading
      // padding positions, none for a single row
      pad: new Tensor('int64', BigInt64Array.of(append ? 1n : 0n), [1]),
    };
    const depth = this.config.depth;
    const needed = append ? state.filled + ids.length : 0;
    if (append && needed > state.capacity) this.#grow(state, needed + headroom(needed, Infinity));
    this.pastNames.forEach((name, i) => {
      if (!append) feeds[name] = new Tensor('float32', state.arrays[i], [1, ...this.shapes[i]]);
      else if (i < depth) feeds[name] = new Tensor('float32', state.buffers[i], [1, this.shapes[i][0], state.capacity, this.shapes[i][1]]);
      else feeds[name] = new Tensor('float32', state.buffers[i].subarray(0, state.filled * this.sizes[i]), [state.filled, 1, ...this.shapes[i]]);
    });
    const out = await session.run(feeds);
    if (append) {
      this.newNames.forEach((name, i) => {
        const entries = out[name].data; // (t, 1, width)
        if (i >= depth) return state.buffers[i].set(entries, state.filled * this.sizes[i]);
        const [heads, d] = this.shapes[i]; // u: slot filled + j of head h starts at (h * capacity + filled + j) * d
        for (let j = 0; j < ids.length; j++) {
          for (let h = 0; h < heads; h++) {
            const from = (j * heads + h) * d;
            state.buffers[i].set(entries.subarray(from, from + d), (h * state.capacity + state.filled + j) * d);
          }
        }
      });
      state.filled += ids.length;
    } else {
      this.newNames.forEach((name, i) => (state.arrays[i] = out[name].data)); // the whole state after this call
    }
    const vocab = this.config.num_tokens;
    return out.logits.data.subarray((ids.length - 1) * vocab, ids.length * vocab);
  }
}

/**
 * The decoder's state from config.json's export.decoder: {kind, pastNames, newNames, shapes}, where
 * shapes[i] is state tensor i's fixed sizes: without its batch axis (appended: without its slot axis either,
 * u's as [heads, head_dim]).
 */
function stateSpec(config, decoder) {
  const kind = decoder?.state ?? 'append'; // absent in exports made before the recurrent families
  if (!STATE_KINDS.includes(kind)) {
    throw new GssInputError(`config.json's export.decoder.state is ${JSON.stringify(kind)}; this runtime knows ${STATE_KINDS.join(', ')}`);
  }
  if (kind === 'append' && decoder?.past_layout !== PAST_LAYOUT) {
    throw new GssInputError(
      "this export was made before the decoder's past became head-major; re-export it with gss-export --format onnx",
    );
  }
  if (!Array.isArray(decoder?.inputs) || !Array.isArray(decoder?.outputs)) {
    throw new GssInputError("config.json lacks export.decoder's inputs and outputs; re-export with gss-export --format onnx");
  }
  const past = decoder.inputs.slice(2);
  const fresh = decoder.outputs.slice(1);
  // the fixed sizes: u (batch, heads, capacity, d) -> [heads, d]; k (context, batch, heads) -> [heads]; a recurrent state's without batch
  const fixedOf = (shape, i) =>
    kind !== 'append' ? shape.slice(1) : i < config.depth ? [shape[1], shape[3]] : shape.slice(2);
  const shapes = past.map((t, i) => {
    const fixed = Array.isArray(t?.shape) ? fixedOf(t.shape, i) : null;
    if (typeof t?.name !== 'string' || !fixed?.length || !fixed.every((d) => Number.isInteger(d) && d > 0)) {
      throw new GssInputError(`config.json's export.decoder.inputs has a state without a name and fixed sizes: ${JSON.stringify(t)}`);
    }
    return fixed;
  });
  if (fresh.length !== past.length) {
    throw new GssInputError(`config.json's export.decoder lists ${past.length} state inputs but ${fresh.length} state outputs`);
  }
  return { kind, pastNames: past.map((t) => t.name), newNames: fresh.map((t) => t?.name), shapes };
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
