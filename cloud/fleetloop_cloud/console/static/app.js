// The console's shell: login with a token, the navigation, the router (#/page/...), and the event
// socket whose events go to the page on screen.

import { ApiError, Feed, login, logout, session } from "./api.js";
import { clear, h } from "./dom.js";
import { campaignsPage, capturesPage, devicePage, fleetPage, queryPage, rolloutsPage } from "./pages.js";
import { timelinePage } from "./timeline.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const live = document.getElementById("live");
let page = null;
let feed = null;

const ROUTES = [
  [/^#\/fleet$/, () => fleetPage(main)],
  [/^#\/devices\/([^/?]+)$/, (m) => devicePage(main, { id: decodeURIComponent(m[1]) })],
  [/^#\/campaigns(?:\/([^/?]+))?$/, (m) => campaignsPage(main, { name: m[1] && decodeURIComponent(m[1]) })],
  [/^#\/rollouts(?:\/([^/?]+))?$/, (m) => rolloutsPage(main, { id: m[1] && decodeURIComponent(m[1]) })],
  [/^#\/captures$/, () => capturesPage(main)],
  [/^#\/captures\/([^/?]+)(?:\?device=([^&]+))?$/, (m) => timelinePage(main, { id: decodeURIComponent(m[1]), device: m[2] && decodeURIComponent(m[2]) })],
  [/^#\/query$/, () => queryPage(main)],
];

function route() {
  if (!session.actions.size) return;
  if (page && page.dispose) page.dispose();
  const hash = location.hash || "#/fleet";
  for (const link of nav.querySelectorAll("a")) link.classList.toggle("active", hash.startsWith(link.getAttribute("href")));
  for (const [pattern, make] of ROUTES) {
    const m = pattern.exec(hash);
    if (m) {
      page = make(m);
      return;
    }
  }
  page = null;
  clear(main, h("h1", {}, "Not found"), h("p", {}, `There is no page ${hash}.`));
}

function showLogin(reason) {
  if (feed) feed.close();
  feed = null;
  if (page && page.dispose) page.dispose();
  page = null;
  logout();
  nav.hidden = true;
  who.textContent = "";
  live.textContent = "";
  const input = h("input", { type: "password", id: "token", autocomplete: "off", placeholder: "flt_…", required: true });
  const error = h("div", { class: "error", id: "login-error", role: "alert", hidden: !reason }, reason || "");
  const form = h("form", { class: "login", id: "login" },
    h("h1", {}, "fleetloop console"),
    h("p", {}, "Sign in with an API token (", h("code", {}, "fleetloop tokens create NAME --role viewer"), ")."),
    h("label", {}, "Token ", input), error, h("button", { type: "submit" }, "Sign in"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    error.hidden = true;
    try {
      await start(input.value.trim());
    } catch (err) {
      logout();
      error.textContent = err instanceof ApiError ? err.message : String(err);
      error.hidden = false;
    }
  });
  clear(main, form);
  input.focus();
}

async function start(token) {
  await login(token);
  nav.hidden = false;
  clear(who, `${session.name} · ${session.role} `, h("button", { id: "logout", onclick: () => showLogin("") }, "Sign out"));
  feed = new Feed((event) => page && page.onEvent(event), (state) => {
    live.textContent = state === "live" ? "● live" : `○ ${state}`;
    live.className = state === "live" ? "live" : "stale";
    live.dataset.state = state;
  });
  feed.open();
  route();
}

session.onExpired = (reason) => showLogin(`Signed out: ${reason}`);
window.addEventListener("hashchange", route);

if (session.token) {
  start(session.token).catch((err) => showLogin(err instanceof ApiError ? err.message : String(err)));
} else {
  showLogin("");
}
