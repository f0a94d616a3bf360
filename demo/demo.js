// The demo page's script (docs/DESIGN.md, "The demo page"). It loads demo.json, the model and the fixed check set
// once, then runs the generator in this browser with onnxruntime-web (WebAssembly, one thread) and draws what it
// makes on a canvas. window.demo is the page's interface for the headless test (tests/test_demo.py).
"use strict";

const GAP = 2; // white pixels between tiles
const $ = (id) => document.getElementById(id);

async function fetchBytes(name) {
  const response = await fetch(name);
  if (!response.ok) throw new Error(`${name}: HTTP ${response.status}`);
  return response.arrayBuffer();
}

// Everything the page will ever need is fetched here, so that it works offline once loaded.
async function load() {
  const config = await (await fetch("demo.json")).json();
  const check = config.check;
  const [model, z, labels, expected] = await Promise.all(
    [config.model, check.z, check.labels, check.expected].map(fetchBytes));
  ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
  ort.env.wasm.numThreads = 1; // threads need cross-origin isolation, which a plain http.server does not give
  const started = performance.now();
  const session = await ort.InferenceSession.create(new Uint8Array(model),
    { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  return {
    config, session, modelBytes: model.byteLength, loadMs: performance.now() - started,
    check: { z: new Float32Array(z), labels: new BigInt64Array(labels), expected: new Float32Array(expected) },
  };
}

async function run(state, z, labels) {
  const n = labels.length;
  const feeds = { z: new ort.Tensor("float32", z, [n, state.config.nz]), labels: new ort.Tensor("int64", labels, [n]) };
  const started = performance.now();
  const output = await state.session.run(feeds);
  return { images: output.images.data, ms: performance.now() - started };
}

// Standard-normal latent vectors, fresh on every press (Box-Muller on the browser's random source).
function randomLatents(count) {
  const uniform = new Uint32Array(count + (count % 2));
  crypto.getRandomValues(uniform);
  const z = new Float32Array(count);
  for (let i = 0; i < count; i += 2) {
    const u = (uniform[i] + 1) / 4294967297, v = uniform[i + 1] / 4294967296;
    const radius = Math.sqrt(-2 * Math.log(u));
    z[i] = radius * Math.cos(2 * Math.PI * v);
    if (i + 1 < count) z[i + 1] = radius * Math.sin(2 * Math.PI * v);
  }
  return z;
}

// Images in [-1, 1], (n, C, S, S) -> one tile of S x S pixels each, `columns` per row, GAP pixels apart.
function drawGrid(config, images, n, columns, caption) {
  const size = config.image_size, channels = config.channels, plane = size * size;
  const rows = Math.ceil(n / columns), canvas = $("grid"), context = canvas.getContext("2d");
  canvas.width = columns * (size + GAP) - GAP;
  canvas.height = rows * (size + GAP) - GAP;
  context.fillStyle = "#fff";
  context.fillRect(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < n; i++) {
    const tile = context.createImageData(size, size), base = i * channels * plane;
    for (let p = 0; p < plane; p++) {
      for (let c = 0; c < 3; c++) {
        const value = images[base + (channels === 3 ? c : 0) * plane + p];
        tile.data[4 * p + c] = Math.min(255, Math.max(0, Math.round((value + 1) * 127.5)));
      }
      tile.data[4 * p + 3] = 255;
    }
    context.putImageData(tile, (i % columns) * (size + GAP), Math.floor(i / columns) * (size + GAP));
  }
  const zoom = Math.max(1, Math.round(84 / size)); // shown about 84 px a tile, pixels kept sharp
  canvas.style.width = `${canvas.width * zoom}px`;
  $("caption").textContent = caption;
  return n;
}

async function generate(state, choice, count) {
  const classes = state.config.num_classes, all = choice === "all";
  const labels = BigInt64Array.from({ length: count }, (_, i) => BigInt(all ? i % classes : Number(choice)));
  const { images, ms } = await run(state, randomLatents(count * state.config.nz), labels);
  const columns = all && classes <= 20 ? classes : 10, names = state.config.class_names;
  const caption = all ? (columns === classes ? `Columns: ${names.join(", ")}.` : "Labels 0, 1, 2, ... in turn.")
    : `All of class ${names[Number(choice)]}.`;
  const tiles = drawGrid(state.config, images, count, columns, caption);
  $("timing").textContent = `${count} images in ${ms.toFixed(1)} ms: ${(ms / count).toFixed(3)} ms per image in ` +
    "this browser (one batch, one WebAssembly thread).";
  state.last = images;
  return { tiles, ms, msPerImage: ms / count, labels: Array.from(labels, Number) };
}

// The artifact check's verdict (utils/compression/runtime.py, judge) on images against the expected ones: the mean
// abs difference at most mean_tolerance, at most pixel_share of the pixels off by more than tolerance.
function compare(images, expected, check) {
  let max = 0, sum = 0, over = 0;
  for (let i = 0; i < expected.length; i++) {
    const diff = Math.abs(images[i] - expected[i]);
    max = Math.max(max, diff);
    sum += diff;
    if (!(diff <= check.tolerance)) over++;
  }
  const mean = sum / expected.length;
  const pass = images.length === expected.length && mean <= check.mean_tolerance &&
    over <= check.pixel_share * expected.length;
  return { maxDiff: max, meanDiff: mean, over, pixels: expected.length, pass };
}

// The fixed latent vectors and labels written by make demo, against the Python runtime's images of them.
async function exactnessCheck(state) {
  const check = state.config.check, { z, labels, expected } = state.check;
  const { images, ms } = await run(state, z, labels);
  const verdict = compare(images, expected, check), max = verdict.maxDiff, mean = verdict.meanDiff;
  const tiles = drawGrid(state.config, images, labels.length, check.columns,
    `The fixed check set, as in samples.png: one row per class (${state.config.class_names.join(", ")}).`);
  const line = $("check");
  line.className = verdict.pass ? "pass" : "fail";
  line.textContent = `Exactness: the ${labels.length} fixed latent vectors and labels of samples.png, run here, ` +
    `differ from the Python runtime's images (${check.python_runtime}) by at most ${max.toExponential(2)} ` +
    `(mean ${mean.toExponential(2)}; ${verdict.over} of ${expected.length} pixels above ${check.tolerance}): ` +
    (verdict.pass ? "the same images, within the artifact check's tolerance." : "NOT the same images.");
  Object.assign(line.dataset, verdict);
  state.last = images;
  $("timing").textContent = `${labels.length} images in ${ms.toFixed(1)} ms: ` +
    `${(ms / labels.length).toFixed(3)} ms per image in this browser.`;
  return { tiles, ms, ...verdict };
}

// The last images as base64 of their float32 bytes (for the headless test).
function lastImagesBase64(state) {
  const bytes = new Uint8Array(state.last.buffer, state.last.byteOffset, state.last.byteLength);
  let text = "";
  for (let i = 0; i < bytes.length; i += 32768) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 32768));
  return btoa(text);
}

