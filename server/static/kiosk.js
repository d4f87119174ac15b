// The kiosk page: a Realtime API client in the browser (no build step, nothing from the internet).
//
// Microphone -> "capture" AudioWorklet (24 kHz, 100 ms blocks) -> input_audio_buffer.append;
// response.output_audio.delta -> "player" AudioWorklet (gapless queue). Hands-free uses the
// server's VAD (it commits and answers by itself, and cancels the answer on barge-in);
// push-to-talk turns the server VAD off and commits on release. A token for a server started
// with --token goes in the page's fragment: https://host:8765/#token=SECRET (never sent in URLs).
"use strict";

const RATE = 24000;
const fragment = new URLSearchParams(location.hash.slice(1));
const token = fragment.get("token");

const $ = (id) => document.getElementById(id);
const ui = {
  connection: $("connection"), state: $("state"), level: $("level"), message: $("message"),
  start: $("start"), talk: $("talk"), stop: $("stop"), transcript: $("transcript"), turns: $("turns"),
  mode: $("mode"), voice: $("voice"), modality: $("modality"), temperature: $("temperature"),
  temperatureValue: $("temperature-value"), latency: $("latency"),
};

// What a test (or a curious operator) can read: window.kiosk.states, .turns, .played
const kiosk = { states: [], turns: [], played: 0, errors: [] };
window.kiosk = kiosk;

let ws = null;
let reconnectDelay = 500;
let audioContext = null;
let playerNode = null;
let micStream = null;
let running = false; // the user pressed Start and the microphone is open
let talking = false; // push-to-talk held
let awaiting = false; // the user's turn ended; no answer yet
let playing = false; // the player has queued audio
let response = null; // the answer in progress
let turnEndedAt = null;
let messageTimer = null;

// ----------------------------------------------------------------------------- state

function currentState() {
  if (!ws || ws.readyState !== WebSocket.OPEN) return "offline";
  if (!running) return "idle";
  if (playing) return "speaking";
  if (awaiting || response) return "thinking";
  return "listening";
}

function update() {
  const state = currentState();
  if (ui.state.textContent !== state) {
    ui.state.textContent = state;
    ui.state.className = `state state-${state}`;
    kiosk.states.push(state);
  }
  ui.stop.disabled = !(response || playing);
  ui.talk.hidden = ui.mode.value !== "push-to-talk" || !running;
  ui.start.textContent = running ? "Stop" : "Start";
}

function showMessage(text, sticky = false) {
  clearTimeout(messageTimer);
  ui.message.textContent = text;
  ui.message.hidden = !text;
  if (text && !sticky) messageTimer = setTimeout(() => showMessage(""), 6000);
}

function setConnection(text, ok) {
  ui.connection.textContent = text;
  ui.connection.className = `connection ${ok ? "ok" : "bad"}`;
}

// ----------------------------------------------------------------------------- server

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

function sessionUpdate() {
  const handsFree = ui.mode.value === "hands-free";
  send({
    type: "session.update",
    session: {
      type: "realtime",
      output_modalities: ui.modality.value.split(","),
      temperature: Number(ui.temperature.value),
      audio: {
        input: {
          format: { type: "audio/pcm", rate: RATE },
          turn_detection: handsFree ? { type: "server_vad", create_response: true, interrupt_response: true } : null,
        },
        output: { format: { type: "audio/pcm", rate: RATE }, voice: ui.voice.value },
      },
    },
  });
}

