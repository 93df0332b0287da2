// EdgeTalk serve: the page. Plain JS, no build step, nothing loaded from outside this server.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const MAX_TRACE = 60000;
  const state = {
    pc: null, mic: null, id: null, secret: null, avatar: "default", timer: null, audioCtx: null,
    startedAt: null, firstFrameAt: null, shown: [], interruptions: 0,
  };
  // Receiving-end timing, kept for measurements (performance.now() milliseconds):
  // video: [expectedDisplayTime, rtpTimestamp, presentedFrames, mediaTime]
  // audio: [time the block is heard, rms]; sync: [now, audio, video estimatedPlayoutTimestamp]
  const trace = { video: [], audio: [], sync: [] };
  const api = { state, trace, stats: null, browser: {}, lastError: "" };
  window.edgetalk = api;

  // The token travels only in a header. It comes from the URL's #token= fragment (browsers never
  // send a fragment to a server), an old-style ?token= link, or the token box; it is kept for
  // this tab only, and taken out of the address bar at once (history, screenshots, Referer).
  const fromUrl = new URLSearchParams(location.hash.slice(1)).get("token") ||
    new URLSearchParams(location.search).get("token");
  if (fromUrl) {
    sessionStorage.setItem("edgetalk-token", fromUrl);
    history.replaceState(null, "", location.pathname);
  }
  $("token").value = sessionStorage.getItem("edgetalk-token") || "";
  const token = () => $("token").value.trim();
  const headers = (extra = {}) => ({ "X-EdgeTalk-Token": token(), ...extra });
  // Stats, interrupt and close need the session's own secret (returned with the answer).
  const sessionHeaders = () => headers({ "X-EdgeTalk-Session": state.secret || "" });

  function setStatus(text, error = false) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("error", error);
    if (error) api.lastError = text;
  }

  async function call(path, options = {}) {
    const res = await fetch(path, { ...options, headers: headers(options.headers || {}) });
    let data = {};
    try { data = await res.json(); } catch (e) { /* not JSON */ }
    if (!res.ok) {
      const err = new Error(data.error || `${res.status} ${res.statusText}`);
      err.status = res.status;
      err.busy = !!data.busy;
      if (data.token_required) $("token-box").hidden = false;
      throw err;
    }
    return data;
  }

  // ---- avatar ----------------------------------------------------------------------------------
  async function showDefaultAvatar() {
    try {
      const res = await fetch("/api/avatar/default.png", { headers: headers() });
      if (!res.ok) return;
      const img = $("avatar-preview");
      if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
      img.src = URL.createObjectURL(await res.blob());
    } catch (e) { /* the preview is only a picture */ }
  }

  async function uploadPhoto(file) {
    const msg = $("avatar-msg");
    msg.textContent = `checking ${file.name}…`;
    msg.classList.remove("error");
    try {
      const data = await call("/api/avatar", {
        method: "POST",
        headers: { "Content-Type": file.type || "application/octet-stream",
                   "X-Filename": encodeURIComponent(file.name) },
        body: file,
      });
      state.avatar = data.id;
      $("avatar-upload").checked = true;
      $("avatar-preview").src = data.preview;
      msg.textContent = `face found in ${data.name}`;
    } catch (e) {
      state.avatar = "default";
      $("avatar-default").checked = true;
      showDefaultAvatar();
      msg.textContent = e.message;
      msg.classList.add("error");
      api.lastError = e.message;
    }
  }

  $("photo").addEventListener("change", (ev) => {
    const file = ev.target.files[0];
    if (file) uploadPhoto(file);
  });
  $("avatar-default").addEventListener("change", () => {
    state.avatar = "default";
    showDefaultAvatar();
  });
  $("avatar-upload").addEventListener("change", () => {
    if (state.avatar === "default") $("photo").click();
  });

  // ---- session ---------------------------------------------------------------------------------
  function iceComplete(pc, timeoutMs) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        if (pc.iceGatheringState === "complete") { clearTimeout(t); resolve(); }
      };
      const t = setTimeout(resolve, timeoutMs);
      pc.addEventListener("icegatheringstatechange", done);
    });
  }

  async function start() {
    if (state.pc) return;
    if (!window.isSecureContext || !navigator.mediaDevices) {
      setStatus("The microphone needs a secure page: open it as http://127.0.0.1:PORT/ " +
                "(or localhost), or serve https with --cert/--key.", true);
      return;
    }
    $("start").disabled = true;
    state.startedAt = performance.now();
    state.firstFrameAt = null;
    state.shown = [];
    setStatus("Asking for the microphone…");
    try {
      state.mic = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true,
                 channelCount: 1 },
        video: false,
      });
    } catch (e) {
      setStatus(`No microphone: ${e.message}`, true);
      $("start").disabled = false;
      return;
    }
    const pc = new RTCPeerConnection({ iceServers: [] });
    state.pc = pc;
    const video = $("video");
    pc.ontrack = (ev) => {
      const stream = ev.streams[0] || new MediaStream([ev.track]);
      if (video.srcObject !== stream) video.srcObject = stream;
      if (ev.track.kind === "audio") startMeter(ev.track);
      video.play().catch(() => {});
    };
    pc.onconnectionstatechange = () => {
      $("st-state").textContent = pc.connectionState;
      if (pc.connectionState === "connected") setStatus("Live: speak, and the avatar talks.");
      if (pc.connectionState === "disconnected") setStatus("Connection interrupted…");
      if (pc.connectionState === "failed") stop("The connection failed.", true);
    };
    for (const t of state.mic.getAudioTracks()) pc.addTrack(t, state.mic);
    pc.addTransceiver("video", { direction: "recvonly" });
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await iceComplete(pc, 3000);
      setStatus("Starting the avatar…");
      const answer = await call("/offer", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer",
                               avatar: state.avatar }),
      });
      if (state.pc !== pc) { // stopped meanwhile: free the session it just got
        fetch(`/api/close?id=${encodeURIComponent(answer.id)}`, {
          method: "POST", headers: headers({ "X-EdgeTalk-Session": answer.secret }),
        }).catch(() => {});
        return;
      }
      state.id = answer.id;
      state.secret = answer.secret;
      await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    } catch (e) {
      stop(e.busy ? e.message : `Could not start: ${e.message}`, true);
      return;
    }
    $("stop").disabled = false;
    $("interrupt").disabled = false;
    if ("requestVideoFrameCallback" in video) video.requestVideoFrameCallback(onFrame);
    state.timer = setInterval(pollStats, 500);
  }

  function onFrame(now, meta) {
    const video = $("video");
    if (state.firstFrameAt === null) {
      state.firstFrameAt = performance.now();
      $("st-browser-ffd").textContent =
        `${((state.firstFrameAt - state.startedAt) / 1000).toFixed(2)} s`;
    }
    if (trace.video.length < MAX_TRACE) {
      trace.video.push([meta.expectedDisplayTime, meta.rtpTimestamp ?? null,
                        meta.presentedFrames, meta.mediaTime]);
    }
    state.shown.push(now);
    while (state.shown.length && now - state.shown[0] > 2000) state.shown.shift();
    if (state.pc) video.requestVideoFrameCallback(onFrame);
  }

  async function startMeter(track) {
    try {
      const ctx = new AudioContext();
      state.audioCtx = ctx;
      await ctx.audioWorklet.addModule("/static/meter-worklet.js");
      const src = ctx.createMediaStreamSource(new MediaStream([track]));
      const node = new AudioWorkletNode(ctx, "edgetalk-meter");
      const mute = ctx.createGain();
      mute.gain.value = 0; // the video element plays the sound; this only measures it
      src.connect(node);
      node.connect(mute);
      mute.connect(ctx.destination);
      node.port.onmessage = (ev) => {
        const ts = ctx.getOutputTimestamp();
        const b = ev.data;
        for (let i = 0; i < b.length && trace.audio.length < MAX_TRACE; i += 2) {
          const heard = ts.performanceTime + (b[i] / ctx.sampleRate - ts.contextTime) * 1000;
          trace.audio.push([heard, b[i + 1]]);
        }
      };
      await ctx.resume();
    } catch (e) {
      console.warn("audio meter unavailable:", e);
    }
  }

  const fmt = (x, digits = 1) => (x === null || x === undefined ? "-" : Number(x).toFixed(digits));

  async function pollStats() {
    const pc = state.pc;
    if (!state.id || !pc) return;
    try {
      const s = await call(`/api/stats?id=${encodeURIComponent(state.id)}`,
                           { headers: { "X-EdgeTalk-Session": state.secret } });
      api.stats = s;
      $("st-backend").textContent = s.backend;
      $("st-fps").textContent = fmt(s.fps_recent);
      $("st-fps-avg").textContent = fmt(s.fps);
      $("st-ffd").textContent = s.first_frame_delay_s === null ? "-" :
        `${Math.round(s.first_frame_delay_s * 1000)} ms (floor ${Math.round(s.floor_s * 1000)} ms)`;
      $("st-misses").textContent =
        `${s.deadline_misses} (${fmt(100 * s.deadline_miss_share)} %)`;
      $("st-late").textContent = `${s.late} / ${s.dropped}`;
      $("st-interruptions").textContent = String(s.interruptions);
      $("st-frames").textContent = String(s.frames);
      $("st-mic").textContent = `${fmt(s.mic_seconds)} s (level ${fmt(s.mic_rms, 3)}, session ${fmt(s.mic_rms_session, 3)})`;
      if (s.closed) {
        stop(`The session ended: ${s.error || s.close_reason}`, !!s.error);
        return;
      }
    } catch (e) {
      if (e.status === 404) { stop("The session ended on the server.", true); return; }
    }
    try {
      const report = await pc.getStats();
      let audioEpt = null;
      let videoEpt = null;
      report.forEach((r) => {
        if (r.type !== "inbound-rtp") return;
        if (r.kind === "video") {
          api.browser = { framesPerSecond: r.framesPerSecond ?? null,
                          framesDecoded: r.framesDecoded, framesDropped: r.framesDropped,
                          jitterBufferDelay: r.jitterBufferDelay,
                          jitterBufferEmittedCount: r.jitterBufferEmittedCount };
          videoEpt = r.estimatedPlayoutTimestamp ?? null;
        } else if (r.kind === "audio") {
          audioEpt = r.estimatedPlayoutTimestamp ?? null;
        }
      });
      if (trace.sync.length < MAX_TRACE) trace.sync.push([performance.now(), audioEpt, videoEpt]);
      const n = state.shown.length;
      const fps = n > 2 ? (n - 1) * 1000 / (state.shown[n - 1] - state.shown[0]) : 0;
      api.browser.shownFps = fps;
      $("st-browser-fps").textContent = fmt(fps);
    } catch (e) { /* closed meanwhile */ }
  }

  async function interrupt() {
    if (!state.id) return;
    try {
      const s = await call("/api/interrupt", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-EdgeTalk-Session": state.secret },
        body: JSON.stringify({ id: state.id }),
      });
      $("st-interruptions").textContent = String(s.interruptions);
      setStatus(`Interrupted (${s.discarded_frames} queued frames dropped).`);
    } catch (e) {
      setStatus(`Interrupt failed: ${e.message}`, true);
    }
  }

  function stop(message = "Stopped.", error = false) {
    clearInterval(state.timer);
    state.timer = null;
    const id = state.id;
    const closeHeaders = sessionHeaders();
    state.id = null;
    state.secret = null;
    if (id) {
      fetch(`/api/close?id=${encodeURIComponent(id)}`,
            { method: "POST", headers: closeHeaders, keepalive: true }).catch(() => {});
    }
    if (state.pc) state.pc.close();
    state.pc = null;
    if (state.mic) state.mic.getTracks().forEach((t) => t.stop());
    state.mic = null;
    if (state.audioCtx) state.audioCtx.close().catch(() => {});
    state.audioCtx = null;
    $("video").srcObject = null;
    $("start").disabled = false;
    $("stop").disabled = true;
    $("interrupt").disabled = true;
    $("st-state").textContent = "closed";
    setStatus(message, error);
  }

  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", () => stop());
  $("interrupt").addEventListener("click", interrupt);
  // A closed tab frees its session at once (the server also notices the connection closing).
  // A keepalive fetch (unlike sendBeacon) can carry the token and session headers.
  window.addEventListener("pagehide", () => {
    if (state.id) {
      fetch(`/api/close?id=${encodeURIComponent(state.id)}`,
            { method: "POST", headers: sessionHeaders(), keepalive: true }).catch(() => {});
    }
  });

  (async () => {
    try {
      const cfg = await (await fetch("/api/config", { headers: headers() })).json();
      if (cfg.token_required && !cfg.backend) {
        $("token-box").hidden = false;
        setStatus("This server needs its access token: type it above, or open the page as " +
                  `${location.origin}/#token=YOUR_TOKEN.`, true);
        $("token").addEventListener("change", () => {
          sessionStorage.setItem("edgetalk-token", token());
          location.reload();
        });
        return;
      }
      $("st-backend").textContent = cfg.backend;
      showDefaultAvatar();
      setStatus(`Ready (${cfg.active}/${cfg.max_sessions} sessions in use). ` +
                "Start asks for the microphone.");
    } catch (e) {
      setStatus(`The server does not answer: ${e.message}`, true);
    }
  })();
})();
