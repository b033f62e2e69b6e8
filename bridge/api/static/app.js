// The operator dashboard: plain ES2020 in one file, no build step, no framework.
//
// Rules this file keeps (the server's Content-Security-Policy enforces the first ones as well):
// - no inline script or style, no eval, nothing loaded from elsewhere;
// - data reaches the page only through textContent and attributes set one by one, never as HTML, so a
//   device or key name cannot become markup;
// - the admin token travels once, in the body of POST /ui/session; the page keeps no copy (the session is an
//   HttpOnly cookie the script cannot read), and nothing goes to localStorage or sessionStorage;
// - every change sends the session's CSRF token in X-CSRF-Token, kept in a variable only;
// - a secret shown once (a key's value, codes, API keys) lives in the DOM until dismissed, never in state.
"use strict";

const $ = (id) => document.getElementById(id);

const EVENTS_KEPT = 500;
const LIVE_PRESENCE_KEPT = 10000;
const RELOAD_DELAY_MS = 300;
const PRESENCE_SETTLE_MS = 1000; // the bridge writes presence to the database in batches about this far apart
const PRESENCE_SETTLE_TRIES = 10;
const PAGE = 100;

// `epoch` counts logins and logouts: an answer that arrives after the session it was asked in has ended is
// not shown.
const session = { csrf: null, who: null, stream: null, streamRetry: null, tab: "devices", epoch: 0 };

// --- the API ----------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details || {}; // the whole `error` object of the answer
  }
}

// Thrown after a 401 on a /v1 call: the login form is back already, nothing more to say.
class SessionEnded extends Error {}

function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(name, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

async function api(method, path, { json, body, contentType } = {}) {
  const headers = { Accept: "application/json" };
  let payload = body;
  if (json !== undefined) {
    payload = JSON.stringify(json);
    headers["Content-Type"] = "application/json";
  } else if (contentType) {
    headers["Content-Type"] = contentType;
  }
  if (method !== "GET" && session.csrf) headers["X-CSRF-Token"] = session.csrf;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: payload,
      credentials: "same-origin",
      cache: "no-store",
      redirect: "error",
    });
  } catch (_err) {
    throw new ApiError(0, "network", "The server cannot be reached.");
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_err) {
    data = null;
  }
  if (!response.ok) {
    const error = data && typeof data === "object" ? data.error : null;
    const message = error && error.message ? String(error.message) : `${response.status} ${response.statusText}`;
    if (response.status === 401 && !path.startsWith("/ui/session") && session.csrf) {
      endSession("The session has ended: log in again.");
      throw new SessionEnded(message);
    }
    throw new ApiError(response.status, error && error.code ? String(error.code) : "error", message, error);
  }
  return data;
}

const enc = encodeURIComponent;

// --- small DOM helpers (textContent only) -----------------------------------------------------------------

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  return node;
}

function button(text, onClick, attrs) {
  const node = el("button", text, { type: "button", ...(attrs || {}) });
  node.addEventListener("click", (event) => {
    event.stopPropagation(); // a button in a row does not also open the row
    guarded(onClick)();
  });
  return node;
}

function fmtTime(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  return new Date(seconds * 1000).toISOString().slice(0, 19).replace("T", " ") + "Z";
}

function fmtPresence(online) {
  if (online === true) return "online";
  if (online === false) return "offline";
  return "—";
}

function fmtValue(value) {
  if (value === null || value === undefined || value === "") return "—";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function fillFields(dl, entries) {
  dl.replaceChildren();
  if (entries.length === 0) {
    dl.append(el("dt", "—"));
    return;
  }
  for (const [label, value, id] of entries) {
    dl.append(el("dt", label));
    dl.append(el("dd", fmtValue(value), id ? { id, "data-testid": id } : {}));
  }
}

function csv(rows) {
  const field = (value) => {
    const text = value === null || value === undefined ? "" : String(value);
    return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  };
  return rows.map((row) => row.map(field).join(",")).join("\r\n") + "\r\n";
}

// --- errors -----------------------------------------------------------------------------------------------

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

function report(err) {
  if (err instanceof SessionEnded) return;
  showError(err && err.message ? err.message : String(err));
}

function guarded(fn) {
  return async (...args) => {
    try {
      await fn(...args);
    } catch (err) {
      report(err);
    }
  };
}

// A form's submit: no page navigation, its submit button off while the request runs (no double create).
function onSubmit(form, fn) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const submit = form.querySelector("button[type=submit]");
    if (submit) submit.disabled = true;
    clearError();
    try {
      await fn();
    } catch (err) {
      report(err);
    } finally {
      if (submit) submit.disabled = false;
    }
  });
}

// --- session ----------------------------------------------------------------------------------------------

