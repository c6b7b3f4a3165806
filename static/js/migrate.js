// Migration form: show the fields of the chosen kind and offer the source's
// live containers and processes to pick from.
(() => {
  const form = document.getElementById("migrate-form");
  const source = form.elements.source;
  const status = document.getElementById("workloads-status");
  const containerChoices = document.getElementById("container-choices");
  const processChoices = document.getElementById("process-choices");

  const showKind = () => {
    const kind = form.querySelector("input[name=kind]:checked")?.value || "container";
    form.querySelector(".kind-container").hidden = kind !== "container";
    form.querySelector(".kind-process").hidden = kind !== "process";
  };

  const fill = (select, items, label, value) => {
    select.replaceChildren(cw.el("option", { value: "", text: label }),
      ...items.map((item) => cw.el("option", { value: value(item), text: item.label })));
  };

  const load = async () => {
    status.textContent = `Asking ${source.value} for its workloads…`;
    try {
      const data = await cw.getJSON(form.dataset.workloadsUrl.replace("HOST", encodeURIComponent(source.value)));
      fill(containerChoices,
        data.containers.filter((c) => c.state === "running").map((c) => ({ ...c, label: `${c.name} (${c.image})` })),
        "— running containers —", (c) => c.name);
      fill(processChoices,
        data.processes.slice(0, 200).map((p) => ({ ...p, label: `${p.pid} ${p.command.slice(0, 60)}` })),
        "— processes —", (p) => p.pid);
      status.textContent = "";
    } catch (error) {
      status.textContent = `Could not list workloads on ${source.value}: ${error.message}`;
    }
  };

  // Only the strategies of the chosen kind that both hosts passed in their
  // probe; the others are listed with what each host lacks.
  const table = JSON.parse(document.getElementById("strategy-table").textContent);
  const strategy = form.elements.strategy;
  const summary = document.getElementById("strategy-summary");
  const missingList = document.getElementById("strategy-missing");
  const showSummary = () => {
    const kind = form.querySelector("input[name=kind]:checked")?.value || "container";
    const row = (table.strategies[kind] || []).find(([name]) => name === strategy.value);
    summary.textContent = row ? row[2] : "";
  };
  const offer = () => {
    const kind = form.querySelector("input[name=kind]:checked")?.value || "container";
    const wanted = strategy.value;
    const why = [];
    const offered = [];
    for (const [name, label] of table.strategies[kind] || []) {
      const lacks = [form.elements.source.value, form.elements.target.value]
        .flatMap((host) => ((table.missing[host] || {})[`${kind}/${name}`] || []).map((m) => `${host}: ${m}`));
      if (lacks.length) why.push(`${label}: not offered (${lacks.join("; ")})`);
      else offered.push(cw.el("option", { value: name, text: label }));
    }
    strategy.replaceChildren(...offered);
    if (offered.some((o) => o.value === wanted)) strategy.value = wanted;
    missingList.replaceChildren(...why.map((text) => cw.el("li", { text })));
    showSummary();
  };
  for (const radio of form.querySelectorAll("input[name=kind]")) radio.addEventListener("change", offer);
  form.elements.target.addEventListener("change", offer);
  source.addEventListener("change", offer);
  strategy.addEventListener("change", showSummary);
  offer();

  containerChoices.addEventListener("change", () => { if (containerChoices.value) form.elements.container.value = containerChoices.value; });
  processChoices.addEventListener("change", () => { if (processChoices.value) form.elements.pid.value = processChoices.value; });
  for (const radio of form.querySelectorAll("input[name=kind]")) radio.addEventListener("change", showKind);
  source.addEventListener("change", load);
  showKind();
  load();
})();
