// The captioner's page: choose a model, and drop, paste or click an example image that fits it;
// caption it; point at a word to see where the model looked when it said it. Plain JavaScript,
// no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("caption-form");
const input = $("image-input");
const dropZone = $("drop-zone");
const stage = $("stage");
const preview = $("preview");
const overlay = $("overlay");
const mode = $("mode");
const submit = $("submit");
const statusLine = $("status");
const errorLine = $("error");
const result = $("result");
const captionList = $("captions");
const conceptLine = $("concepts");
const staleNote = $("stale-note");
const readout = $("word-readout");
const fileName = $("file-name");
const modelChoice = $("model-choice");

const MB = 1024 * 1024;
const touch = window.matchMedia("(pointer: coarse)").matches;
// What the service accepts, until /v1/model says otherwise.
let limits = { max_bytes: 16 * MB, formats: ["JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"] };
let chosen = null; // { file, type }: the image to caption and its sniffed content type
let answer = null; // the last captions answer shown
let pinned = null; // the word a tap or click fixed on the image: [caption, word]
let previewUrl = null;
let models = []; // /v1/models: each model the service serves, the default first
let model = null; // the chosen one's entry

// --- choosing an image ---------------------------------------------------------------------

// The first bytes of each accepted format (what the service checks too).
const SIGNATURES = [
  ["JPEG", "image/jpeg", [0xff, 0xd8, 0xff]],
  ["PNG", "image/png", [0x89, 0x50, 0x4e, 0x47]],
  ["GIF", "image/gif", [0x47, 0x49, 0x46, 0x38]],
  ["BMP", "image/bmp", [0x42, 0x4d]],
  ["TIFF", "image/tiff", [0x49, 0x49, 0x2a, 0x00]],
  ["TIFF", "image/tiff", [0x4d, 0x4d, 0x00, 0x2a]],
];

async function sniff(file) {
  const head = new Uint8Array(await file.slice(0, 12).arrayBuffer());
  const text = String.fromCharCode(...head);
  if (text.startsWith("RIFF") && text.slice(8, 12) === "WEBP") return "image/webp";
  for (const [name, type, bytes] of SIGNATURES) {
    if (limits.formats.includes(name) && bytes.every((b, i) => head[i] === b)) return type;
  }
  return null;
}

function megabytes(bytes) {
  if (bytes < MB) return `${Math.max(1, Math.round(bytes / 1024))} KB`;
  const mb = bytes / MB;
  return `${mb >= 10 || Number.isInteger(mb) ? Math.round(mb) : mb.toFixed(1)} MB`;
}

function formatList() {
  const names = limits.formats;
  return `${names.slice(0, -1).join(", ")} or ${names[names.length - 1]}`;
}

// Why the service would refuse this file, or null: checked here, before uploading it.
async function refusal(file) {
  if (file.size > limits.max_bytes) {
    return `${file.name} is ${megabytes(file.size)}; the service accepts images up to ${megabytes(limits.max_bytes)}.`;
  }
  if (file.size === 0) return `${file.name} is empty.`;
  if (!(await sniff(file))) return `${file.name} is not an image the service reads (${formatList()}).`;
  return null;
}

// Everything that described the previous image or answer goes.
function clearAnswer() {
  answer = null;
  pinned = null;
  captionList.replaceChildren();
  captionList.classList.remove("stale");
  result.hidden = true;
  document.querySelector("main").classList.remove("answered");
  staleNote.hidden = true;
  statusLine.textContent = "";
  errorLine.hidden = true;
  readout.textContent = "";
  clearOverlay();
}

async function choose(file) {
  if (!file) return; // a cancelled dialog changes nothing: the current image stays
  clearAnswer();
  const why = await refusal(file);
  if (why) {
    chosen = null;
    stage.hidden = true;
    fileName.textContent = "";
    submit.disabled = true;
    showError(why);
    return;
  }
  chosen = { file, type: await sniff(file) };
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  preview.src = previewUrl;
  stage.hidden = false;
  fileName.textContent = `${file.name} · ${megabytes(file.size)}`;
  submit.disabled = false;
}

function showError(message) {
  errorLine.textContent = message;
  errorLine.hidden = false;
}

