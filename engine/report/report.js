// The report's charts: the series in #report-data (engine/report/charts.py), drawn with
// uPlot (engine/report/vendor). Every panel shares one time axis (UTC): the cursor and
// the zoom of one are the cursor and zoom of all. Restarts are dashed vertical lines,
// replica outages shaded spans, on every panel.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var plots = [];
  var syncing = false;
  var HEIGHT = 220;
  var stamp = uPlot.fmtDate("{YYYY}-{MM}-{DD} {HH}:{mm}:{ss}");
  var day = uPlot.fmtDate("{YYYY}-{MM}-{DD}");
  var minute = uPlot.fmtDate("{HH}:{mm}");
  var second = uPlot.fmtDate("{HH}:{mm}:{ss}");
  function utc(ts) {
    return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC");
  }
  function ticks(u, splits, axis, space, step) {  // 24-hour UTC, the date where it changes
    var shown = "";
    return splits.map(function (v) {
      if (v == null) return null;
      var d = utc(v), date = day(d);
      if (step >= 86400) return date;
      var text = (step < 60 ? second : minute)(d);
      if (date !== shown) text += "\n" + date;
      shown = date;
      return text;
    });
  }
  function number(v) {
    if (v == null) return "--";
    var a = Math.abs(v);
    if (a >= 1000) return Math.round(v).toLocaleString("en-US");
    if (a >= 100) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    return v.toFixed(a >= 1 || a === 0 ? 2 : 3);
  }

  function shade(u) {  // outages, under the lines
    var ctx = u.ctx, box = u.bbox;
    ctx.save();
    ctx.fillStyle = data.colors.outage + "26";
    data.outages.forEach(function (span) {
      var a = Math.max(box.left, u.valToPos(span[0], "x", true));
      var b = Math.min(box.left + box.width, u.valToPos(span[1], "x", true));
      if (b >= a) ctx.fillRect(a, box.top, Math.max(b - a, uPlot.pxRatio), box.height);
    });
    ctx.restore();
  }

  function restarts(u) {  // restarts, over the lines
    var ctx = u.ctx, box = u.bbox, px = uPlot.pxRatio;
    ctx.save();
    ctx.strokeStyle = ctx.fillStyle = data.colors.restart;
    ctx.lineWidth = px;
    ctx.setLineDash([5 * px, 4 * px]);
    ctx.font = 11 * px + "px system-ui, sans-serif";
    ctx.textBaseline = "top";
    data.restarts.forEach(function (r) {
      var x = Math.round(u.valToPos(r.t, "x", true));
      if (x < box.left || x > box.left + box.width) return;
      ctx.beginPath();
      ctx.moveTo(x, box.top);
      ctx.lineTo(x, box.top + box.height);
      ctx.stroke();
      if (!r.label) return;
      var right = x > box.left + box.width * 0.75;  // near the right edge: label on the left
      ctx.textAlign = right ? "right" : "left";
      ctx.fillText(r.label, x + (right ? -4 : 4) * px, box.top + 2 * px);
    });
    ctx.restore();
  }

  function followZoom(u, key) {  // a zoom (or its undoing) on one panel, on every panel
    if (key !== "x" || syncing) return;
    syncing = true;
    var range = { min: u.scales.x.min, max: u.scales.x.max };
    plots.forEach(function (other) {
      if (other !== u) other.setScale("x", range);
    });
    syncing = false;
  }

  function draw(panel, holder) {
    var series = [{ label: "time (UTC)", value: function (u, v) {
      return v == null ? "--" : stamp(utc(v));
    } }];
    panel.lines.forEach(function (line) {
      series.push({
        label: line.label,
        stroke: line.color,
        width: line.width,
        dash: line.dash.length ? line.dash : undefined,
        spanGaps: false,
        points: { show: false },
        value: function (u, v) { return number(v); },
      });
    });
    var opts = {
      title: panel.title,
      width: Math.max(320, holder.clientWidth),
      height: HEIGHT,
      tzDate: utc,
      series: series,
      // The time under the cursor on every panel; no horizontal hair (a height on one
      // panel means nothing on the next).
      cursor: { sync: { key: "turnstile-report" }, drag: { x: true, y: false }, y: false },
      scales: {
        x: { time: true },
        y: { range: function (u, min, max) { return [0, max > 0 ? max * 1.08 : 1]; } },
      },
      axes: [{ values: ticks, size: 46 }, { label: panel.unit, size: 60 }],
      legend: { live: true },
      hooks: { drawClear: [shade], draw: [restarts], setScale: [followZoom] },
    };
    var columns = [data.t].concat(panel.lines.map(function (line) { return line.values; }));
    var plot = new uPlot(opts, columns, holder);
    if (!panel.lines.length) {
      var note = document.createElement("div");
      note.className = "nothing";
      note.textContent = "nothing recorded";
      holder.appendChild(note);
    }
    plots.push(plot);
  }

  var sections = {};
  document.querySelectorAll("section[data-plot]").forEach(function (section) {
    sections[section.dataset.plot] = section;
  });
  data.charts.forEach(function (chart) {
    var section = sections[chart.name];
    chart.panels.forEach(function (panel, i) {
      var holder = document.createElement("div");
      holder.className = "panel";
      holder.setAttribute("data-panel", String(i));
      section.appendChild(holder);
      draw(panel, holder);
    });
  });

  function fit() {
    plots.forEach(function (plot) {
      plot.setSize({ width: Math.max(320, plot.root.parentNode.clientWidth), height: HEIGHT });
    });
  }
  // The page grew as the charts went in (a scrollbar may have taken some width): one
  // width for all of them, so their time axes line up.
  fit();
  var pending = null;
  window.addEventListener("resize", function () {
    clearTimeout(pending);
    pending = setTimeout(fit, 100);
  });
  window.turnstileReport = { plots: plots };
})();
