// The REST API with the operator's token, the session (who is logged in and what their role allows) and
// the event socket the pages update from.

const TOKEN_KEY = "fleetloop.token";

export class ApiError extends Error {
  constructor(status, type, message, requestId) {
    super(message);
    this.status = status;
    this.type = type;
    this.requestId = requestId;
  }
}

export const session = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  name: "",
  role: "",
  actions: new Set(),
  // POST /v1/rollouts/{rollout_id}/<verb> operations the coordinator offers: verb → action.
  rolloutVerbs: new Map(),
  onExpired: () => {},
};

export function can(action) {
  return session.actions.has(action);
}

export async function api(method, path, { body, contentType = "application/json", raw = false } = {}) {
  const headers = { Authorization: `Bearer ${session.token}` };
  let payload = body;
  if (body !== undefined && contentType === "application/json" && typeof body !== "string") {
    payload = JSON.stringify(body);
  }
  if (body !== undefined) headers["Content-Type"] = contentType;
  let response;
  try {
    response = await fetch(path, { method, headers, body: payload });
  } catch (err) {
    throw new ApiError(0, "UnavailableError", `cannot reach the coordinator: ${err.message}`, "");
  }
  if (!response.ok) {
    let doc = {};
    try {
      doc = await response.json();
    } catch {
      doc = { error: response.statusText, type: "HttpError" };
    }
    const error = new ApiError(response.status, doc.type || "", doc.error || response.statusText, doc.request_id || "");
    if (response.status === 401) session.onExpired(error.message);
    throw error;
  }
  if (raw) return response;
  return response.json();
}

export const get = (path) => api("GET", path);
export const post = (path, body, contentType) => api("POST", path, { body, contentType });

export async function login(token) {
  session.token = token;
  const me = await get("/v1/whoami");
  session.name = me.name;
  session.role = me.role;
  session.actions = new Set(me.actions || []);
  const doc = await (await fetch("/v1/openapi.json")).json();
  session.rolloutVerbs = new Map();
  for (const [path, ops] of Object.entries(doc.paths || {})) {
    const m = /^\/v1\/rollouts\/\{rollout_id\}\/([a-z-]+)$/.exec(path);
    const action = ops.post && (ops.post["x-fleetloop-action"] || "");
    if (m && ops.post) session.rolloutVerbs.set(m[1], action || `rollouts.${m[1]}`);
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  return me;
}

export function logout() {
  session.token = "";
  session.actions = new Set();
  sessionStorage.removeItem(TOKEN_KEY);
}

// The event socket: one per page load, reconnecting with a growing delay; `onEvent` gets every event
// (`ready` after each (re)connection: reload what the page shows).
export class Feed {
  constructor(onEvent, onState) {
    this.onEvent = onEvent;
    this.onState = onState;
    this.delay = 500;
    this.closed = false;
    this.ws = null;
  }

  open() {
    if (this.closed) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/v1/events`);
    this.ws = ws;
    this.onState("connecting");
    ws.addEventListener("open", () => ws.send(JSON.stringify({ token: session.token })));
    ws.addEventListener("message", (msg) => {
      let event;
      try {
        event = JSON.parse(msg.data);
      } catch {
        return;
      }
      if (event.type === "ready") {
        this.delay = 500;
        this.onState("live");
      }
      if (event.type === "expired") {
        this.closed = true;
        session.onExpired(event.error);
        return;
      }
      this.onEvent(event);
    });
    ws.addEventListener("close", () => {
      if (this.ws !== ws || this.closed) return;
      this.onState("reconnecting");
      setTimeout(() => this.open(), this.delay);
      this.delay = Math.min(this.delay * 2, 15000);
    });
  }

  close() {
    this.closed = true;
    if (this.ws) this.ws.close();
  }
}
