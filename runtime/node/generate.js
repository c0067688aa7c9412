#!/usr/bin/env node
// Greedy generation from a gss-export folder on onnxruntime-node: prints {"tokens":[...], ...} (generated ids only).
import { existsSync, statSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import * as ort from 'onnxruntime-node';
import { GssDecoder, GssInputError, parseIds, parsePositiveInt } from '../js/gss_decoder.mjs';

const USAGE = `usage: node generate.js MODEL_DIR --prompt-ids 1,2,3 --max-new-tokens N [--threads N]

  MODEL_DIR            a folder written by gss-export --format onnx (decoder.onnx, config.json)
  --prompt-ids IDS     comma-separated token ids, each in [0, num_tokens)
  --max-new-tokens N   how many tokens to generate (dsconv: prompt + N <= max_seq_len; the recurrent
                       families gss and mhesa have no such limit)
  --threads N          onnxruntime intra-op threads (default: onnxruntime's choice)

Prints one JSON line to stdout: {"tokens":[...],"prompt":"step"|"prefill","family":"dsconv"|"gss"|"mhesa"}:
the greedily generated ids (prompt excluded), the graph the prompt went through, and the model's family.`;

class UsageError extends GssInputError {}

function parseCommandLine(args) {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      options: {
        'prompt-ids': { type: 'string' },
        'max-new-tokens': { type: 'string' },
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
  for (const name of ['prompt-ids', 'max-new-tokens']) {
    if (values[name] === undefined) throw new UsageError(`--${name} is required`);
  }
  return {
    modelDir: positionals[0],
    promptIds: values['prompt-ids'],
    maxNewTokens: parsePositiveInt(values['max-new-tokens'], '--max-new-tokens'),
    threads: values.threads === undefined ? undefined : parsePositiveInt(values.threads, '--threads'),
  };
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
  const promptIds = parseIds(options.promptIds, decoder.config.num_tokens);
  const tokens = await decoder.generate(promptIds, options.maxNewTokens);
  process.stdout.write(JSON.stringify({ tokens, prompt: decoder.promptPath, family: decoder.family }) + '\n');
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
