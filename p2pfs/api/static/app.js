// The p2pfs web UI: one page over the node's HTTP API (protocol/API.md). Nothing is
// loaded from elsewhere. The key comes from the URL fragment (#key=...), which the browser
// never sends to any server, and is kept for this tab only.
"use strict";

const state = { key: null, lastEvent: 0, refreshTimer: null, busyTimer: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function plural(n, one, many) { return `${n} ${n === 1 ? one : (many || one + "s")}`; }

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fill(list, items, render, emptyText) {
  list.replaceChildren(...(items.length ? items.map(render) : [el("li", { class: "empty" }, emptyText)]));
}

async function api(method, path, body) {
  const options = { method, headers: { "X-API-Key": state.key } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  if (response.status === 401) { showLogin(); throw new Error("the API key was refused"); }
  const isJson = (response.headers.get("content-type") || "").startsWith("application/json");
  const result = isJson ? await response.json() : await response.text();
  if (!response.ok) throw new Error(isJson ? result.error.message : result);
  return result;
}

function showError(error) {
  const box = document.getElementById("error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

async function act(work) {
  try { showError(null); await work(); } catch (error) { showError(error); }
  scheduleRefresh();
}

async function qr(text, target) {
  const svg = await api("GET", `/api/qr.svg?text=${encodeURIComponent(text)}`);
  // Our own server drew this SVG from the text: no markup of anyone else's is inserted.
  target.innerHTML = svg;
}

// -- views ---------------------------------------------------------------------------------

async function refreshNode() {
  const id = await api("GET", "/api/id");
  document.getElementById("node-id").textContent = id.node_id;
  fill(document.getElementById("node-addresses"), id.addresses, (a) => el("li", {}, a), "no address yet");
  const target = document.getElementById("node-qr");
  if (target.dataset.text !== id.node_id) { await qr(id.node_id, target); target.dataset.text = id.node_id; }
}

function folderView(folder) {
  const head = el("div", { class: "head" },
    el("span", { class: "path" }, folder.path),
    el("span", { class: `state ${folder.state}` }, folder.state + (folder.progress != null ? ` ${Math.floor(folder.progress)}%` : "")),
    el("span", {}, folder.mode === "rw" ? "read-write" : "read-only"),
    el("span", {}, plural(folder.files, "file")),
    el("span", { title: "this member's tag in conflict copies' names" }, `device ${folder.device}`),
  );
  if (folder.progress != null) {
    head.append(el("progress", { max: "100", value: String(folder.progress) }),
      el("span", {}, completionText(folder.completion)));
  }
  const paused = folder.state === "paused";
  head.append(
    el("button", { onclick: () => act(() => api("POST", paused ? "/api/control/sync_resume" : "/api/control/sync_pause", { path: folder.path })) }, paused ? "Resume" : "Pause"),
    el("button", { onclick: () => act(() => showTickets(folder.path)) }, "Show tickets"),
    el("button", { onclick: () => { if (confirm(`Stop syncing ${folder.path}? Its files stay.`)) act(() => api("DELETE", `/api/folders?path=${encodeURIComponent(folder.path)}`)); } }, "Remove"),
  );
  const members = el("ul", { class: "members" });
  fill(members, folder.members, memberView, "no member connected");
  const node = el("div", { class: "folder" }, head, members);
  for (const change of folder.local_changes) node.append(el("div", { class: "problems" }, `local change, not sent: ${change}`));
  for (const problem of folder.problems) node.append(el("div", { class: "problems" }, problem));
  return node;
}

function completionText(c) {
  if (!c.need_items && !c.need_bytes) return "100%";
  return `${Math.floor(c.percent)}% (${plural(c.need_items, "file")}, ${bytes(c.need_bytes)} to fetch)`;
}

function memberView(m) {
  // A member's completion as it reports it; a member too old to report one: same index or not.
  const c = m.completion;
  let text = m.in_sync ? "up to date" : "differs";
  if (c && !(m.in_sync && !c.need_items)) text = completionText(c) + (m.in_sync ? "" : ", index differs");
  const item = el("li", { class: "member", "data-node": m.node_id },
    `${m.node_id.slice(0, 16)}… ${m.path}${m.device ? ` device ${m.device}` : ""} — ${text}`);
  if (c && c.need_items) item.append(el("progress", { max: "100", value: String(c.percent) }));
  return item;
}

function conflictMaker(c) {
  if (c.own) return `this node, device ${c.device}`;
  if (c.member) return `member ${c.member.slice(0, 16)}…, device ${c.device}`;
  return `device ${c.device || "?"}, not a member met since start`;
}

function folderBusy(f) {
  return f.state === "syncing" || f.state === "scanning" || f.completion.need_items > 0
    || f.members.some((m) => m.completion && m.completion.need_items > 0);
}

async function refreshFolders() {
  const result = await api("GET", "/api/folders");
  const list = document.getElementById("folder-list");
  list.replaceChildren(...(result.folders.length ? result.folders.map(folderView) : [el("p", { class: "empty" }, "no folder is synced")]));
  const conflicts = await api("GET", "/api/conflicts");
  fill(document.getElementById("conflict-list"), conflicts.conflicts,
    (c) => el("li", {}, `${c.dir}/${c.path} (conflicts with ${c.original}${c.kind === "conflict copy" ? `; by ${conflictMaker(c)}` : ""})`), "no conflicts");
  return result.folders.some(folderBusy);
}

async function refreshStatus() {
  const status = await api("GET", "/api/status");
  fill(document.getElementById("share-list"), status.shares,
    (s) => el("li", {}, `shared ${s.path} (root ${s.root.slice(0, 12)})`
      + (s.stale ? " — stale: a chunk no longer reads back, share it again" : "")
      + (s.replaces.length ? ` — its files changed, indexed again; old tickets (${s.replaces.map((r) => r.slice(0, 12)).join(", ")}) are told so. Ticket now: ` : " "),
      el("span", { class: "ticket" }, s.ticket)), "no shares");
  fill(document.getElementById("transfer-list"), status.transfers,
    (t) => el("li", {}, `fetching ${t.destination}: ${bytes(t.bytes_done)} of ${bytes(t.bytes_total)}, ${bytes(t.rate)}/s `,
      el("progress", { max: String(t.bytes_total || 1), value: String(t.bytes_done) })), "no fetch running");
  const rows = status.peers.map((p) => el("tr", {},
    el("td", {}, p.node_id.slice(0, 16) + "…"), el("td", {}, p.address), el("td", { class: "path" }, p.path),
    el("td", {}, `${bytes(p.send_rate)}/s`), el("td", {}, `${bytes(p.receive_rate)}/s`)));
  const body = document.getElementById("peer-list");
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: "5" }, "no peer connected"))]));
  return status.transfers.length > 0 || status.peers.some((p) => p.send_rate > 0 || p.receive_rate > 0);
}

