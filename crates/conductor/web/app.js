// convoy dashboard: live updates without reloading. The pages work without this file;
// with it, pages marked data-live re-render their #live region whenever the conductor
// reports a change on /events (SSE), and the app/stage selects of the deploy form reload
// the refs offered.
(function () {
  "use strict";
  document.documentElement.classList.add("js");

  // Forms that ask before they act (abort, roll back).
  document.addEventListener("submit", function (e) {
    var form = e.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) e.preventDefault();
  });

  // The deploy form: changing app or stage reloads the refs present on its hosts.
  document.addEventListener("change", function (e) {
    var el = e.target;
    if (!el.hasAttribute || !el.hasAttribute("data-reload")) return;
    var params = new URLSearchParams();
    ["app", "stage"].forEach(function (name) {
      var field = el.form.elements[name];
      // A new app has other stages: let the server choose the first.
      if (field && !(name === "stage" && el.name === "app")) params.set(name, field.value);
    });
    window.location.assign("/deploy?" + params.toString());
  });

  var main = document.querySelector("main[data-live]");
  var status = document.getElementById("live-status");
  if (!main || !window.EventSource) return;

  var pending = null, running = false, again = false;
  function refresh() {
    if (running) { again = true; return; }
    running = true;
    var focused = document.activeElement && document.activeElement.id;
    var open = Array.prototype.map.call(main.querySelectorAll("details[open]"), function (d) {
      return d.closest("[data-host]") ? d.closest("[data-host]").getAttribute("data-host") : null;
    });
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Convoy-Live": "1" } })
      .then(function (resp) {
        if (resp.redirected || resp.status === 401) { window.location.reload(); return null; }
        return resp.ok ? resp.text() : null;
      })
      .then(function (text) {
        if (!text) return;
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.getElementById("live");
        var live = document.getElementById("live");
        if (!fresh || !live) return;
        live.replaceWith(fresh);
        open.forEach(function (host) {
          if (!host) return;
          var d = main.querySelector('[data-host="' + CSS.escape(host) + '"] details');
          if (d) d.open = true;
        });
        if (focused) {
          var el = document.getElementById(focused);
          if (el) el.focus();
        }
      })
      .catch(function () {})
      .then(function () {
        running = false;
        if (again) { again = false; schedule(); }
      });
  }
  function schedule() {
    if (pending) return;
    pending = setTimeout(function () { pending = null; refresh(); }, 250);
  }

  function setStatus(text, cls) {
    if (!status) return;
    status.textContent = text;
    status.className = "status " + cls;
  }

  var source, wasDown = false;
  function connect() {
    source = new EventSource("/events");
    source.onopen = function () {
      setStatus("live", "live");
      if (wasDown) { wasDown = false; schedule(); }
    };
    source.onerror = function () {
      setStatus("reconnecting…", "down");
      wasDown = true;
      // EventSource retries by itself unless the server refused (e.g. logged out).
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, 3000);
    };
    ["rollout", "progress", "result", "host", "pipeline", "build", "fetch", "inventory", "lagged"].forEach(function (kind) {
      source.addEventListener(kind, schedule);
    });
  }
  connect();
  // Hosts turn stale without an event: look again now and then.
  setInterval(schedule, 15000);
})();
