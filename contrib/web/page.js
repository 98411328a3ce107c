/* The page around transfer.js: a transfer URL (or ?url=...), a file, buttons, progress and
 * errors. When embedded in a frame it tells the parent how the transfer ended (postMessage). */
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const status = $("status");
  let controller = null;

  const url = new URLSearchParams(location.search).get("url");
  if (url) $("url").value = url;

  function human(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  function show(state, text, result) {
    status.dataset.state = state;
    status.textContent = text;
    for (const [k, v] of Object.entries(result || {})) status.dataset[k] = v;
    if (window.parent !== window && state !== "running") {
      window.parent.postMessage({type: "nbdproxy-transfer", state, message: text,
                                 ...(result || {})}, "*");
    }
  }

  function onProgress({done, total, rate}) {
    $("progress").value = total ? done / total : 0;
    $("bytes").textContent = total ? `${human(done)} of ${human(total)}` : human(done);
    $("rate").textContent = `${human(Math.round(rate))}/s`;
  }

  function transferUrl() {
    const value = $("url").value.trim();
    try {
      const u = new URL(value);
      const web = u.protocol === "https:" || u.protocol === "http:";
      if (web && u.pathname.startsWith("/images/")) return u.href;
    } catch (e) { /* below */ }
    show("error", "enter a transfer URL: https://host:port/images/TICKET");
    return null;
  }

  function busy(on) {
    $("upload").disabled = $("download").disabled = on;
    $("cancel").disabled = !on;
  }

  async function start(verb, run) {
    controller = new AbortController();
    busy(true);
    $("progress").value = 0;
    $("bytes").textContent = $("rate").textContent = "";
    delete status.dataset.bytes;
    delete status.dataset.flush;
    show("running", verb + "ing...");
    try {
      const result = await run(controller.signal);
      show("done", `${verb}ed ${human(result.bytes)}`, result);
    } catch (e) {
      if (e.kind === "canceled" || e.name === "AbortError") {
        show("canceled", "canceled");
      } else {
        show("error", e.kind ? e.message : `${verb} failed: ${e.message}`);
      }
    } finally {
      controller = null;
      busy(false);
    }
  }

  $("upload").addEventListener("click", () => {
    const url = transferUrl();
    if (!url) return;
    const file = $("file").files[0];
    if (!file) {
      show("error", "choose a file to upload");
      return;
    }
    start("upload", (signal) => NbdTransfer.upload(url, file, {signal, onProgress}));
  });

  $("download").addEventListener("click", () => {
    const url = transferUrl();
    if (!url) return;
    const name = decodeURIComponent(new URL(url).pathname.split("/").pop()) + ".raw";
    if (window.showSaveFilePicker) {
      // The picker needs this click's user activation: open it before anything is awaited.
      const picked = window.showSaveFilePicker({suggestedName: name});
      start("download", async (signal) => {
        const sink = await (await picked).createWritable();
        return NbdTransfer.download(url, sink, {signal, onProgress});
      });
    } else {
      start("download", (signal) =>
        NbdTransfer.download(url, new NbdTransfer.BlobSink(name), {signal, onProgress}));
    }
  });

  $("cancel").addEventListener("click", () => controller && controller.abort());
})();