function connect() {
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime`;
  const protocols = token ? ["realtime", `openai-insecure-api-key.${token}`] : ["realtime"];
  setConnection("connecting…", false);
  ws = new WebSocket(url, protocols);
  let opened = false;
  ws.onopen = () => {
    opened = true;
    reconnectDelay = 500;
    setConnection("connected", true);
    showMessage("");
    sessionUpdate();
    update();
  };
  ws.onmessage = (message) => handle(JSON.parse(message.data));
  ws.onclose = (event) => {
    response = null;
    awaiting = false;
    clearPlayer();
    const seconds = (reconnectDelay / 1000).toFixed(1);
    if (!opened) {
      showMessage(`Cannot reach the server${token ? "" : " (if it needs a token, open this page as /#token=SECRET)"}; ` +
                  `retrying in ${seconds} s.`, true);
    } else {
      showMessage(`The server went away (code ${event.code}${event.reason ? ": " + event.reason : ""}); ` +
                  `reconnecting in ${seconds} s.`, true);
    }
    setConnection("disconnected", false);
    setTimeout(connect, reconnectDelay);
    reconnectDelay = Math.min(reconnectDelay * 2, 10000);
    update();
  };
}

function handle(event) {
  switch (event.type) {
    case "input_audio_buffer.speech_started":
      if (response || playing) bargeIn();
      addLine("user", "…");
      break;
    case "input_audio_buffer.speech_stopped":
      turnEndedAt = performance.now();
      awaiting = true;
      break;
    case "input_audio_buffer.committed":
      awaiting = true;
      if (turnEndedAt === null) turnEndedAt = performance.now();
      setLastUserLine("(spoken)");
      break;
    case "conversation.item.added": {
      const item = event.item;
      if (item.role === "user" && item.content.some((c) => c.type === "input_text")) {
        addLine("user", item.content.map((c) => c.text || "").join(" "));
      }
      break;
    }
    case "response.created":
      awaiting = false;
      response = {
        id: event.response.id, itemId: null, firstAudio: null, startedAt: turnEndedAt ?? performance.now(),
        line: addLine("assistant", ""), played: 0,
      };
      if (playerNode) playerNode.port.postMessage({ type: "reset" });
      turnEndedAt = null;
      break;
    case "response.output_item.added":
      if (response) response.itemId = event.item.id;
      break;
    case "response.output_audio.delta":
      if (!response) break;
      if (response.firstAudio === null) {
        response.firstAudio = performance.now() - response.startedAt;
        ui.latency.textContent = `first audio after ${Math.round(response.firstAudio)} ms`;
      }
      play(decodePcm16(event.delta));
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      if (response) response.line.querySelector(".text").textContent += event.delta;
      break;
    case "response.done":
      finishTurn(event.response);
      break;
    case "error":
      kiosk.errors.push(event.error);
      showMessage(`Server: ${event.error.message}`);
      break;
    default:
      break;
  }
  update();
}

function finishTurn(done) {
  if (!response) return;
  const turn = {
    n: kiosk.turns.length + 1,
    status: done.status,
    firstAudioMs: response.firstAudio === null ? null : Math.round(response.firstAudio),
    totalMs: Math.round(performance.now() - response.startedAt),
    serverFirstAudioMs: done.spiritlm ? done.spiritlm.first_audio_ms : null,
  };
  kiosk.turns.push(turn);
  const row = document.createElement("tr");
  const first = turn.firstAudioMs === null ? "–" : `${turn.firstAudioMs} ms`;
  const status = done.status === "cancelled" ? " (interrupted)" : "";
  row.innerHTML = `<td>${turn.n}</td><td class="first-audio">${first}</td><td>${(turn.totalMs / 1000).toFixed(1)} s${status}</td>`;
  ui.turns.prepend(row);
  if (done.status === "cancelled") response.line.querySelector(".who").textContent = "Spirit LM (interrupted)";
  response = null;
}

function bargeIn() {
  // The server cancels its answer itself (interrupt_response); here the speaker goes quiet
  // at once and the server learns how much of the answer was heard.
  if (response && response.itemId && response.played > 0) {
    send({ type: "conversation.item.truncate", item_id: response.itemId, content_index: 0,
           audio_end_ms: Math.round((response.played / RATE) * 1000) });
  }
  clearPlayer();
}

// ----------------------------------------------------------------------------- transcript

function addLine(who, text) {
  const li = document.createElement("li");
  li.className = who;
  li.innerHTML = `<span class="who">${who === "user" ? "You" : "Spirit LM"}</span><span class="text"></span>`;
  li.querySelector(".text").textContent = text;
  ui.transcript.append(li);
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  return li;
}

function setLastUserLine(text) {
  const lines = ui.transcript.querySelectorAll("li.user .text");
  const last = lines[lines.length - 1];
  if (last && last.textContent === "…") last.textContent = text;
  else addLine("user", text);
}

// ----------------------------------------------------------------------------- audio

function decodePcm16(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
  const out = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
  return out;
}

function encodePcm16(samples) {
  const pcm = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const x = Math.max(-1, Math.min(1, samples[i]));
    pcm[i] = x < 0 ? x * 32768 : x * 32767;
  }
  const bytes = new Uint8Array(pcm.buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function play(samples) {
  if (!playerNode) return;
  playerNode.port.postMessage({ type: "chunk", samples }, [samples.buffer]);
  playing = true;
}

function clearPlayer() {
  if (playerNode) playerNode.port.postMessage({ type: "clear" });
  playing = false;
}

function onMicBlock({ samples, rms }) {
  ui.level.style.width = `${Math.min(100, Math.round(rms * 400))}%`;
  const handsFree = ui.mode.value === "hands-free";
  if (handsFree || talking) send({ type: "input_audio_buffer.append", audio: encodePcm16(samples) });
}

async function start() {
  try {
    audioContext = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
    await audioContext.audioWorklet.addModule("/static/worklets.js");
    micStream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
  } catch (error) {
    const refused = error && (error.name === "NotAllowedError" || error.name === "SecurityError");
    const missing = error && error.name === "NotFoundError";
    showMessage(refused ? "The microphone was refused. Allow it for this page (the lock icon in the address bar), " +
                          "then press Start again. Browsers only offer it on https:// or localhost pages."
              : missing ? "No microphone was found. Plug one in and press Start again."
              : `Audio could not start: ${error}`, true);
    if (audioContext) audioContext.close();
    audioContext = null;
    return;
  }
  const source = audioContext.createMediaStreamSource(micStream);
  const capture = new AudioWorkletNode(audioContext, "capture", { processorOptions: { blockSize: RATE / 10 } });
  capture.port.onmessage = (event) => onMicBlock(event.data);
  const mute = audioContext.createGain();
  mute.gain.value = 0;
  source.connect(capture).connect(mute).connect(audioContext.destination); // keeps the capture node pulled
  playerNode = new AudioWorkletNode(audioContext, "player", { outputChannelCount: [1] });
  playerNode.port.onmessage = (event) => {
    const { played, playing: queued } = event.data;
    if (response) response.played = played;
    kiosk.played = Math.max(kiosk.played, played);
    if (playing !== queued) {
      playing = queued;
      update();
    }
  };
  playerNode.connect(audioContext.destination);
  await audioContext.resume();
  running = true;
  showMessage("");
  update();
}

function stop() {
  running = false;
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  if (audioContext) audioContext.close();
  audioContext = playerNode = micStream = null;
  if (response) send({ type: "response.cancel" });
  playing = false;
  update();
}

// ----------------------------------------------------------------------------- controls

ui.start.addEventListener("click", () => (running ? stop() : start()));
ui.stop.addEventListener("click", () => {
  if (response) send({ type: "response.cancel" });
  clearPlayer();
  update();
});

function talkDown(event) {
  event.preventDefault();
  if (talking) return;
  talking = true;
  ui.talk.classList.add("pressed");
  if (response) send({ type: "response.cancel" });
  clearPlayer();
  send({ type: "input_audio_buffer.clear" });
  addLine("user", "…");
}

function talkUp() {
  if (!talking) return;
  talking = false;
  ui.talk.classList.remove("pressed");
  turnEndedAt = performance.now();
  send({ type: "input_audio_buffer.commit" });
  send({ type: "response.create" });
  awaiting = true;
  update();
}

ui.talk.addEventListener("pointerdown", talkDown);
ui.talk.addEventListener("pointerup", talkUp);
ui.talk.addEventListener("pointerleave", talkUp);
ui.talk.addEventListener("pointercancel", talkUp);

for (const control of [ui.mode, ui.voice, ui.modality]) control.addEventListener("change", () => { sessionUpdate(); update(); });
ui.temperature.addEventListener("input", () => (ui.temperatureValue.textContent = ui.temperature.value));
ui.temperature.addEventListener("change", sessionUpdate);

connect();
update();