function showLogin(message) {
  $("app").hidden = true;
  $("logout").hidden = true;
  $("stream-status").hidden = true;
  $("whoami").textContent = "";
  $("login-form").hidden = false;
  const error = $("login-error");
  error.textContent = message || "";
  error.hidden = !message;
  $("login-token").focus();
}

function canWrite() {
  return Boolean(session.who && session.who.scopes && session.who.scopes.includes("write"));
}

function startSession(answer) {
  session.epoch += 1;
  session.csrf = answer.csrf;
  session.who = answer.token;
  const who = answer.token;
  const scopes = (who.scopes || []).join(", ");
  $("whoami").textContent = `${who.name} (${scopes}${who.tenant ? `; tenant ${who.tenant}` : ""})`;
  document.body.classList.toggle("readonly", !canWrite());
  $("login-form").hidden = true;
  $("login-error").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  clearError();
  openStream();
  guarded(loadTenants)();
  guarded(seedEvents)();
  selectTab(session.tab);
}

// Everything this session showed goes: tables, the detail, secrets, the stream, the CSRF token.
function endSession(message) {
  closeStream();
  session.epoch += 1;
  session.csrf = null;
  session.who = null;
  clearSecrets();
  closeDetail();
  devices.gen += 1;
  keys.gen += 1;
  allowlist.gen += 1;
  devices.rows.clear();
  livePresence.clear();
  forgetPresenceSettle();
  $("devices-body").replaceChildren();
  $("keys-body").replaceChildren();
  $("allowlist-body").replaceChildren();
  $("events-body").replaceChildren();
  events.keys.clear();
  events.buffer = null;
  clearError();
  showLogin(message);
}

async function login() {
  const input = $("login-token");
  const token = input.value.trim();
  input.value = ""; // whatever the answer: the page keeps no copy of the token
  if (!token) return;
  $("login-error").hidden = true;
  try {
    startSession(await api("POST", "/ui/session", { json: { token } }));
  } catch (err) {
    showLogin(err.message);
  }
}

async function logout() {
  try {
    await api("DELETE", "/ui/session");
    endSession();
  } catch (err) {
    endSession();
    report(err);
  }
}

// --- tabs -------------------------------------------------------------------------------------------------

const loaders = {
  devices: () => loadDevices(),
  keys: () => loadKeys(),
  allowlist: () => loadAllowlist(),
  events: async () => {},
};

function selectTab(name) {
  session.tab = name;
  clearSecrets(); // a value shown once is gone when the operator moves on
  for (const tab of document.querySelectorAll("[role=tab]")) {
    const selected = tab.dataset.tab === name;
    tab.setAttribute("aria-selected", String(selected));
    $(`panel-${tab.dataset.tab}`).hidden = !selected;
  }
  guarded(loaders[name])();
}

// --- tenants ----------------------------------------------------------------------------------------------

async function loadTenants() {
  const epoch = session.epoch;
  const names = [];
  let after = null;
  do { // every page: the selects offer every tenant
    const page = await api("GET", "/v1/tenants?limit=1000" + (after ? "&after=" + encodeURIComponent(after) : ""));
    if (epoch !== session.epoch) return;
    names.push(...page.tenants.map((t) => t.name));
    after = page.next_cursor;
  } while (after);
  for (const select of document.querySelectorAll("select.tenant-select")) {
    const before = select.value;
    select.replaceChildren();
    if (select.dataset.any) select.append(el("option", "any tenant", { value: "" }));
    for (const name of names) select.append(el("option", name, { value: name }));
    if (names.includes(before) || (before === "" && select.dataset.any)) select.value = before;
    else if (!select.dataset.any && names.includes("default")) select.value = "default";
  }
  if (session.tab === "allowlist") await loadAllowlist();
}

// --- devices ----------------------------------------------------------------------------------------------

// `pages`: how many pages the list shows. Once it shows more than the first, what would reload it (a claim, a
// catch-up) is noted on a button instead, which would otherwise throw away the pages the user asked for:
// `unseen` devices provisioned since (0: it may have changed, how is not known). `waiting`: claims a pending
// reload is for.
const devices = {
  gen: 0,
  cursor: null,
  rows: new Map(),
  selected: null,
  reloadTimer: null,
  pages: 0,
  unseen: 0,
  waiting: 0,
};

// Presence the stream told, which the database may not have yet (the bridge writes presence in batches):
// a row shows whichever is newer.
const livePresence = new Map();

function rememberPresence(deviceId, online, time) {
  livePresence.delete(deviceId); // re-inserted last: the map is kept in order of arrival
  livePresence.set(deviceId, { online, time });
  if (livePresence.size > LIVE_PRESENCE_KEPT) livePresence.delete(livePresence.keys().next().value);
}