// --- asking for captions -------------------------------------------------------------------

function requestQuery() {
  const query = new URLSearchParams();
  for (const field of form.querySelectorAll("fieldset input, fieldset select")) {
    if (!field.closest("label").hidden && field.value !== "") query.append(field.name, field.value);
  }
  // The model's default decoding may set options the form has no field for (re-ranking): sent
  // with its own mode only, where they apply.
  const chosen = model && model.default_decoding;
  if (chosen && chosen.mode === mode.value) {
    for (const [name, value] of Object.entries(chosen)) {
      if (value === null || name === "explain" || form.elements.namedItem(name)) continue;
      query.append(name, typeof value === "boolean" ? (value ? "1" : "0") : String(value));
    }
  }
  query.append("explain", "1");
  if (model) query.append("model", model.name);
  return query;
}

// --- the API key, when the service wants one ------------------------------------------------
// Asked once, kept in this tab's session storage only (never in local storage or a cookie), sent
// as "Authorization: Bearer KEY". A key the service refuses is forgotten and asked for again.

const KEY_ITEM = "captioner-api-key";
const keyForm = $("key-form");

function withKey(headers = {}) {
  const key = sessionStorage.getItem(KEY_ITEM);
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

function askForKey(refused) {
  $("key-why").textContent = refused
    ? "The service refused this key. Check it and enter it again."
    : "This service needs an API key.";
  keyForm.hidden = false;
  $("api-key").focus();
}

// fetch with the key; a 401 asks for one (saying whether the one sent was refused).
async function apiFetch(url, options = {}) {
  const sent = sessionStorage.getItem(KEY_ITEM);
  const response = await fetch(url, { ...options, headers: withKey(options.headers) });
  if (response.status === 401) {
    sessionStorage.removeItem(KEY_ITEM);
    askForKey(Boolean(sent));
    throw new Error(sent ? "the service refused the API key" : "the service needs an API key");
  }
  return response;
}

keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_ITEM, $("api-key").value.trim());
  $("api-key").value = "";
  keyForm.hidden = true;
  errorLine.hidden = true;
  showModels();
});

// The answer's JSON, or an Error that says what went wrong in words a person reads.
async function answerOf(response) {
  let body = null;
  try {
    body = JSON.parse(await response.text());
  } catch (err) {
    body = null; // a proxy's HTML page, or a cut-off answer
  }
  if (response.ok && body && !body.error) return body;
  if (body && body.error) throw new Error(`${body.error.message} (${body.error.code})`);
  throw new Error(`the service answered with an error (status ${response.status})`);
}

async function caption(event) {
  event.preventDefault();
  if (!chosen) return;
  const sent = chosen;
  clearAnswer();
  submit.disabled = true;
  statusLine.textContent = "captioning…";
  try {
    const response = await apiFetch(`/v1/captions?${requestQuery()}`, {
      method: "POST",
      headers: { "Content-Type": sent.type },
      body: sent.file,
    });
    const body = await answerOf(response);
    if (chosen !== sent) return; // another image was chosen meanwhile: this answer is stale
    showAnswer(body);
  } catch (err) {
    if (chosen !== sent) return;
    statusLine.textContent = "";
    showError(err instanceof TypeError ? `the service could not be reached (${err.message})` : err.message);
  } finally {
    submit.disabled = !chosen;
  }
}

// --- showing captions ----------------------------------------------------------------------

function showAnswer(body) {
  answer = body;
  // Ranked by perplexity whatever the mode (beam search ranks so too; samples come in draw order).
  answer.captions.sort((a, b) => a.perplexity - b.perplexity);
  captionList.replaceChildren(...answer.captions.map(captionItem));
  result.hidden = false;
  document.querySelector("main").classList.add("answered");
  $("hover-hint").textContent = touch
    ? "Tap a word to see where the model looked."
    : "Point at a word (or tab to it) to see where the model looked.";
  showConcepts(answer.captions[0] && answer.captions[0].concepts);
  const { width, height, format } = body.image;
  statusLine.textContent = `${format} ${width}×${height} · ${body.timing_ms.total.toFixed(0)} ms`;
}

