// The dashboard, driven in Debian's headless Chromium by playwright-core.
// Run by crates/conductor/tests/web.rs, which brings up the fleet and passes:
//   CONVOY_URL, DEPLOYER (user:password), VIEWER (user:password), STAGING_HOST,
//   PROD_HOSTS (comma-separated), ARTIFACTS (screenshot directory).
// Prints one JSON line with what it saw (`RESULT {...}`); exits non-zero on the first
// expectation that fails, saying which.
import { chromium } from "playwright-core";
import fs from "node:fs";
import path from "node:path";

const url = process.env.CONVOY_URL;
const [deployer, deployerPass] = process.env.DEPLOYER.split(":");
const [viewer, viewerPass] = process.env.VIEWER.split(":");
const stagingHost = process.env.STAGING_HOST;
const prodHosts = process.env.PROD_HOSTS.split(",");
const artifacts = process.env.ARTIFACTS;
fs.mkdirSync(artifacts, { recursive: true });

const result = { screenshots: [] };
let step = "start";

function expect(cond, what) {
  if (!cond) throw new Error(`expected: ${what}`);
}

async function shot(page, name) {
  const file = path.join(artifacts, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  result.screenshots.push(file);
}

async function login(page, user, password) {
  await page.goto(`${url}/`);
  expect(page.url().includes("/login"), "an anonymous visit is sent to /login");
  await page.fill("#user", user);
  await page.fill("#password", password);
  const [resp] = await Promise.all([
    page.waitForNavigation(),
    page.click("form[action='/login'] button[type=submit]"),
  ]);
  return resp;
}

// Reloads the deploy form until `ref` is offered (the hosts' fetchers report it).
async function chooseRef(page, app, stage, ref) {
  const deadline = Date.now() + 30000;
  for (;;) {
    await page.goto(`${url}/deploy?app=${app}&stage=${stage}`);
    const offered = await page.$$eval("#ref option", (os) => os.map((o) => o.value));
    if (offered.includes(ref)) {
      await page.selectOption("#ref", ref);
      return offered;
    }
    if (Date.now() > deadline) throw new Error(`${ref} never offered for ${stage}: ${offered}`);
    await page.waitForTimeout(500);
  }
}

// The state of each host cell of a grid, in page order.
async function cells(page, scope) {
  return page.$$eval(`${scope} .grid [data-host]`, (cs) =>
    cs.map((c) => [c.getAttribute("data-host"), c.getAttribute("data-state")]),
  );
}

async function waitCells(page, scope, hosts, state, seen) {
  const deadline = Date.now() + 60000;
  for (;;) {
    const now = await cells(page, scope);
    for (const [h, s] of now) {
      seen[h] = seen[h] || [];
      if (seen[h][seen[h].length - 1] !== s) seen[h].push(s);
    }
    const states = Object.fromEntries(now);
    if (hosts.every((h) => states[h] === state)) return states;
    if (Date.now() > deadline) throw new Error(`hosts ${hosts} not ${state}: ${JSON.stringify(now)}`);
    await page.waitForTimeout(100);
  }
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});

