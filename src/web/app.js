// The streamdet page: a user chooses or drops a video (or an image); the page plays it locally,
// uploads it to the server and draws the server's detections over it while the upload goes on.
//
// Video: `GET sessions/ID/events` (SSE) is opened first, then `POST detect/video?session=ID`
// uploads the file with XMLHttpRequest (for upload progress). The detections of the frame whose
// `pts` is the latest at or before the video's current time are drawn on #overlay.
// Image: `POST detect` with the file; the boxes are drawn over an <img>.
// Tracking (videos): "Track objects" sends `track=bytetrack`; a counting line the user clicks on
// the video is sent as `lines=line1:x1,y1,x2,y2` in the video's pixels; "Annotated video" sends
// `annotate=1`, and `end` then links the MP4 the server drew.
//
// Elements a test can rely on: #file, #status[data-state], #error, #progress, #frames[data-count],
// #ttfd, #class-counts (li[data-class][data-count]), #summary (dd[data-key]), #detections (rows with
// data-pts, data-class, data-confidence, data-track), #overlay[data-drawn] (boxes drawn now) and
// [data-track-ids] (their track ids), #notice (the "cannot play" message), #video, #image; #track,
// #annotate, #draw-line, #clear-line, #line-info; #line-counts (li[data-line][data-in][data-out]
// [data-points]), #track-counts (li[data-class][data-count]; [data-final] on the list once `end`
// gave the totals), #annotated (a#annotated-link or the failure in words); body[data-health] is
// "ok" once /health answered. #status[data-state] is "waiting" while a chosen video waits for the
// line's two points.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    modelInfo: $('model-info'),
    drop: $('drop'),
    file: $('file'),
    cancel: $('cancel'),
    notice: $('notice'),
    stage: $('stage'),
    video: $('video'),
    image: $('image'),
    overlay: $('overlay'),
    holdLine: $('hold-line'),
    hold: $('hold'),
    conf: $('conf'),
    iou: $('iou'),
    classes: $('classes'),
    classNames: $('class-names'),
    stride: $('stride'),
    fps: $('fps'),
    track: $('track'),
    annotate: $('annotate'),
    drawLine: $('draw-line'),
    clearLine: $('clear-line'),
    lineInfo: $('line-info'),
    status: $('status'),
    error: $('error'),
    progress: $('progress'),
    progressText: $('progress-text'),
    frames: $('frames'),
    ttfd: $('ttfd'),
    classCounts: $('class-counts'),
    tracking: $('tracking'),
    lineCounts: $('line-counts'),
    zoneCounts: $('zone-counts'),
    trackCounts: $('track-counts'),
    annotated: $('annotated'),
    summary: $('summary'),
    summaryList: $('summary-list'),
    detections: $('detections').tBodies[0],
    detectionsScroll: $('detections-scroll'),
    detectionsNote: $('detections-note'),
    detectionsEmpty: $('detections-empty'),
  };

  // Rows kept in the detections table; older ones are dropped first.
  const MAX_ROWS = 500;
  // How long a failed upload request waits for the event stream to say why, before blaming the network.
  const GRACE_MS = 2500;
  // How long the upload waits for the event stream to open before it starts anyway.
  const EVENTS_OPEN_WAIT_MS = 3000;
  // Box colours, dark enough for white label text (contrast at least 4.5:1).
  const PALETTE = ['#c62828', '#1565c0', '#2e7d32', '#6a1b9a', '#ad1457', '#00695c', '#4e342e', '#283593', '#37474f', '#8a4b00'];

  // --- The API's address -------------------------------------------------------------------

  // `?api=http://host:port` points the page at a server on another origin (development);
  // otherwise requests are relative to the page, so the page works wherever the server mounts it.
  const API_BASE = (() => {
    const raw = new URLSearchParams(location.search).get('api');
    if (!raw) return '';
    try {
      const url = new URL(raw);
      if (url.protocol === 'http:' || url.protocol === 'https:') return url.href.replace(/\/+$/, '') + '/';
    } catch (_) { /* not a URL: fall back to the page's own origin */ }
    return '';
  })();
  const api = (path) => API_BASE + path;

  // --- Formatting --------------------------------------------------------------------------

  const fmtBytes = (n) => {
    if (!Number.isFinite(n)) return '?';
    const units = ['bytes', 'KB', 'MB', 'GB', 'TB'];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 2 : 1)) + ' ' + units[i];
  };
  const fmtSeconds = (s) => (Number.isFinite(s) ? s.toFixed(2) + ' s' : '—');
  const fmtPercent = (x) => Math.round(x * 100) + '%';

  // A session id the server accepts: [A-Za-z0-9_-]{16,64}; 22 random characters are 132 bits.
  const ID_ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';
  function randomId() {
    const bytes = new Uint8Array(22);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => ID_ALPHABET[b & 63]).join('');
  }

  // --- What the server says, in words ------------------------------------------------------

  const CODE_WORDS = {
    unsupported_media: 'The server cannot read this file: it is not a supported video or image.',
    no_video_stream: 'This file has no video stream.',
    unsupported_codec: "The server does not support this video's codec.",
    truncated: 'The video ended early: the file is cut short or damaged, or the upload broke off.',
    too_large: 'The file is too large for this server.',
    too_many_sessions: 'The server is busy with other uploads. Try again in a moment.',
    bad_parameter: 'The server refused a setting.',
    conflict: 'Another upload is using the same session id. Try again.',
    timeout: 'The server gave up waiting: the upload stalled or took longer than it allows.',
    internal: 'The server failed while working on this file.',
    unavailable: 'The server is restarting. Send the file again in a moment.',
    unauthorized: 'This server requires an access token, which this page does not send.',
  };

  function statusWords(status, code) {
    switch (status) {
      case 400: return 'The server refused a setting.';
      case 401: return CODE_WORDS.unauthorized;
      case 409: return CODE_WORDS.conflict;
      case 413: return CODE_WORDS.too_large;
      case 415: return code === 'no_video_stream' ? CODE_WORDS.no_video_stream
        : code === 'unsupported_codec' ? CODE_WORDS.unsupported_codec
          : 'This file is not a video or image the server supports.';
      case 429: return CODE_WORDS.too_many_sessions;
      case 503: return code === 'unavailable' ? CODE_WORDS.unavailable : CODE_WORDS.too_many_sessions;
      default:
        if (code && CODE_WORDS[code]) return CODE_WORDS[code];
        return status >= 500 ? `The server failed (HTTP ${status}).` : `The server refused the upload (HTTP ${status}).`;
    }
  }

  // Reads `{code, message}` from an error response body, if it is one.
  function parseErrorBody(text) {
    try {
      const body = JSON.parse(text);
      if (body && typeof body === 'object') return { code: String(body.code || ''), message: String(body.message || '') };
    } catch (_) { /* not JSON */ }
    return { code: '', message: '' };
  }

  // --- State of the current file -----------------------------------------------------------

  let run = null;

  // The counting line: one line, `line1`, in pixels of the video it was drawn on (`w` x `h`). It is
  // a setting: it stays, and goes with each video chosen, until cleared. `drawing`: the next two
  // clicks on the video place a new one; `first`: the first of them.
  const LINE_NAME = 'line1';
  const lineTool = { line: null, drawing: false, first: null };

  function newRun(file, kind) {
    return {
      file,
      kind, // 'video' or 'image'
      id: '',
      url: '',
      xhr: null,
      events: null,
      timers: [],
      finished: false,
      complete: false, // the `end` event came: every frame's detections are known
      lastSeq: -1,
      frames: [], // {index, pts, detections}, ordered by pts
      framesProcessed: 0,
      counts: new Map(),
      startedAt: 0,
      firstDetectionMs: null,
      canPlay: null, // null: not known yet
      held: false, // the page paused playback to wait for detections
      stride: 1,
      fpsLimit: 0,
      media: null,
      image: null, // the /detect response for an image
      begun: false, // the event stream and the upload have started
      sizeWaitOver: false, // gave up waiting for the browser to read the video's size
      tracking: false, // track or lines were sent
      annotate: false, // annotate=1 was sent
      lines: new Map(), // line name -> {points, in: Map(class -> n), out: Map(class -> n)}
      zones: new Map(), // zone name -> {entries: Map(class -> n), inside: Set(track id), max}
      tracks: new Map(), // class -> Set of track ids seen (until `end` gives the totals)
      trackTotals: null, // class -> distinct tracks, from `end`
    };
  }

  // Ends whatever the page was doing and clears what it showed, ready for the next file.
  function reset() {
    if (run) stopRun(run);
    run = null;
    ui.video.pause();
    ui.video.removeAttribute('src');
    ui.video.load();
    ui.video.hidden = true;
    ui.image.removeAttribute('src');
    ui.image.hidden = true;
    ui.stage.hidden = true;
    ui.holdLine.hidden = true;
    clearOverlay();
    hideNotice();
    clearError();
    setProgress(0, 0);
    ui.progressText.textContent = 'Nothing uploaded yet.';
    ui.frames.textContent = '0';
    ui.frames.dataset.count = '0';
    ui.ttfd.textContent = '—';
    renderCounts(new Map());
    ui.tracking.hidden = true;
    ui.annotated.hidden = true;
    ui.annotated.replaceChildren();
    lineTool.first = null;
    updateLineTool();
    ui.summary.hidden = true;
    ui.summaryList.replaceChildren();
    ui.detections.replaceChildren();
    ui.detectionsEmpty.hidden = false;
    ui.detectionsNote.textContent = 'Each row is one box. Select a time to show that frame.';
    ui.cancel.hidden = true;
  }

  // Stops the network work of `r` (upload, event stream, timers) and frees its object URL.
  function stopRun(r) {
    r.finished = true;
    r.timers.forEach(clearTimeout);
    r.timers = [];
    if (r.events) r.events.close();
    if (r.xhr && r.xhr.readyState !== XMLHttpRequest.DONE) r.xhr.abort();
    if (r.url) URL.revokeObjectURL(r.url);
    r.url = '';
  }

  // The run ends (state: done, error or stopped); what it showed stays on the page.
  function finish(r, state, text) {
    if (r.finished) return;
    r.finished = true;
    r.timers.forEach(clearTimeout);
    r.timers = [];
    if (r.events) r.events.close();
    // After an error the rest of the upload is of no use; after `end` the server has it all.
    if (state !== 'done' && r.xhr && r.xhr.readyState !== XMLHttpRequest.DONE) r.xhr.abort();
    setStatus(state, text);
    ui.cancel.hidden = true;
    // A file the server refused outright: the "cannot play" notice would only add noise.
    if (state === 'error' && r.kind === 'video' && r.framesProcessed === 0) hideNotice();
  }

  function setStatus(state, text) {
    ui.status.dataset.state = state;
    document.body.dataset.state = state;
    if (text) ui.status.textContent = text;
  }

  function showError(headline, detail) {
    ui.error.replaceChildren();
    const strong = document.createElement('strong');
    strong.textContent = headline;
    ui.error.append(strong);
    // The server's own words, unless they only repeat the headline.
    const gist = (text) => String(text || '').toLowerCase().replace(/[^a-z]+/g, '').slice(0, 28);
    if (detail && gist(detail) !== gist(headline)) {
      const p = document.createElement('span');
      p.className = 'detail';
      p.textContent = 'Server says: ' + detail;
      ui.error.append(p);
    }
    ui.error.hidden = false;
  }

  function clearError() {
    ui.error.hidden = true;
    ui.error.replaceChildren();
  }

  function showNotice(text) {
    ui.notice.textContent = text;
    ui.notice.hidden = false;
  }

  function hideNotice() {
    ui.notice.hidden = true;
    ui.notice.textContent = '';
  }

  function setProgress(loaded, total) {
    ui.progress.max = 1;
    ui.progress.value = total > 0 ? loaded / total : 0;
    ui.progress.textContent = total > 0 ? fmtPercent(loaded / total) : '0%';
    if (total > 0) ui.progressText.textContent = `${fmtPercent(loaded / total)} of ${fmtBytes(total)} sent`;
  }

  // --- Settings ----------------------------------------------------------------------------

  class SettingsError extends Error {}

  // The query for a detect route from the settings form; only non-empty fields are sent.
  function settingsQuery(kind) {
    const query = new URLSearchParams();
    const fields = kind === 'video' ? [ui.conf, ui.iou, ui.stride, ui.fps] : [ui.conf, ui.iou];
    for (const input of fields) {
      const label = document.querySelector(`label[for="${input.id}"]`).textContent;
      if (input.validity.badInput || !input.checkValidity()) {
        throw new SettingsError(`${label}: ${input.validationMessage || 'not a valid number'}`);
      }
      const value = input.value.trim();
      if (value !== '') query.set(input.name, value);
    }
    if (query.has('stride') && query.has('fps')) {
      throw new SettingsError('Give either a stride or an fps limit, not both.');
    }
    const classes = ui.classes.value.split(',').map((s) => s.trim()).filter(Boolean);
    if (classes.length) query.set('classes', classes.join(','));
    // The counting line is added when the upload starts: it needs the video's size.
    if (kind === 'video' && ui.track.checked) query.set('track', 'bytetrack');
    if (kind === 'video' && ui.annotate.checked) query.set('annotate', '1');
    return query;
  }

  let classNames = [];
  // The server's upload limit, when /health tells it.
  let maxUploadBytes = null;

  // Suggests class names for the part of the classes field after its last comma.
  function suggestClasses() {
    if (!classNames.length) return;
    const value = ui.classes.value;
    const cut = value.lastIndexOf(',');
    const head = cut >= 0 ? value.slice(0, cut + 1) + ' ' : '';
    const chosen = new Set(value.split(',').map((s) => s.trim()));
    const options = classNames.filter((name) => !chosen.has(name) || cut < 0).map((name) => {
      const option = document.createElement('option');
      option.value = head + name;
      return option;
    });
    ui.classNames.replaceChildren(...options);
  }

  async function loadHealth() {
    try {
      const response = await fetch(api('health'), { cache: 'no-store' });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const health = await response.json();
      const model = health.model || {};
      const defaults = health.defaults || {};
      const parts = [`Model ${model.name || 'unknown'}`];
      if (Array.isArray(model.input)) parts.push(`input ${model.input.join('×')}`);
      if (model.classes) parts.push(`${model.classes} classes`);
      parts.push(`on ${health.device || 'unknown device'}`);
      if (Number.isFinite(health.max_sessions)) parts.push(`${health.sessions_active ?? 0} of ${health.max_sessions} sessions busy`);
      if (health.version) parts.push(`streamdet ${health.version}`);
      maxUploadBytes = Number.isFinite(health.max_upload_bytes) ? health.max_upload_bytes : null;
      ui.modelInfo.textContent = parts.join(' · ');
      // Server defaults fill the fields the user has not touched.
      const fill = (input, value) => {
        if (value === null || value === undefined) return;
        // Rounded: the server's single-precision numbers print as e.g. 0.44999998807907104.
        if (input.value === '' && !input.dataset.touched) input.value = String(Number(Number(value).toPrecision(6)));
      };
      fill(ui.conf, defaults.conf);
      fill(ui.iou, defaults.iou);
      ui.stride.placeholder = `${defaults.stride ?? 1} (default)`;
      ui.fps.placeholder = defaults.fps ? `${defaults.fps} (default)` : 'no limit (default)';
      if (Array.isArray(model.class_names) && model.class_names.length) {
        classNames = model.class_names.map(String);
        ui.classes.placeholder = `all classes, e.g. ${classNames.slice(0, 2).join(', ')}`;
        suggestClasses();
      }
      document.body.dataset.health = 'ok';
    } catch (err) {
      ui.modelInfo.textContent = `The server did not answer (${err.message}); uploads will fail until it does.`;
      ui.conf.placeholder = '0.25';
      ui.iou.placeholder = '0.45';
      document.body.dataset.health = 'error';
    }
  }

  // --- Results -----------------------------------------------------------------------------

  // Fills a list of class chips (#class-counts, #track-counts) from a Map of class -> count.
  function renderCounts(counts, list = ui.classCounts) {
    const items = [...counts.entries()].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    if (!items.length) {
      const li = document.createElement('li');
      li.className = 'empty';
      li.textContent = 'None yet.';
      list.replaceChildren(li);
      return;
    }
    list.replaceChildren(...items.map(([name, count]) => {
      const li = document.createElement('li');
      li.dataset.class = name;
      li.dataset.count = String(count);
      const label = document.createElement('span');
      label.textContent = name;
      const value = document.createElement('span');
      value.className = 'count';
      value.textContent = String(count);
      li.append(label, value);
      return li;
    }));
  }

  // Adds one table row per detection; `pts` is null for an image.
  function addRows(r, pts, index, detections) {
    if (!detections.length) return;
    const scroller = ui.detectionsScroll;
    const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 24;
    const fragment = document.createDocumentFragment();
    for (const d of detections) {
      const tr = document.createElement('tr');
      tr.dataset.class = d.class;
      tr.dataset.confidence = String(d.confidence);
      const time = document.createElement('td');
      if (pts === null) {
        time.textContent = 'image';
      } else {
        tr.dataset.pts = String(pts);
        const button = document.createElement('button');
        button.type = 'button';
        button.className = 'seek';
        button.textContent = pts.toFixed(2);
        button.dataset.pts = String(pts);
        button.setAttribute('aria-label', `Show the frame at ${pts.toFixed(2)} seconds`);
        button.disabled = r.canPlay === false;
        time.append(button);
      }
      const frame = document.createElement('td');
      frame.textContent = index === null ? '—' : String(index);
      const cls = document.createElement('td');
      cls.textContent = d.class;
      const track = document.createElement('td');
      const id = trackId(d);
      if (id !== null) tr.dataset.track = String(id);
      track.textContent = id === null ? '—' : `#${id}`;
      const conf = document.createElement('td');
      conf.textContent = d.confidence.toFixed(2);
      tr.append(time, frame, cls, track, conf);
      fragment.append(tr);
    }
    ui.detections.append(fragment);
    ui.detectionsEmpty.hidden = true;
    let dropped = false;
    while (ui.detections.rows.length > MAX_ROWS) {
      ui.detections.deleteRow(0);
      dropped = true;
    }
    if (dropped) ui.detectionsNote.textContent = `Showing the latest ${MAX_ROWS} boxes. Select a time to show that frame.`;
    if (atBottom) scroller.scrollTop = scroller.scrollHeight;
  }

  function countDetections(r, detections) {
    for (const d of detections) addTo(r.counts, d.class);
    if (detections.length) renderCounts(r.counts);
    if (r.tracking) {
      let more = false;
      for (const d of detections) more = noteTrack(r, d.class, trackId(d)) || more;
      if (more) renderTracks(r);
    }
    if (detections.length && r.firstDetectionMs === null) {
      r.firstDetectionMs = performance.now() - r.startedAt;
      ui.ttfd.textContent = fmtSeconds(r.firstDetectionMs / 1000);
    }
  }

  // --- Tracks, lines and zones ------------------------------------------------------------

  // A detection's track id, or null: a box no track has confirmed yet has none.
  function trackId(d) {
    const id = d ? d.track_id : null;
    return Number.isInteger(id) ? id : null;
  }

  const addTo = (counts, key, n = 1) => counts.set(key, (counts.get(key) || 0) + n);
  const total = (counts) => [...counts.values()].reduce((a, b) => a + b, 0);
  // A Map from the server's {class: count} object.
  const countsOf = (object) => new Map(Object.entries(object && typeof object === 'object' ? object : {})
    .map(([name, n]) => [name, Number(n) || 0]));

  function lineEntry(r, name) {
    if (!r.lines.has(name)) r.lines.set(name, { points: '', in: new Map(), out: new Map() });
    return r.lines.get(name);
  }

  function zoneEntry(r, name) {
    if (!r.zones.has(name)) r.zones.set(name, { entries: new Map(), inside: new Set(), max: 0 });
    return r.zones.get(name);
  }

  // Tracks per class: the ids seen so far while the video runs, the server's totals after `end`.
  function noteTrack(r, cls, id) {
    if (id === null || r.trackTotals) return false;
    if (!r.tracks.has(cls)) r.tracks.set(cls, new Set());
    const ids = r.tracks.get(cls);
    if (ids.has(id)) return false;
    ids.add(id);
    return true;
  }

  function renderTracks(r) {
    const counts = r.trackTotals || new Map([...r.tracks.entries()].map(([cls, ids]) => [cls, ids.size]));
    renderCounts(counts, ui.trackCounts);
    if (r.trackTotals) ui.trackCounts.dataset.final = '1';
    else delete ui.trackCounts.dataset.final;
  }

  // "cat 1, dog 2": the per-class detail of a count.
  const byClass = (counts) => [...counts.entries()].sort((a, b) => a[0].localeCompare(b[0]))
    .map(([cls, n]) => `${cls} ${n}`).join(', ');

  function renderLines(r) {
    if (!r.lines.size) {
      const li = document.createElement('li');
      li.className = 'empty';
      li.textContent = 'No counting line was sent.';
      ui.lineCounts.replaceChildren(li);
    } else {
      ui.lineCounts.replaceChildren(...[...r.lines.entries()].map(([name, line]) => {
        const li = document.createElement('li');
        const into = total(line.in);
        const out = total(line.out);
        li.dataset.line = name;
        li.dataset.in = String(into);
        li.dataset.out = String(out);
        if (line.points) li.dataset.points = line.points;
        const label = document.createElement('span');
        label.className = 'name';
        label.textContent = name;
        li.append(label, `: ${into} in · ${out} out`);
        if (into || out) {
          const detail = document.createElement('span');
          detail.className = 'by-class';
          detail.textContent = [into ? `in: ${byClass(line.in)}` : '', out ? `out: ${byClass(line.out)}` : ''].filter(Boolean).join('; ');
          li.append(detail);
        }
        return li;
      }));
    }
    ui.zoneCounts.hidden = !r.zones.size;
    ui.zoneCounts.replaceChildren(...[...r.zones.entries()].map(([name, zone]) => {
      const li = document.createElement('li');
      const entries = total(zone.entries);
      li.dataset.zone = name;
      li.dataset.entries = String(entries);
      li.dataset.inside = String(zone.inside.size);
      const label = document.createElement('span');
      label.className = 'name';
      label.textContent = `zone ${name}`;
      const occupancy = r.complete ? `at most ${zone.max} inside at once` : `${zone.inside.size} inside now`;
      li.append(label, `: ${entries} entered · ${occupancy}`);
      if (entries) {
        const detail = document.createElement('span');
        detail.className = 'by-class';
        detail.textContent = byClass(zone.entries);
        li.append(detail);
      }
      return li;
    }));
  }

  // The totals of `end`, which also cover any crossing or zone event the page missed.
  function applyTotals(r, event) {
    if (event.tracks && typeof event.tracks === 'object') r.trackTotals = countsOf(event.tracks);
    if (Array.isArray(event.lines)) {
      for (const line of event.lines) {
        const entry = lineEntry(r, String(line.name));
        entry.in = countsOf(line.in);
        entry.out = countsOf(line.out);
      }
    }
    if (Array.isArray(event.zones)) {
      for (const zone of event.zones) {
        const entry = zoneEntry(r, String(zone.name));
        entry.entries = countsOf(zone.entries);
        entry.max = Number(zone.max_occupancy) || 0;
      }
    }
  }

  // An absolute URL as it is; a path from the server (e.g. /sessions/ID/video) through api(),
  // like every other request of the page.
  const serverUrl = (url) => (/^[a-z][a-z0-9+.-]*:/i.test(url) ? url : api(url.replace(/^\/+/, '')));

  // The annotated video of `end`: a link to it, or why there is none.
  function showAnnotated(r, video) {
    ui.annotated.replaceChildren();
    ui.annotated.classList.remove('failed');
    if (video && typeof video.url === 'string' && video.url) {
      const a = document.createElement('a');
      a.id = 'annotated-link';
      a.href = serverUrl(video.url);
      a.target = '_blank';
      a.rel = 'noopener';
      const bytes = Number(video.bytes);
      if (Number.isFinite(bytes)) a.dataset.bytes = String(bytes);
      a.textContent = `Annotated video (${fmtBytes(bytes)})`;
      ui.annotated.append(a);
    } else if (video && video.error) {
      ui.annotated.classList.add('failed');
      ui.annotated.textContent = `The server could not make the annotated video. Server says: ${video.error}`;
    } else if (r.annotate) {
      ui.annotated.classList.add('failed');
      ui.annotated.textContent = 'The server sent no annotated video.';
    } else {
      ui.annotated.hidden = true;
      return;
    }
    ui.annotated.hidden = false;
  }

  function showSummary(rows) {
    ui.summaryList.replaceChildren(...rows.flatMap(([key, label, value]) => {
      const dt = document.createElement('dt');
      dt.textContent = label;
      const dd = document.createElement('dd');
      dd.dataset.key = key;
      dd.textContent = value;
      if (key === 'sha256') dd.className = 'hash';
      return [dt, dd];
    }));
    ui.summary.hidden = false;
  }

  // --- Video -------------------------------------------------------------------------------

  function startVideo(file) {
    const r = newRun(file, 'video');
    run = r;
    let query;
    try {
      query = settingsQuery('video');
    } catch (err) {
      showError(err.message);
      finish(r, 'error', 'Nothing was sent: fix the settings and choose the file again.');
      return;
    }
    r.id = randomId();
    r.stride = Number(query.get('stride')) || 1;
    r.fpsLimit = Number(query.get('fps')) || 0;
    query.set('session', r.id);
    r.query = query;
    r.url = URL.createObjectURL(file);
    ui.cancel.hidden = false;
    if (lineTool.drawing) {
      setStatus('waiting', `Click two points on the video to place the counting line; then ${file.name} is sent.`);
    } else {
      setStatus('uploading', `Starting: ${file.name} (${fmtBytes(file.size)}).`);
    }
    playLocally(r);
    // A counting line is sent in this video's pixels, which the browser reads from the file in a
    // moment; if it does not, the line goes as drawn.
    if (lineTool.line) r.timers.push(setTimeout(() => { r.sizeWaitOver = true; maybeBegin(r); }, EVENTS_OPEN_WAIT_MS));
    maybeBegin(r);
  }

  // Starts the event stream and the upload once nothing holds them back: the user placing the
  // counting line on this video, or the browser reading the video's size for the line.
  function maybeBegin(r) {
    if (r !== run || r.finished || r.begun) return;
    if (lineTool.drawing && r.canPlay !== false) return;
    if (lineTool.line && r.canPlay === null && !r.sizeWaitOver) return;
    r.begun = true;
    connect(r);
  }

  function connect(r) {
    const query = r.query;
    if (lineTool.line) {
      const points = linePoints(lineTool.line, r.canPlay ? [ui.video.videoWidth, ui.video.videoHeight] : null);
      query.set('lines', `${LINE_NAME}:${points}`);
      lineEntry(r, LINE_NAME).points = points;
    }
    r.tracking = query.has('track') || query.has('lines');
    r.annotate = query.has('annotate');
    if (r.tracking) {
      renderLines(r);
      renderTracks(r);
      ui.tracking.hidden = false;
    }
    setStatus('uploading', `Starting: ${r.file.name} (${fmtBytes(r.file.size)}).`);
    if (r.canPlay !== false) {
      const playing = ui.video.play();
      if (playing) playing.catch(() => { /* autoplay refused or not playable: the controls remain */ });
    }

    // The event stream first (the server holds it until the upload starts), then the upload.
    // The id in the query too: proxies that hash on `?session=` alone (ingress-nginx's
    // upstream-hash-by) then send the watcher where they send the upload.
    const id = encodeURIComponent(r.id);
    const events = new EventSource(api(`sessions/${id}/events?session=${id}`));
    r.events = events;
    for (const type of ['start', 'frame', 'track', 'crossing', 'zone', 'end']) events.addEventListener(type, (e) => onMessage(r, e));
    events.addEventListener('error', (e) => {
      if (r !== run || r.finished) return;
      // An SSE message named `error` is the server's; a plain event is the connection's.
      if (typeof e.data === 'string') onMessage(r, e);
      else onStreamTrouble(r);
    });
    let uploading = false;
    const go = () => {
      if (uploading || r !== run || r.finished) return;
      uploading = true;
      uploadVideo(r, query);
    };
    events.addEventListener('open', () => {
      go();
      if (r === run && !r.finished && ui.status.dataset.state === 'reconnecting') setStatus('processing', 'Event stream back; processing.');
    });
    r.timers.push(setTimeout(go, EVENTS_OPEN_WAIT_MS));
  }

  // Shows the file in the <video> element; playback starts with the upload (connect).
  function playLocally(r) {
    ui.stage.hidden = false;
    ui.video.hidden = false;
    ui.image.hidden = true;
    const type = r.file.type;
    if (type && ui.video.canPlayType(type) === '') {
      cannotPlay(r, `it reports that it cannot play ${type} files`);
    }
    ui.video.muted = true;
    ui.video.src = r.url;
  }

  function cannotPlay(r, reason) {
    r.canPlay = false;
    ui.stage.hidden = true;
    ui.holdLine.hidden = true;
    updateLineTool();
    if (r.finished && r.framesProcessed === 0 && ui.status.dataset.state === 'error') return;
    showNotice(`This browser cannot play this video (${reason}), so the picture is not shown. ` +
      'The server still reads it: the detections are listed below by time as they arrive.');
    ui.detectionsNote.textContent = 'Each row is one box.';
    setSeekable(false);
    // A line cannot be placed on a picture the browser cannot show: the upload waits no longer.
    maybeBegin(r);
  }

  // Times in the list show their frame only while the video can play.
  function setSeekable(on) {
    for (const button of ui.detections.querySelectorAll('button.seek')) button.disabled = !on;
  }

  ui.video.addEventListener('error', () => {
    if (!run || run.kind !== 'video' || !ui.video.getAttribute('src')) return;
    const codes = { 1: 'loading was aborted', 2: 'a network error', 3: 'it could not decode the video', 4: 'the format or codec is not supported' };
    const error = ui.video.error;
    cannotPlay(run, (error && codes[error.code]) || 'unknown media error');
  });

  ui.video.addEventListener('loadedmetadata', () => {
    if (!run || run.kind !== 'video') return;
    if (ui.video.videoWidth === 0) {
      cannotPlay(run, 'it found no picture it can show');
      return;
    }
    run.canPlay = true;
    ui.stage.hidden = false;
    ui.holdLine.hidden = false;
    hideNotice();
    ui.detectionsNote.textContent = 'Each row is one box. Select a time to show that frame.';
    setSeekable(true);
    updateLineTool();
    maybeBegin(run);
  });

  // One upload with XMLHttpRequest, for its progress events, shared by videos and images: the
  // progress bar follows the bytes sent; an HTTP error status shows the server's reason and ends
  // the run with `refused`; otherwise the caller's handlers take the sent body, the answer and a
  // broken connection.
  function upload(r, path, file, refused, { onSent, onAnswer, onNetworkError }) {
    const xhr = new XMLHttpRequest();
    r.xhr = xhr;
    xhr.open('POST', api(path));
    xhr.upload.addEventListener('progress', (e) => {
      if (r === run && e.lengthComputable) setProgress(e.loaded, e.total);
    });
    xhr.upload.addEventListener('load', () => {
      if (r !== run) return;
      setProgress(file.size, file.size);
      onSent();
    });
    xhr.addEventListener('load', () => {
      if (r !== run || r.finished) return;
      if (xhr.status >= 400) {
        const { code, message } = parseErrorBody(xhr.responseText);
        showError(statusWords(xhr.status, code), message);
        finish(r, 'error', refused);
        return;
      }
      onAnswer(xhr.responseText);
    });
    xhr.addEventListener('error', () => {
      if (r !== run || r.finished) return;
      onNetworkError();
    });
    r.startedAt = performance.now();
    xhr.send(file);
  }

  const NETWORK_FAILURE = 'The upload failed: the server could not be reached or the connection broke off. The server may be down, or it may have refused the file (for example, because it is too large).';

  function uploadVideo(r, query) {
    setStatus('uploading', `Uploading ${r.file.name} (${fmtBytes(r.file.size)}); detections appear as frames are processed.`);
    upload(r, 'detect/video?' + query.toString(), r.file, 'Stopped: the server refused the upload.', {
      onSent: () => {
        ui.progressText.textContent = `Upload complete: ${fmtBytes(r.file.size)}.`;
        if (!r.finished) setStatus('processing', 'Upload complete; the server is finishing the last frames.');
      },
      onAnswer: (text) => {
        // The response carries the same events as the stream (NDJSON, line n = event n): it
        // fills in whatever the event stream missed.
        text.split('\n').forEach((line, seq) => {
          if (!line.trim() || r.finished) return;
          try {
            accept(r, seq, JSON.parse(line));
          } catch (_) { /* a partial line */ }
        });
        r.timers.push(setTimeout(() => {
          if (r !== run || r.finished) return;
          showError('The server closed the connection before it sent a summary.');
          finish(r, 'error', 'Stopped early.');
        }, GRACE_MS));
      },
      onNetworkError: () => {
        // A server that refuses the file early may close the connection mid-upload; its reason
        // usually comes on the event stream, so wait a moment for it.
        setStatus('processing', 'The upload connection closed; waiting for the server to say why…');
        r.timers.push(setTimeout(() => {
          if (r !== run || r.finished) return;
          showError(NETWORK_FAILURE);
          finish(r, 'error', 'Stopped: network failure.');
        }, GRACE_MS));
      },
    });
  }

  function onMessage(r, e) {
    if (r !== run || r.finished) return;
    let event;
    try {
      event = JSON.parse(e.data);
    } catch (_) {
      return;
    }
    const seq = e.lastEventId === '' ? NaN : Number(e.lastEventId);
    accept(r, seq, event);
  }

  function onStreamTrouble(r) {
    if (r.events.readyState === EventSource.CLOSED) {
      // The browser gave up on the stream; the upload's own response still brings the events
      // (if the upload has not started, its timer starts it).
      if (r.xhr) setStatus('processing', 'Lost the live event stream; the results will come when the upload finishes.');
    } else {
      setStatus('reconnecting', 'The event stream dropped; reconnecting…');
    }
  }

  // One event of the session, numbered `seq` (its position in the session; NaN if unknown).
  function accept(r, seq, event) {
    if (r.finished || !event || typeof event !== 'object') return;
    if (Number.isFinite(seq)) {
      if (seq <= r.lastSeq) return;
      r.lastSeq = seq;
    }
    switch (event.type) {
      case 'start': {
        r.media = event.media || null;
        const m = r.media || {};
        const bits = [m.codec, m.width && m.height ? `${m.width}×${m.height}` : '', m.fps ? `${Number(m.fps).toFixed(2).replace(/\.?0+$/, '')} fps` : ''].filter(Boolean);
        setStatus('processing', `Processing ${r.file.name}${bits.length ? ' (' + bits.join(', ') + ')' : ''}; detections appear as frames are processed.`);
        break;
      }
      case 'frame': {
        const detections = Array.isArray(event.detections) ? event.detections : [];
        const frame = { index: event.index, pts: Number(event.pts) || 0, detections };
        // Frames come in presentation order; keep the list sorted even if one does not.
        let at = r.frames.length;
        while (at > 0 && r.frames[at - 1].pts > frame.pts) at -= 1;
        r.frames.splice(at, 0, frame);
        r.framesProcessed += 1;
        ui.frames.textContent = `${r.framesProcessed} (up to ${frame.pts.toFixed(2)} s)`;
        ui.frames.dataset.count = String(r.framesProcessed);
        countDetections(r, detections);
        addRows(r, frame.pts, Number.isFinite(event.index) ? event.index : null, detections);
        break;
      }
      case 'end': {
        ui.frames.textContent = `${event.frames_processed} of ${event.frames_decoded} decoded`;
        ui.frames.dataset.count = String(event.frames_processed);
        if (r.firstDetectionMs === null) ui.ttfd.textContent = 'no detections';
        showSummary([
          ['frames_decoded', 'Frames decoded', String(event.frames_decoded)],
          ['frames_processed', 'Frames processed', String(event.frames_processed)],
          ['bytes', 'Bytes received', `${fmtBytes(event.bytes)} (${event.bytes})`],
          ['upload_seconds', 'Upload time', fmtSeconds(event.upload_seconds)],
          ['seconds', 'Total time', fmtSeconds(event.seconds)],
          ['sha256', 'SHA-256', String(event.sha256 || '')],
        ]);
        r.complete = true;
        if (r.tracking) {
          applyTotals(r, event);
          renderTracks(r);
          renderLines(r);
        }
        if (r.annotate || event.video) showAnnotated(r, event.video);
        finish(r, 'done', `Done: ${event.frames_processed} frames processed in ${fmtSeconds(event.seconds)}.`);
        break;
      }
      case 'track': {
        // A track ended; its boxes normally came first, but a frame the page missed is covered.
        if (noteTrack(r, String(event.class), trackId(event))) renderTracks(r);
        break;
      }
      case 'crossing': {
        const line = lineEntry(r, String(event.line));
        addTo(event.direction === 'in' ? line.in : line.out, String(event.class));
        renderLines(r);
        break;
      }
      case 'zone': {
        const zone = zoneEntry(r, String(event.zone));
        if (event.action === 'enter') {
          addTo(zone.entries, String(event.class));
          zone.inside.add(event.track_id);
          zone.max = Math.max(zone.max, zone.inside.size);
        } else {
          zone.inside.delete(event.track_id);
        }
        renderLines(r);
        break;
      }
      case 'error': {
        const code = String(event.code || '');
        showError(CODE_WORDS[code] || `The server reported an error (${code || 'unknown'}).`, String(event.message || ''));
        finish(r, 'error', r.framesProcessed ? 'Stopped: the detections so far are kept below.' : 'Stopped.');
        break;
      }
      default:
        break;
    }
  }

  // --- Image -------------------------------------------------------------------------------

  function startImage(file) {
    const r = newRun(file, 'image');
    run = r;
    let query;
    try {
      query = settingsQuery('image');
    } catch (err) {
      showError(err.message);
      finish(r, 'error', 'Nothing was sent: fix the settings and choose the file again.');
      return;
    }
    r.url = URL.createObjectURL(file);
    ui.stage.hidden = false;
    ui.video.hidden = true;
    ui.image.hidden = false;
    ui.image.src = r.url;
    ui.cancel.hidden = false;
    ui.detectionsNote.textContent = 'Each row is one box.';

    setStatus('uploading', `Uploading ${file.name} (${fmtBytes(file.size)})…`);
    upload(r, 'detect?' + query.toString(), file, 'Stopped: the server refused the image.', {
      onSent: () => {
        if (!r.finished) setStatus('processing', `Uploaded ${file.name}; the server is detecting…`);
      },
      onAnswer: (text) => {
        let result;
        try {
          result = JSON.parse(text);
        } catch (_) {
          showError('The server sent an answer this page cannot read.');
          finish(r, 'error', 'Stopped.');
          return;
        }
        const detections = Array.isArray(result.detections) ? result.detections : [];
        r.image = { width: Number(result.width) || 0, height: Number(result.height) || 0, detections };
        setProgress(file.size, file.size);
        ui.frames.textContent = '1 image';
        ui.frames.dataset.count = '1';
        countDetections(r, detections);
        if (!detections.length) ui.ttfd.textContent = 'no detections';
        addRows(r, null, null, detections);
        const seconds = (performance.now() - r.startedAt) / 1000;
        showSummary([
          ['size', 'Image size', `${r.image.width}×${r.image.height}`],
          ['detections', 'Boxes', String(detections.length)],
          ['seconds', 'Total time', fmtSeconds(seconds)],
        ]);
        finish(r, 'done', `Done: ${detections.length} ${detections.length === 1 ? 'box' : 'boxes'} in ${file.name}.`);
      },
      onNetworkError: () => {
        showError(NETWORK_FAILURE);
        finish(r, 'error', 'Stopped: network failure.');
      },
    });
  }

  ui.image.addEventListener('error', () => {
    if (!run || run.kind !== 'image' || !ui.image.getAttribute('src')) return;
    ui.stage.hidden = true;
    showNotice('This browser cannot show this image, so the boxes are not drawn; the detections are listed below.');
  });

  // --- Drawing -----------------------------------------------------------------------------

  const ctx = ui.overlay.getContext('2d');
  let lastDrawKey = '';

  function clearOverlay() {
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, ui.overlay.width, ui.overlay.height);
    ui.overlay.dataset.drawn = '0';
    delete ui.overlay.dataset.pts;
    lastDrawKey = '';
  }

  // The latest frame whose pts is at or before `t` (a millisecond of slack for rounding).
  function frameAt(frames, t) {
    let lo = 0;
    let hi = frames.length - 1;
    let found = null;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (frames[mid].pts <= t + 0.001) {
        found = frames[mid];
        lo = mid + 1;
      } else {
        hi = mid - 1;
      }
    }
    return found;
  }

  // The expected time between processed frames: measured once two have come, else from the
  // stream's frame rate and the stride or fps setting.
  function frameGap(r) {
    const n = r.frames.length;
    if (n >= 2) {
      const gap = r.frames[n - 1].pts - r.frames[n - 2].pts;
      if (gap > 0) return gap;
    }
    const fps = r.media && Number(r.media.fps) > 0 ? Number(r.media.fps) : 25;
    return Math.max(r.stride / fps, r.fpsLimit > 0 ? 1 / r.fpsLimit : 0);
  }

  // Up to where (seconds of video) the detections are known while the session still runs.
  function knownUntil(r) {
    if (!r.frames.length) return 0;
    return r.frames[r.frames.length - 1].pts + frameGap(r);
  }

  // With "keep in step" on, playback pauses where the processed frames end and resumes as they come.
  function holdPlayback() {
    const r = run;
    if (!r || r.kind !== 'video' || !r.canPlay) return;
    const v = ui.video;
    if (r.finished || !ui.hold.checked) {
      if (r.held) {
        r.held = false;
        const playing = v.play();
        if (playing) playing.catch(() => {});
      }
      return;
    }
    const edge = knownUntil(r);
    if (!r.held && !v.paused && !v.seeking && v.currentTime >= edge - 0.001) {
      r.held = true;
      v.pause();
    } else if (r.held && v.currentTime < edge - 0.001) {
      r.held = false;
      const playing = v.play();
      if (playing) playing.catch(() => {});
    }
  }

  ui.video.addEventListener('play', () => {
    // The user pressed play: the page no longer counts the pause as its own.
    if (run) run.held = false;
  });

  // What to draw now: the media element, the picture's own size, the boxes' pixel space, the boxes.
  function currentScene() {
    if (!run || ui.stage.hidden) return null;
    if (run.kind === 'video') {
      if (run.canPlay === false || ui.video.hidden || !ui.video.videoWidth) return null;
      const t = ui.video.currentTime;
      // Past the processed frames of an unfinished (or stopped) session nothing is known: draw no stale boxes.
      const frame = !run.complete && t >= knownUntil(run) - 0.001 ? null : frameAt(run.frames, t);
      // Boxes are in pixels of the displayed frame, which is what videoWidth x videoHeight measure.
      const w = ui.video.videoWidth;
      const h = ui.video.videoHeight;
      return { element: ui.video, naturalW: w, naturalH: h, boxW: w, boxH: h, frame };
    }
    if (!ui.image.complete || !ui.image.naturalWidth || !run.image) return null;
    return {
      element: ui.image,
      naturalW: ui.image.naturalWidth,
      naturalH: ui.image.naturalHeight,
      boxW: run.image.width || ui.image.naturalWidth,
      boxH: run.image.height || ui.image.naturalHeight,
      frame: { pts: null, index: null, detections: run.image.detections },
    };
  }

  function draw() {
    const scene = currentScene();
    if (!scene) {
      if (ui.overlay.dataset.drawn !== '0' || lastDrawKey) clearOverlay();
      return;
    }
    const el = scene.element;
    const cssW = el.clientWidth;
    const cssH = el.clientHeight;
    if (!cssW || !cssH) {
      if (lastDrawKey) clearOverlay();
      return;
    }
    const dpr = window.devicePixelRatio || 1;
    const showLine = el === ui.video && (lineTool.line || lineTool.first);
    const key = [cssW, cssH, el.offsetLeft, el.offsetTop, dpr, scene.naturalW, scene.naturalH, scene.boxW, scene.boxH,
      scene.frame ? `${scene.frame.pts}/${scene.frame.index}/${scene.frame.detections.length}` : 'none',
      showLine ? JSON.stringify([lineTool.line, lineTool.first]) : ''].join(',');
    if (key === lastDrawKey) return;
    lastDrawKey = key;

    // The canvas covers the media element's box, at device pixels.
    const canvas = ui.overlay;
    canvas.style.left = el.offsetLeft + 'px';
    canvas.style.top = el.offsetTop + 'px';
    canvas.style.width = cssW + 'px';
    canvas.style.height = cssH + 'px';
    const pxW = Math.max(1, Math.round(cssW * dpr));
    const pxH = Math.max(1, Math.round(cssH * dpr));
    if (canvas.width !== pxW) canvas.width = pxW;
    if (canvas.height !== pxH) canvas.height = pxH;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, pxW, pxH);
    ctx.setTransform(pxW / cssW || dpr, 0, 0, pxH / cssH || dpr, 0, 0);

    const shown = pictureRect(el, scene.naturalW, scene.naturalH);
    const sx = shown.w / scene.boxW;
    const sy = shown.h / scene.boxH;

    const detections = scene.frame ? scene.frame.detections : [];
    const trackIds = [];
    ctx.font = '600 13px system-ui, sans-serif';
    ctx.textBaseline = 'top';
    ctx.lineWidth = 2;
    for (const d of detections) {
      if (!Array.isArray(d.box) || d.box.length !== 4) continue;
      const [x1, y1, x2, y2] = d.box.map(Number);
      const x = shown.x + x1 * sx;
      const y = shown.y + y1 * sy;
      const w = (x2 - x1) * sx;
      const h = (y2 - y1) * sy;
      const id = trackId(d);
      if (id !== null) trackIds.push(id);
      const colour = id === null ? PALETTE[Math.abs(Number(d.class_id) || 0) % PALETTE.length] : trackColour(id);
      ctx.strokeStyle = colour;
      ctx.strokeRect(x, y, w, h);
      const label = `${d.class}${id === null ? '' : ` #${id}`} ${Math.round(Number(d.confidence) * 100)}%`;
      const textW = ctx.measureText(label).width + 8;
      const textH = 18;
      const labelY = y - textH >= 0 ? y - textH : y;
      const labelX = Math.min(Math.max(0, x - 1), Math.max(0, cssW - textW));
      ctx.fillStyle = colour;
      ctx.fillRect(labelX, labelY, textW, textH);
      ctx.fillStyle = '#ffffff';
      ctx.fillText(label, labelX + 4, labelY + 3);
    }
    if (showLine) drawLine(shown);
    canvas.dataset.drawn = String(detections.length);
    canvas.dataset.trackIds = trackIds.join(' ');
    if (scene.frame && scene.frame.pts !== null) canvas.dataset.pts = String(scene.frame.pts);
    else delete canvas.dataset.pts;
  }

  // Where the picture lies inside `el`'s box (object-fit: contain, centred), in CSS pixels.
  function pictureRect(el, naturalW, naturalH) {
    const scale = Math.min(el.clientWidth / naturalW, el.clientHeight / naturalH);
    const w = naturalW * scale;
    const h = naturalH * scale;
    return { x: (el.clientWidth - w) / 2, y: (el.clientHeight - h) / 2, w, h };
  }

  // A track's own colour, the same for its every box: hues a golden angle apart, dark enough for
  // white label text (contrast at least 4.5:1 at any hue).
  const trackColour = (id) => `hsl(${(id * 137.508) % 360}, 70%, 28%)`;

  // The counting line (or its first point while it is placed) over the picture `shown`. It is
  // kept as fractions of the picture it was drawn on, so it is drawn where it would be sent.
  // "in" marks the side that crossings into count as `in`: the right-hand side seen from the
  // first point towards the second.
  function drawLine(shown) {
    const line = lineTool.line;
    const at = (x, y, w, h) => [shown.x + (x / w) * shown.w, shown.y + (y / h) * shown.h];
    ctx.save();
    ctx.lineCap = 'round';
    if (lineTool.first) {
      const [x, y] = at(lineTool.first.x, lineTool.first.y, lineTool.first.w, lineTool.first.h);
      dot(x, y);
    } else if (line) {
      const [x1, y1] = at(line.x1, line.y1, line.w, line.h);
      const [x2, y2] = at(line.x2, line.y2, line.w, line.h);
      ctx.strokeStyle = '#000000';
      ctx.lineWidth = 5;
      ctx.beginPath();
      ctx.moveTo(x1, y1);
      ctx.lineTo(x2, y2);
      ctx.stroke();
      ctx.strokeStyle = '#ffd600';
      ctx.lineWidth = 3;
      ctx.stroke();
      dot(x1, y1);
      dot(x2, y2);
      const length = Math.hypot(x2 - x1, y2 - y1) || 1;
      const nx = -(y2 - y1) / length;
      const ny = (x2 - x1) / length;
      const mx = (x1 + x2) / 2;
      const my = (y1 + y2) / 2;
      ctx.font = '700 12px system-ui, sans-serif';
      ctx.textAlign = 'center';
      ctx.textBaseline = 'middle';
      for (const [word, sign] of [['in', 1], ['out', -1]]) {
        const lx = mx + sign * nx * 20;
        const ly = my + sign * ny * 20;
        const w = ctx.measureText(word).width + 8;
        ctx.fillStyle = '#000000';
        ctx.fillRect(lx - w / 2, ly - 9, w, 18);
        ctx.fillStyle = '#ffd600';
        ctx.fillText(word, lx, ly);
      }
    }
    ctx.restore();
  }

  function dot(x, y) {
    ctx.fillStyle = '#ffd600';
    ctx.strokeStyle = '#000000';
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.arc(x, y, 5, 0, 2 * Math.PI);
    ctx.fill();
    ctx.stroke();
  }

  // --- The counting line: placing it -------------------------------------------------------

  // The line in pixels of a video of `size` ([width, height]; null when unknown: as drawn), as
  // `lines=` takes it.
  function linePoints(line, size) {
    const sx = size ? size[0] / line.w : 1;
    const sy = size ? size[1] / line.h : 1;
    return [line.x1 * sx, line.y1 * sy, line.x2 * sx, line.y2 * sy].map((v) => Math.round(v)).join(',');
  }

  // A line can be placed while a video's picture is shown.
  const canDrawNow = () => Boolean(run && run.kind === 'video' && run.canPlay && !ui.stage.hidden && ui.video.videoWidth);

  // The buttons, the words under them and whether the overlay takes clicks, from lineTool.
  function updateLineTool() {
    const drawable = canDrawNow();
    ui.overlay.classList.toggle('drawing', lineTool.drawing && drawable);
    ui.drawLine.textContent = lineTool.drawing ? 'Stop drawing' : 'Draw a counting line';
    ui.drawLine.setAttribute('aria-pressed', String(lineTool.drawing));
    ui.clearLine.hidden = !lineTool.line;
    let words;
    if (lineTool.drawing && !drawable) {
      words = 'Choose a video: it is shown, paused, for you to click the line\'s two points; then it is sent.';
    } else if (lineTool.drawing) {
      words = lineTool.first ? 'Click the line\'s second point on the video.' : 'Click the line\'s first point on the video.';
      if (run.begun) words += ' The line goes with the next video you choose.';
    } else if (lineTool.line) {
      const [x1, y1, x2, y2] = linePoints(lineTool.line, null).split(',');
      words = `${LINE_NAME}: (${x1}, ${y1}) to (${x2}, ${y2}) on a ${lineTool.line.w}×${lineTool.line.h} picture, ` +
        'sent with each video until cleared. Crossings towards its "in" side count as in, the other way as out.';
    } else {
      words = 'No line: crossings are not counted.';
    }
    ui.lineInfo.textContent = words;
  }

  // A click on the overlay in video pixels, kept inside the picture.
  function videoPoint(e) {
    const box = ui.overlay.getBoundingClientRect();
    const w = ui.video.videoWidth;
    const h = ui.video.videoHeight;
    const shown = pictureRect(ui.video, w, h);
    const clamp = (v, max) => Math.min(max, Math.max(0, v));
    return {
      x: clamp(((e.clientX - box.left - shown.x) / shown.w) * w, w),
      y: clamp(((e.clientY - box.top - shown.y) / shown.h) * h, h),
      w,
      h,
    };
  }

  ui.overlay.addEventListener('click', (e) => {
    if (!lineTool.drawing || !canDrawNow()) return;
    e.preventDefault();
    const p = videoPoint(e);
    const first = lineTool.first;
    if (!first) {
      lineTool.first = p;
    } else {
      // A second click on (nearly) the same spot, such as a double click, places no line.
      if (Math.hypot(p.x - first.x, p.y - first.y) < 4) return;
      lineTool.line = { x1: first.x, y1: first.y, x2: p.x, y2: p.y, w: p.w, h: p.h };
      stopDrawing();
    }
    updateLineTool();
  });

  // Drawing ends (a line placed, drawing stopped or the line cleared): a video waiting for its
  // line is sent.
  function stopDrawing() {
    lineTool.drawing = false;
    lineTool.first = null;
    updateLineTool();
    if (run) maybeBegin(run);
  }

  ui.drawLine.addEventListener('click', () => {
    if (lineTool.drawing) {
      stopDrawing();
      return;
    }
    lineTool.drawing = true;
    lineTool.first = null;
    updateLineTool();
  });

  ui.clearLine.addEventListener('click', () => {
    lineTool.line = null;
    stopDrawing();
  });

  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && lineTool.drawing) stopDrawing();
  });

  function tick() {
    holdPlayback();
    draw();
    requestAnimationFrame(tick);
  }

  // --- Choosing a file ---------------------------------------------------------------------

  const IMAGE_NAME = /\.(jpe?g|png|webp)$/i;

  function chooseFile(file) {
    reset();
    if (!file) return;
    if (maxUploadBytes !== null && file.size > maxUploadBytes) {
      showError(`${CODE_WORDS.too_large} ${file.name} is ${fmtBytes(file.size)}; the limit is ${fmtBytes(maxUploadBytes)}.`);
      setStatus('error', 'Nothing was sent.');
      return;
    }
    if (file.type.startsWith('image/') || IMAGE_NAME.test(file.name)) startImage(file);
    else startVideo(file);
  }

  ui.file.addEventListener('change', () => {
    const file = ui.file.files && ui.file.files[0];
    if (file) chooseFile(file);
    // Cleared so that choosing the same file again starts again.
    ui.file.value = '';
  });

  ui.cancel.addEventListener('click', () => {
    if (!run || run.finished) return;
    const r = run;
    finish(r, 'stopped', 'Stopped by you. The detections so far are kept.');
    ui.file.focus();
  });

  // A file dropped anywhere on the page is taken; the browser would otherwise open it.
  const carriesFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes('Files');
  let dragDepth = 0;
  document.addEventListener('dragenter', (e) => {
    if (!carriesFiles(e)) return;
    dragDepth += 1;
    ui.drop.classList.add('active');
  });
  document.addEventListener('dragleave', (e) => {
    if (!carriesFiles(e)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) ui.drop.classList.remove('active');
  });
  document.addEventListener('dragover', (e) => {
    if (!carriesFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = 'copy';
  });
  document.addEventListener('drop', (e) => {
    if (!carriesFiles(e)) return;
    e.preventDefault();
    dragDepth = 0;
    ui.drop.classList.remove('active');
    const file = e.dataTransfer.files[0];
    if (file) chooseFile(file);
  });

  // A time in the list shows that frame (when the browser can play the video).
  ui.detections.addEventListener('click', (e) => {
    const button = e.target.closest('button.seek');
    if (!button || !run || run.kind !== 'video' || !run.canPlay) return;
    ui.video.pause();
    ui.video.currentTime = Number(button.dataset.pts);
  });

  for (const input of [ui.conf, ui.iou, ui.stride, ui.fps, ui.classes]) {
    input.addEventListener('input', () => { input.dataset.touched = '1'; });
  }
  ui.classes.addEventListener('input', suggestClasses);

  setStatus('idle');
  updateLineTool();
  loadHealth();
  requestAnimationFrame(tick);
})();