// What the CNN's ImageNet classifier saw, and the caption word each class maps to.
function showConcepts(concepts) {
  conceptLine.hidden = !concepts || concepts.length === 0;
  if (conceptLine.hidden) return;
  const seen = concepts.map((c) => `${c.class} ${Math.round(100 * c.prob)}%` + (c.word ? ` (“${c.word}”)` : ""));
  conceptLine.textContent = `The CNN saw: ${seen.join(", ")}. Underlined words are among these concepts.`;
}

function captionItem(c, index) {
  const item = document.createElement("li");
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = `perplexity ${c.perplexity.toFixed(3)} · log p ${c.log_prob.toFixed(2)}`;
  score.title = $("score-help").title;
  const text = document.createElement("span");
  text.className = "text";
  for (const [w, word] of (c.words || []).entries()) text.append(wordButton(word, index, w), " ");
  if (!c.words) text.textContent = c.text || "(empty caption)";
  item.append(score, text);
  if (!c.finished) {
    item.classList.add("unfinished");
    const cut = document.createElement("span");
    cut.className = "cut";
    cut.textContent = "cut off at the length limit";
    cut.title = "The model had not ended the caption when it reached max length: it is unfinished.";
    item.append(cut);
  }
  item.append(copyButton(c.text));
  return item;
}

function wordButton(word, captionIndex, wordIndex) {
  const span = document.createElement("span");
  span.className = word.word === "<end>" ? "word end" : word.concept ? "word concept" : "word";
  if (word.concept) span.title = "a word of what the CNN's ImageNet classifier saw";
  span.textContent = word.word === "<end>" ? "■" : word.word;
  span.tabIndex = 0;
  span.dataset.caption = captionIndex;
  span.dataset.word = wordIndex;
  if (word.word === "<end>") span.title = "the end of the caption: how sure the model was to stop here";
  const key = [captionIndex, wordIndex];
  span.addEventListener("mouseenter", () => showWord(key));
  span.addEventListener("focus", () => showWord(key));
  span.addEventListener("mouseleave", () => showWord(pinned));
  span.addEventListener("blur", () => showWord(pinned));
  span.addEventListener("click", () => {
    pinned = pinned && pinned[0] === key[0] && pinned[1] === key[1] ? null : key;
    showWord(pinned);
  });
  return span;
}

function copyButton(text) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "copy";
  button.title = "copy this caption";
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "copied";
    } catch (err) {
      button.textContent = "select and copy";
    }
    setTimeout(() => { button.textContent = "copy"; }, 1500);
  });
  return button;
}

// --- where the model looked ----------------------------------------------------------------

function clearOverlay() {
  overlay.getContext("2d").clearRect(0, 0, overlay.width, overlay.height);
  overlay.hidden = true;
  for (const el of captionList.querySelectorAll(".word.shown")) el.classList.remove("shown");
}

// Darkens each cell of the image by how little attention it had next to the most attended one.
function showWord(key) {
  clearOverlay();
  if (!key || !answer) { readout.textContent = ""; return; }
  const word = answer.captions[key[0]].words[key[1]];
  const [rows, cols] = answer.attention_grid;
  const box = preview.getBoundingClientRect();
  const scale = window.devicePixelRatio || 1;
  overlay.width = Math.round(box.width * scale);
  overlay.height = Math.round(box.height * scale);
  const context = overlay.getContext("2d");
  const flat = word.attention.flat();
  const most = Math.max(...flat);
  const cellW = overlay.width / cols;
  const cellH = overlay.height / rows;
  word.attention.forEach((row, r) => row.forEach((weight, c) => {
    context.fillStyle = `rgba(0, 0, 0, ${0.75 * (1 - weight / most)})`;
    context.fillRect(c * cellW, r * cellH, cellW, cellH);
  }));
  const top = flat.indexOf(most);
  context.strokeStyle = "#ffd400";
  context.lineWidth = Math.max(2, 3 * scale);
  context.strokeRect((top % cols) * cellW + 1, Math.floor(top / cols) * cellH + 1, cellW - 2, cellH - 2);
  overlay.hidden = false;
  overlay.dataset.word = word.word;
  captionList.querySelector(`.word[data-caption="${key[0]}"][data-word="${key[1]}"]`)?.classList.add("shown");
  const where = rows * cols > 1 ? ` · looked most at row ${Math.floor(top / cols) + 1}, column ${top % cols + 1} (${Math.round(100 * most)}% of its attention)` : "";
  const name = word.word === "<end>" ? "end of caption" : `“${word.word}”`;
  readout.textContent = `${name}: probability ${word.prob.toFixed(3)}${where}`;
}

