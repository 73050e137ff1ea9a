// swapmoe-gguf's web page: a chat on the server's OpenAI-compatible endpoint (/v1/chat/completions,
// streamed) and the Virtual Experts live (GET /swapmoe/state, polled; POST /swapmoe/budget).
// Vanilla JS, no build step, nothing loaded from elsewhere.
'use strict';

const $ = (id) => document.getElementById(id);
const KEY = 'swapmoe.apiKey';
const POLL_BUSY_MS = 400, POLL_IDLE_MS = 2000, POLL_DOWN_MS = 3000, SAMPLES = 150;

const ui = {
  history: [],          // [{role, content}] of the conversation
  controller: null,     // AbortController of the reply being streamed
  state: null,          // the last /swapmoe/state
  samples: [],          // [{t, swaps, hit, tps}] for the chart
  marks: [],            // times of budget changes (chart)
  fresh: new Map(),     // "layer:expert" -> time it became resident
  tps: null,            // decode tokens/s of the latest interval with decoding
  down: false,          // the last poll failed
  pollTimer: null,
  knobsFilled: false,
};

// ---------------------------------------------------------------------------------- HTTP ---
class RequestError extends Error {}

function headers(json) {
  const h = {};
  if (json) h['Content-Type'] = 'application/json';
  const k = localStorage.getItem(KEY);
  if (k) h['Authorization'] = 'Bearer ' + k;
  return h;
}

// fetch with the key; a refusal becomes one line: the server's own message
async function api(path, opts = {}) {
  let res;
  try {
    res = await fetch(path, { ...opts, headers: headers(opts.body !== undefined) });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new RequestError(`the server at ${location.host} is not answering`);
  }
  if (res.status === 401) {
    askKey();
    throw new RequestError('this server needs an API key: enter it above');
  }
  if (!res.ok) {
    let msg = `${res.status} ${res.statusText}`;
    try { const j = await res.json(); msg = (j.error && j.error.message) || msg; } catch (_) { /* not JSON */ }
    throw new RequestError(msg);
  }
  return res;
}

function say(text, kind = '') {
  const s = $('status');
  s.textContent = text;
  s.title = text;
  s.className = kind;
}

function askKey() {
  $('key-form').hidden = false;
  $('key').value = localStorage.getItem(KEY) || '';
  $('key').focus();
}

// ---------------------------------------------------------------------------------- chat ---
function addMessage(role, text) {
  const div = document.createElement('div');
  div.className = 'msg ' + role;
  const body = document.createElement('span');
  body.className = 'body';
  body.textContent = text;
  div.appendChild(body);
  $('messages').appendChild(div);
  div.scrollIntoView({ block: 'end' });
  return div;
}

function setMeta(div, text) {
  let m = div.querySelector('.meta');
  if (!m) { m = document.createElement('span'); m.className = 'meta'; div.appendChild(m); }
  m.textContent = text;
}

function num(id) {
  const v = $(id).value.trim();
  return v === '' ? undefined : Number(v);
}

function requestBody() {
  const messages = [];
  const system = $('system').value.trim();
  if (system) messages.push({ role: 'system', content: system });
  messages.push(...ui.history);
  const body = { messages, stream: true };
  for (const k of ['temperature', 'top_p', 'top_k', 'min_p', 'repeat_penalty']) {
    const v = num(k);
    if (v !== undefined && !Number.isNaN(v)) body[k] = v;
  }
  const n = num('max_tokens');
  if (n !== undefined && n >= 0) body.max_tokens = n;
  const seed = num('seed');
  if (seed !== undefined && seed >= 0) body.seed = seed;
  return body;
}

// server-sent events of one response: yields each data payload (a string)
async function* events(res) {
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.search(/\r?\n\r?\n/)) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i).replace(/^\r?\n\r?\n/, '');
      const data = block.split(/\r?\n/).filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
      if (data) yield data;
    }
  }
}