function presenceOf(device) {
  const told = livePresence.get(device.id);
  if (told && (device.last_seen === null || device.last_seen === undefined || told.time >= device.last_seen)) {
    return told;
  }
  return { online: device.online, time: device.last_seen };
}

function deviceFilters() {
  return {
    q: $("devices-q").value.trim(),
    tenant: $("devices-tenant").value,
    status: $("devices-status").value,
    label: $("devices-label").value.trim(),
    presence: $("devices-presence").value,
  };
}

async function loadDevices(append = false) {
  const gen = ++devices.gen; // endSession raises it too
  const after = append ? devices.cursor : null;
  const page = await api("GET", `/v1/devices${query({ ...deviceFilters(), limit: PAGE, after })}`);
  if (gen !== devices.gen) return; // a newer load has started: its answer is the one to show
  const body = $("devices-body");
  if (!append) {
    body.replaceChildren();
    devices.rows.clear();
  }
  for (const device of page.devices) {
    if (devices.rows.has(device.id)) continue;
    const row = deviceRow(device);
    devices.rows.set(device.id, row);
    body.append(row);
  }
  devices.cursor = page.next_cursor;
  devices.pages = append ? devices.pages + 1 : 1;
  if (!append) forgetNewer();
  $("devices-more").hidden = !page.next_cursor;
  $("devices-empty").hidden = devices.rows.size > 0;
}

// After `claims` new devices (0: a catch-up, how many unknown), the first page again; at most one reload in
// flight per RELOAD_DELAY_MS, so a herd of claims costs a few list reads, not one each. A list of several
// pages stays as it is, also when the user asked for more while a reload was pending.
function scheduleDevicesReload(claims) {
  if (devices.pages > 1) {
    noteNewer(claims);
    return;
  }
  devices.waiting += claims;
  if (devices.reloadTimer !== null || !session.csrf) return;
  devices.reloadTimer = setTimeout(() => {
    devices.reloadTimer = null;
    const waiting = devices.waiting;
    devices.waiting = 0;
    if (devices.pages > 1) noteNewer(waiting);
    else guarded(loadDevices)();
  }, RELOAD_DELAY_MS);
}

function noteNewer(claims) {
  devices.unseen += claims;
  const button = $("devices-newer");
  button.textContent =
    devices.unseen > 0
      ? `${devices.unseen} new since this list was read: show the newest`
      : "This list may have changed: show the newest";
  button.hidden = false;
}

function forgetNewer() {
  devices.unseen = 0;
  $("devices-newer").hidden = true;
}

function deviceRow(device) {
  const row = el("tr", null, { "data-testid": "device-row", "data-device-id": device.id, tabindex: "0" });
  const seen = presenceOf(device);
  const cells = [
    ["id", device.id],
    ["hardware_id", device.hardware_id],
    ["name", device.name || ""],
    ["tenant", device.tenant],
    ["status", device.status],
    ["presence", fmtPresence(seen.online)],
    ["last_seen", fmtTime(seen.time)],
  ];
  for (const [col, text] of cells) row.append(el("td", text, { "data-col": col, "data-testid": `device-${col}` }));
  row.classList.toggle("revoked", device.status === "revoked");
  row.classList.toggle("selected", device.id === devices.selected);
  setPresenceClass(row.querySelector("[data-col=presence]"), seen.online);
  const open = () => guarded(openDevice)(device.id);
  row.addEventListener("click", open);
  row.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      open();
    }
  });
  return row;
}

function setPresenceClass(node, online) {
  node.classList.toggle("online", online === true);
  node.classList.toggle("offline", online === false);
}

function replaceRow(device) {
  const old = devices.rows.get(device.id);
  if (!old) return;
  const row = deviceRow(device);
  old.replaceWith(row);
  devices.rows.set(device.id, row);
}

function onPresence(change) {
  if (!change || typeof change.device_id !== "string") return;
  const online = change.online === true;
  rememberPresence(change.device_id, online, change.time);
  const row = devices.rows.get(change.device_id);
  if (row) {
    const cell = row.querySelector("[data-col=presence]");
    cell.textContent = fmtPresence(online);
    setPresenceClass(cell, online);
    row.querySelector("[data-col=last_seen]").textContent = fmtTime(change.time);
  }
  if (devices.selected === change.device_id) {
    const shown = $("detail-presence");
    if (shown) shown.textContent = fmtPresence(online);
    const last = $("detail-last-seen");
    if (last) last.textContent = fmtTime(change.time);
  }
  if ($("devices-presence").value) settlePresence(change); // it may have left, or joined, the filtered list
}

// A list filtered by presence is the database's answer, and the bridge writes presence there in batches, after
// the stream told it: read at once, the list would miss the change (a device that came online would not join
// the online list until something else reloads it). So the list is read again once the database says what the
// stream said of the latest change (one device read per try, whatever the number of changes).
const presenceSettle = { timer: null, latest: null, tries: 0 };

