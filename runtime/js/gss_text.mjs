// A model's text, shared by runtime/node and runtime/web: prompt text -> ids, generated ids -> text (at once, or
// streamed as the ids come), and the token that ends generation by default. Same rules as the Python runtime
// (runtime/gss_runtime/tokenizer.py and vocabulary.py):
// - an export made with `gss-export --tokenizer` (config.json's "tokenizer" record, tokenizer.json beside the
//   model): its Hugging Face tokenizer, read with @huggingface/tokenizers. Prompts are encoded with the special
//   tokens the tokenizer adds (a bos, say), text is decoded with special tokens skipped, and generation stops
//   at its eos token (not shown) unless told otherwise;
// - else a byte-level model (num_tokens 256): text is its UTF-8 bytes, no eos;
// - else ids only: no text.
//
// Like gss_decoder.mjs it imports no package itself: the caller passes the `Tokenizer` class of its
// @huggingface/tokenizers (Node: the package; the page: its browser build) and the same `load(name)` it gives
// GssDecoder.open.

import { GssInputError } from './gss_decoder.mjs';

export const BYTE_VOCAB = 256;
export const TOKENIZER_FILE = 'tokenizer.json';
export const CONFIG_FILE = 'tokenizer_config.json';
export const SPECIAL_FILE = 'special_tokens_map.json';
const SPECIAL_NAMES = ['eos', 'bos', 'unk', 'pad'];
const REPLACEMENT = '\ufffd'; // what an incomplete UTF-8 sequence decodes to
// transformers' options that the Rust `tokenizers` library (the Python runtime's) does not apply, turned off so
// that both runtimes turn the same text into the same ids and the same ids into the same text
const AS_RUST_TOKENIZERS = {
  clean_up_tokenization_spaces: false,
  remove_space: false,
  do_lowercase_and_remove_accent: false,
  additional_special_tokens: [], // Rust skips the tokens tokenizer.json marks special, and only those
};

/**
 * The vocabulary of a model opened by GssDecoder.open: `decoder.tokenizer` (config.json's "tokenizer"
 * record, null without one) and `decoder.config.num_tokens` say which kind. `Tokenizer`: the class from
 * @huggingface/tokenizers, needed only when the export has a tokenizer.
 */
export async function openVocabulary(decoder, load, Tokenizer) {
  const numTokens = decoder.config.num_tokens;
  const record = decoder.tokenizer;
  if (record === null || record === undefined) return numTokens === BYTE_VOCAB ? new ByteVocabulary() : new IdVocabulary(numTokens);
  if (typeof record !== 'object' || !Array.isArray(record.files) || !record.files.includes(TOKENIZER_FILE)) {
    throw new GssInputError(`config.json's "tokenizer" does not list ${TOKENIZER_FILE}: re-export with gss-export --tokenizer`);
  }
  if (Number.isInteger(record.vocab_size) && record.vocab_size > numTokens) {
    throw new GssInputError(
      `the tokenizer has ${record.vocab_size} tokens but the model has num_tokens ${numTokens}: it would produce ids the model cannot read`,
    );
  }
  const files = {};
  for (const name of [TOKENIZER_FILE, SPECIAL_FILE, CONFIG_FILE].filter((n) => record.files.includes(n))) {
    files[name] = await loadJson(load, name);
  }
  // tokenizer_config.json's values win over special_tokens_map.json's, as in transformers; the special
  // tokens as config.json records them (text, not AddedToken objects)
  const config = { ...files[SPECIAL_FILE], ...files[CONFIG_FILE], ...AS_RUST_TOKENIZERS };
  for (const name of SPECIAL_NAMES) config[`${name}_token`] = record[`${name}_token`] ?? undefined;
  let tokenizer;
  try {
    tokenizer = new Tokenizer(files[TOKENIZER_FILE], config);
  } catch (e) {
    throw new GssInputError(`${TOKENIZER_FILE} cannot be read by @huggingface/tokenizers: ${e?.message ?? e}`);
  }
  return new TokenizerVocabulary(tokenizer, numTokens, record);
}

/** Prompt text -> ids for this vocabulary, refusing text that gives no tokens. */
function nonEmpty(ids, text) {
  if (ids.length === 0) {
    throw new GssInputError(text === '' ? 'the prompt is empty: type some text' : `the prompt ${JSON.stringify(text)} has no tokens`);
  }
  return ids;
}

/** A model whose ids are not text (no tokenizer, num_tokens other than 256): prompts are ids. */
export class IdVocabulary {
  constructor(numTokens) {
    Object.assign(this, { kind: 'ids', text: false, size: numTokens, eosId: null });
  }

  encode() {
    throw new GssInputError(
      `this model has no text (num_tokens ${this.size}, not bytes, and no tokenizer: export it with gss-export ` +
        '--tokenizer to give it one): enter the prompt as token ids',
    );
  }

  decode() {
    return null;
  }

  stream() {
    throw new GssInputError(`this model has no text (num_tokens ${this.size} and no tokenizer): it gives ids only`);
  }
}

