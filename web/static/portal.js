// Small enhancements of the otaflow portal; everything works through htmx
// attributes, and this file only checks an image's size before it is sent.
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