function settlePresence(change) {
  presenceSettle.latest = { deviceId: change.device_id, online: change.online === true };
  presenceSettle.tries = 0;
  if (presenceSettle.timer === null) {
    presenceSettle.timer = setTimeout(guarded(checkPresenceSettled), PRESENCE_SETTLE_MS);
  }
}

async function checkPresenceSettled() {
  presenceSettle.timer = null;
  const latest = presenceSettle.latest;
  if (!latest || !session.csrf || !$("devices-presence").value) return;
  let written = true;
  try {
    written = (await api("GET", `/v1/devices/${enc(latest.deviceId)}`)).online === latest.online;
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) throw err; // deleted meanwhile: nothing to wait for
  }
  if (latest !== presenceSettle.latest) return; // a newer change came meanwhile, and armed the timer again
  if (written || ++presenceSettle.tries >= PRESENCE_SETTLE_TRIES) {
    presenceSettle.latest = null;
    scheduleDevicesReload(0);
    return;
  }
  presenceSettle.timer = setTimeout(guarded(checkPresenceSettled), PRESENCE_SETTLE_MS);
}

function forgetPresenceSettle() {
  if (presenceSettle.timer !== null) clearTimeout(presenceSettle.timer);
  presenceSettle.timer = null;
  presenceSettle.latest = null;
}

async function openDevice(deviceId) {
  devices.selected = deviceId;
  for (const [id, row] of devices.rows) row.classList.toggle("selected", id === deviceId);
  const [device, history] = await Promise.all([
    api("GET", `/v1/devices/${enc(deviceId)}`),
    api("GET", `/v1/events${query({ device_id: deviceId, limit: 100 })}`),
  ]);
  if (devices.selected !== deviceId) return; // another device was opened meanwhile
  renderDetail(device);
  renderDetailEvents(history.events);
}

function renderDetail(device) {
  const seen = presenceOf(device);
  $("detail-id").textContent = device.id;
  fillFields($("detail-fields"), [
    ["hardware id", device.hardware_id, "detail-hardware-id"],
    ["name", device.name, "detail-name"],
    ["tenant", device.tenant, "detail-tenant"],
    ["status", device.status, "detail-status"],
    ["presence", fmtPresence(seen.online), "detail-presence"],
    ["last seen", fmtTime(seen.time), "detail-last-seen"],
    ["profile", device.profile],
    ["credential", device.credential_type],
    ["generation", device.credential_generation],
    ["reset pending", device.reset_pending ? "yes" : "no"],
    ["agent version", device.agent_version],
    ["provisioning key", device.key_id],
    ["created", fmtTime(device.created_at)],
    ["updated", fmtTime(device.updated_at)],
  ]);
  fillFields($("detail-labels"), Object.entries(device.labels || {}));
  $("detail-groups").textContent = (device.groups || []).length ? device.groups.join(", ") : "—";
  fillFields($("detail-hardware"), Object.entries(device.hardware || {}));
  fillFields($("detail-network"), Object.entries(device.network || {}));
  $("device-revoke").hidden = device.status !== "active";
  $("device-reinstate").hidden = device.status !== "revoked";
  $("device-detail").hidden = false;
}

function eventItem(event) {
  const item = el("li", null, { "data-event": String(event.event) });
  item.append(el("time", String(event.time || "").replace("T", " ")));
  item.append(el("strong", event.event));
  const detail = eventDetail(event);
  if (detail) item.append(el("span", detail));
  return item;
}

function renderDetailEvents(history) {
  const list = $("detail-events");
  list.replaceChildren();
  for (const event of history.slice().reverse()) list.append(eventItem(event)); // newest first
  if (history.length === 0) list.append(el("li", "no events"));
}

function closeDetail() {
  devices.selected = null;
  $("device-detail").hidden = true;
  $("detail-id").textContent = "";
  for (const id of ["detail-fields", "detail-labels", "detail-hardware", "detail-network", "detail-events"]) {
    $(id).replaceChildren();
  }
  for (const row of devices.rows.values()) row.classList.remove("selected");
}

const CONFIRM = {
  reset: (id) => `Reset ${id}? Its next valid claim may bring a new key pair; everything it holds is refused.`,
  delete: (id) => `Delete ${id}? Its hardware id becomes free; everything it holds is refused.`,
};

async function deviceAction(action) {
  const deviceId = devices.selected;
  if (!deviceId) return;
  if (CONFIRM[action] && !window.confirm(CONFIRM[action](deviceId))) return;
  clearError();
  if (action === "delete") {
    await api("DELETE", `/v1/devices/${enc(deviceId)}`);
    closeDetail();
  } else {
    const device = await api("POST", `/v1/devices/${enc(deviceId)}/${action}`);
    replaceRow(device);
    if (devices.selected === deviceId) {
      renderDetail(device);
      const history = await api("GET", `/v1/events${query({ device_id: deviceId, limit: 100 })}`);
      if (devices.selected === deviceId) renderDetailEvents(history.events);
    }
  }
  await loadDevices(); // admin changes are not in the live stream: read the list again
}

