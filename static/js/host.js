// Host page: its containers and processes, asked live from the host.
(async () => {
  const section = document.getElementById("workloads");
  const migrateUrl = section.dataset.migrateUrl;
  const loading = section.querySelector(".loading");
  const migrateLink = (params) => {
    if (!migrateUrl) return "";
    const query = new URLSearchParams({ source: section.dataset.host, ...params });
    return cw.el("a", { href: `${migrateUrl}?${query}`, text: "migrate…" });
  };
  try {
    const data = await cw.getJSON(section.dataset.url);
    loading.remove();
    const containers = document.getElementById("containers");
    for (const c of data.containers) {
      containers.tBodies[0].append(cw.row([c.name, c.image, c.status,
        c.state === "running" ? migrateLink({ kind: "container", container: c.name }) : ""]));
    }
    containers.hidden = false;
    const processes = document.getElementById("processes");
    const filter = document.getElementById("process-filter");
    const draw = () => {
      const needle = filter.value.toLowerCase();
      processes.tBodies[0].replaceChildren(...data.processes
        .filter((p) => p.command.toLowerCase().includes(needle))
        .slice(0, 100)
        .map((p) => cw.row([String(p.pid), p.user, cw.bytes(p.rss_kib * 1024), p.command,
          migrateLink({ kind: "process", pid: p.pid })])));
    };
    filter.addEventListener("input", draw);
    draw();
    filter.hidden = processes.hidden = false;
  } catch (error) {
    loading.textContent = `Could not list workloads: ${error.message}`;
    loading.className = "message error";
  }
})();
