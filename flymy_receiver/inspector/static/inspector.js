// flymy-receiver inspector: keeps the page live by polling the JSON API once a second.
// Every value from a delivery goes into the page through textContent, never as HTML.
"use strict";
(function () {
  var body = document.body;
  var base = body.dataset.base || "/";
  var live = document.getElementById("live");
  var POLL_MS = 1000;

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // The same format as the server's "when" filter: UTC, to the second.
  function when(iso) {
    var date = new Date(iso);
    if (isNaN(date.getTime())) return "-";
    return date.toISOString().slice(0, 19).replace("T", " ");
  }

  function deliveryUrl(key) {
    return base + "deliveries/" + encodeURIComponent(key);
  }

  function setLive(ok) {
    if (!live) return;
    live.hidden = false;
    live.textContent = ok ? "live" : "reconnecting\u2026";
    live.classList.toggle("down", !ok);
  }

  function getJSON(path) {
    return fetch(base + path, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      });
  }

  // Polls one path; calls render(text) when the answer changed. Pauses while hidden.
  function poll(pathFn, render) {
    var last = null;
    var timer = null;
    function tick() {
      timer = null;
      if (document.hidden) return;
      getJSON(pathFn()).then(function (text) {
        setLive(true);
        if (text !== last) {
          last = text;
          render(JSON.parse(text));
        }
      }).catch(function () {
        setLive(false);
      }).then(function () {
        if (timer === null) timer = setTimeout(tick, POLL_MS);
      });
    }
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden && timer === null) tick();
    });
    tick();
    return function now() {
      last = null;
      if (timer !== null) { clearTimeout(timer); timer = null; }
      tick();
    };
  }

  function startIndex() {
    var form = document.getElementById("filters");
    var rows = document.getElementById("rows");
    var empty = document.getElementById("empty");
    var count = document.getElementById("count");
    var refusals = document.getElementById("refusals");
    var noRefusals = document.getElementById("no-refusals");
    var known = null;

    var older = document.getElementById("older");
    var olderP = document.getElementById("older-p");
    var bulk = document.getElementById("bulk");
    // The page's own limit, if it has one (the server checked it when it rendered the page).
    var LIMIT = parseInt(new URLSearchParams(window.location.search).get("limit"), 10) || 100;

    function query() {
      var params = new URLSearchParams();
      ["state", "event", "agent_id", "run_id", "before"].forEach(function (name) {
        var field = form.elements[name];
        var value = field ? field.value.trim() : "";
        if (value) params.set(name, value);
      });
      return params;
    }

    // The bulk replay form replays what the filter shows: keep its fields in step.
    function syncBulk() {
      if (!bulk) return;
      Array.prototype.forEach.call(bulk.querySelectorAll("[data-filter]"), function (input) {
        var field = form.elements[input.dataset.filter];
        input.value = field ? field.value.trim() : "";
      });
    }

    function renderDeliveries(data) {
      var fresh = document.createDocumentFragment();
      var seen = {};
      data.deliveries.forEach(function (d) {
        seen[d.key] = true;
        var tr = el("tr");
        tr.dataset.key = d.key;
        if (known !== null && !known[d.key]) tr.className = "new";
        var cells = [
          ["Received", when(d.received_at)],
          ["Event", d.event],
          ["Run", null],
          ["Agent", d.agent_name || d.agent_id || "-"],
          ["State", null],
          ["Attempts", d.attempts]
        ];
        cells.forEach(function (cell) {
          var td = el("td", null, cell[1]);
          td.dataset.label = cell[0];
          tr.appendChild(td);
        });
        var link = el("a", null, d.run_id !== null && d.run_id !== undefined ? d.run_id : d.key);
        link.href = deliveryUrl(d.key);
        tr.children[2].className = "run";
        tr.children[2].appendChild(link);
        if (d.agent_name && d.agent_id) {
          tr.children[3].appendChild(document.createTextNode(" "));
          tr.children[3].appendChild(el("span", "sub id", d.agent_id));
        }
        tr.children[4].appendChild(el("span", "state state-" + d.state, d.state));
        fresh.appendChild(tr);
      });
      known = seen;
      rows.replaceChildren(fresh);
      empty.hidden = data.deliveries.length > 0;
      count.textContent = data.deliveries.length + " shown, newest first";
      if (older && olderP) {
        olderP.hidden = !data.before;
        if (data.before) {
          var next = query();
          if (LIMIT !== 100) next.set("limit", String(LIMIT));
          next.set("before", data.before);
          older.href = base + "?" + next.toString();
        }
      }
    }

    function renderRefusals(data) {
      var fresh = document.createDocumentFragment();
      data.refusals.forEach(function (r) {
        var li = el("li");
        var head = el("span", "refusal-head");
        head.appendChild(el("span", "status", r.status));
        head.appendChild(document.createTextNode(" "));
        head.appendChild(el("code", null, r.reason));
        li.appendChild(head);
        if (r.detail) li.appendChild(el("span", "hint", r.detail));
        li.appendChild(el("time", null, when(r.at)));
        fresh.appendChild(li);
      });
      refusals.replaceChildren(fresh);
      noRefusals.hidden = data.refusals.length > 0;
    }

    if (!rows || !form) return;
    // The rows the server rendered count as known: only later arrivals are highlighted.
    known = {};
    Array.prototype.forEach.call(rows.children, function (tr) { known[tr.dataset.key] = true; });
    var refresh = poll(function () {
      var params = query();
      params.set("limit", String(LIMIT));
      return "api/deliveries?" + params.toString();
    }, renderDeliveries);
    poll(function () { return "api/refusals?limit=20"; }, renderRefusals);

    function applyFilters() {
      // New filters start from the newest page again.
      if (form.elements.before) form.elements.before.value = "";
      syncBulk();
      var params = query();
      var search = params.toString();
      history.replaceState(null, "", base + (search ? "?" + search : ""));
      refresh();
    }
    form.addEventListener("change", applyFilters);
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      applyFilters();
    });
  }

  function startDelivery() {
    var article = document.querySelector("article.detail");
    if (!article) return;
    var key = article.dataset.key;
    var run = article.dataset.run;
    var updated = article.dataset.updated;
    var state = document.getElementById("state");
    var attempts = document.getElementById("attempts");
    var updatedText = document.getElementById("updated");
    var changed = document.getElementById("changed");
    startCurl(key);
    // The refresh reads summaries only (the list, by run id): never the body again.
    if (!run) return;
    poll(function () {
      return "api/deliveries?limit=50&run_id=" + encodeURIComponent(run);
    }, function (data) {
      var d = null;
      data.deliveries.forEach(function (item) { if (item.key === key) d = item; });
      if (d === null) return;
      state.textContent = d.state;
      state.className = "state state-" + d.state;
      attempts.textContent = d.attempts;
      updatedText.textContent = when(d.updated_at);
      // Handler outcomes, history and tracebacks stay as rendered; say when they are old.
      changed.hidden = new Date(d.updated_at).getTime() === new Date(updated).getTime();
    });
  }

  // "Copy as curl": the server builds the command for the URL in the form; it signs the
  // body itself when run, so it holds neither the secret nor a signature.
  function startCurl(key) {
    var button = document.getElementById("copy-curl");
    var url = document.getElementById("resend-url");
    var pre = document.getElementById("curl");
    var code = document.getElementById("curl-command");
    var problem = document.getElementById("curl-problem");
    if (!button || !url) return;
    button.addEventListener("click", function () {
      problem.hidden = true;
      fetch(base + "api/curl/" + encodeURIComponent(key) + "?url=" + encodeURIComponent(url.value.trim()), {
        headers: { Accept: "application/json" }, credentials: "same-origin"
      }).then(function (response) {
        return response.json().then(function (data) {
          if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
          return data.command;
        });
      }).then(function (command) {
        code.textContent = command;
        pre.hidden = false;
        button.textContent = "Copy as curl";
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(command).then(function () {
            button.textContent = "Copied";
          }, function () { /* shown on the page: select it by hand */ });
        }
      }).catch(function (error) {
        problem.textContent = String(error.message || error);
        problem.hidden = false;
      });
    });
  }

  if (body.dataset.page === "index") startIndex();
  else if (body.dataset.page === "delivery") startDelivery();
})();
