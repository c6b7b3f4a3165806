// Comparison page: charts drawn from one JSON endpoint.
(async () => {
  const root = document.getElementById("compare");
  const PALETTE = ["#3b82f6", "#10b981", "#f59e0b", "#8b5cf6", "#ef4444", "#06b6d4", "#84cc16", "#ec4899", "#64748b"];
  const data = await cw.getJSON(root.dataset.url);
  window.cwCompareCharts = [];
  const chart = (id, config) => {
    config.options = { maintainAspectRatio: false, animation: false, ...(config.options || {}) };
    window.cwCompareCharts.push(new Chart(document.getElementById(id), config));
  };
  const ms = { title: { display: true, text: "ms" }, beginAtZero: true };

  chart("over-time", {
    type: "line",
    data: {
      labels: data.over_time.map((r) => r.created.slice(0, 19).replace("T", " ")),
      datasets: [{ label: "downtime", data: data.over_time.map((r) => r.downtime_ms), borderColor: PALETTE[0], pointRadius: 3 }],
    },
    // offset: a lone run's point is drawn inside the chart, not on its axis.
    options: { scales: { y: ms, x: { offset: true, ticks: { maxTicksLimit: 8 } } } },
  });

  // One series per kind and strategy (TLS apart), and one more per series
  // for the observed downtime; the baseline is a strategy of its own.
  const series = new Map();
  const seriesFor = (name) => {
    if (!series.has(name)) series.set(name, { reported: [], observed: [] });
    return series.get(name);
  };
  for (const p of data.by_size) {
    const s = seriesFor(`${p.kind} ${p.strategy}${p.tls ? " TLS" : ""}`);
    const mib = p.bytes / 1048576;
    s.reported.push({ x: mib, y: p.downtime_ms });
    if (p.observed_ms != null && p.observed_ms > 0) s.observed.push({ x: mib, y: p.observed_ms });
  }
  const scatter = [];
  [...series.entries()].forEach(([name, s], i) => {
    const color = PALETTE[i % PALETTE.length];
    scatter.push({ label: name, data: s.reported, backgroundColor: color, borderColor: color, pointRadius: 4 });
    if (s.observed.length) {
      scatter.push({ label: `${name} (observed)`, data: s.observed, borderColor: color, backgroundColor: "transparent",
        pointStyle: "triangle", pointRadius: 6 });
    }
  });
  chart("by-size-scatter", {
    type: "scatter",
    data: { datasets: scatter },
    options: {
      scales: {
        x: { type: "logarithmic", title: { display: true, text: "state moved (MiB)" } },
        y: { type: "logarithmic", title: { display: true, text: "downtime (ms)" } },
      },
      plugins: { tooltip: { callbacks: { label: (item) =>
        `${item.dataset.label}: ${item.raw.y.toFixed(0)} ms at ${item.raw.x.toFixed(1)} MiB` } } },
    },
  });

  const names = Object.keys(data.phases.phases);
  chart("phase-breakdown", {
    type: "bar",
    data: {
      labels: data.phases.labels.map((l) => l.slice(0, 19).replace("T", " ")),
      datasets: names.map((name, i) => ({ label: name, data: data.phases.phases[name], backgroundColor: PALETTE[i % PALETTE.length] })),
    },
    options: { scales: { x: { stacked: true, ticks: { maxTicksLimit: 8 } }, y: { ...ms, stacked: true } } },
  });

  for (const [grouping, groups] of Object.entries(data.groups)) {
    chart(`by-${grouping}`, {
      type: "bar",
      data: {
        labels: groups.map((g) => g.group),
        datasets: [
          { label: "median", data: groups.map((g) => g.median_ms), backgroundColor: PALETTE[0] },
          { label: "95th percentile", data: groups.map((g) => g.p95_ms), backgroundColor: PALETTE[2] },
        ],
      },
      options: { scales: { y: ms } },
    });
    const table = document.getElementById(`table-${grouping}`);
    table.append(cw.row(["group", "runs", "median", "p95"]));
    for (const g of groups) {
      table.append(cw.row([g.group, String(g.count), `${g.median_ms.toFixed(0)} ms`, `${g.p95_ms.toFixed(0)} ms`]));
    }
  }
})();