// --- what the model knows ------------------------------------------------------------------

function fact(term, value) {
  const dt = document.createElement("dt");
  const dd = document.createElement("dd");
  dt.textContent = term;
  dd.textContent = value;
  $("model-facts").append(dt, dd);
}

// Photo data sets by the name a model records (its token or captions file's): what their photographs show.
const PHOTO_DATA_SETS = {
  flickr8k: {name: "Flickr8k", shows: "everyday scenes from Flickr: mostly people and dogs, outdoors, at play or at sport",
    fallback: "people, dogs or outdoor scenes"},
  flickr30k: {name: "Flickr30k", shows: "everyday scenes from Flickr: mostly people, at work, at play or at sport",
    fallback: "people and what they do"},
};

function describeTraining(model) {
  const data = model.trained_on;
  if (!data) return "This model file does not record what it was trained on: it knows only that world, whatever it was.";
  const images = Object.values(data.images).reduce((a, b) => a + b, 0);
  const heldOut = data.held_out.length
    ? ` Never named together in its training captions: ${data.held_out.map((p) => p.replace(":", " ")).join(", ")}.`
    : "";
  if (data.world === "shapes") {
    return `Trained on the shapes world: ${images.toLocaleString()} images of coloured shapes ` +
      `(${data.images.train.toLocaleString()} for training). It describes every image as shapes: ` +
      `a photo or noise still gets a confident caption about shapes.${heldOut}`;
  }
  const photos = PHOTO_DATA_SETS[data.name];
  if (photos) {
    return `Trained on ${photos.name}: ${images.toLocaleString()} photographs (${(data.images.train || 0).toLocaleString()} ` +
      `for training) of ${photos.shows}. It describes a photograph in those terms: anything else (a drawing, ` +
      `a screenshot, an object close up) still gets a caption about ${photos.fallback}.`;
  }
  return `Trained on ${data.name}: ${images.toLocaleString()} images. It knows only what those show.${heldOut}`;
}

function showFacts(model) {
  const m = model.training_metrics || {};
  const d = model.decoding;
  const scores = [["BLEU-4", m.val_bleu_4], ["CIDEr", m.val_cider], ["truthful", m.val_truthfulness], ["perplexity", m.val_perplexity]]
    .filter(([, v]) => typeof v === "number").map(([k, v]) => `${k} ${v.toFixed(3)}`);
  if (model.trained_on) fact("data set", `${model.trained_on.name} (${model.trained_on.format}), splits ${JSON.stringify(model.trained_on.images)}`);
  fact("vocabulary", `${model.vocab_size} words`);
  fact("scores", scores.length ? `validation, epoch ${m.epoch}: ${scores.join(" · ")}` : "none recorded");
  fact("encoder", `${model.encoder.name} at ${model.encoder.image_size} px, attention over ${model.attention_grid.join(" × ")} cells`);
  fact("defaults", `${d.defaults.mode}, beam size ${d.defaults.beam_size}, up to ${d.defaults.max_length} words`);
  fact("limits", `up to ${d.limits.num_captions} captions, beam size ${d.limits.beam_size}, ${d.limits.max_length} words; ` +
    `images up to ${megabytes(model.limits.max_bytes)} and ${(model.limits.max_pixels / 1e6).toFixed(0)} megapixels (${formatList()})`);
}

// The models the service serves (the choice shown when there are several), then the chosen one:
// the one named in the address (?model=NAME), else the default.
async function showModels() {
  try {
    const listing = await answerOf(await apiFetch("/v1/models"));
    models = listing.models;
    const wanted = new URLSearchParams(location.search).get("model");
    const entry = models.find((m) => m.name === wanted) || models.find((m) => m.default) || models[0];
    modelChoice.replaceChildren(...models.map((m) => {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = m.ready ? m.name : `${m.name} (not ready)`;
      return option;
    }));
    modelChoice.value = entry.name;
    $("model-choice-label").hidden = models.length < 2;
    await showModel(entry);
  } catch (err) {
    $("model").textContent = err.message;
  }
}

