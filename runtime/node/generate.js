#!/usr/bin/env node
// Greedy generation from a gss-export folder on onnxruntime-node: prints {"tokens":[...],"text":...} (generated only).
import { Tokenizer } from '@huggingface/tokenizers';
import { existsSync, statSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import * as ort from 'onnxruntime-node';
import { GssDecoder, GssInputError, parseIds, parsePositiveInt } from '../js/gss_decoder.mjs';
import { eosFor, openVocabulary } from '../js/gss_text.mjs';

const USAGE = `usage: node generate.js MODEL_DIR (--prompt TEXT | --prompt-ids 1,2,3) --max-new-tokens N
                        [--eos-id ID | --ignore-eos] [--stream] [--threads N]

  MODEL_DIR            a folder written by gss-export --format onnx (decoder.onnx, config.json)
  --prompt TEXT        text: through the export's tokenizer (gss-export --tokenizer), else UTF-8 bytes
                       for a byte-level model (num_tokens 256); other models take --prompt-ids only
  --prompt-ids IDS     comma-separated token ids, each in [0, num_tokens)
  --max-new-tokens N   at most this many new tokens (dsconv: prompt + N <= max_seq_len)
  --eos-id ID          stop at this token (not printed); default: the tokenizer's eos token, if any
  --ignore-eos         do not stop at the tokenizer's eos token
  --stream             write the text to stdout as it comes (whole characters), then the JSON line
  --threads N          onnxruntime intra-op threads (default: onnxruntime's choice)

Prints one JSON line: {"tokens":[...],"text":"...","stop_reason":"eos"|"max_new_tokens",
"prompt":"step"|"prefill","family":"dsconv"|"gss"|"mhesa"}: the greedy ids (prompt and eos excluded),
their text (special tokens skipped; null without a tokenizer or bytes), why it stopped, the prompt's
graph and the model's family.`;

class UsageError extends GssInputError {}

function parseCommandLine(args) {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      options: {
        prompt: { type: 'string' },
        'prompt-ids': { type: 'string' },
        'max-new-tokens': { type: 'string' },
        'eos-id': { type: 'string' },
        'ignore-eos': { type: 'boolean', default: false },
        stream: { type: 'boolean', default: false },
        threads: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (e) {
    throw new UsageError(e.message); // unknown flag, missing value, ...
  }
  const { values, positionals } = parsed;
  if (values.help) return null;
  if (positionals.length !== 1) throw new UsageError(`expected one MODEL_DIR, got ${positionals.length} positional arguments`);
  if ((values.prompt === undefined) === (values['prompt-ids'] === undefined)) {
    throw new UsageError('give exactly one of --prompt TEXT or --prompt-ids 1,2,3');
  }
  if (values['max-new-tokens'] === undefined) throw new UsageError('--max-new-tokens is required');
  if (values['eos-id'] !== undefined && values['ignore-eos']) throw new UsageError('give at most one of --eos-id and --ignore-eos');
  return {
    modelDir: positionals[0],
    prompt: values.prompt,
    promptIds: values['prompt-ids'],
    maxNewTokens: parsePositiveInt(values['max-new-tokens'], '--max-new-tokens'),
    eosId: values['eos-id'] === undefined ? null : parseTokenId(values['eos-id'], '--eos-id'),
    ignoreEos: values['ignore-eos'],
    stream: values.stream,
    threads: values.threads === undefined ? undefined : parsePositiveInt(values.threads, '--threads'),
  };
}

function parseTokenId(text, what) {
  const s = text.trim();
  if (!/^\+?\d+$/.test(s) || !Number.isSafeInteger(Number(s))) {
    throw new GssInputError(`${what} must be a token id (an integer from 0), got ${JSON.stringify(text)}`);
  }
  return Number(s);
}

function checkModelDir(dir) {
  if (!existsSync(dir) || !statSync(dir).isDirectory()) {
    throw new GssInputError(`model folder ${dir} does not exist (or is not a folder); export one with gss-export`);
  }
  for (const name of ['decoder.onnx', 'config.json']) {
    if (!existsSync(join(dir, name))) {
      throw new GssInputError(`${dir} has no ${name}; expected a folder written by gss-export --format onnx (without --no-decoder)`);
    }
  }
}

async function main(args) {
  const options = parseCommandLine(args);
  if (options === null) {
    console.log(USAGE);
    return 0;
  }
  checkModelDir(options.modelDir);
  ort.env.logLevel = 'error'; // keep stdout/stderr for our JSON line and messages
  const sessionOptions = { executionProviders: ['cpu'], logSeverityLevel: 3 };
  if (options.threads !== undefined) sessionOptions.intraOpNumThreads = options.threads;
  // the .onnx files by path: onnxruntime then also finds their .onnx.data, where a big export keeps its weights
  const load = async (name) => (name.endsWith('.onnx') ? join(options.modelDir, name) : readFile(join(options.modelDir, name)));
  const decoder = await GssDecoder.open(ort, load, sessionOptions);
  const vocab = await openVocabulary(decoder, load, Tokenizer);
  const numTokens = decoder.config.num_tokens;
  const noText = `this model has no text (num_tokens ${numTokens}, not bytes, and no tokenizer: export it with gss-export --tokenizer to give it one)`;
  if (options.prompt !== undefined && !vocab.text) throw new GssInputError(`--prompt takes text, but ${noText}; use --prompt-ids`);
  if (options.stream && !vocab.text) throw new GssInputError(`--stream writes text, but ${noText}`);
  const promptIds = options.prompt !== undefined ? vocab.encode(options.prompt) : parseIds(options.promptIds, numTokens);
  const eosId = eosFor(vocab, options);
  decoder.check(promptIds, options.maxNewTokens); // every check before anything is written
  const stream = options.stream ? vocab.stream() : null;
  const write = (text) => text && process.stdout.write(text);
  const onToken = stream && ((token) => write(stream.add(token)));
  const tokens = await decoder.generate(promptIds, options.maxNewTokens, onToken, { eosId });
  if (stream) process.stdout.write(stream.end() + '\n');
  const result = { tokens, text: vocab.decode(tokens), stop_reason: decoder.stopReason, prompt: decoder.promptPath, family: decoder.family };
  process.stdout.write(JSON.stringify(result) + '\n');
  return 0;
}

// Every failure is one message on stderr and a non-zero exit: 2 for bad input, 1 for anything else.
main(process.argv.slice(2)).then(
  (code) => (process.exitCode = code),
  (e) => {
    if (e instanceof UsageError) console.error(`${USAGE}\n\nerror: ${e.message}`);
    else console.error(`error: ${e?.message ?? e}`);
    process.exitCode = e instanceof GssInputError ? 2 : 1;
  },
);
