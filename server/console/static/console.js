// fedretrieve console: the little that needs a script (the page works without it).
(function () {
  "use strict";
  // The browser's time zone, so "From"/"To" (datetime-local, no zone) mean local time here.
  document.querySelectorAll("input[data-tz]").forEach(function (el) {
    el.value = String(new Date().getTimezoneOffset());
  });
  // Typing a time picks "Between the times below".
  var range = document.getElementById("range");
  ["since", "until"].forEach(function (id) {
    var el = document.getElementById(id);
    if (el && range) {
      el.addEventListener("change", function () { if (el.value) { range.value = "custom"; } });
    }
  });
  // The broker banner: asked every 5 s while the page is open.
  if (!document.body.hasAttribute("data-poll-broker")) { return; }
  var banner = document.getElementById("broker-banner");
  var message = document.getElementById("broker-message");
  function check() {
    fetch("/api/broker", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (state) {
        if (!state) { return; }
        banner.hidden = state.up;
        message.textContent = state.up || !state.message ? "" : "Reason: " + state.message;
      })
      .catch(function () {
        banner.hidden = false;
        message.textContent = "The console itself does not answer.";
      });
  }
  setInterval(check, 5000);
})();