function showPage(state) {
  const config = state.config, picker = $("class");
  picker.add(new Option("all classes", "all"));
  config.class_names.forEach((name, label) => picker.add(new Option(name, String(label))));
  for (const line of config.card.lines) {
    const item = document.createElement("li");
    item.textContent = line;
    $("card").appendChild(item);
  }
  $("card").firstElementChild.className = "headline";
  const shape = `${config.image_size}x${config.image_size} ${config.channels === 3 ? "RGB" : "grey"}`;
  $("status").textContent = `Model loaded: ${config.model} (${state.modelBytes.toLocaleString("en")} bytes), ` +
    `${shape}, ${config.num_classes} classes; onnxruntime-web ${config.runtime_version} (WebAssembly), session ready ` +
    `in ${state.loadMs.toFixed(0)} ms.`;
  for (const id of ["generate", "run-check"]) $(id).disabled = false;
  $("generate").onclick = () => generate(state, picker.value, Number($("count").value));
  $("run-check").onclick = () => exactnessCheck(state);
}

// Ready once everything is loaded and the check set has run once (the page opens on its verdict).
const ready = load().then(async (state) => {
  showPage(state);
  window.demo.generate = (choice, count) => generate(state, String(choice), count);
  window.demo.check = () => exactnessCheck(state);
  window.demo.compare = (images, expected) =>
    compare(Float32Array.from(images), Float32Array.from(expected), state.config.check);
  window.demo.lastImagesBase64 = () => lastImagesBase64(state);
  const check = await exactnessCheck(state);
  document.body.dataset.state = "ready";
  return { loaded: true, modelBytes: state.modelBytes, loadMs: state.loadMs, check };
}, (error) => {
  $("status").className = "error";
  $("status").textContent = `Could not load the model: ${error.message || error}`;
  document.body.dataset.state = "error";
  throw error;
});
window.demo = { ready };
