// The web timeline: fetches /api/groups every two seconds and draws each group's journal
// window. No framework and no build step: this file is embedded in the appliance binary.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 2000;
let admin = false;

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function sv(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + u[i];
}

function clock(ns) {
  return new Date(ns / 1e6).toISOString().replace("T", " ").slice(0, 19) + "Z";
}

// Seq to time, by linear interpolation between the points whose seq and time are known.
function seqToTime(known, seq) {
  if (!known.length) return null;
  if (seq <= known[0][0]) return known[0][1];
  for (let i = 1; i < known.length; i++) {
    const [s1, t1] = known[i];
    if (seq <= s1) {
      const [s0, t0] = known[i - 1];
      return s1 === s0 ? t1 : t0 + (t1 - t0) * (seq - s0) / (s1 - s0);
    }
  }
  return known[known.length - 1][1];
}

// Appends a row of `cells` to `table` and returns the row.
function addRow(table, cells) {
  const row = el("tr", {});
  row.append(...cells);
  table.append(row);
  return row;
}

function fact(parent, label, value, cls) {
  const span = el("span", {});
  span.append(label + ": ");
  const b = el("b", cls ? { class: cls } : {}, value);
  span.append(b);
  parent.append(span);
  return b;
}

async function post(path, body) {
  const token = document.getElementById("token").value;
  const msg = document.getElementById("message");
  msg.textContent = "";
  const r = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "Authorization": "Bearer " + token },
    body: JSON.stringify(body),
  });
  const answer = await r.json().catch(() => ({}));
  if (!r.ok) msg.textContent = r.status + ": " + (answer.error || r.statusText);
  refresh();
}

