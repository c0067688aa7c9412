// Drive the page in headless Chromium: fill the form, press Generate, wait until it is done, screenshot.
// usage: node test/drive.mjs PAGE_URL SCREENSHOT.png --prompt TEXT [--ids] --max-new-tokens N
//        node test/drive.mjs --runs RUNS.json   (several runs in one browser; RUNS.json: a JSON array of
//        {"url", "screenshot", "prompt", "ids", "maxNewTokens"}, each one page load)
// Prints one JSON line: {state, status, tokens, text, generated, counts, texts, prompt, family, vocabulary, stop, errors}
// (with --runs, a JSON array of them); `counts` are the token counts the page showed while generating (each one seen
// proves tokens appeared one by one) and `texts` the generated text at each of them; `generated` is the generated
// text alone, `text` the prompt's and the generated text.
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    prompt: { type: 'string', default: '' },
    ids: { type: 'boolean', default: false },
    'max-new-tokens': { type: 'string', default: '24' },
    runs: { type: 'string' },
    chromium: { type: 'string', default: '/usr/bin/chromium' },
    'timeout-ms': { type: 'string', default: '60000' },
  },
});
const timeout = Number(values['timeout-ms']);
const runs = values.runs !== undefined
  ? JSON.parse(readFileSync(values.runs, 'utf8'))
  : [{ url: positionals[0], screenshot: positionals[1], prompt: values.prompt, ids: values.ids, maxNewTokens: values['max-new-tokens'] }];

async function drive(page, { url, screenshot, prompt = '', ids = false, maxNewTokens = '24' }) {
  const errors = [];
  const onError = (e) => errors.push(String(e));
  const onConsole = (m) => m.type() === 'error' && errors.push(m.text());
  page.on('pageerror', onError);
  page.on('console', onConsole);
  try {
    await page.goto(url, { timeout });
    await page.fill('#prompt', prompt);
    await page.setChecked('#as-ids', ids);
    await page.fill('#max-new-tokens', String(maxNewTokens));
    // record every token count the page shows, and the text then, to check that tokens stream in rather than
    // arrive at once
    await page.evaluate(() => {
      window.seenCounts = [];
      window.seenTexts = [];
      const output = document.getElementById('output');
      new MutationObserver(() => {
        window.seenCounts.push(Number(output.dataset.count));
        window.seenTexts.push(output.querySelector('.generated')?.textContent ?? '');
      }).observe(output, { attributes: true, attributeFilter: ['data-count'] });
    });
    await page.click('#generate');
    // on a timeout the result still comes back (state "running" or "idle", with the page's status line)
    await page.waitForSelector('body[data-state="done"], body[data-state="error"]', { timeout }).catch(() => {});
    const result = await page.evaluate(() => ({
      state: document.body.dataset.state,
      status: document.getElementById('status').textContent,
      tokens: document.body.dataset.state === 'done' ? JSON.parse(document.getElementById('tokens').textContent) : null,
      text: document.getElementById('output').textContent,
      generated: document.querySelector('#output .generated')?.textContent ?? null,
      counts: window.seenCounts,
      texts: window.seenTexts,
      prompt: document.body.dataset.prompt ?? null,
      family: document.body.dataset.family ?? null,
      vocabulary: document.body.dataset.vocabulary ?? null,
      stop: document.body.dataset.stop ?? null,
    }));
    if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
    return { ...result, errors };
  } finally {
    page.off('pageerror', onError);
    page.off('console', onConsole);
  }
}

const browser = await chromium.launch({
  executablePath: values.chromium,
  headless: true, // playwright adds --headless and a fresh temporary --user-data-dir
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 900 } });
  const results = [];
  for (const run of runs) results.push(await drive(page, run));
  console.log(JSON.stringify(values.runs !== undefined ? results : results[0]));
} finally {
  await browser.close();
}