async function send(ev) {
  if (ev) ev.preventDefault();
  const text = $('input').value;
  if (!text.trim() || ui.controller) return;
  ui.history.push({ role: 'user', content: text });
  const userDiv = addMessage('user', text);
  $('input').value = '';
  const div = addMessage('assistant', '');
  const body = div.querySelector('.body');
  const controller = new AbortController();
  ui.controller = controller;
  busy(true);
  say('');
  let reply = '', pieces = 0;
  const t0 = performance.now();
  let tFirst = null;
  try {
    const res = await api('v1/chat/completions', { method: 'POST', body: JSON.stringify(requestBody()),
                                                   signal: controller.signal });
    for await (const data of events(res)) {
      if (data === '[DONE]') break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new RequestError(chunk.error.message || 'the server stopped the reply');
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (tFirst === null) tFirst = performance.now();
        reply += delta.content;
        pieces += 1;
        body.textContent = reply.replace(/^\s+/, '');  // (the history keeps it as sent)
        div.scrollIntoView({ block: 'end' });
      }
    }
    const secs = (performance.now() - (tFirst || t0)) / 1000;
    setMeta(div, `${pieces} tokens, ${secs > 0 ? (pieces / secs).toFixed(1) : '-'} tok/s as received`);
    ui.history.push({ role: 'assistant', content: reply });
  } catch (e) {
    const stopped = e.name === 'AbortError';
    if (reply) {  // keep what came; the conversation goes on from it
      ui.history.push({ role: 'assistant', content: reply });
      setMeta(div, stopped ? 'stopped' : 'interrupted: ' + e.message);
    } else {      // nothing came: the message goes back where it was typed
      ui.history.pop();
      userDiv.remove();
      div.remove();
      if (!$('input').value) $('input').value = text;
    }
    if (!stopped) { div.classList.add('failed'); say(e.message, 'error'); }
  } finally {
    ui.controller = null;
    busy(false);
  }
}

function busy(on) {
  $('send').disabled = on;
  $('stop').disabled = !on;
  schedulePoll(0);
}

function newChat() {
  if (ui.controller) ui.controller.abort();
  ui.history = [];
  $('messages').textContent = '';
}

// ---------------------------------------------------------------------------- live panel ---
function schedulePoll(ms) {
  clearTimeout(ui.pollTimer);
  ui.pollTimer = setTimeout(poll, ms);
}

async function poll() {
  let next = (ui.controller || (ui.state && (ui.state.running || ui.state.changing))) ? POLL_BUSY_MS : POLL_IDLE_MS;
  try {
    const st = await (await api('swapmoe/state')).json();
    if (ui.down) { ui.down = false; say('the server answers again', 'ok'); }
    update(st);
  } catch (e) {
    if (!ui.down || $('status').textContent === '') say(e.message, 'error');
    ui.down = true;
    next = POLL_DOWN_MS;
  }
  schedulePoll(next);
}

function fmtBytes(b) {
  if (b === null || b === undefined) return '-';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i += 1; }
  return (i ? b.toFixed(b < 10 ? 2 : 1) : b.toFixed(0)) + ' ' + u[i];
}

function update(st) {
  const prev = ui.state;
  const now = performance.now();
  // experts that came in since the last reading
  if (prev && prev.layers && prev.experts_per_layer === st.experts_per_layer) {
    st.layers.forEach((l, i) => {
      const was = new Set(prev.resident[i] || []);
      for (const e of st.resident[i]) if (!was.has(e)) ui.fresh.set(l + ':' + e, now);
    });
  }
  for (const [k, t] of ui.fresh) if (now - t > 2500) ui.fresh.delete(k);
  if (prev && st.decode_tokens > prev.decode_tokens && st.decode_seconds > prev.decode_seconds) {
    ui.tps = (st.decode_tokens - prev.decode_tokens) / (st.decode_seconds - prev.decode_seconds);
  }
  const dt = prev ? (st.time - prev.time) : 0;
  const rate = prev && dt > 0 ? Math.max(0, st.swaps - prev.swaps) / dt : 0;
  ui.samples.push({ t: st.time, swaps: rate, hit: st.hit_rate });
  if (ui.samples.length > SAMPLES) ui.samples.shift();
  ui.state = st;

  $('model').textContent = st.model;
  $('s-value').textContent = st.experts_per_layer;
  $('n-expert').textContent = st.n_expert;
  $('policy').textContent = st.policy + (st.sleeping ? ', asleep (the model is freed)' : '') +
    (st.changing ? ', changing the budget...' : '');
  $('summary').textContent = `${st.requests} requests, ${st.tokens} tokens through the model`;
  $('tps').textContent = ui.tps ? ui.tps.toFixed(1) : '-';
  $('hit').textContent = st.hit_rate === null ? '-' : (100 * st.hit_rate).toFixed(1) + ' %';
  $('swaps').textContent = st.swaps + (st.swap_failures ? ` (${st.swap_failures} failed)` : '');
  $('tau-now').textContent = st.max_dropped_mass.toFixed(2) +
    (st.floor_acted !== null && st.floor_acted !== undefined ? `, floor acted on ${(100 * st.floor_acted).toFixed(0)} %` : '');
  memoryBars(st);
  fillKnobs(st);
  const hm = $('heatmap');
  hm.dataset.resident = JSON.stringify(st.resident);
  hm.dataset.hot = JSON.stringify(st.hot);
  hm.dataset.swaps = String(st.swaps);
  drawHeatmap(st);
  drawChart();
}

