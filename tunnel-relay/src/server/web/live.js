// Weft's web view: live updates without a reload. Every few seconds the page asks for its own
// <main> again (X-Weft-Live: 1 answers only that) and swaps it in when it changed. A field
// being typed in, or a focused control, holds the update back; a 401 sends the page to login.
(function () {
  const main = document.getElementById("live");
  if (!main) return;
  const every = parseInt(main.dataset.live || "2000", 10);
  let last = main.innerHTML;
  async function tick() {
    const a = document.activeElement;
    if (a && main.contains(a) && a.matches("input, select, textarea")) return;
    try {
      const r = await fetch(location.href, { headers: { "X-Weft-Live": "1" }, credentials: "same-origin" });
      if (r.status === 401) { location.href = "/"; return; }
      if (!r.ok) return;
      const html = await r.text();
      if (html !== last) { main.innerHTML = html; last = html; }
      main.dataset.updated = String(Date.now());
    } catch (e) { /* the relay is restarting: try again at the next tick */ }
  }
  setInterval(tick, every);
})();