// --- keys and codes ---------------------------------------------------------------------------------------

const keys = { gen: 0, cursor: null };

// Oldest first, a page at a time.
async function loadKeys(append = false) {
  const gen = ++keys.gen; // endSession raises it too
  const after = append ? keys.cursor : null;
  const page = await api("GET", `/v1/keys${query({ limit: PAGE, after })}`);
  if (gen !== keys.gen) return;
  const body = $("keys-body");
  if (!append) body.replaceChildren();
  for (const key of page.keys) {
    if (!body.querySelector(`tr[data-key-id="${CSS.escape(key.id)}"]`)) body.append(keyRow(key));
  }
  keys.cursor = page.next_cursor;
  $("keys-more").hidden = !page.next_cursor;
}

function keyRow(key) {
  const row = el("tr", null, { "data-testid": "key-row", "data-key-id": key.id });
  const limit = key.max_registrations === null ? "∞" : String(key.max_registrations);
  const cells = [
    ["id", key.id],
    ["name", key.name],
    ["tenant", key.tenant],
    ["kind", key.kind],
    ["status", key.status],
    ["registrations", `${key.registrations} / ${limit}`],
    ["expires", key.expires_at === null ? "never" : fmtTime(key.expires_at)],
  ];
  for (const [col, text] of cells) row.append(el("td", text, { "data-col": col, "data-testid": `key-${col}` }));
  const actions = el("td", null, { class: "write row-actions", "data-col": "actions" });
  keyActions(actions, key);
  row.append(actions);
  row.classList.toggle("revoked", key.status === "revoked");
  return row;
}

function keyActions(cell, key) {
  cell.replaceChildren();
  if (key.status === "revoked") {
    cell.append(button("Reinstate", () => keyChange(key.id, "reinstate"), { "data-testid": "key-reinstate" }));
  } else {
    cell.append(button("Revoke", () => keyChange(key.id, "revoke"), { "data-testid": "key-revoke" }));
  }
  cell.append(button("Max…", () => editMax(cell, key), { "data-testid": "key-edit-max" }));
}

async function keyChange(keyId, action) {
  clearError();
  replaceKeyRow(await api("POST", `/v1/keys/${enc(keyId)}/${action}`));
}

// The row of a changed key, from the answer, where it is (it may be on any page loaded).
function replaceKeyRow(key) {
  const old = $("keys-body").querySelector(`tr[data-key-id="${CSS.escape(key.id)}"]`);
  if (old) old.replaceWith(keyRow(key));
}

// The max registrations edited in the row itself: empty means unlimited.
function editMax(cell, key) {
  const form = el("form", null, { class: "inline", "data-testid": "key-max-form" });
  const input = el("input", null, {
    type: "number",
    min: "1",
    placeholder: "unlimited",
    "aria-label": "Max registrations",
    "data-testid": "key-max-input",
  });
  input.value = key.max_registrations === null ? "" : String(key.max_registrations);
  form.append(input, el("button", "Save", { type: "submit" }));
  form.append(button("Cancel", () => keyActions(cell, key)));
  onSubmit(form, async () => {
    const text = input.value.trim();
    const change = text === "" ? { unlimited: true } : { max_registrations: Number(text) };
    replaceKeyRow(await api("PATCH", `/v1/keys/${enc(key.id)}`, { json: change }));
  });
  cell.replaceChildren(form);
  input.focus();
}

async function createKey() {
  const body = {
    name: $("key-name").value.trim(),
    tenant: $("key-tenant").value || "default",
    reclaim_policy: $("key-reclaim").value,
    code: $("key-code").checked,
    preprovisioned_only: $("key-preprovisioned").checked,
  };
  const max = $("key-max").value.trim();
  if (max !== "") body.max_registrations = Number(max);
  clearSecrets();
  const made = await api("POST", "/v1/keys", { json: body });
  $("key-name").value = "";
  $("key-max").value = "";
  $("key-secret-value").textContent = made.provision_key;
  $("key-secret").hidden = false;
  $("key-secret-dismiss").focus();
  await loadKeys();
  showKeyRow(made);
}

// A key just made is the newest, so on the last page: shown at the end when that page is not loaded.
function showKeyRow(key) {
  const body = $("keys-body");
  if (!body.querySelector(`tr[data-key-id="${CSS.escape(key.id)}"]`)) body.append(keyRow(key));
}