async function refresh() {
  state.refreshTimer = null;
  try {
    const [, foldersBusy, transfersBusy] = await Promise.all([refreshNode(), refreshFolders(), refreshStatus()]);
    // Rates and progress move without events: while something moves, look again each second.
    clearTimeout(state.busyTimer);
    if (foldersBusy || transfersBusy) state.busyTimer = setTimeout(scheduleRefresh, 1000);
  } catch (error) { showError(error); }
}

function scheduleRefresh() {
  if (state.refreshTimer === null) state.refreshTimer = setTimeout(refresh, 150);
}

async function showTickets(path) {
  const tickets = await api("GET", `/api/folders/tickets?path=${encodeURIComponent(path)}`);
  document.getElementById("tickets-path").textContent = path;
  const list = document.getElementById("ticket-list");
  list.replaceChildren();
  for (const [name, label] of [["rw", "read-write"], ["ro", "read-only"]]) {
    if (!tickets[name]) continue;
    const code = el("div", { class: "qr" });
    list.append(el("h3", {}, label), el("p", { class: "ticket", "data-kind": name }, tickets[name]), code);
    await qr(tickets[name], code);
  }
  document.getElementById("tickets").hidden = false;
}

// -- the event stream ----------------------------------------------------------------------

function onEvent(event) {
  state.lastEvent = Math.max(state.lastEvent, event.id);
  const list = document.getElementById("event-list");
  const when = new Date(event.time * 1000).toLocaleTimeString();
  const what = event.data.paths ? event.data.paths.join(", ") : (event.data.state || event.data.message || event.data.path || event.data.dest || "");
  list.prepend(el("li", { "data-type": event.type }, `${when} ${event.type} ${event.data.dir || ""} ${what}`));
  while (list.children.length > 200) list.lastChild.remove();
  scheduleRefresh();
}

async function stream() {
  // EventSource cannot send the key header, so the stream is read with fetch.
  const live = document.getElementById("live");
  for (;;) {
    try {
      const response = await fetch(`/api/events/stream?since=${state.lastEvent}`, { headers: { "X-API-Key": state.key } });
      if (response.status === 401) { showLogin(); return; }
      live.textContent = "live"; live.classList.remove("off");
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
          if (data) onEvent(JSON.parse(data));
        }
      }
    } catch (error) { /* the daemon went away: retry below */ }
    live.textContent = "offline"; live.classList.add("off");
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

// -- start ---------------------------------------------------------------------------------

function showLogin() {
  document.getElementById("login").hidden = false;
  document.getElementById("main").hidden = true;
}

function start() {
  document.getElementById("login").hidden = true;
  document.getElementById("main").hidden = false;
  refresh();
  stream();
}

document.addEventListener("DOMContentLoaded", () => {
  const fromUrl = new URLSearchParams(location.hash.slice(1)).get("key");
  if (fromUrl) { sessionStorage.setItem("p2pfs-key", fromUrl); history.replaceState(null, "", "/"); }
  state.key = sessionStorage.getItem("p2pfs-key");
  document.getElementById("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = document.getElementById("key").value.trim();
    sessionStorage.setItem("p2pfs-key", state.key);
    start();
  });
  document.getElementById("add-folder").addEventListener("submit", (e) => {
    e.preventDefault();
    const form = new FormData(e.target);
    const body = { path: form.get("path") };
    if (form.get("ticket")) body.ticket = form.get("ticket");
    act(async () => { const r = await api("POST", "/api/folders", body); e.target.reset(); await showTickets(r.path); });
  });
  document.getElementById("add-share").addEventListener("submit", (e) => {
    e.preventDefault();
    const path = new FormData(e.target).get("path");
    act(async () => {
      const r = await api("POST", "/api/shares", { path });
      const shown = document.getElementById("share-ticket");
      shown.textContent = r.ticket; shown.hidden = false; e.target.reset();
    });
  });
  document.getElementById("tickets-close").addEventListener("click", () => { document.getElementById("tickets").hidden = true; });
  if (state.key) start(); else showLogin();
});
