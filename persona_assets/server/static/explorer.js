// The person explorer's only script: an action's page follows the action until it ends, then reloads.
(function () {
  "use strict";
  var action = document.getElementById("action");
  if (!action || action.dataset.running !== "yes") return;
  var url = "/actions/" + encodeURIComponent(action.dataset.action) + "/status";
  function poll() {
    fetch(url, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (job) {
        if (job && !job.running) { window.location.reload(); } else { window.setTimeout(poll, 1500); }
      })
      .catch(function () { window.setTimeout(poll, 3000); });
  }
  window.setTimeout(poll, 1500);
})();