function memoryBars(st) {
  const hostFill = $('host-fill');
  const over = st.budget_bytes && st.rss_bytes > st.budget_bytes;
  hostFill.style.width = st.budget_bytes ? Math.min(100, 100 * st.rss_bytes / st.budget_bytes) + '%' : '100%';
  hostFill.classList.toggle('over', !!over);
  $('host-text').textContent = st.budget_bytes
    ? `${fmtBytes(st.rss_bytes)} of ${fmtBytes(st.budget_bytes)} (peak ${fmtBytes(st.peak_rss_bytes)})`
    : `${fmtBytes(st.rss_bytes)}, no budget (peak ${fmtBytes(st.peak_rss_bytes)})`;
  $('host-text').title = st.memory_plan || '';
  const dev = st.device_bytes;
  $('device-row').hidden = !dev;
  if (dev) {
    $('device-fill').style.width = st.vram_budget_bytes ? Math.min(100, 100 * dev / st.vram_budget_bytes) + '%' : '100%';
    $('device-text').textContent = `${fmtBytes(dev)} weights` +
      (st.vram_budget_bytes ? ` of ${fmtBytes(st.vram_budget_bytes)}` : '');
  }
}

function fillKnobs(st) {
  const tau = $('tau');
  tau.disabled = !st.tau_live;
  $('tau-label').title = st.tau_live ? 'share of the full model\'s expert weight a token may lose before the floor loads the missing experts (0: exact, 1: never)'
    : 'the floor can change live only on a server started with --max-dropped-mass below 1';
  $('slots').max = st.n_expert;
  if (ui.knobsFilled) return;
  ui.knobsFilled = true;
  $('slots').value = st.experts_per_layer;
  tau.value = st.max_dropped_mass;
  $('budget').placeholder = st.budget_bytes ? fmtBytes(st.budget_bytes) : 'e.g. 75% or 2GiB';
}

function canvasSize(c) {
  const dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth;
  const h = Number(c.getAttribute('height'));
  if (c.width !== Math.round(w * dpr)) { c.width = Math.round(w * dpr); }
  c.height = Math.round(h * dpr);
  const g = c.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  return [g, w, h];
}

function drawHeatmap(st) {
  const c = $('heatmap');
  const rows = st.layers.length, cols = st.n_expert;
  const labelW = 34, top = 14;
  const cell = Math.max(3, Math.min(18, Math.floor((c.clientWidth - labelW) / cols)));
  const cellH = rows <= 12 ? Math.min(26, Math.round(cell * 1.4)) : cell;  // few layers: taller rows
  c.setAttribute('height', String(top + rows * cellH + 4));
  const [g, w, h] = canvasSize(c);
  const css = getComputedStyle(document.documentElement);
  const color = (v) => css.getPropertyValue(v).trim();
  g.clearRect(0, 0, w, h);
  g.font = '10px system-ui, sans-serif';
  g.fillStyle = color('--dim');
  g.textBaseline = 'middle';
  for (let e = 0; e < cols; e += cols > 32 ? 8 : 4) g.fillText(String(e), labelW + e * cell, 6);
  const now = performance.now();
  st.layers.forEach((l, i) => {
    const y = top + i * cellH;
    g.fillStyle = color('--dim');
    g.fillText('L' + l, 2, y + cellH / 2);
    const res = new Set(st.resident[i]), hot = new Set(st.hot[i]), loading = new Set(st.loading[i]);
    const score = st.scores ? st.scores[i] : null;
    for (let e = 0; e < cols; e += 1) {
      const x = labelW + e * cell;
      const s = score ? score[e] : 0.6;
      if (res.has(e)) {
        g.globalAlpha = 0.45 + 0.55 * s;
        g.fillStyle = color('--accent');
      } else if (hot.has(e)) {
        g.globalAlpha = loading.has(e) ? 1 : 0.75;
        g.fillStyle = color('--hot');
      } else {
        g.globalAlpha = 1;
        g.fillStyle = color('--missing');
      }
      g.fillRect(x, y, cell - 1, cellH - 1);
      g.globalAlpha = 1;
      const t = ui.fresh.get(l + ':' + e);
      if (t !== undefined && now - t < 2500) {
        g.strokeStyle = color('--fresh');
        g.lineWidth = 1.5;
        g.strokeRect(x + 0.75, y + 0.75, cell - 2.5, cellH - 2.5);
      }
    }
  });
}