try {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await ctx.newPage();
  page.on("dialog", (d) => d.accept());

  step = "a wrong password is refused";
  let resp = await login(page, deployer, "not-the-password");
  expect(resp.status() === 401, `status 401 for a wrong password, got ${resp.status()}`);
  expect(
    (await page.textContent("[role=alert]")).includes("Wrong user name or password"),
    "the login page says the password is wrong",
  );
  await shot(page, "01-login-refused");

  step = "log in";
  resp = await login(page, deployer, deployerPass);
  expect(resp.status() === 200, `dashboard after login, got ${resp.status()}`);
  expect(new URL(page.url()).pathname === "/", "logged in, on the dashboard");
  const cookies = await ctx.cookies();
  const session = cookies.find((c) => c.name === "convoy_session");
  expect(session && session.httpOnly, "the session cookie is HttpOnly");
  expect(session.sameSite === "Lax" || session.sameSite === "Strict", "the session cookie is SameSite");
  await shot(page, "02-dashboard");

  step = "preview a plan and deploy v1 to staging from the form";
  const offered = await chooseRef(page, "web", "staging", "refs/tags/v1");
  result.offered = offered;
  await page.click("button[value=preview]");
  await page.waitForSelector("section.plan");
  const planText = await page.textContent("section.plan");
  expect(planText.includes(stagingHost), "the plan lists the staging host");
  await shot(page, "03-deploy-plan");
  await Promise.all([page.waitForNavigation(), page.click("button[value=deploy]")]);
  const first = page.url().match(/\/rollouts\/(\d+)$/);
  expect(first, `a rollout page after Deploy, got ${page.url()}`);
  result.first_rollout = Number(first[1]);

  step = "watch the staging host turn green live";
  await page.evaluate(() => (window.__convoyNoReload = true));
  const seenStaging = {};
  await waitCells(page, "#live", [stagingHost], "succeeded", seenStaging);
  expect(await page.evaluate(() => window.__convoyNoReload === true), "the rollout page was not reloaded");
  result.seen_staging = seenStaging;
  await shot(page, "04-rollout-staging-done");

  step = "the manual gate waits; promote from the dashboard";
  await page.goto(`${url}/`);
  await page.waitForSelector("form[action='/apps/web/promote'] button", { timeout: 30000 });
  await shot(page, "05-gate-waits");
  await Promise.all([page.waitForNavigation(), page.click("form[action='/apps/web/promote'] button")]);

  step = "watch the prod hosts turn green live on the dashboard";
  await page.evaluate(() => (window.__convoyNoReload = true));
  const seenProd = {};
  await waitCells(page, "li.stage[data-stage=prod]", prodHosts, "succeeded", seenProd);
  expect(await page.evaluate(() => window.__convoyNoReload === true), "the dashboard was not reloaded");
  result.seen_prod = seenProd;
  await shot(page, "06-prod-green");

  step = "a host's page: ask its agent what it runs and keeps";
  await page.goto(`${url}/`);
  await Promise.all([page.waitForNavigation(), page.click(`#fleet a[href='/hosts/${prodHosts[0]}']`)]);
  expect(new URL(page.url()).pathname === `/hosts/${prodHosts[0]}`, `the host's page, got ${page.url()}`);
  await Promise.all([
    page.waitForNavigation(),
    page.click(`form[action='/hosts/${prodHosts[0]}/inventory'] button`),
  ]);
  // The answer shows up by itself (live update on the `inventory` event).
  await page.waitForSelector("table.inventory tr[data-app=web] td[data-current] code", { timeout: 30000 });
  const current = (await page.textContent("table.inventory tr[data-app=web] td[data-current]")).trim();
  expect(/^\d{8}-\d{6}-[0-9a-f]{7}$/.test(current), `a release id as web's current release, got ${current}`);
  result.inventory_current = current;
  await shot(page, "06b-host-inventory");

  step = "deploy v2 to prod with a long pause between batches, then abort it";
  await chooseRef(page, "web", "prod", "refs/tags/v2");
  await page.fill("#batches", "1");
  await page.fill("#pause_s", "600");
  await Promise.all([page.waitForNavigation(), page.click("button[value=deploy]")]);
  const second = page.url().match(/\/rollouts\/(\d+)$/);
  expect(second, `a rollout page for the second deploy, got ${page.url()}`);
  result.second_rollout = Number(second[1]);
  await waitCells(page, "#live", [prodHosts[0]], "succeeded", {});
  await Promise.all([
    page.waitForNavigation(),
    page.click(`form[action='/rollouts/${second[1]}/abort'] button`),
  ]);
  await page.waitForSelector("h1 .badge.s-aborted", { timeout: 15000 });
  await shot(page, "07-rollout-aborted");

  step = "find both rollouts in the history";
  await page.goto(`${url}/history`);
  const ids = await page.$$eval("tr[data-rollout]", (rs) => rs.map((r) => Number(r.getAttribute("data-rollout"))));
  expect(ids.includes(result.first_rollout) && ids.includes(result.second_rollout), `both rollouts listed: ${ids}`);
  await page.selectOption("#f-stage", "prod");
  await Promise.all([page.waitForNavigation(), page.click("form.filters button")]);
  const prodRows = await page.$$eval("tr[data-rollout]", (rs) => rs.map((r) => r.textContent));
  expect(prodRows.every((t) => t.includes("prod")), "the stage filter keeps prod rollouts only");
  expect(prodRows.some((t) => t.includes("aborted") && t.includes(deployer)), "the aborted rollout, started by the user");
  result.history_prod_rows = prodRows.length;
  await shot(page, "08-history");
  await page.goto(`${url}/audit`);
  const audit = await page.textContent("table.audit");
  expect(audit.includes(deployer) && audit.includes("promote") && audit.includes("abort"), "audit names the user's promote and abort");
  await shot(page, "09-audit");

  step = "refused messages show with their reason, markup as text";
  await page.click('nav a[href="/dead-letters"]');
  expect((await page.textContent("h1")) === "Dead letters", "the nav leads to the dead letters");
  const dead = await page.textContent("table.audit");
  expect(dead.includes("malformed") && dead.includes(".conductor"), `the garbled result, refused by the conductor: ${dead}`);
  await page.click("table.audit details summary");
  const body = await page.textContent("table.audit details pre");
  expect(body.includes('<img src=x onerror="window.__xss=1">'), `the body shown as text: ${body}`);
  expect((await page.evaluate(() => window.__xss)) === undefined, "markup in a dead letter never runs");
  await shot(page, "09b-dead-letters");

  step = "a form without its CSRF token is refused";
  const noCsrf = await page.request.post(`${url}/rollouts/${result.second_rollout}/retry`, { form: { x: "1" } });
  expect(noCsrf.status() === 403, `403 without a CSRF token, got ${noCsrf.status()}`);
  expect((await noCsrf.text()).includes("CSRF"), "the refusal names the CSRF token");
  const wrongCsrf = await page.request.post(`${url}/deploy`, {
    form: { csrf: "forged", app: "web", stage: "prod", ref: "refs/tags/v2", action: "deploy" },
  });
  expect(wrongCsrf.status() === 403, `403 with a forged CSRF token, got ${wrongCsrf.status()}`);
  result.csrf_refused = [noCsrf.status(), wrongCsrf.status()];

  step = "without scripts, Show refs posts the form: no CSRF token in a URL";
  const nojs = await browser.newContext({
    viewport: { width: 1280, height: 900 },
    javaScriptEnabled: false,
    storageState: await ctx.storageState(),
  });
  const plain = await nojs.newPage();
  await plain.goto(`${url}/deploy?app=web&stage=staging`);
  await plain.selectOption("#stage", "prod");
  await Promise.all([plain.waitForNavigation(), plain.click("div.nojs button")]);
  const shown = new URL(plain.url());
  expect(shown.pathname === "/deploy" && !shown.search.includes("csrf"), `no token in the URL: ${plain.url()}`);
  expect((await plain.$eval("#stage", (s) => s.value)) === "prod", "the form is shown for the stage chosen");
  const prodRefs = await plain.$$eval("#ref option", (os) => os.map((o) => o.value));
  expect(prodRefs.includes("refs/tags/v2"), `prod's refs offered: ${prodRefs}`);
  await nojs.close();

  step = "pages are small and keyboard-usable";
  const sizes = {};
  for (const p of ["/", "/deploy", `/rollouts/${result.first_rollout}`, `/hosts/${prodHosts[0]}`, "/history", "/audit", "/dead-letters", "/static/app.css", "/static/app.js"]) {
    const r = await page.request.get(`${url}${p}`);
    sizes[p] = (await r.body()).length;
  }
  const pageWeight = (p) => sizes[p] + sizes["/static/app.css"] + sizes["/static/app.js"];
  for (const p of ["/", "/deploy", `/rollouts/${result.first_rollout}`, `/hosts/${prodHosts[0]}`, "/history", "/audit", "/dead-letters"]) {
    expect(pageWeight(p) < 200 * 1024, `${p} with its assets under 200 KB (${pageWeight(p)} bytes)`);
  }
  result.sizes = sizes;
  await page.goto(`${url}/deploy?app=web&stage=prod`);
  const unlabelled = await page.$$eval("form.deploy input:not([type=hidden]), form.deploy select", (els) =>
    els.filter((e) => e.labels.length === 0).map((e) => e.name),
  );
  expect(unlabelled.length === 0, `every form field has a label: ${unlabelled}`);
  await page.focus("#app");
  const order = [];
  for (let i = 0; i < 4; i++) {
    order.push(await page.evaluate(() => document.activeElement.id || document.activeElement.name));
    await page.keyboard.press("Tab");
  }
  expect(order[0] === "app" && order[1] === "stage", `Tab moves from app to stage: ${order}`);
  result.tab_order = order;

  step = "usable on a phone";
  const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true });
  await phone.addCookies([session]);
  const mobile = await phone.newPage();
  await mobile.goto(`${url}/`);
  const overflow = await mobile.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  expect(overflow <= 1, `no sideways scrolling at 390 px (${overflow} px too wide)`);
  await shot(mobile, "10-dashboard-phone");
  await phone.close();

  step = "a read-only user pressing Deploy is refused";
  const ro = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const roPage = await ro.newPage();
  await login(roPage, viewer, viewerPass);
  expect((await roPage.$$("form[action='/apps/web/promote']")).length === 0, "no Promote button for a read-only user");
  await chooseRef(roPage, "web", "prod", "refs/tags/v2");
  const [refused] = await Promise.all([roPage.waitForNavigation(), roPage.click("button[value=deploy]")]);
  expect(refused.status() === 403, `403 for a read-only Deploy, got ${refused.status()}`);
  expect((await roPage.textContent("[role=alert]")).includes("read-only"), "the refusal says the user is read-only");
  await shot(roPage, "11-read-only-refused");
  await ro.close();

  step = "log out";
  await page.goto(`${url}/`);
  await Promise.all([page.waitForNavigation(), page.click("form[action='/logout'] button")]);
  await page.goto(`${url}/history`);
  expect(page.url().includes("/login"), "after logging out, pages ask for a login again");

  console.log("RESULT " + JSON.stringify(result));
} catch (e) {
  console.error(`FAILED at "${step}": ${e.message}`);
  try {
    const pages = browser.contexts().flatMap((c) => c.pages());
    for (const [i, p] of pages.entries()) await shot(p, `failure-${i}`);
  } catch {}
  process.exitCode = 1;
} finally {
  await browser.close();
}
