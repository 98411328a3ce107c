/*
 * nbdproxy browser client: upload a local file to, or download an image from, a transfer URL
 * (https://host:port/images/TICKET) of nbdproxy or ovirt-imageio, from a page on another origin.
 * Plain JavaScript, no build step: include it with <script src="transfer.js"> and use
 * window.NbdTransfer.upload(url, file, options) and .download(url, sink, options).
 */
(function (global) {
  "use strict";

  const MiB = 1024 * 1024;

  // Options a page may change (NbdTransfer.defaults) or pass per call.
  const defaults = {
    pieceSize: 8 * MiB,     // one PUT (or PATCH zero) per piece
    parallel: 4,            // pieces in flight at once (at most the server's max_writers)
    maxBlobSize: 2048 * MiB, // download without a file picker: the whole image in a Blob
    onProgress: null,       // function ({done, total, rate}) with bytes and bytes per second
    signal: null,           // an AbortSignal to cancel
  };

  const REFUSED_OR_UNREACHABLE = "ticket refused or daemon unreachable";

  /* kind: "refused" (403), "unreachable" (a failed preflight: a refused or unknown ticket, or no
   * daemon), "network", "server" (any other HTTP error), "usage", "canceled". */
  class TransferError extends Error {
    constructor(kind, message) {
      super(message);
      this.name = "TransferError";
      this.kind = kind;
    }
  }

  /* One upload or download: its requests, their errors, its progress. */
  class Transfer {
    constructor(url, options) {
      this.options = Object.assign({}, defaults, options);
      this.url = new URL(url);
      this.controller = new AbortController();
      if (this.options.signal) {
        const outer = this.options.signal;
        if (outer.aborted) this.controller.abort();
        outer.addEventListener("abort", () => this.controller.abort());
      }
      // Request kinds (method) that got an answer: a browser sends a preflight before the first
      // of each kind, and fails the request when the preflight is refused (a 403 for an unknown
      // or expired ticket) or unanswered; JavaScript then only sees a network error.
      this.answered = new Set();
      this.done = 0;
      this.total = 0;
      this.started = performance.now();
    }

    target(query) {
      const u = new URL(this.url);
      for (const [k, v] of Object.entries(query || {})) u.searchParams.set(k, v);
      return u.href;
    }

    async request(method, query, init) {
      let resp;
      try {
        resp = await fetch(this.target(query),
                           Object.assign({method, signal: this.controller.signal}, init));
      } catch (e) {
        if (this.controller.signal.aborted) throw new TransferError("canceled", "canceled");
        if (!this.answered.has(method)) {
          throw new TransferError("unreachable", REFUSED_OR_UNREACHABLE);
        }
        throw new TransferError("network", "network failure");
      }
      this.answered.add(method);
      if (resp.ok) return resp;
      const message = (await resp.text().catch(() => "")).trim() || resp.statusText;
      if (resp.status === 403) throw new TransferError("refused", "ticket refused: " + message);
      throw new TransferError("server", `server error ${resp.status}: ${message}`);
    }

    progress(n) {
      this.done += n;
      const seconds = (performance.now() - this.started) / 1000;
      if (this.options.onProgress) {
        this.options.onProgress({done: this.done, total: this.total,
                                 rate: seconds > 0 ? this.done / seconds : 0});
      }
    }

    cancel() {
      this.controller.abort();
    }
  }

  // Upload

  function isZero(buffer) {
    const words = new Uint32Array(buffer, 0, buffer.byteLength >>> 2);
    for (let i = 0; i < words.length; i++) if (words[i] !== 0) return false;
    const tail = new Uint8Array(buffer, words.length * 4);
    for (let i = 0; i < tail.length; i++) if (tail[i] !== 0) return false;
    return true;
  }

  class Upload extends Transfer {
    /* PUT pieces with Content-Range, a few at a time, then flush: with PATCH where the server
     * allows PATCH cross-origin (nbdproxy), else by sending the last piece as PUT ?flush=y after
     * all others completed (ovirt-imageio allows only OPTIONS, GET, PUT). */
    async run(file) {
      this.total = file.size;
      const info = await (await this.request("OPTIONS")).json();
      if (typeof info.size === "number" && file.size > info.size) {
        throw new TransferError("usage",
          `the file (${file.size} bytes) is larger than the image (${info.size} bytes)`);
      }
      this.patch = await this.probePatch();
      const pieces = [];
      for (let offset = 0; offset < file.size; offset += this.options.pieceSize) {
        pieces.push([offset, Math.min(this.options.pieceSize, file.size - offset)]);
      }
      const last = pieces.pop() || [0, 0];
      const workers = Math.max(1, Math.min(this.options.parallel, info.max_writers || 1));
      let next = 0;
      const work = async () => {
        while (next < pieces.length) {
          const [offset, length] = pieces[next++];
          await this.writePiece(file, offset, length, false);
        }
      };
      try {
        await Promise.all(Array.from({length: workers}, work));
      } catch (e) {
        this.cancel();      // the other pieces in flight
        throw e;
      }
      await this.writePiece(file, last[0], last[1], !this.patch);
      if (this.patch) await this.patchRequest({op: "flush"});
      return {bytes: file.size, flush: this.patch ? "patch" : "put"};
    }

    /* Try PATCH once, with a zero of nothing: a network error means the browser refused it (the
     * preflight did not allow PATCH), and PUT is used from then on; PUTs report their own
     * errors. */
    async probePatch() {
      try {
        await this.patchRequest({op: "zero", offset: 0, size: 0, flush: false});
        return true;
      } catch (e) {
        if (e.kind === "unreachable" || e.kind === "network") return false;
        throw e;
      }
    }

    patchRequest(msg) {
      return this.request("PATCH", null, {
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify(msg),
      });
    }

    async writePiece(file, offset, length, flush) {
      const data = await file.slice(offset, offset + length).arrayBuffer();
      if (length > 0 && this.patch && isZero(data)) {
        await this.patchRequest({op: "zero", offset, size: length, flush: false});
      } else {
        const range = `bytes ${offset}-${offset + length - 1}/*`;
        const headers = length > 0 ? {"Content-Range": range} : {};
        await this.request("PUT", {flush: flush ? "y" : "n"}, {headers, body: data});
      }
      this.progress(length);
    }
  }

  // Download

  /* Where a download goes when there is no file picker: the image in memory, in Blobs of up to
   * 64 MiB (which the browser may keep on disk), saved at the end through a link. */
  class BlobSink {
    constructor(filename) {
      this.filename = filename;
      this.blobs = [];
      this.chunks = [];
      this.pending = 0;
    }

    write(chunk) {
      this.chunks.push(chunk);
      this.pending += chunk.byteLength;
      if (this.pending >= 64 * MiB) this.seal();
    }

    seal() {
      this.blobs.push(new Blob(this.chunks));
      this.chunks = [];
      this.pending = 0;
    }

    close() {
      this.seal();
      this.blob = new Blob(this.blobs, {type: "application/octet-stream"});
      this.blobs = [];
      const a = document.createElement("a");
      a.href = URL.createObjectURL(this.blob);
      a.download = this.filename;
      a.style.display = "none";
      document.body.appendChild(a);
      a.click();
      a.remove();
      // The download keeps its own reference; free ours after the browser started it.
      setTimeout(() => URL.revokeObjectURL(a.href), 60000);
    }

    abort() {
      this.blobs = [];
      this.chunks = [];
    }
  }

  class Download extends Transfer {
    /* One plain GET (no preflight, so a refused ticket shows the server's 403 message),
     * streamed into sink: a FileSystemWritableFileStream or a BlobSink. */
    async run(sink) {
      let failed = true;
      try {
        const resp = await this.request("GET");
        this.total = Number(resp.headers.get("Content-Length")) || 0;
        if (sink instanceof BlobSink && this.total > this.options.maxBlobSize) {
          throw new TransferError("usage",
            `the image (${this.total} bytes) is larger than a download without a file picker ` +
            `can hold (${this.options.maxBlobSize} bytes)`);
        }
        const reader = resp.body.getReader();
        for (;;) {
          let part;
          try {
            part = await reader.read();
          } catch (e) {
            if (this.controller.signal.aborted) throw new TransferError("canceled", "canceled");
            throw new TransferError("network", "network failure");
          }
          if (part.done) break;
          await sink.write(part.value);
          this.progress(part.value.byteLength);
        }
        if (this.total && this.done !== this.total) {
          throw new TransferError("network", "network failure: the download ended early");
        }
        await sink.close();
        failed = false;
        return {bytes: this.done};
      } finally {
        if (failed) {
          this.cancel();
          await Promise.resolve(sink.abort()).catch(() => {});
        }
      }
    }
  }

  function upload(url, file, options) {
    const t = new Upload(url, options);
    return t.run(file);
  }

  function download(url, sink, options) {
    const t = new Download(url, options);
    return t.run(sink);
  }

  global.NbdTransfer = {defaults, upload, download, BlobSink, TransferError, isZero};
})(window);
