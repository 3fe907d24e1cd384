// The Synapse dashboard: one page, five views, no library. Each view builds its frame once
// (forms keep what the operator types) and refreshes its live parts every second from the
// node's API with the operator's token. Everything shown is built as DOM nodes from text,
// never as HTML from data: a key, a memory or a task's output cannot inject markup.
"use strict";

const TOKEN_KEY = "synapse.token";
const POLL_MS = 1000; // the bound on staleness: every view asks again each second

const app = {
  token: sessionStorage.getItem(TOKEN_KEY),
  who: null,
  view: null,        // the mounted view object
  viewName: null,
  inFlight: false,   // one refresh at a time: a slow node must not pile requests up
  lastOk: 0,
  timer: null,
};

// --- DOM helpers -------------------------------------------------------------------------

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

function $(sel, root = document) { return root.querySelector(sel); }

function fill(el, ...kids) { el.replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined)); }

function badge(text, kind) { return h("span", { class: `badge ${kind || text}`.replace(/\s+/g, " ") }, text); }

function short(hex, n = 12) { return hex ? hex.slice(0, n) : "—"; }

function when(ms) {
  if (!ms) return "—";
  const d = new Date(ms);
  // The time alone today; with the date otherwise (a token expiring tomorrow, a task of last week).
  return d.toLocaleTimeString([], { hour12: false }) + (d.toDateString() !== new Date().toDateString() ? " " + d.toLocaleDateString() : "");
}

function ago(ms) {
  if (!ms) return "";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  return s < 60 ? `${s.toFixed(0)} s ago` : s < 3600 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}

function pretty(value) { return JSON.stringify(value, null, 2); }

function table(headers, rows, attrs) {
  return h("table", attrs || {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: headers.length, class: "empty" }, "none"))));
}

// --- the API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, { method = "GET", body, query } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query || {})) {
    for (const one of [].concat(v)) if (one !== undefined && one !== null && one !== "") url.searchParams.append(k, one);
  }
  const init = { method, headers: { Authorization: `Bearer ${app.token}` }, cache: "no-store" };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(url, init);
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { message: text.slice(0, 300) }; }
  if (resp.status === 401) {
    signOut(`The node refused the token: ${data && data.message ? data.message : "unauthorized"}`);
    throw new ApiError(401, data);
  }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

// A part of a view the token may not read says so in place instead of failing the page.
function refusal(e, what) {
  if (e instanceof ApiError && e.status === 403) return h("p", { class: "note" }, `This token may not ${what}: ${e.message}`);
  return h("p", { class: "error" }, `${what}: ${e.message}`);
}

// --- sign in / out -------------------------------------------------------------------------

