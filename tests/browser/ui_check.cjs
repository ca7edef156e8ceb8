// Headless Chromium (Debian's package) driven by playwright-core: the web chat streams an answer,
// keeps the conversation, shows tokens/s; the dashboard shows the workers and their layer coverage.
// Usage: node ui_check.cjs BASE_URL API_KEY MODEL ARTIFACT_DIR
// Env: PLAYWRIGHT_CORE (path to the module), CHROMIUM (the browser binary).
"use strict";
const path = require("path");
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");

const [BASE, KEY, MODEL, ART] = process.argv.slice(2);
let passed = 0, failed = 0;

function assert(cond, msg) { if (!cond) throw new Error("assertion failed: " + msg); }

async function step(name, fn) {
  try { await fn(); passed++; console.log("PASS " + name); }
  catch (e) { failed++; console.log("FAIL " + name + "\n" + (e.stack || e)); }
}

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  page.on("pageerror", (e) => { console.log("page error: " + e); failed++; });

  await step("chat page streams an answer", async () => {
    await page.goto(BASE + "/");
    await page.fill("#key", KEY);
    await page.dispatchEvent("#key", "change");
    await page.waitForSelector(`#model option[value="${MODEL}"]`, { state: "attached", timeout: 10000 });
    await page.fill("#max", "24");
    // Record every change of the answer's text while it streams.
    await page.evaluate(() => {
      window.__lens = [];
      new MutationObserver(() => {
        const a = document.querySelector(".msg.assistant:last-of-type");
        if (a && a.dataset.state === "streaming") window.__lens.push(a.textContent.length);
      }).observe(document.getElementById("log"), { subtree: true, childList: true, characterData: true });
    });
    await page.fill("#prompt", "Name three colors of the rainbow.");
    await page.click("#send");
    await page.waitForSelector('.msg.assistant[data-state="done"]', { timeout: 60000 });
    const answer = await page.textContent(".msg.assistant");
    const lens = await page.evaluate(() => window.__lens);
    const distinct = [...new Set(lens.filter((n) => n > 0))];
    console.log(`   answer: ${JSON.stringify(answer)}; partial lengths seen while streaming: ${distinct.length}`);
    assert(answer.length > 5, "an answer appeared");
    assert(distinct.length >= 3, "the answer grew in at least 3 steps while streaming: " + JSON.stringify(lens));
    const stats = await page.textContent("#stats");
    console.log("   stats: " + stats);
    assert(/[0-9.]+ tokens\/s/.test(stats) && /acceptance [0-9]+%/.test(stats), "tokens/s and acceptance shown: " + stats);
    // The page's answer is the API's greedy answer to the same request.
    const r = await fetch(BASE + "/v1/chat/completions", {
      method: "POST", headers: { "content-type": "application/json", authorization: "Bearer " + KEY },
      body: JSON.stringify({ model: MODEL, max_tokens: 24, temperature: 0,
        messages: [{ role: "user", content: "Name three colors of the rainbow." }] }),
    });
    const j = await r.json();
    assert(j.choices[0].message.content === answer, "page answer equals API answer: " + JSON.stringify(j));
    await page.screenshot({ path: path.join(ART, "chat.png"), fullPage: true });
  });

  await step("conversation history is kept", async () => {
    await page.fill("#prompt", "And one more?");
    await page.click("#send");
    await page.waitForFunction(() => document.querySelectorAll('.msg.assistant[data-state="done"]').length === 2, null, { timeout: 60000 });
    const users = await page.$$eval(".msg.user", (els) => els.map((e) => e.textContent));
    assert(users.length === 2 && users[1] === "And one more?", JSON.stringify(users));
    await page.screenshot({ path: path.join(ART, "chat-two-turns.png"), fullPage: true });
  });

  await step("dashboard shows the workers", async () => {
    await page.goto(BASE + "/swarm");
    await page.waitForSelector("tr.worker", { timeout: 10000 });
    const rows = await page.$$eval("tr.worker", (els) => els.map((e) => e.textContent.replace(/\s+/g, " ").trim()));
    console.log("   workers: " + JSON.stringify(rows));
    assert(rows.length === 1 && rows[0].includes(MODEL) && rows[0].includes("[0, 30)") && rows[0].includes("healthy"), JSON.stringify(rows));
    const seg = await page.$eval(".seg", (e) => e.style.width);
    assert(seg === "100%", "the local worker covers every layer: " + seg);
    const workers = await page.textContent("#workers");
    assert(workers.trim() === "1 / 1", "workers card: " + workers);
    // Live: the "updated" stamp changes between polls.
    const t1 = await page.textContent("#updated");
    await page.waitForFunction((t) => document.getElementById("updated").textContent !== t, t1, { timeout: 5000 });
    const total = Number(await page.textContent("#total"));
    assert(total >= 24, "tokens generated so far: " + total);
    await page.screenshot({ path: path.join(ART, "swarm.png"), fullPage: true });
  });

  await browser.close();
  console.log(`browser: ${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
})().catch((e) => { console.log("FAIL setup\n" + (e.stack || e)); process.exit(1); });