// Everything on the page that depends on the model: its card, what it knows, its examples and
// the decoding it was chosen with.
async function showModel(entry) {
  model = entry;
  const line = $("model");
  document.body.dataset.world = (entry.trained_on && entry.trained_on.world) || "photos";
  showExamples(entry.examples || []);
  startDecodingFrom(entry.default_decoding);
  try {
    const card = await answerOf(await apiFetch(`/v1/model?model=${encodeURIComponent(entry.name)}`));
    if (model !== entry) return; // another model was chosen meanwhile
    limits = card.limits;
    line.textContent = `${card.name} (version ${card.version}, ${card.vocab_size} words)`;
    $("knows").textContent = describeTraining(card);
    $("knows").hidden = false;
    form.querySelector("[name=max_length]").placeholder = `${card.decoding.defaults.max_length}`;
    $("model-facts").replaceChildren();
    showFacts(card);
  } catch (err) {
    if (model === entry) line.textContent = err.message;
  }
}

// The decoding controls start from the model's own default decoding, where it has one.
function startDecodingFrom(chosen) {
  form.reset();
  for (const [name, value] of Object.entries(chosen || {})) {
    const field = form.elements.namedItem(name);
    if (field && value !== null && typeof value !== "boolean") field.value = String(value);
  }
  showModeOptions();
}

modelChoice.addEventListener("change", () => {
  const entry = models.find((m) => m.name === modelChoice.value);
  if (!entry || entry === model) return;
  const address = new URL(location.href);
  address.searchParams.set("model", entry.name);
  history.replaceState(null, "", address);
  clearAnswer();
  showModel(entry);
});

// --- examples, and wiring ------------------------------------------------------------------

// The example images that fit the model (the shapes world's scenes for a shapes model, the
// operator's for another; none without), each a button that chooses it.
function showExamples(examples) {
  const box = $("examples");
  box.replaceChildren(box.firstElementChild); // the "Examples:" label stays
  box.hidden = examples.length === 0;
  for (const example of examples) {
    const file = decodeURIComponent(example.url.split("/").pop());
    const button = document.createElement("button");
    button.type = "button";
    button.className = "example";
    button.title = `example: ${file}`;
    const image = document.createElement("img");
    image.src = example.url;
    image.alt = file;
    button.append(image);
    button.addEventListener("click", async () => {
      const blob = await (await fetch(image.src)).blob();
      choose(new File([blob], file, { type: blob.type }));
    });
    box.append(button);
  }
}

function showModeOptions() {
  for (const label of form.querySelectorAll("[data-modes]")) {
    label.hidden = !label.dataset.modes.split(" ").includes(mode.value);
  }
}

// Captions on screen no longer answer the options shown: say so until Caption is pressed.
function markStale() {
  if (answer) {
    staleNote.hidden = false;
    captionList.classList.add("stale");
  }
}

input.addEventListener("change", () => choose(input.files[0]));
dropZone.addEventListener("dragover", (e) => { e.preventDefault(); dropZone.classList.add("dragging"); });
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
dropZone.addEventListener("drop", (e) => {
  e.preventDefault();
  dropZone.classList.remove("dragging");
  if (e.dataTransfer.files.length) choose(e.dataTransfer.files[0]);
  else showError("drop an image file (not text or a link)");
});
dropZone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData?.files || [])][0];
  if (file) choose(file);
});
mode.addEventListener("change", showModeOptions);
for (const field of form.querySelectorAll("fieldset input, fieldset select")) {
  field.addEventListener("input", markStale);
  field.addEventListener("change", markStale);
}
form.addEventListener("submit", caption);
window.addEventListener("resize", () => showWord(pinned));
if (touch) $("drop-hint").innerHTML = 'Tap <label for="image-input" class="link">choose an image</label>, or an example below';
showModeOptions();
showModels();