async function signIn(token) {
  app.token = token;
  try {
    app.who = await api("/v1/whoami");
  } catch (e) {
    app.token = null;
    throw e;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  showApp();
}

function signOut(why) {
  sessionStorage.removeItem(TOKEN_KEY);
  app.token = null;
  app.who = null;
  clearInterval(app.timer);
  app.timer = null;
  $("#bar").hidden = true;
  $("#problem").hidden = true;
  fill($("#main"));
  $("#login").hidden = false;
  $("#login-error").textContent = why || "";
  $("#token").value = "";
  $("#token").focus();
}

function showApp() {
  $("#login").hidden = true;
  $("#bar").hidden = false;
  const w = app.who;
  fill($("#who"), h("span", { title: w.token ? `token ${w.token.accessor}` : "" }, w.principal),
    w.roles && w.roles.length ? h("small", {}, ` (${w.roles.join(", ")})`) : null);
  route();
  if (!app.timer) app.timer = setInterval(refresh, POLL_MS);
}

// --- routing and the refresh loop -----------------------------------------------------------

const VIEWS = {};

function route() {
  if (!app.token) return;
  const [name, ...rest] = (location.hash.replace(/^#\/?/, "") || "cluster").split("/");
  const view = VIEWS[name] ? name : "cluster";
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === view);
  const arg = decodeURIComponent(rest.join("/"));
  if (app.viewName !== view || (app.view.arg !== undefined && app.view.arg !== arg)) {
    app.viewName = view;
    app.view = VIEWS[view](arg);
    const root = h("section", { id: `view-${view}`, class: "view" });
    fill($("#main"), root);
    app.view.mount(root);
  }
  refresh();
}

async function refresh() {
  if (!app.token || !app.view || app.inFlight || document.hidden) return;
  app.inFlight = true;
  const view = app.view;
  try {
    await view.refresh();
    app.lastOk = Date.now();
    $("#problem").hidden = true;
    $("#live").className = "live ok";
    $("#live").textContent = `live · ${new Date().toLocaleTimeString([], { hour12: false })}`;
  } catch (e) {
    if (app.token) {
      $("#live").className = "live stale";
      $("#live").textContent = app.lastOk ? `stale · last update ${ago(app.lastOk)}` : "no answer";
      const problem = $("#problem");
      problem.hidden = false;
      problem.textContent = e instanceof ApiError ? `The node answered ${e.status}: ${e.message}`
        : `Cannot reach this node (${e.message}). Its peers may still serve: open another node's /ui/.`;
    }
  } finally {
    app.inFlight = false;
  }
}

// --- Cluster ---------------------------------------------------------------------------------

const SERVICE_HELP = {
  serving: "its state matches the agreed checkpoints",
  diverged: "its digest differs from the agreed one: refusing state requests",
  repairing: "fetching the differing buckets from a healthy peer",
  proving: "repaired; waiting for a checkpoint that agrees",
};

VIEWS.cluster = () => ({
  mount(root) {
    root.append(
      h("div", { class: "cards", id: "cluster-cards" }),
      h("h2", {}, "Nodes"),
      h("p", { class: "hint" }, "Each node's own answer, asked by this node every second. A node that does not answer is down; "
        + "integrity is what its checkpoint digests prove, lag is how far it is behind the leader's commit index."),
      h("div", { id: "cluster-nodes" }),
      h("h2", {}, "Workers"),
      h("div", { id: "cluster-workers" }),
      h("h2", {}, "Timeline"),
      h("p", { class: "hint" }, "Leader changes, divergences, repairs, rollbacks and catch-ups, as each node recorded them (newest first)."),
      h("div", { id: "cluster-timeline" }));
  },
  async refresh() {
    const o = await api("/v1/cluster/overview", { query: { events: 200 } });
    const up = o.nodes.filter((n) => n.reachable).length;
    const cp = o.checkpoint || {};
    const latest = cp.latest || {};
    const agreeing = Object.values(latest.nodes || {}).filter((r) => r.agrees).length;
    const workersUp = o.workers.filter((w) => w.state === "up").length;
    fill($("#cluster-cards"),
      card("Leader", o.leader || "none", o.leader ? `term ${o.term}` : "an election is under way", o.leader ? "" : "bad", "leader"),
      card("Nodes answering", `${up} / ${o.nodes.length}`, up > o.nodes.length / 2 ? "a majority: writes commit" : "no majority: writes wait",
        up === o.nodes.length ? "" : up > o.nodes.length / 2 ? "warn" : "bad", "answering"),
      card("Commit index", o.leader_commit_index, "the leader's"),
      card("Last checkpoint", latest.index !== undefined ? latest.index : "—",
        latest.index !== undefined ? `${agreeing} of ${Object.keys(latest.nodes || {}).length} digests agree` : "none yet",
        latest.index !== undefined && agreeing < Object.keys(latest.nodes || {}).length ? "warn" : ""),
      card("Workers up", `${workersUp} / ${o.workers.length}`, "execution nodes"));
    fill($("#cluster-nodes"), table(
      ["Node", "Role", "Answers", "Integrity", "Term", "Commit", "Applied", "Lag", "Raft link", "Checkpoint digest", "Repairs", "Catch-ups", "State hash"],
      o.nodes.map(nodeRow), { class: "nodes" }));
    fill($("#cluster-workers"), table(["Worker", "State", "Driver", "Slots", "Running", "Heartbeat", "Since"],
      o.workers.map((w) => h("tr", { dataset: { worker: w.worker_id, state: w.state } },
        h("td", {}, w.worker_id), h("td", {}, badge(w.state, w.state === "up" ? "ok" : "bad")), h("td", {}, w.driver || "—"),
        h("td", {}, w.slots), h("td", {}, w.running),
        h("td", {}, w.last_heartbeat_s === null ? "—" : `${w.last_heartbeat_s.toFixed(1)} s ago`), h("td", {}, when(w.since_ms))))));
    fill($("#cluster-timeline"), h("ol", { class: "timeline" }, o.events.length ? o.events.map((e) =>
      h("li", { dataset: { kind: e.kind, node: e.node, service: e.service || "" } },
        h("time", {}, when(e.at * 1000)), h("b", {}, e.node), badge(e.service || e.kind.replace("_", " "), kindClass(e)),
        h("span", {}, e.message))) : h("li", { class: "empty" }, "nothing yet")));
  },
});

function card(title, value, sub, kind, id) {
  return h("div", { class: `card ${kind || ""}`, id: id ? `card-${id}` : null },
    h("div", { class: "card-title" }, title), h("div", { class: "card-value" }, String(value)), h("div", { class: "card-sub" }, sub));
}

function kindClass(e) {
  if (e.kind === "service") return { serving: "ok", proving: "warn", repairing: "warn", diverged: "bad" }[e.service] || "";
  return { repair_failed: "bad", rollback: "warn", repaired: "ok", leader: "info", caught_up: "info" }[e.kind] || "";
}

function nodeRow(n) {
  const s = n.status;
  const service = s ? s.checkpoint.service : null;
  const cp = s ? s.checkpoint : null;
  const catchup = s ? s.catchup : null;
  return h("tr", { dataset: { node: n.node_id || n.raft, reachable: String(n.reachable), role: s ? s.role : "down", service: service || "" } },
    h("td", {}, h("b", {}, n.node_id || "?"), n.self ? h("small", { title: "the node this page talks to" }, " (this node)") : null,
      h("div", { class: "sub" }, n.api || n.raft)),
    h("td", {}, s ? badge(s.role, s.role === "leader" ? "leader" : s.role === "follower" ? "" : "bad") : badge("down", "bad")),
    h("td", { class: "answers" }, n.reachable ? badge("up", "ok") : h("span", {}, badge("down", "bad"), h("div", { class: "sub" }, n.error))),
    h("td", { title: service ? SERVICE_HELP[service] || "" : "" }, service ? badge(service, { serving: "ok", diverged: "bad" }[service] || "warn") : "—"),
    h("td", {}, s ? s.term : "—"), h("td", {}, s ? s.commit_index : "—"), h("td", {}, s ? s.applied_index : "—"),
    h("td", { class: n.lag > 100 ? "warn-text" : "" }, n.lag === null ? "—" : n.lag),
    h("td", {}, n.self ? "—" : n.up ? `up · ${n.last_contact_s !== null ? n.last_contact_s.toFixed(1) + " s" : ""}`
      : h("span", { class: "bad-text" }, `down${n.down_since ? " since " + when(n.down_since * 1000) : ""}`)),
    h("td", {}, n.checkpoint_digest ? h("code", {}, short(n.checkpoint_digest)) : "—",
      n.checkpoint_agrees === null ? null : n.checkpoint_agrees ? badge("agrees", "ok") : badge("differs", "bad")),
    h("td", {}, cp ? String(cp.repairs || 0) : "—",
      cp && cp.repair ? h("div", { class: "sub" }, `last: ${cp.repair.outcome}`) : null),
    h("td", {}, catchup ? `${catchup.containers_received} in · ${catchup.containers_sent} out` : "—"),
    h("td", {}, s ? h("code", { title: s.state_hash }, short(s.state_hash)) : "—"));
}

// --- Keys ------------------------------------------------------------------------------------

VIEWS.keys = (arg) => {
  const view = { arg, prefix: arg || "", selected: null, editing: false, canWrite: {} };
  view.mount = (root) => {
    root.append(
      h("div", { class: "toolbar" },
        h("div", { id: "keys-crumbs", class: "crumbs" }),
        h("form", { id: "keys-go", onsubmit: (ev) => { ev.preventDefault(); location.hash = `#/keys/${encodeURIComponent($("#keys-prefix").value)}`; } },
          h("input", { id: "keys-prefix", placeholder: "prefix, e.g. app/config/", value: view.prefix, spellcheck: "false" }),
          h("button", { type: "submit" }, "Browse"))),
      h("div", { class: "split" },
        h("div", { class: "pane" }, h("div", { id: "keys-list" })),
        h("div", { class: "pane" }, h("div", { id: "keys-detail" }, h("p", { class: "hint" }, "Select a key to see its value and versions.")),
          h("div", { id: "keys-new" }))));
    fill($("#keys-crumbs"), crumbs(view.prefix));
  };
  view.refresh = async () => {
    const page = await api("/v1/kv", { query: { prefix: view.prefix, limit: 1000 } });
    const folders = new Map();
    const here = [];
    for (const item of page.items) {
      const rest = item.key.slice(view.prefix.length);
      const cut = rest.indexOf("/");
      if (cut >= 0) folders.set(rest.slice(0, cut + 1), (folders.get(rest.slice(0, cut + 1)) || 0) + 1);
      else here.push(item);
    }
    fill($("#keys-list"),
      h("ul", { class: "tree" },
        [...folders].map(([name, count]) => h("li", { class: "folder" },
          h("a", { href: `#/keys/${encodeURIComponent(view.prefix + name)}` }, name), h("small", {}, ` ${count} key${count > 1 ? "s" : ""}`))),
        here.map((item) => h("li", { class: `key${view.selected === item.key ? " selected" : ""}`, dataset: { key: item.key } },
          h("a", { href: "#", onclick: (ev) => { ev.preventDefault(); view.select(item.key); } }, item.key.slice(view.prefix.length) || "(the prefix itself)"),
          h("small", {}, ` v${item.version}`))),
        !folders.size && !here.length ? h("li", { class: "empty" }, "no keys under this prefix") : null),
      page.next_start_after ? h("p", { class: "note" }, "Only the first 1,000 keys under this prefix are listed: narrow the prefix.") : null);
    if (view.selected && !view.editing) await view.showKey();
    await view.offerNew();
  };
  view.may = async (scope) => {
    if (!(scope in view.canWrite)) {
      const who = await api("/v1/whoami", { query: { can: scope } });
      view.canWrite[scope] = who.can[scope];
    }
    return view.canWrite[scope];
  };
  view.select = async (key) => {
    view.selected = key;
    view.editing = false;
    await view.showKey();
    for (const li of document.querySelectorAll("#keys-list li.key")) li.classList.toggle("selected", li.dataset.key === key);
  };
  view.showKey = async () => {
    const key = view.selected;
    let rec;
    try {
      rec = await api(`/v1/kv/${key.split("/").map(encodeURIComponent).join("/")}`);
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) { fill($("#keys-detail"), h("p", { class: "note" }, `${key} was deleted.`)); return; }
      fill($("#keys-detail"), refusal(e, `read ${key}`));
      return;
    }
    const writable = await view.may(`kv:write:${key}`);
    const value = h("pre", { class: "value", id: "key-value" }, pretty(rec.value));
    const parts = [h("h3", {}, key),
      h("dl", { class: "facts" }, h("dt", {}, "version"), h("dd", { id: "key-version" }, rec.version),
        h("dt", {}, "last changed at entry"), h("dd", {}, rec.index), h("dt", {}, "created at entry"), h("dd", {}, rec.create_index)),
      value];
    if (writable) {
      parts.push(h("div", { class: "actions" },
        h("button", { type: "button", onclick: () => view.edit(rec) }, "Edit"),
        h("button", { type: "button", class: "danger", onclick: () => view.remove(rec) }, "Delete")));
    } else {
      parts.push(h("p", { class: "hint" }, "Read-only: this token may not write this key."));
    }
    fill($("#keys-detail"), parts);
  };
  view.edit = (rec) => {
    view.editing = true;
    const area = h("textarea", { id: "key-editor", rows: 10, spellcheck: "false" }, pretty(rec.value));
    const err = h("p", { class: "error", role: "alert" });
    fill($("#keys-detail"), h("h3", {}, rec.key),
      h("p", { class: "hint" }, `Editing version ${rec.version}: the write is refused if someone changed it meanwhile.`), area,
      h("div", { class: "actions" },
        h("button", { type: "button", onclick: async () => {
          let value;
          try { value = JSON.parse(area.value); } catch (e) { err.textContent = `Not JSON: ${e.message}`; return; }
          try {
            await api(`/v1/kv/${rec.key.split("/").map(encodeURIComponent).join("/")}`, { method: "PUT", body: { value, if_version: rec.version } });
            view.editing = false;
            await view.showKey();
          } catch (e) { err.textContent = e.message; }
        } }, "Save"),
        h("button", { type: "button", class: "quiet", onclick: () => { view.editing = false; view.showKey(); } }, "Cancel")), err);
  };
  view.remove = async (rec) => {
    if (!confirm(`Delete ${rec.key}?`)) return;
    try {
      await api(`/v1/kv/${rec.key.split("/").map(encodeURIComponent).join("/")}`, { method: "DELETE", query: { if_version: rec.version } });
      view.selected = null;
      fill($("#keys-detail"), h("p", { class: "note" }, `Deleted ${rec.key}.`));
    } catch (e) { fill($("#keys-detail"), refusal(e, `delete ${rec.key}`)); }
  };
  view.offerNew = async () => {
    const box = $("#keys-new");
    if (box.dataset.prefix === view.prefix) return; // built once per prefix: keep what is typed
    box.dataset.prefix = view.prefix;
    if (!(await view.may(`kv:write:${view.prefix}`))) { fill(box); return; }
    const key = h("input", { id: "new-key", value: view.prefix, spellcheck: "false", placeholder: "key" });
    const value = h("textarea", { id: "new-value", rows: 3, spellcheck: "false", placeholder: "value as JSON, e.g. {\"port\": 8080}" });
    const err = h("p", { class: "error", role: "alert" });
    fill(box, h("h3", {}, "New key"), key, value, h("div", { class: "actions" }, h("button", { type: "button", onclick: async () => {
      let parsed;
      try { parsed = JSON.parse(value.value); } catch (e) { err.textContent = `The value is not JSON: ${e.message}`; return; }
      try {
        await api(`/v1/kv/${key.value.split("/").map(encodeURIComponent).join("/")}`, { method: "PUT", body: { value: parsed } });
        err.textContent = "";
        value.value = "";
        await view.select(key.value);
      } catch (e) { err.textContent = e.message; }
    } }, "Put")), err);
  };
  return view;
};

function crumbs(prefix) {
  const parts = prefix.split("/").filter((p, i, all) => p || i < all.length - 1);
  const out = [h("a", { href: "#/keys/" }, "all keys")];
  let acc = "";
  for (const p of parts) {
    acc += p + "/";
    out.push(" / ", h("a", { href: `#/keys/${encodeURIComponent(acc)}` }, p));
  }
  return out;
}

// --- Memory ------------------------------------------------------------------------------------

VIEWS.memory = (arg) => {
  const view = { arg, ns: arg || null };
  view.mount = (root) => {
    root.append(h("div", { class: "split" },
      h("div", { class: "pane narrow" }, h("h2", {}, "Namespaces"), h("div", { id: "memory-spaces" })),
      h("div", { class: "pane" }, h("div", { id: "memory-recall" }), h("div", { id: "memory-results" }), h("div", { id: "memory-records" }))));
    if (view.ns) {
      const query = h("input", { id: "recall-query", placeholder: "what to recall, in words", spellcheck: "false" });
      const k = h("input", { id: "recall-k", type: "number", min: 1, max: 100, value: 5, class: "small" });
      fill($("#memory-recall"), h("h2", {}, `Recall in ${view.ns}`),
        h("form", { class: "inline", onsubmit: async (ev) => {
          ev.preventDefault();
          try {
            const found = await api(`/v1/memory/${encodeURIComponent(view.ns)}/recall`, { method: "POST", body: { query: query.value, k: Number(k.value) } });
            fill($("#memory-results"), table(["Score", "Id", "Text", "Metadata"], found.results.map((r) => h("tr", { dataset: { id: r.id } },
              h("td", {}, r.score.toFixed(3)), h("td", {}, r.id), h("td", {}, r.text), h("td", {}, h("code", {}, JSON.stringify(r.metadata))))),
            { class: "results" }));
          } catch (e) { fill($("#memory-results"), refusal(e, "recall")); }
        } }, query, h("label", {}, " k ", k), h("button", { type: "submit" }, "Recall")));
    } else {
      fill($("#memory-recall"), h("p", { class: "hint" }, "Pick a namespace to list its records and recall from it."));
    }
  };
  view.refresh = async () => {
    const spaces = await api("/v1/memory");
    fill($("#memory-spaces"), h("ul", { class: "tree" }, spaces.namespaces.length ? spaces.namespaces.map((s) =>
      h("li", { class: s.namespace === view.ns ? "selected" : "", dataset: { ns: s.namespace } },
        h("a", { href: `#/memory/${encodeURIComponent(s.namespace)}` }, s.namespace),
        h("small", {}, ` ${s.count} record${s.count === 1 ? "" : "s"} · ${s.model} (${s.dim})`)))
      : h("li", { class: "empty" }, "no namespace this token may read holds records")));
    if (!view.ns) return;
    try {
      const page = await api(`/v1/memory/${encodeURIComponent(view.ns)}`, { query: { limit: 200, consistency: "stale" } });
      fill($("#memory-records"), h("h2", {}, "Records"), table(["Id", "Text", "Metadata", "Updated", "Expires"],
        page.items.map((r) => h("tr", { dataset: { id: r.id } }, h("td", {}, r.id), h("td", {}, r.text),
          h("td", {}, h("code", {}, JSON.stringify(r.metadata))), h("td", {}, when(r.updated_ms)), h("td", {}, r.expires_ms ? when(r.expires_ms) : "never")))),
      page.next_start_after ? h("p", { class: "note" }, "The first 200 records are listed.") : null);
    } catch (e) { fill($("#memory-records"), refusal(e, `list ${view.ns}`)); }
  };
  return view;
};

// --- Tasks -------------------------------------------------------------------------------------

const TASK_KIND = { succeeded: "ok", running: "info", assigned: "info", pending: "", failed: "bad", "timed-out": "bad", lost: "bad", cancelled: "warn" };

VIEWS.tasks = (arg) => {
  const view = { arg, task: arg || null, filter: "all" };
  view.mount = (root) => {
    const command = h("input", { id: "submit-command", placeholder: "command, e.g. echo hello  (or a JSON array of arguments)", spellcheck: "false" });
    const err = h("p", { class: "error", role: "alert" });
    root.append(
      h("div", { class: "cards", id: "task-cards" }),
      h("form", { class: "inline", id: "submit-form", onsubmit: async (ev) => {
        ev.preventDefault();
        const text = command.value.trim();
        let argv;
        try { argv = text.startsWith("[") ? JSON.parse(text) : text.split(/\s+/).filter(Boolean); } catch (e) { err.textContent = `Not a JSON array: ${e.message}`; return; }
        if (!argv.length) { err.textContent = "Type a command first."; return; }
        try {
          const t = await api("/v1/tasks", { method: "POST", body: { command: argv } });
          err.textContent = "";
          command.value = "";
          location.hash = `#/tasks/${encodeURIComponent(t.task_id)}`;
        } catch (e) { err.textContent = e.message; }
      } }, command, h("button", { type: "submit" }, "Submit task")), err,
      h("div", { class: "split even" },
        h("div", { class: "pane" }, h("div", { class: "toolbar" }, h("h2", {}, "Tasks"), h("select", { id: "task-filter", onchange: (ev) => { view.filter = ev.target.value; refresh(); } },
          ["all", "active", "ended", "failed"].map((f) => h("option", { value: f }, f)))), h("div", { id: "task-list" })),
        h("div", { class: "pane" }, h("div", { id: "task-detail" }, h("p", { class: "hint" }, "Select a task to follow it: its attempts, state and logs.")))),
      h("h2", {}, "Workers"), h("div", { id: "task-workers" }));
  };
  view.refresh = async () => {
    const [list, workers] = await Promise.all([api("/v1/tasks", { query: { order: "recent", limit: 200 } }), api("/v1/workers")]);
    const c = list.counts;
    fill($("#task-cards"), card("Queued", c.pending, "waiting for a worker", "", "queued"), card("Running", c.leased, "assigned or running", "", "running"),
      card("Ended", c.ended, "kept (newest 100,000)", "", "ended"),
      card("Workers up", `${workers.workers.filter((w) => w.state === "up").length} / ${workers.workers.length}`, "execution nodes"));
    const ended = new Set(["succeeded", "failed", "timed-out", "cancelled", "lost"]);
    const shown = list.tasks.filter((t) => view.filter === "all" || (view.filter === "active" ? !ended.has(t.state)
      : view.filter === "ended" ? ended.has(t.state) : ["failed", "timed-out", "lost"].includes(t.state)));
    fill($("#task-list"), table(["Task", "State", "Command", "Worker", "Attempts", "Submitted", "Ended"], shown.map((t) =>
      h("tr", { class: t.task_id === view.task ? "selected" : "", dataset: { task: t.task_id, state: t.state } },
        h("td", {}, h("a", { href: `#/tasks/${encodeURIComponent(t.task_id)}` }, short(t.task_id, 10))), h("td", {}, badge(t.state, TASK_KIND[t.state])),
        h("td", { class: "command" }, h("code", { title: Array.isArray(t.what) ? t.what.join(" ") : String(t.what || "") },
          Array.isArray(t.what) ? t.what.join(" ") : String(t.what || ""))), h("td", {}, t.worker || "—"),
        h("td", {}, t.attempts), h("td", {}, when(t.submitted_ms)), h("td", {}, when(t.finished_ms))))));
    fill($("#task-workers"), table(["Worker", "State", "Driver", "Slots", "Running", "Heartbeat", "Labels"], workers.workers.map((w) =>
      h("tr", { dataset: { worker: w.worker_id } }, h("td", {}, w.worker_id), h("td", {}, badge(w.state, w.state === "up" ? "ok" : "bad")),
        h("td", {}, w.driver || "—"), h("td", {}, w.slots), h("td", {}, w.running),
        h("td", {}, w.last_heartbeat_s === null ? "—" : `${w.last_heartbeat_s.toFixed(1)} s ago`), h("td", {}, h("code", {}, JSON.stringify(w.labels)))))));
    if (view.task) await view.showTask();
  };
  view.showTask = async () => {
    const id = encodeURIComponent(view.task);
    let t, logs;
    try {
      [t, logs] = await Promise.all([api(`/v1/tasks/${id}`), api(`/v1/tasks/${id}/logs`)]);
    } catch (e) { fill($("#task-detail"), refusal(e, `read task ${view.task}`)); return; }
    const r = t.result;
    const activeNow = !["succeeded", "failed", "timed-out", "cancelled", "lost"].includes(t.state);
    fill($("#task-detail"), h("div", { id: "task-view", dataset: { task: t.task_id, state: t.state } },
      h("h3", {}, `Task ${t.task_id} `, badge(t.state, TASK_KIND[t.state])),
      h("dl", { class: "facts" },
        h("dt", {}, "command"), h("dd", {}, h("code", {}, Array.isArray(t.what) ? t.what.join(" ") : String(t.what))),
        h("dt", {}, "worker"), h("dd", {}, t.worker || "—"), h("dt", {}, "attempts"), h("dd", {}, t.attempts),
        h("dt", {}, "priority"), h("dd", {}, t.priority), h("dt", {}, "submitted"), h("dd", {}, when(t.submitted_ms)),
        r ? [h("dt", {}, "outcome"), h("dd", {}, `${r.status}${r.reason ? " (" + r.reason + ")" : ""}${r.exit_code !== null && r.exit_code !== undefined ? ", exit " + r.exit_code : ""}`)] : null,
        r && r.usage ? [h("dt", {}, "usage"), h("dd", {}, h("code", {}, JSON.stringify(r.usage)))] : null),
      activeNow ? h("div", { class: "actions" }, h("button", { type: "button", class: "danger", onclick: async () => {
        try { await api(`/v1/tasks/${id}/cancel`, { method: "POST" }); } catch (e) { alert(e.message); }
      } }, "Cancel")) : null,
      h("h4", {}, "History"),
      table(["When", "State", "Detail"], t.history.map((x) => h("tr", {}, h("td", {}, when(x.at_ms)), h("td", {}, badge(x.state, TASK_KIND[x.state])),
        h("td", {}, x.detail === null || x.detail === undefined ? "" : typeof x.detail === "string" ? x.detail : JSON.stringify(x.detail))))),
      h("h4", {}, "stdout", logs.stdout_truncated ? " (truncated)" : ""), h("pre", { class: "log", id: "task-stdout" }, logs.stdout || "(empty)"),
      h("h4", {}, "stderr", logs.stderr_truncated ? " (truncated)" : ""), h("pre", { class: "log", id: "task-stderr" }, logs.stderr || "(empty)")));
  };
  return view;
};

// --- Principals ------------------------------------------------------------------------------------

VIEWS.principals = () => ({
  mount(root) {
    root.append(h("h2", {}, "Principals"), h("div", { id: "sec-principals" }), h("h2", {}, "Roles"), h("div", { id: "sec-roles" }),
      h("h2", {}, "Tokens"), h("p", { class: "hint" }, "By accessor: a token's secret is shown once, when it is created, and kept nowhere."),
      h("div", { id: "sec-tokens" }));
  },
  async refresh() {
    const [principals, roles, tokens] = await Promise.allSettled([api("/v1/principals"), api("/v1/roles"), api("/v1/tokens")]);
    fill($("#sec-principals"), principals.status === "fulfilled" ? table(["Name", "Kind", "Roles", "Owner", "Created"],
      principals.value.principals.map((p) => h("tr", { dataset: { principal: p.name } }, h("td", {}, p.name), h("td", {}, p.kind),
        h("td", {}, p.roles.join(", ")), h("td", {}, p.owner || "—"), h("td", {}, when(p.created_ms))))) : refusal(principals.reason, "list principals"));
    fill($("#sec-roles"), roles.status === "fulfilled" ? table(["Role", "Allows", "Denies"], roles.value.roles.map((r) =>
      h("tr", { dataset: { role: r.name } }, h("td", {}, r.name), h("td", {}, h("code", {}, r.allow.join(" "))), h("td", {}, h("code", {}, r.deny.join(" ") || "—")))))
      : refusal(roles.reason, "list roles"));
    fill($("#sec-tokens"), tokens.status === "fulfilled" ? table(["Accessor", "Principal", "Scopes", "Denies", "Label", "Parent", "Created", "Expires"],
      tokens.value.tokens.map((t) => h("tr", { dataset: { accessor: t.accessor } }, h("td", {}, h("code", {}, t.accessor)), h("td", {}, t.principal),
        h("td", {}, h("code", {}, t.scopes.join(" "))), h("td", {}, h("code", {}, t.deny.join(" ") || "—")), h("td", {}, t.label || "—"),
        h("td", {}, t.parent || "—"), h("td", {}, when(t.created_ms)), h("td", {}, t.expires_ms ? when(t.expires_ms) : "never"))))
      : refusal(tokens.reason, "list tokens"));
    if (principals.status === "rejected" && roles.status === "rejected" && tokens.status === "rejected") throw tokens.reason;
  },
});

// --- start ---------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("#login-error").textContent = "";
    try {
      await signIn($("#token").value.trim());
    } catch (e) {
      $("#login-error").textContent = e instanceof ApiError ? `The node refused the token: ${e.message}` : `Cannot reach the node: ${e.message}`;
    }
  });
  $("#sign-out").addEventListener("click", () => signOut(""));
  window.addEventListener("hashchange", route);
  document.addEventListener("visibilitychange", refresh);
  if (app.token) {
    signIn(app.token).catch((e) => signOut(e instanceof ApiError ? `The node refused the saved token: ${e.message}`
      : `Cannot reach this node (${e.message}); sign in again once it answers, or open another node's /ui/.`));
  }
  else signOut("");
});