/** A byte-level model: ids are UTF-8 bytes; bytes that are not UTF-8 decode as U+FFFD. */
export class ByteVocabulary {
  constructor() {
    Object.assign(this, { kind: 'bytes', text: true, size: BYTE_VOCAB, eosId: null });
  }

  encode(text) {
    return nonEmpty(Array.from(new TextEncoder().encode(text)), text);
  }

  decode(ids) {
    // a leading byte-order mark stays, as Python's bytes.decode keeps it
    return new TextDecoder('utf-8', { ignoreBOM: true }).decode(Uint8Array.from(ids));
  }

  stream() {
    return new TextStream((ids) => this.decode(ids));
  }
}

/** The export's Hugging Face tokenizer (as runtime/gss_runtime/tokenizer.py's TokenizerVocabulary). */
export class TokenizerVocabulary {
  constructor(tokenizer, numTokens, record) {
    Object.assign(this, { kind: 'tokenizer', text: true, size: numTokens, tokenizer, record });
    this.eosId = Number.isInteger(record.eos_token_id) ? record.eos_token_id : null;
    if (this.eosId !== null && tokenizer.id_to_token(this.eosId) !== (record.eos_token ?? undefined)) {
      throw new GssInputError(
        `config.json says the eos token is ${JSON.stringify(record.eos_token)} (id ${this.eosId}) but ${TOKENIZER_FILE} ` +
          `has ${JSON.stringify(tokenizer.id_to_token(this.eosId) ?? null)} there: re-export with gss-export --tokenizer`,
      );
    }
  }

  /** Text -> ids, with the special tokens the tokenizer's post-processor adds (a bos, say), as a completion prompt gets. */
  encode(text) {
    const ids = nonEmpty(this.tokenizer.encode(text, { add_special_tokens: true }).ids, text);
    const bad = ids.findIndex((id) => !Number.isInteger(id) || id < 0 || id >= this.size);
    if (bad >= 0) {
      throw new GssInputError(`the tokenizer gave the prompt an id (${ids[bad]}) that is not a token of this model (num_tokens ${this.size})`);
    }
    return ids;
  }

  /** Ids -> text, special tokens skipped; ids the tokenizer does not have (below num_tokens) give no text, as in Rust. */
  decode(ids) {
    const known = Array.from(ids, Number).filter((id) => this.tokenizer.id_to_token(id) !== undefined);
    return known.length ? this.tokenizer.decode(known, { skip_special_tokens: true, clean_up_tokenization_spaces: false }) : '';
  }

  stream() {
    return new TextStream((ids) => this.decode(ids));
  }
}

/**
 * Text of ids as they come (runtime/gss_runtime/tokenizer.py's TokenizerStream). A token may end inside a
 * multi-byte character, or change how the text before it reads (a decoder that joins word pieces): a window is
 * decoded from the last point where the text was whole, and text is shown once the window no longer ends in an
 * incomplete character (U+FFFD). Shown text never changes: the pieces joined (end() included) equal decode(ids).
 */
export class TextStream {
  constructor(decode) {
    this.decode = decode;
    this.ids = [];
    this.start = 0; // ids[start:] are decoded together with what comes next
    this.shown = 0; // ids[:shown] have had their text shown
  }

  /** The text that `ids` (one id or several) make showable now, '' while a character is incomplete. */
  add(ids) {
    for (const id of typeof ids === 'number' ? [ids] : ids) this.ids.push(Number(id));
    if (this.ids.length === this.shown) return '';
    const before = this.decode(this.ids.slice(this.start, this.shown));
    const now = this.decode(this.ids.slice(this.start));
    if (now.length <= before.length || now.endsWith(REPLACEMENT)) return ''; // hold it
    [this.start, this.shown] = [this.shown, this.ids.length];
    return now.slice(before.length);
  }

  /** What is still held back (an incomplete character decodes as U+FFFD). */
  end() {
    const before = this.decode(this.ids.slice(this.start, this.shown));
    const now = this.decode(this.ids.slice(this.start));
    this.start = this.shown = this.ids.length;
    return now.slice(before.length);
  }
}

/**
 * The id that ends generation: none with ignoreEos, else eosId when given (checked against the model), else
 * the vocabulary's default (the tokenizer's eos token; none for bytes and ids).
 */
export function eosFor(vocab, { eosId = null, ignoreEos = false } = {}) {
  if (ignoreEos) return null;
  if (eosId === null || eosId === undefined) return vocab.eosId;
  if (!Number.isInteger(eosId) || eosId < 0 || eosId >= vocab.size) {
    throw new GssInputError(`eos id ${eosId} is not a token id in [0, ${vocab.size})`);
  }
  return eosId;
}

async function loadJson(load, name) {
  let bytes;
  try {
    bytes = await load(name);
  } catch (e) {
    throw e instanceof GssInputError ? e : new GssInputError(`cannot load ${name}: ${e.message}`);
  }
  try {
    const value = JSON.parse(new TextDecoder().decode(bytes));
    if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new Error('expected a JSON object');
    return value;
  } catch (e) {
    throw new GssInputError(`${name} is not a JSON object: ${e.message}`);
  }
}
