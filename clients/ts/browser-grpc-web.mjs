// Opens a page in headless Chromium (Debian's package, driven by
// puppeteer-core) and prints what the page's script reported in
// `window.__result` as one JSON line. Usage: node browser-grpc-web.mjs <url>
// With `--count <selector>`, prints how many elements match once one does.
import puppeteer from "puppeteer-core";

const url = process.argv[2];
const countSelector = process.argv[3] === "--count" ? process.argv[4] : null;
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
  ],
});
try {
  const page = await browser.newPage();
  // The page's own messages go to stderr, for a failing test's output.
  page.on("console", (m) => console.error(`page console: ${m.text()}`));
  page.on("pageerror", (e) => console.error(`page error: ${e}`));
  page.on("requestfailed", (r) => console.error(`request failed: ${r.method()} ${r.url()} ${r.failure()?.errorText}`));
  await page.goto(url, { waitUntil: "load" });
  if (countSelector) {
    await page.waitForSelector(countSelector, { timeout: 20000 });
    const count = await page.$$eval(countSelector, (els) => els.length);
    console.log(JSON.stringify({ count }));
  } else {
    await page.waitForFunction(() => window.__result !== undefined, { timeout: 20000 });
    const result = await page.evaluate(() => window.__result);
    console.log(JSON.stringify(result));
  }
} finally {
  await browser.close();
}