function drawChart() {
  const c = $('chart');
  const [g, w, h] = canvasSize(c);
  g.clearRect(0, 0, w, h);
  const n = ui.samples.length;
  if (n < 2) return;
  const t0 = ui.samples[0].t, t1 = ui.samples[n - 1].t;
  const span = Math.max(1e-3, t1 - t0);
  const x = (t) => 4 + (w - 8) * (t - t0) / span;
  const maxRate = Math.max(1, ...ui.samples.map((s) => s.swaps));
  const css = getComputedStyle(document.documentElement);
  g.fillStyle = css.getPropertyValue('--hot').trim();
  const bw = Math.max(1, (w - 8) / n - 1);
  for (const s of ui.samples) {
    const bh = (h - 16) * s.swaps / maxRate;
    g.fillRect(x(s.t) - bw / 2, h - 4 - bh, bw, bh);
  }
  g.strokeStyle = '#b48cf0';
  for (const m of ui.marks) {
    if (m < t0) continue;
    g.beginPath(); g.moveTo(x(m), 2); g.lineTo(x(m), h - 2); g.stroke();
  }
  g.strokeStyle = css.getPropertyValue('--accent').trim();
  g.lineWidth = 2;
  g.beginPath();
  let started = false;
  for (const s of ui.samples) {
    if (s.hit === null || s.hit === undefined) continue;
    const y = h - 4 - (h - 16) * s.hit;
    if (started) g.lineTo(x(s.t), y); else { g.moveTo(x(s.t), y); started = true; }
  }
  g.stroke();
  g.fillStyle = css.getPropertyValue('--dim').trim();
  g.font = '10px system-ui, sans-serif';
  g.fillText(`hit rate 0-100 %, swaps/s up to ${maxRate.toFixed(1)}, last ${Math.round(span)} s`, 6, 10);
}

// --------------------------------------------------------------------------------- knobs ---
async function applyKnobs(ev) {
  ev.preventDefault();
  const st = ui.state;
  const body = {};
  const budget = $('budget').value.trim();
  if (budget) body.memory_budget = budget;
  const slots = num('slots');  // sent when changed (with a budget too: then S must fit in it)
  if (slots !== undefined && (!st || slots !== st.experts_per_layer)) body.experts_per_layer = slots;
  const tau = num('tau');
  if (!$('tau').disabled && tau !== undefined && (!st || Math.abs(tau - st.max_dropped_mass) > 1e-9)) {
    body.max_dropped_mass = tau;
  }
  const out = $('knob-result');
  if (!Object.keys(body).length) { out.textContent = 'nothing to change'; out.className = ''; return; }
  $('apply').disabled = true;
  out.textContent = 'applying (between two steps of the model)...';
  out.className = '';
  schedulePoll(100);
  try {
    const r = await (await api('swapmoe/budget', { method: 'POST', body: JSON.stringify(body) })).json();
    out.textContent = r.cost + (r.budget ? `; budget ${r.budget}` : '');
    out.className = 'ok';
    $('slots').value = r.experts_per_layer;
    $('budget').value = '';
    if (ui.state) ui.marks.push(Date.now() / 1000);
    ui.fresh.clear();
  } catch (e) {  // the old budget stays in force: say why in one line
    out.textContent = 'refused: ' + e.message;
    out.className = 'error';
  } finally {
    $('apply').disabled = false;
    schedulePoll(0);
  }
}

// ---------------------------------------------------------------------------------- start ---
async function loadProps() {
  try {
    const p = await (await api('props')).json();
    const d = (p.default_generation_settings || {}).params || {};
    for (const k of ['temperature', 'top_p', 'top_k', 'min_p', 'repeat_penalty']) {
      if (d[k] !== undefined && $(k).value === '') $(k).value = d[k];
    }
    $('template').textContent = p.chat_template || '(none: the server formats prompts with llama.cpp\'s built-in template)';
    document.title = 'swapmoe-gguf: ' + (p.model_alias || '');
  } catch (e) {
    say(e.message, 'error');
  }
}

function start() {
  $('composer').addEventListener('submit', send);
  $('input').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $('stop').addEventListener('click', () => { if (ui.controller) ui.controller.abort(); });
  $('new-chat').addEventListener('click', newChat);
  $('knobs').addEventListener('submit', applyKnobs);
  $('key-button').addEventListener('click', askKey);
  $('key-form').addEventListener('submit', (e) => {
    e.preventDefault();
    localStorage.setItem(KEY, $('key').value.trim());
    $('key-form').hidden = true;
    say('');
    loadProps();
    schedulePoll(0);
  });
  window.addEventListener('resize', () => { if (ui.state) { drawHeatmap(ui.state); drawChart(); } });
  loadProps();
  poll();
}

start();