async function createCodes() {
  const name = $("codes-name").value.trim();
  const body = { name, count: Number($("codes-count").value), tenant: $("codes-tenant").value || "default" };
  clearSecrets();
  const codes = await api("POST", "/v1/keys/codes", { json: body });
  $("codes-name").value = "";
  const rows = $("codes-secret-body");
  rows.replaceChildren();
  for (const made of codes) {
    const row = el("tr", null, { "data-testid": "code-row" });
    row.append(el("td", made.key_id), el("td", made.code), el("td", fmtTime(made.expires_at)));
    rows.append(row);
  }
  $("codes-secret-count").textContent = `${codes.length} codes.`;
  const table = [["key_id", "code", "expires_at"], ...codes.map((c) => [c.key_id, c.code, c.expires_at ?? ""])];
  offerDownload($("codes-download"), csv(table), `codes-${name.replace(/[^A-Za-z0-9._-]+/g, "_")}.csv`);
  $("codes-secret").hidden = false;
  await loadKeys();
}

// A CSV built here, offered as a download from an object URL (revoked when the secret is dismissed).
const objectUrls = [];

function offerDownload(link, text, filename) {
  const url = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
  objectUrls.push(url);
  link.href = url;
  link.download = filename;
  link.hidden = false;
}

function clearSecrets() {
  $("key-secret").hidden = true;
  $("key-secret-value").textContent = "";
  $("codes-secret").hidden = true;
  $("codes-secret-body").replaceChildren();
  $("codes-secret-count").textContent = "";
  $("allowlist-secret").hidden = true;
  $("allowlist-secret-body").replaceChildren();
  for (const link of [$("codes-download"), $("allowlist-download")]) {
    link.href = "#";
    link.removeAttribute("download");
  }
  $("allowlist-download").hidden = true;
  while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
}

async function copySecret() {
  const value = $("key-secret-value").textContent;
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(value);
    return;
  }
  // No clipboard API (plain HTTP on another host): select the value for Ctrl-C.
  const range = document.createRange();
  range.selectNodeContents($("key-secret-value"));
  const selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
}

// --- the allowlist ----------------------------------------------------------------------------------------

const allowlist = { gen: 0, cursor: null };

async function loadAllowlist(append = false) {
  const gen = ++allowlist.gen;
  const tenant = $("allowlist-tenant").value;
  if (!tenant) return; // the tenants are not read yet; loadTenants calls again
  const after = append ? allowlist.cursor : null;
  const page = await api("GET", `/v1/allowlist${query({ tenant, limit: PAGE, after })}`);
  if (gen !== allowlist.gen) return;
  const body = $("allowlist-body");
  if (!append) body.replaceChildren();
  for (const entry of page.entries) body.append(entryRow(entry, tenant));
  allowlist.cursor = page.next_cursor;
  $("allowlist-more").hidden = !page.next_cursor;
  $("allowlist-empty").hidden = body.children.length > 0;
}

function entryRow(entry, tenant) {
  const row = el("tr", null, { "data-testid": "allowlist-row", "data-hardware-id": entry.hardware_id });
  const labels = Object.entries(entry.labels || {}).map(([k, v]) => `${k}=${v}`);
  const cells = [
    ["hardware_id", entry.hardware_id],
    ["device_id", entry.device_id || "—"],
    ["name", entry.name || ""],
    ["labels", labels.join(", ")],
    ["api_key_made", entry.api_key_made ? "yes" : "no"],
    ["created_at", fmtTime(entry.created_at)],
  ];
  for (const [col, text] of cells) row.append(el("td", text, { "data-col": col }));
  const actions = el("td", null, { class: "write row-actions" });
  actions.append(
    button("Remove", async () => {
      if (!window.confirm(`Take ${entry.hardware_id} off the allowlist of ${tenant}?`)) return;
      clearError();
      await api("DELETE", `/v1/allowlist/${enc(entry.hardware_id)}${query({ tenant })}`);
      await loadAllowlist();
    }),
  );
  row.append(actions);
  return row;
}

function showCredentials(credentials) {
  const rows = $("allowlist-secret-body");
  rows.replaceChildren();
  for (const made of credentials) {
    const row = el("tr", null, { "data-testid": "credential-row" });
    row.append(el("td", made.hardware_id), el("td", made.device_id), el("td", made.api_key));
    rows.append(row);
  }
  if (credentials.length > 1) {
    const table = [["hardware_id", "device_id", "api_key"], ...credentials.map((c) => [c.hardware_id, c.device_id, c.api_key])];
    offerDownload($("allowlist-download"), csv(table), "credentials.csv");
  }
  $("allowlist-secret").hidden = false;
}

