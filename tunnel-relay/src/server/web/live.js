// Weft's web view: live updates without a reload. Every few seconds the page asks for its own
// <main> again (X-Weft-Live: 1 answers only that), sending the version it shows
// (If-None-Match): the relay answers 304 without building anything while nothing changed, else
// the new <main> and its version (ETag), swapped in when it differs. A field being typed in,
// or a focused control, holds the update back; a 401 sends the page to login.
(function () {
  const main = document.getElementById("live");
  if (!main || !main.dataset.version) return;
  const every = parseInt(main.dataset.live || "2000", 10);
  let last = main.innerHTML;
  let version = main.dataset.version || "";
  async function tick() {
    const a = document.activeElement;
    if (a && main.contains(a) && a.matches("input, select, textarea")) return;
    try {
      const headers = { "X-Weft-Live": "1" };
      if (version) headers["If-None-Match"] = version;
      const r = await fetch(location.href, { headers: headers, credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { location.href = "/"; return; }
      if (r.status === 304) { main.dataset.updated = String(Date.now()); return; }
      if (!r.ok) return;
      const html = await r.text();
      version = r.headers.get("ETag") || "";
      if (html !== last) { main.innerHTML = html; last = html; }
      main.dataset.updated = String(Date.now());
    } catch (e) { /* the relay is restarting: try again at the next tick */ }
  }
  setInterval(tick, every);
})();
