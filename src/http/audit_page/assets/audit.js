// Draws the /audit page's chart from its JSON block: the page's Content-Security-Policy
// allows no inline script, so the data travels as JSON and this file turns it into bars.
(function () {
  "use strict";
  var block = document.getElementById("timeline-data");
  var canvas = document.getElementById("timeline");
  if (!block || !canvas || typeof Chart === "undefined") {
    return;
  }
  var timeline = JSON.parse(block.textContent);
  var step = timeline.bucket_seconds * 1000;
  var first = Date.parse(timeline.since);
  var last = Date.parse(timeline.until);
  var starts = [];
  for (var at = first; at < last; at += step) {
    starts.push(at);
  }
  var palette = ["#2563eb", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777", "#4b5563"];
  var targets = [];
  var series = {};
  timeline.points.forEach(function (point) {
    var target = point.target || "(no target)";
    if (targets.indexOf(target) < 0) {
      targets.push(target);
    }
    var key = point.decision + " " + target;
    if (!series[key]) {
      series[key] = { decision: point.decision, target: target, counts: starts.map(function () { return 0; }) };
    }
    // Buckets are counted from `since` (date_bin), so each start is since + k * step.
    var bucket = Math.round((Date.parse(point.start) - first) / step);
    if (bucket >= 0 && bucket < starts.length) {
      series[key].counts[bucket] += point.events;
    }
  });
  var withTime = step < 86400000;
  var labels = starts.map(function (start) {
    var text = new Date(start).toISOString();
    return withTime ? text.slice(5, 16).replace("T", " ") : text.slice(0, 10);
  });
  var datasets = Object.keys(series).sort().map(function (key) {
    var line = series[key];
    var colour = palette[targets.indexOf(line.target) % palette.length];
    var denied = line.decision === "denied";
    return {
      label: line.target + " " + line.decision,
      data: line.counts,
      stack: line.decision,
      backgroundColor: denied ? colour + "66" : colour,
      borderColor: denied ? "#dc2626" : colour,
      borderWidth: denied ? 1 : 0
    };
  });
  new Chart(canvas, {
    type: "bar",
    data: { labels: labels, datasets: datasets },
    options: {
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      scales: {
        x: { stacked: true, title: { display: true, text: "UTC" } },
        y: { stacked: true, beginAtZero: true, ticks: { precision: 0 }, title: { display: true, text: "events" } }
      },
      plugins: { legend: { position: "bottom" } }
    }
  });
  // Lets a reader (and the browser test) tell a drawn chart from a page whose script failed.
  canvas.setAttribute("data-rendered", String(datasets.length));
})();