async function addEntry() {
  const tenant = $("allowlist-tenant").value || "default";
  const body = {
    hardware_id: $("allowlist-hardware-id").value.trim(),
    tenant,
    with_credentials: $("allowlist-credentials").checked,
  };
  const name = $("allowlist-name").value.trim();
  if (name) body.name = name;
  clearSecrets();
  const added = await api("POST", "/v1/allowlist", { json: body });
  $("allowlist-hardware-id").value = "";
  $("allowlist-name").value = "";
  if (added.api_key) showCredentials([added]);
  await loadAllowlist();
}

async function importEntries() {
  const file = $("import-file").files[0];
  const result = $("import-result");
  const error = $("import-error");
  result.hidden = true;
  error.hidden = true;
  if (!file) return;
  const params = {
    tenant: $("allowlist-tenant").value || "default",
    dry_run: $("import-dry-run").checked ? "true" : "false",
    with_credentials: $("import-credentials").checked ? "true" : "false",
  };
  clearSecrets();
  let done;
  try {
    done = await api("POST", `/v1/allowlist/import${query(params)}`, { body: file, contentType: "text/csv" });
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    // The message names the file's problems line by line; a `problems` list, when the answer has one, too.
    const problems = Array.isArray(err.details.problems) ? err.details.problems : [];
    const lines = problems.map((p) => {
      if (Array.isArray(p)) return `line ${p[0]}: ${p[1]}`; // [line, what is wrong]
      if (p && typeof p === "object") return `line ${p.line}: ${p.message}`;
      return String(p);
    });
    error.textContent = [err.message, ...lines.filter((line) => !err.message.includes(line))].join("\n");
    error.hidden = false;
    return;
  }
  result.textContent = done.dry_run
    ? `Dry run: ${done.entries} entries are valid; nothing was written.`
    : `Imported ${done.entries} entries.`;
  result.hidden = false;
  if ((done.credentials || []).length) showCredentials(done.credentials);
  if (!done.dry_run) {
    $("import-file").value = "";
    await loadAllowlist();
  }
}

// --- live events ------------------------------------------------------------------------------------------

// `buffer` holds what the stream brings while the first page is read (null once it is shown); `keys` lets the
// first page and the stream agree on what was already shown.
const events = { keys: new Set(), buffer: null };

function eventKey(kind, data) {
  if (kind === "presence") return `presence|${data.device_id}|${data.online}|${data.time}`;
  return [data.event, data.time, data.request_id, data.device_id, data.hardware_id, data.actor].join("|");
}

function eventDetail(event) {
  const parts = [];
  if (event.reason) parts.push(event.reason);
  if (event.key_name) parts.push(`key ${event.key_name}`);
  if (Array.isArray(event.changes) && event.changes.length) parts.push(`changed ${event.changes.join(", ")}`);
  if (event.count !== undefined && event.count !== null) parts.push(`count ${event.count}`);
  if (event.label) parts.push(`label ${event.label}`);
  if (event.actor) parts.push(`by ${event.actor}`);
  return parts.join("; ");
}

function showEvent(kind, data) {
  const key = eventKey(kind, data);
  if (events.keys.has(key)) return;
  events.keys.add(key);
  const row = el("tr", null, { "data-testid": "event-row", "data-kind": kind });
  if (kind === "presence") {
    row.setAttribute("data-event", "presence");
    row.append(
      el("td", fmtTime(data.time)),
      el("td", `presence ${fmtPresence(data.online === true)}`),
      el("td", ""),
      el("td", data.device_id),
      el("td", ""),
      el("td", ""),
    );
  } else {
    row.setAttribute("data-event", String(data.event));
    row.append(
      el("td", String(data.time || "").replace("T", " ")),
      el("td", data.event),
      el("td", data.tenant),
      el("td", data.device_id || ""),
      el("td", data.hardware_id || ""),
      el("td", eventDetail(data)),
    );
  }
  const body = $("events-body");
  body.prepend(row);
  while (body.children.length > EVENTS_KEPT) body.lastElementChild.remove();
  if (events.keys.size > EVENTS_KEPT * 4) {
    // Forget the oldest keys too; the rows they name are long gone.
    const keep = [...events.keys].slice(-EVENTS_KEPT * 2);
    events.keys = new Set(keep);
  }
}

async function seedEvents() {
  const epoch = session.epoch;
  events.buffer = [];
  let recent = [];
  let failure = null;
  try {
    recent = (await api("GET", `/v1/events${query({ limit: 50 })}`)).events; // oldest first
  } catch (err) {
    failure = err; // the stream's events are shown all the same
  }
  if (epoch !== session.epoch) return;
  const buffered = events.buffer || [];
  events.buffer = null;
  for (const event of recent) showEvent("event", event);
  for (const [kind, data] of buffered) showEvent(kind, data);
  if (failure) throw failure;
}

