// Carrara web UI: small progressive enhancements on server-rendered pages, and the live charts.
// Every page works without this file; it adds busy states, form helpers and Chart.js drawing.
(function () {
  "use strict";

  const PALETTE = ["#2f5bd3", "#e0802c", "#1f9d74", "#b4418e", "#6b7280", "#c0392b", "#7c5cd6"];
  const carrara = (window.carrara = { charts: {}, updates: 0 });

  // --- forms ---------------------------------------------------------------------------------

  // A form with data-confirm asks first; one with data-busy disables its buttons once
  // submitted (no double submits) and says why.
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement)) return;
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
      return;
    }
    if (!form.dataset.busy) return;
    for (const button of form.querySelectorAll("button[type=submit]")) {
      button.disabled = true;
      button.dataset.label = button.textContent;
      button.textContent = form.dataset.busy;
    }
  });
  // Coming back with the browser's back button restores the buttons.
  window.addEventListener("pageshow", () => {
    for (const button of document.querySelectorAll("button[data-label]")) {
      button.disabled = false;
      button.textContent = button.dataset.label;
    }
  });

  // Snapshot form: show the inputs of the chosen mode only.
  function syncModes(root) {
    for (const form of root.querySelectorAll("form")) {
      const chosen = form.querySelector("input[data-toggles=mode]:checked");
      if (!chosen) continue;
      for (const block of form.querySelectorAll("[data-mode]")) {
        block.hidden = block.dataset.mode !== chosen.value;
      }
    }
  }
  // Runs list: "Compare selected" is enabled with 2 to 5 runs ticked only.
  function syncCompare(root) {
    const button = root.querySelector("[data-compare-button]");
    if (!button) return;
    const count = root.querySelectorAll("#compare-form input[name=ids]:checked").length;
    button.disabled = count < 2 || count > 5;
    const note = root.getElementById ? root.getElementById("compare-count") : null;
    if (note) {
      note.textContent =
        count === 0 ? "tick 2 to 5 runs" : count === 1 ? "1 run ticked: tick at least one more"
        : count > 5 ? `${count} runs ticked: at most 5` : `${count} runs ticked`;
    }
  }

  document.addEventListener("change", (event) => {
    if (event.target.matches && event.target.matches("#compare-form input[name=ids]")) syncCompare(document);
    if (event.target.matches && event.target.matches("input[data-toggles=mode]")) syncModes(document);
    if (event.target.matches && event.target.matches("[data-weight], .variants-editor input[type=checkbox]")) {
      syncWeights(document);
    }
  });
  document.addEventListener("input", (event) => {
    if (event.target.matches && event.target.matches("[data-weight]")) syncWeights(document);
  });

  // Deployment editor: the live weights' total, which must be 100.
  function syncWeights(root) {
    const output = root.querySelector("#weight-total");
    if (!output) return;
    let total = 0;
    for (const row of root.querySelectorAll(".variants-editor tbody tr")) {
      const name = row.querySelector("input[name$='-name']");
      const weight = row.querySelector("[data-weight]");
      const shadow = row.querySelector("input[type=checkbox]");
      if (!name || !name.value.trim() || (shadow && shadow.checked)) continue;
      total += Number(weight.value || 0);
    }
    output.textContent = total + "%";
    output.className = total === 100 ? "text-good" : "text-bad";
  }

  // Feature-set editor: after the parser refused the SQL, put the cursor where it points.
  function showSqlError(root) {
    const editor = root.querySelector("textarea[data-error-line]");
    if (!editor) return;
    const line = Number(editor.dataset.errorLine);
    const column = Number(editor.dataset.errorColumn || 1);
    const lines = editor.value.split("\n");
    let offset = 0;
    for (let i = 0; i < Math.min(line - 1, lines.length); i++) offset += lines[i].length + 1;
    offset += Math.min(column - 1, (lines[line - 1] || "").length);
    editor.focus();
    editor.setSelectionRange(offset, offset);
  }
  document.addEventListener("DOMContentLoaded", () => showSqlError(document));

  // --- live charts -----------------------------------------------------------------------------

  const timeLabel = (iso) => {
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toISOString().slice(11, 16);
  };

  function lineChart(canvas, yTitle, percent, { log = false, legendFont = 11 } = {}) {
    return new window.Chart(canvas, {
      type: "line",
      data: { labels: [], datasets: [] },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        spanGaps: true,
        interaction: { mode: "index", intersect: false },
        plugins: {
          legend: { position: "bottom", labels: { boxWidth: 10, font: { size: legendFont } } },
          tooltip: percent
            ? { callbacks: { label: (c) => `${c.dataset.label}: ${(c.parsed.y * 100).toFixed(2)}%` } }
            : {},
        },
        scales: {
          x: { ticks: { maxTicksLimit: 7, font: { size: 10 } }, grid: { display: false } },
          y: {
            // Latency: a log axis, so milliseconds of scoring and seconds of lag both read.
            ...(log ? { type: "logarithmic" } : { beginAtZero: true }),
            title: { display: Boolean(yTitle), text: yTitle, font: { size: 10 } },
            ticks: {
              font: { size: 10 },
              callback: percent ? (v) => `${(v * 100).toFixed(v < 0.01 && v > 0 ? 2 : 0)}%` : undefined,
            },
          },
        },
      },
    });
  }

  function barChart(canvas) {
    return new window.Chart(canvas, {
      type: "bar",
      data: { labels: [], datasets: [] },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        plugins: {
          legend: { position: "bottom", labels: { boxWidth: 10, font: { size: 11 } } },
          tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${(c.parsed.y * 100).toFixed(1)}%` } },
        },
        scales: {
          x: { ticks: { maxTicksLimit: 6, font: { size: 10 } }, grid: { display: false } },
          y: { beginAtZero: true, ticks: { font: { size: 10 }, callback: (v) => `${Math.round(v * 100)}%` } },
        },
      },
    });
  }

  function chartFor(key, data) {
    if (carrara.charts[key]) return carrara.charts[key];
    const canvas = document.querySelector(`canvas[data-chart=${key}]`);
    if (!canvas || !window.Chart) return null;
    const make = {
      throughput: () => lineChart(canvas, data.throughput_unit, false),
      latency: () => lineChart(canvas, "ms (log scale)", false, { log: true, legendFont: 10 }),
      dead: () => lineChart(canvas, "", true),
      quality: () => lineChart(canvas, "", data.quality_is_rate),
      scores: () => barChart(canvas),
    }[key];
    carrara.charts[key] = make();
    return carrara.charts[key];
  }

  // The last bucket is still filling: its segment is dotted (never a drop in traffic).
  let partialLast = false;
  const unfinished = (ctx) =>
    partialLast && ctx.p1DataIndex === ctx.chart.data.labels.length - 1 ? [2, 3] : undefined;

  function lineSet(label, values, color, dashed, thin) {
    return {
      segment: { borderDash: unfinished },
      label,
      data: values,
      borderColor: color,
      backgroundColor: color,
      borderWidth: thin ? 1 : 2,
      borderDash: dashed ? [5, 4] : [],
      pointRadius: values.length < 30 ? 2 : 0,
      tension: 0.25,
    };
  }

  function drawLive() {
    const holder = document.getElementById("live-data");
    if (!holder || !window.Chart) return;
    const data = JSON.parse(holder.textContent);
    partialLast = Boolean(data.partial);
    const labels = data.labels.map(timeLabel);
    if (partialLast && labels.length) labels[labels.length - 1] += " (so far)";
    const routed = data.series.filter((s) => s.routed);
    // A variant keeps its colour when others are added: the champion always takes the first
    // colour, the others follow in the deployment's order ("not routed" is grey).
    const names = routed.map((s) => s.name);
    const champion = data.champion && names.includes(data.champion) ? data.champion : names[0];
    const ordered = [champion, ...names.filter((n) => n !== champion)];
    const colors = new Map(data.series.map((s) => [s.name, s.routed ? PALETTE[ordered.indexOf(s.name) % PALETTE.length] : "#9aa3af"]));
    const name = (s) => (s.shadow ? `${s.name} (shadow)` : s.name);

    const update = (key, datasets, chartLabels) => {
      const chart = chartFor(key, data);
      if (!chart) return;
      chart.data.labels = chartLabels || labels;
      chart.data.datasets = datasets;
      chart.update("none");
    };
    update("throughput", routed.map((s) => lineSet(name(s), s.throughput, colors.get(s.name), s.shadow)));
    update(
      "latency",
      // End to end (input record -> prediction written) in bold, the scorer's in-process time thin.
      routed.flatMap((s) => [
        lineSet(`${name(s)} e2e p50`, s.end_to_end_p50, colors.get(s.name), false),
        lineSet(`${name(s)} e2e p99`, s.end_to_end_p99, colors.get(s.name), true),
        lineSet(`${name(s)} scoring p50`, s.p50, colors.get(s.name) + "99", false, true),
        lineSet(`${name(s)} scoring p99`, s.p99, colors.get(s.name) + "99", true, true),
      ]),
    );
    update("dead", data.series.map((s) => lineSet(name(s), s.dead_letter_rate, colors.get(s.name), s.shadow)));
    update("quality", routed.map((s) => lineSet(name(s), s.quality, colors.get(s.name), s.shadow)));
    update(
      "scores",
      routed
        .filter((s) => s.scores.length)
        .map((s) => ({ label: name(s), data: s.scores, backgroundColor: colors.get(s.name) + "cc" })),
      data.score_bins,
    );
    const caption = document.getElementById("chart-quality-title");
    if (caption) caption.textContent = data.quality_label;
    carrara.updates += 1;
    const charts = document.getElementById("charts");
    if (charts) charts.dataset.updates = String(carrara.updates);
  }

  document.addEventListener("htmx:afterSettle", (event) => {
    if (event.target && event.target.querySelector && event.target.querySelector("#live-data")) drawLive();
  });
  document.addEventListener("DOMContentLoaded", () => {
    syncCompare(document);
    syncModes(document);
    syncWeights(document);
  });
})();
