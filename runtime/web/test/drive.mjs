// Drive the page in headless Chromium: fill the form, press Generate, wait until it is done, screenshot.
// usage: node test/drive.mjs PAGE_URL SCREENSHOT.png --prompt TEXT [--ids] --max-new-tokens N
// Prints one JSON line: {state, status, tokens, text, counts, prompt, family, errors}; `counts` are the token counts the
// page showed while generating (each one seen proves tokens appeared one by one).
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    prompt: { type: 'string', default: '' },
    ids: { type: 'boolean', default: false },
    'max-new-tokens': { type: 'string', default: '24' },
    chromium: { type: 'string', default: '/usr/bin/chromium' },
    'timeout-ms': { type: 'string', default: '60000' },
  },
});
const [pageUrl, screenshot] = positionals;
const timeout = Number(values['timeout-ms']);

const browser = await chromium.launch({
  executablePath: values.chromium,
  headless: true, // playwright adds --headless and a fresh temporary --user-data-dir
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 900 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => m.type() === 'error' && errors.push(m.text()));
  await page.goto(pageUrl, { timeout });
  await page.fill('#prompt', values.prompt);
  await page.setChecked('#as-ids', values.ids);
  await page.fill('#max-new-tokens', values['max-new-tokens']);
  // record every token count the page shows, to check that tokens stream in rather than arrive at once
  await page.evaluate(() => {
    window.seenCounts = [];
    const output = document.getElementById('output');
    new MutationObserver(() => window.seenCounts.push(Number(output.dataset.count)))
      .observe(output, { attributes: true, attributeFilter: ['data-count'] });
  });
  await page.click('#generate');
  // on a timeout the result still comes back (state "running" or "idle", with the page's status line)
  await page.waitForSelector('body[data-state="done"], body[data-state="error"]', { timeout }).catch(() => {});
  const result = await page.evaluate(() => ({
    state: document.body.dataset.state,
    status: document.getElementById('status').textContent,
    tokens: document.body.dataset.state === 'done' ? JSON.parse(document.getElementById('tokens').textContent) : null,
    text: document.getElementById('output').textContent,
    counts: window.seenCounts,
    prompt: document.body.dataset.prompt ?? null,
    family: document.body.dataset.family ?? null,
  }));
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ ...result, errors }));
} finally {
  await browser.close();
}