function fromStream(kind, message) {
  let data;
  try {
    data = JSON.parse(message.data);
  } catch (_err) {
    return;
  }
  if (!data || typeof data !== "object") return;
  if (events.buffer) events.buffer.push([kind, data]);
  else showEvent(kind, data);
  if (kind === "presence") {
    onPresence(data);
    return;
  }
  if (data.event === "device.provisioned" || data.event === "device.reprovisioned") scheduleDevicesReload(1);
  if (data.device_id && data.device_id === devices.selected) {
    const list = $("detail-events");
    if (list.firstElementChild && !list.firstElementChild.dataset.event) list.replaceChildren();
    list.prepend(eventItem(data));
  }
}

// The device list read again from the database: until the stream is ready (after a login, a reconnection), or
// when it lagged, changes may have gone by unseen.
function catchUp() {
  scheduleDevicesReload(0);
}

function setStreamStatus(text) {
  const status = $("stream-status");
  status.textContent = text;
  status.dataset.state = text;
  status.hidden = false;
}

function openStream() {
  closeStream();
  const source = new EventSource("/ui/events/stream");
  session.stream = source;
  setStreamStatus("connecting");
  // `ready`: the server is subscribed to the bridge's events, so nothing after it is missed. What happened
  // before it (or while reconnecting, or what a slow page was too late for: `lagged`) is only in the database.
  source.addEventListener("ready", () => {
    setStreamStatus("live");
    catchUp();
  });
  source.addEventListener("lagged", catchUp);
  source.addEventListener("event", (message) => fromStream("event", message));
  source.addEventListener("presence", (message) => fromStream("presence", message));
  // `ended`: the admin token was revoked or the session ended; the server closes the stream. Ask whether the
  // session still stands (reopenStream shows the login form when it does not) instead of letting the browser retry.
  source.addEventListener("ended", () => {
    if (session.stream !== source) return;
    source.close();
    session.stream = null;
    setStreamStatus("disconnected");
    guarded(reopenStream)();
  });
  source.addEventListener("error", () => {
    if (session.stream !== source) return;
    if (source.readyState !== EventSource.CLOSED) {
      setStreamStatus("reconnecting"); // the browser retries by itself
      return;
    }
    // Refused (a 401 when the session ended, or an error): the browser gives up; check the session, retry.
    setStreamStatus("disconnected");
    session.stream = null;
    session.streamRetry = setTimeout(guarded(reopenStream), 5000);
  });
}

async function reopenStream() {
  session.streamRetry = null;
  if (!session.csrf) return;
  try {
    await api("GET", "/ui/session");
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      endSession("The session has ended: log in again.");
      return;
    }
    session.streamRetry = setTimeout(guarded(reopenStream), 5000);
    return;
  }
  if (session.csrf) openStream();
}

function closeStream() {
  if (session.streamRetry !== null) clearTimeout(session.streamRetry);
  session.streamRetry = null;
  if (session.stream) session.stream.close();
  session.stream = null;
}

// --- start ------------------------------------------------------------------------------------------------

function wire() {
  onSubmit($("login-form"), login);
  $("logout").addEventListener("click", guarded(logout));
  $("error-dismiss").addEventListener("click", clearError);
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => selectTab(tab.dataset.tab));
  }

  onSubmit($("devices-filter"), () => loadDevices());
  for (const id of ["devices-tenant", "devices-status", "devices-presence"]) {
    $(id).addEventListener("change", guarded(() => loadDevices()));
  }
  $("devices-more").addEventListener("click", guarded(() => loadDevices(true)));
  $("devices-newer").addEventListener("click", guarded(() => loadDevices()));
  $("keys-more").addEventListener("click", guarded(() => loadKeys(true)));
  $("detail-close").addEventListener("click", closeDetail);
  for (const action of ["revoke", "reinstate", "reset", "delete"]) {
    $(`device-${action}`).addEventListener("click", guarded(() => deviceAction(action)));
  }

  onSubmit($("key-create"), createKey);
  onSubmit($("codes-create"), createCodes);
  $("key-secret-dismiss").addEventListener("click", clearSecrets);
  $("key-secret-copy").addEventListener("click", guarded(copySecret));
  $("codes-secret-dismiss").addEventListener("click", clearSecrets);

  $("allowlist-tenant").addEventListener("change", guarded(() => loadAllowlist()));
  $("allowlist-more").addEventListener("click", guarded(() => loadAllowlist(true)));
  $("allowlist-secret-dismiss").addEventListener("click", clearSecrets);
  onSubmit($("allowlist-add"), addEntry);
  onSubmit($("allowlist-import"), importEntries);
}

async function start() {
  wire();
  try {
    startSession(await api("GET", "/ui/session"));
  } catch (err) {
    showLogin(err instanceof ApiError && err.status === 401 ? "" : err.message);
  }
}

start();
