// Small enhancements of the otaflow portal. Pages work through htmx
// attributes. This file checks an image's size before it is sent, and keeps
// the release page's actions panel while the user works in it.
document.addEventListener("change", (event) => {
  const input = event.target;
  if (!(input instanceof HTMLInputElement) || input.type !== "file") return;
  const limit = Number(input.dataset.maxBytes || 0);
  const error = document.getElementById("error-" + input.name);
  const file = input.files && input.files[0];
  const tooLarge = Boolean(limit && file && file.size > limit);
  input.setCustomValidity(tooLarge ? "too large" : "");
  if (error) {
    error.textContent = tooLarge
      ? `The file has ${file.size} bytes, more than the limit of ${limit} bytes.`
      : "";
  }
});

// The release page's live poll replaces #release-actions out of band when
// the buttons it should show change. That would erase a comment being typed
// and a message about the last action, so the swap is skipped while the
// panel is in use. The panel's hidden #release-actions-key then keeps the
// old fingerprint, and every later poll offers the new panel again, until
// one arrives after the user is done.
const TEXT_FIELDS = "textarea, input:not([type]), input[type=text]";

function actionsPanelInUse(panel) {
  const focused = document.activeElement;
  if (focused && panel.contains(focused) && focused.matches(TEXT_FIELDS)) {
    return true;
  }
  if (panel.querySelector(".action-notice, details[open], input:checked")) {
    return true;
  }
  for (const error of panel.querySelectorAll(".field-error")) {
    if (error.textContent.trim()) return true;
  }
  for (const field of panel.querySelectorAll(TEXT_FIELDS)) {
    if (field.value.trim()) return true;
  }
  return false;
}

// htmx 2.0 fires htmx:oobBeforeSwap on the element an out-of-band swap
// replaces; setting detail.shouldSwap to false skips that swap only.
document.addEventListener("htmx:oobBeforeSwap", (event) => {
  const panel = event.detail.target;
  if (!panel || panel.id !== "release-actions") return;
  if (actionsPanelInUse(panel)) {
    event.detail.shouldSwap = false;
    panel.dataset.stale = "true";
  }
});

// A result message stays until the user dismisses it. A panel that missed an
// update requests the newest state at once, through the poller's trigger.
document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-dismiss-notice]");
  if (!button) return;
  const panel = button.closest("#release-actions");
  button.closest(".notice").remove();
  if (panel && panel.dataset.stale === "true" && window.htmx) {
    window.htmx.trigger(document.body, "release-changed");
  }
});
