// The captioner's page: pick or drop an image, choose decoding options, show the captions.
"use strict";

const form = document.getElementById("caption-form");
const input = document.getElementById("image-input");
const dropZone = document.getElementById("drop-zone");
const preview = document.getElementById("preview");
const mode = document.getElementById("mode");
const submit = document.getElementById("submit");
const statusLine = document.getElementById("status");
const errorLine = document.getElementById("error");
const captionList = document.getElementById("captions");
let chosen = null; // the File to caption

// Show only the options that the chosen mode uses, and send only those.
function showModeOptions() {
  for (const label of form.querySelectorAll("[data-modes]")) {
    label.hidden = !label.dataset.modes.split(" ").includes(mode.value);
  }
}

function choose(file) {
  chosen = file || null;
  submit.disabled = !chosen;
  captionList.replaceChildren();
  errorLine.hidden = true;
  if (chosen) {
    preview.src = URL.createObjectURL(chosen);
    preview.hidden = false;
  }
}

function showError(message) {
  errorLine.textContent = message;
  errorLine.hidden = false;
}

async function caption(event) {
  event.preventDefault();
  if (!chosen) return;
  const body = new FormData();
  body.append("image", chosen);
  for (const field of form.querySelectorAll("fieldset input, fieldset select")) {
    if (!field.closest("label").hidden && field.value !== "") body.append(field.name, field.value);
  }
  submit.disabled = true;
  errorLine.hidden = true;
  captionList.replaceChildren();
  statusLine.textContent = "captioning…";
  try {
    const response = await fetch("/v1/captions", { method: "POST", body });
    const answer = await response.json();
    if (!response.ok) {
      showError(`${answer.error.message} (${answer.error.code})`);
      statusLine.textContent = "";
      return;
    }
    for (const c of answer.captions) {
      const item = document.createElement("li");
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = `log p ${c.log_prob.toFixed(2)} · perplexity ${c.perplexity.toFixed(2)}`;
      item.append(c.text || "(empty caption)", score);
      captionList.append(item);
    }
    const { width, height, format } = answer.image;
    statusLine.textContent = `${format} ${width}×${height} · ${answer.timing_ms.total.toFixed(0)} ms`;
  } catch (err) {
    showError(`the service could not be reached (${err.message})`);
    statusLine.textContent = "";
  } finally {
    submit.disabled = !chosen;
  }
}

async function showModel() {
  const line = document.getElementById("model");
  try {
    const response = await fetch("/v1/model");
    const model = await response.json();
    line.textContent = response.ok
      ? `${model.name} (version ${model.version}, ${model.vocab_size} words)`
      : model.error.message;
  } catch (err) {
    line.textContent = "the service could not be reached";
  }
}

input.addEventListener("change", () => choose(input.files[0]));
dropZone.addEventListener("dragover", (e) => { e.preventDefault(); dropZone.classList.add("dragging"); });
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
dropZone.addEventListener("drop", (e) => {
  e.preventDefault();
  dropZone.classList.remove("dragging");
  choose(e.dataTransfer.files[0]);
});
mode.addEventListener("change", showModeOptions);
form.addEventListener("submit", caption);
showModeOptions();
showModel();