function drawAxis(g, now) {
  const t = g.timeline || {};
  const st = g.status;
  const W = 1000, H = 170, L = 10, R = 990, AXIS_Y = 92;
  const svg = sv("svg", { class: "axis", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  if (!t.first || !t.last) {
    svg.append(sv("text", { x: L, y: 60 }, "the journal holds no record yet"));
    return svg;
  }
  const known = [[t.first.seq, t.first.timestamp_ns], [t.last.seq, t.last.timestamp_ns]];
  for (const b of t.bookmarks) known.push([b.seq, b.timestamp_ns]);
  for (const k of (t.consolidated ? t.consolidated.kept : [])) known.push([k.seq, k.timestamp_ns]);
  for (const i of g.images) known.push([i.seq, i.time_ns]);
  known.sort((a, b) => a[0] - b[0]);
  let t0 = t.first.timestamp_ns, t1 = Math.max(t.last.timestamp_ns, t0 + 1e9);
  const pad = (t1 - t0) * 0.02;
  t0 -= pad; t1 += pad;
  const x = (ns) => L + (R - L) * (ns - t0) / (t1 - t0);
  const xs = (seq) => x(seqToTime(known, seq));
  svg.setAttribute("data-from-ns", String(t0));
  svg.setAttribute("data-until-ns", String(t1));

  svg.append(sv("rect", { class: "window", x: x(t.first.timestamp_ns), y: AXIS_Y - 14,
    width: Math.max(1, x(t.last.timestamp_ns) - x(t.first.timestamp_ns)), height: 28 }));
  if (t.consolidated) {
    const c = sv("rect", { class: "consolidated", x: x(t.first.timestamp_ns), y: AXIS_Y - 14,
      width: Math.max(1, xs(t.consolidated.below_seq) - x(t.first.timestamp_ns)), height: 28 });
    svg.append(c);
    for (const k of t.consolidated.kept) {
      const m = sv("g", { class: "kept", "data-seq": String(k.seq) });
      m.append(sv("line", { x1: x(k.timestamp_ns), x2: x(k.timestamp_ns), y1: AXIS_Y - 14, y2: AXIS_Y + 14 }));
      svg.append(m);
    }
  }
  for (const n of t.not_recoverable) {
    let from = n.from_seq !== undefined ? xs(n.from_seq) : x(n.from_ns);
    if (n.from_ns !== undefined) from = Math.min(from, x(n.from_ns));
    const until = n.until_seq !== null && n.until_seq !== undefined ? xs(n.until_seq) : R;
    const r = sv("rect", { class: "notrec", "data-volume": n.volume, "data-reason": n.reason,
      x: Math.max(L, from), y: AXIS_Y - 14, width: Math.max(2, until - Math.max(L, from)), height: 28 });
    r.append(sv("title", {}, `${n.volume}: ${n.reason}, not recoverable`));
    svg.append(r);
  }
  // Ticks: five times across the axis.
  const ticks = sv("g", { class: "ticks" });
  for (let i = 0; i <= 4; i++) {
    const ns = t0 + (t1 - t0) * i / 4;
    const label = t1 - t0 < 120e9 ? new Date(ns / 1e6).toISOString().slice(11, 23) + "Z" : clock(ns).slice(11);
    ticks.append(sv("text", { x: x(ns), y: H - 4, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle" }, label));
  }
  svg.append(ticks);
  // Bookmarks above the axis, labels staggered over three rows so neighbours stay legible.
  const bookmarks = t.bookmarks.filter((b) => !b.consolidated).slice().sort((a, b) => a.seq - b.seq);
  bookmarks.forEach((b, i) => {
    const bx = x(b.timestamp_ns);
    const m = sv("g", { class: "bookmark", "data-name": b.name, "data-seq": String(b.seq), "data-x": bx.toFixed(2),
      "data-consistency": b.consistency });
    const top = 14 + (i % 3) * 18;
    m.append(sv("line", { x1: bx, x2: bx, y1: top + 3, y2: AXIS_Y + 14 }));
    m.append(sv("text", { x: bx + 3, y: top + 10 }, b.name + (b.consistency === "application" ? " (app)" : "") + (b.keep ? " ★" : "")));
    m.append(sv("title", {}, `${b.name} — seq ${b.seq}, ${b.time}, ${b.consistency}-consistent`));
    svg.append(m);
  });
  for (const i of g.images) {
    const ix = x(i.time_ns);
    const m = sv("g", { class: "image-mark", "data-id": i.id, "data-x": ix.toFixed(2) });
    m.append(sv("line", { x1: ix, x2: ix, y1: AXIS_Y - 18, y2: AXIS_Y + 24 }));
    m.append(sv("text", { x: ix + 3, y: AXIS_Y + 34 }, "image " + i.id));
    svg.append(m);
  }
  const remote = st.remote;
  if (remote) {
    const shipped = remote.shipped_known ? remote.shipped_seq : t.first.seq;
    const rx = Math.min(R, xs(Math.max(shipped, t.first.seq)));
    const m = sv("g", { class: "remote-mark", "data-shipped-seq": String(shipped), "data-x": rx.toFixed(2) });
    m.append(sv("line", { x1: rx, x2: rx, y1: AXIS_Y - 14, y2: AXIS_Y + 14 }));
    m.append(sv("text", { x: rx < W / 2 ? rx + 3 : rx - 3, y: AXIS_Y + 50, "text-anchor": rx < W / 2 ? "start" : "end" },
      `remote copy (seq ${shipped})`));
    svg.append(m);
  }
  return svg;
}

function chart(title, points, value, format, cls) {
  const box = el("div", { class: "chart " + cls });
  const last = points.length ? value(points[points.length - 1]) : 0;
  box.append(el("div", { class: "title" }, `${title}: ${format(last)}`));
  const W = 220, H = 50;
  const svg = sv("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  const max = Math.max(1e-9, ...points.map(value));
  const n = points.length;
  const coords = points.map((p, i) => {
    const px = n > 1 ? (W * i) / (n - 1) : W;
    return px.toFixed(1) + "," + (H - 2 - (H - 4) * value(p) / max).toFixed(1);
  });
  svg.append(sv("polyline", { points: coords.join(" "), "data-points": String(n) }));
  box.append(svg);
  return box;
}

function drawGroup(g, now) {
  const st = g.status;
  const sec = el("section", { class: "group", "data-group": st.name });
  sec.append(el("h2", {}, `group ${st.name}` + (st.source === "remote" ? " (remote copy)" : "")));
  const facts = el("div", { class: "facts" });
  const t = g.timeline;
  if (t && t.first) {
    fact(facts, "window", `${clock(t.first.timestamp_ns)} — ${clock(t.last.timestamp_ns)}`);
    fact(facts, "seqs", `${t.first.seq} … ${t.last.seq}`);
  }
  fact(facts, "journal", `${bytes(st.journal_bytes)} of ${bytes(st.journal_capacity_bytes)}`,
    st.journal_over_capacity ? "bad" : "");
  fact(facts, "distributed", `seq ${st.distributed_seq} (lag ${st.lag_records} records)`);
  if (st.failure) fact(facts, "fenced", st.failure, "bad");
  const notrec = t ? t.not_recoverable.length : 0;
  fact(facts, "protection", notrec ? `${notrec} volume span(s) not recoverable` : "recoverable",
    notrec ? "bad" : "good");
  if (st.remote) {
    const r = st.remote;
    const b = fact(facts, "remote copy", `${r.connected ? "connected" : "disconnected"} ${r.endpoint}, shipped seq ${r.shipped_seq}, lag ${r.lag_seconds.toFixed(1)} s`,
      r.connected ? "good" : "bad");
    b.id = `remote-${st.name}`;
    fact(facts, "RPO", `${r.rpo_s} s` + (r.rpo_exceeded ? " — exceeded" : " — met"), r.rpo_exceeded ? "bad" : "good");
  }
  if (st.replication_source) {
    const r = st.replication_source;
    fact(facts, "receiving", `${r.connected ? "connected" : "disconnected"}, last received seq ${r.last_received_seq}`);
  }
  sec.append(facts);
  if (g.timeline_error) sec.append(el("div", { class: "bad" }, "timeline: " + g.timeline_error));
  sec.append(drawAxis(g, now));

  const charts = el("div", { class: "charts" });
  charts.append(chart("lag", g.history, (p) => p.lag_seconds, (v) => v.toFixed(1) + " s", "lag-chart"));
  charts.append(chart("write rate", g.history, (p) => p.write_bytes_per_s, (v) => bytes(v) + "/s", "rate-chart"));
  charts.append(chart("journal fill", g.history, (p) => p.journal_fill, (v) => (100 * v).toFixed(1) + " %", "fill-chart"));
  sec.append(charts);

  const images = el("table", { class: "images" });
  addRow(images, [el("th", {}, "open image"), el("th", {}, "point"), el("th", {}, "seq"),
    el("th", {}, "time"), el("th", {}, "mode"), el("th", {}, "state"), el("th", {}, "")]);
  for (const i of g.images) {
    const row = el("tr", { class: "image", "data-id": i.id });
    row.append(el("td", {}, i.id), el("td", {}, i.point), el("td", {}, String(i.seq)), el("td", {}, i.time),
      el("td", {}, i.mode + (i.writable ? ", writable" : "")), el("td", {}, i.state));
    const act = el("td", {});
    if (admin) {
      const b = el("button", { class: "release" }, "release");
      b.onclick = () => post("/api/image/release", { id: i.id });
      act.append(b);
    }
    row.append(act);
    images.append(row);
  }
  if (!g.images.length) addRow(images, [el("td", { colspan: "7" }, "no image open")]);
  sec.append(images);

  if (t && t.bookmarks.length) {
    const list = el("table", { class: "bookmarks" });
    addRow(list, [el("th", {}, "bookmark"), el("th", {}, "seq"), el("th", {}, "time"),
      el("th", {}, "consistency"), el("th", {}, "")]);
    for (const b of t.bookmarks) {
      const row = el("tr", { "data-name": b.name });
      row.append(el("td", {}, b.name + (b.keep ? " (kept)" : "") + (b.consolidated ? " (consolidated)" : "")),
        el("td", {}, String(b.seq)), el("td", {}, b.time), el("td", {}, b.consistency));
      const act = el("td", {});
      if (admin && !b.consolidated) {
        const open = el("button", { class: "open" }, "open image");
        open.onclick = () => post("/api/image", { group: st.name, at: b.name });
        act.append(open);
      }
      row.append(act);
      list.append(row);
    }
    sec.append(list);
  }
  if (admin) {
    const form = el("div", { class: "admin" });
    const name = el("input", { type: "text", placeholder: "bookmark name", size: "20", class: "bookmark-name" });
    const take = el("button", { class: "take" }, "take bookmark");
    take.onclick = () => name.value && post("/api/bookmark", { group: st.name, name: name.value });
    form.append(name, take);
    sec.append(form);
  }
  return sec;
}

async function refresh() {
  try {
    const r = await fetch("/api/groups", { cache: "no-store" });
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || r.statusText);
    admin = data.admin;
    document.getElementById("token-box").hidden = !admin;
    document.getElementById("mode").textContent = admin ? "admin (bearer token required)" : "read-only";
    const box = document.getElementById("groups");
    box.replaceChildren(...data.groups.map((g) => drawGroup(g, data.now_ns)));
    const up = document.getElementById("updated");
    up.textContent = "updated " + clock(data.now_ns);
    up.setAttribute("data-loaded", "true");
  } catch (e) {
    document.getElementById("updated").textContent = "refresh failed: " + e.message;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
