// Parts of a page that fetch themselves again (<div data-refresh="/overview/live"
// data-every="2000" data-at-once>): a file of the console's own, as the Content-Security-Policy
// allows no inline script. A session that ended sends the page itself to the sign-in.
"use strict";

for (const part of document.querySelectorAll("[data-refresh]")) {
  const refresh = async () => {
    try {
      const answer = await fetch(part.dataset.refresh, { credentials: "same-origin" });
      if (answer.redirected) {
        window.location.reload();
      } else if (answer.ok) {
        part.innerHTML = await answer.text();
      }
    } catch (error) {
      // unreachable for a moment: the next turn tries again
    }
  };
  if ("atOnce" in part.dataset) {
    refresh();
  }
  setInterval(refresh, Number(part.dataset.every));
}
