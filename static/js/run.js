// Run page: live progress while the run goes on, then its timeline.
(() => {
  const root = document.getElementById("run");
  const FREEZING = new Set(["checkpoint", "dump"]);
  const NUM_COLUMNS = [4, 5, 6];  // start, duration, bytes
  const HOST_COLORS = ["#3b82f6", "#10b981", "#8b5cf6", "#f59e0b"];
  const $ = (id) => document.getElementById(id);
  let drawn = false;

  const fmtMs = (ms) => (ms == null ? "–" : `${ms.toFixed(ms < 10 ? 1 : 0)} ms`);

  function offsets(run) {
    const t0 = run.phases.length ? Date.parse(run.phases[0].started) : 0;
    return (phase) => Date.parse(phase.started) - t0;
  }

  function renderPhases(run) {
    const at = offsets(run);
    $("phases").tBodies[0].replaceChildren(...run.phases.map((p) => {
      const tr = cw.row([
        String(p.seq), p.name, p.host, p.status, fmtMs(at(p)),
        p.status === "running" ? "…" : fmtMs(p.duration_ms), p.bytes ? cw.bytes(p.bytes) : "", p.detail || "",
      ]);
      for (const i of NUM_COLUMNS) tr.cells[i].className = "num";  // like their headers
      return tr;
    }));
  }

  function renderTransfer(run) {
    const phase = run.phases.find((p) => p.name === "transfer" && p.status === "running");
    const box = $("transfer");
    if (!phase) { box.hidden = true; return; }
    const expected = Math.max(run.expected_bytes || 0, phase.bytes || 0, 1);
    $("transfer-bar").value = Math.round((100 * (phase.bytes || 0)) / expected);
    $("transfer-text").textContent = `${cw.bytes(phase.bytes || 0)} of about ${cw.bytes(expected)}`;
    box.hidden = false;
  }

  function renderSummary(run) {
    const status = $("run-status");
    // A pending run waits in the workers' queue: its place in the line for its hosts.
    status.textContent = run.status === "pending"
      ? `queued (position ${run.queue_position})` : run.status.replace("_", " ");
    status.className = `status ${run.status}`;
    const unattended = $("run-unattended");
    if (unattended) unattended.hidden = run.status !== "pending";  // a worker took it
    $("run-downtime").textContent = fmtMs(run.downtime_ms);
    $("run-observed").textContent = fmtMs(run.observed_downtime_ms);
    $("run-observed-method").textContent = run.observed_method || "";
    $("run-observed-box").hidden = run.observed_downtime_ms == null && !run.observed_method;
    $("run-bytes").textContent = cw.bytes(run.bytes);
    $("run-image").textContent = cw.bytes(run.image_bytes);
    $("run-image-box").hidden = !run.image_bytes;
    $("run-result").textContent = run.result_workload || "–";
    $("run-error").hidden = !run.error;
    $("run-error").textContent = run.error || "";
  }

  function renderStats(run) {
    const withStats = run.phases.filter((p) => p.criu_stats && Object.keys(p.criu_stats).length);
    const box = $("stats");
    box.replaceChildren(...withStats.map((p) => {
      const table = cw.el("table", { class: "facts" });
      for (const [key, value] of Object.entries(p.criu_stats)) {
        const shown = key.endsWith("_time") ? `${(value / 1000).toFixed(2)} ms` : String(value);
        table.append(cw.row([key, shown]));
      }
      return cw.el("div", {}, cw.el("h3", { text: `${p.name} on ${p.host}` }), table);
    }));
    $("stats-section").hidden = !withStats.length;
    const logs = run.phases.filter((p) => p.log_excerpt);
    $("logs").replaceChildren(...logs.map((p) => cw.el("div", {},
      cw.el("h3", { text: `${p.name} on ${p.host}` }), cw.el("pre", { text: p.log_excerpt }))));
    $("logs-section").hidden = !logs.length;
  }

  function drawTimeline(run) {
    const at = offsets(run);
    const hosts = [...new Set(run.phases.map((p) => p.host))];
    const labels = run.phases.map((p) => `${p.name} · ${p.host}`);
    const ranges = run.phases.map((p) => [at(p), at(p) + (p.duration_ms || 0)]);
    const colors = run.phases.map((p) => (p.status === "failed" ? "#dc2626" : HOST_COLORS[hosts.indexOf(p.host) % HOST_COLORS.length]));
    const freeze = run.phases.find((p) => FREEZING.has(p.name));
    if (freeze && run.downtime_ms != null) {
      labels.push("downtime");
      ranges.push([at(freeze), at(freeze) + run.downtime_ms]);
      colors.push("#ef4444");
    }
    $("timeline-section").hidden = false;
    const canvas = $("timeline");
    canvas.parentElement.style.height = `${60 + labels.length * 28}px`;
    window.cwTimelineChart = new Chart(canvas, {
      type: "bar",
      data: { labels, datasets: [{ label: "phase", data: ranges, backgroundColor: colors, borderSkipped: false }] },
      options: {
        indexAxis: "y",
        maintainAspectRatio: false,
        animation: false,
        plugins: {
          legend: { display: false },
          tooltip: { callbacks: { label: (item) => {
            const [start, end] = item.raw;
            return `${fmtMs(start)} → ${fmtMs(end)} (${fmtMs(end - start)})`;
          } } },
        },
        scales: { x: { type: "linear", title: { display: true, text: "ms since the run started" } } },
      },
    });
    drawn = true;
  }

  async function poll() {
    let run;
    try {
      run = await cw.getJSON(root.dataset.url);
    } catch (error) {
      setTimeout(poll, 2000);
      return;
    }
    renderSummary(run);
    renderPhases(run);
    renderTransfer(run);
    if (run.finished) {
      renderStats(run);
      const archive = document.getElementById("run-archive");
      if (archive && run.archive_url) {
        document.getElementById("run-archive-link").href = run.archive_url;
        archive.hidden = false;
      }
      if (!drawn && run.phases.length) drawTimeline(run);
      return;
    }
    setTimeout(poll, 500);
  }

  poll();
})();
