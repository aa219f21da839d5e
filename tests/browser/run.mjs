// Opens the storefront page in headless Chromium (Debian's, through
// playwright-core; Playwright's own browser download is not used), browses
// the catalog, buys the first product as a guest and waits until the page
// shows the order CONFIRMED. On failure it saves a screenshot.
//
// usage: node run.mjs <page url> <screenshot path> [chromium path]
import { chromium } from "playwright-core";

const [pageUrl, screenshot, executablePath = "/usr/bin/chromium"] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
const page = await browser.newPage();
const problems = [];
page.on("console", (message) => { if (message.type() === "error") problems.push(message.text()); });
try {
  await page.goto(pageUrl);
  await page.waitForFunction(
    () => document.querySelector("#products li") || document.getElementById("error").textContent !== "",
    null, { timeout: 15000 });
  const products = await page.locator("#products li").count();
  if (products === 0) throw new Error(`no catalog: ${await page.textContent("#error")}`);
  await page.click("#buy");
  await page.waitForFunction(
    () => ["CONFIRMED", "FAILED", "CANCELLED"].includes(document.getElementById("status").textContent)
      || document.getElementById("error").textContent !== "",
    null, { timeout: 30000 });
  const status = await page.textContent("#status");
  const error = await page.textContent("#error");
  console.log(JSON.stringify({ products, status, error }));
  if (status !== "CONFIRMED") throw new Error(`the page shows ${status}: ${error}`);
} catch (failure) {
  await page.screenshot({ path: screenshot, fullPage: true }).catch(() => {});
  console.error(`${failure}\nconsole errors: ${JSON.stringify(problems)}\nscreenshot: ${screenshot}`);
  await browser.close();
  process.exit(1);
}
await browser.close();
