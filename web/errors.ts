// web/errors.ts — the page's error box: every failure is shown there, in words, never only in the console.

/// <reference lib="dom" />

/** Show an error (or several lines) in the box at the top of the page. */
export function showError(error: unknown): void {
  const box = document.getElementById("error-box")!;
  const message = error instanceof Error ? error.message : String(error);
  document.getElementById("error-text")!.textContent = message;
  box.hidden = false;
}

/** Hide the error box (a new action starts). */
export function clearError(): void {
  document.getElementById("error-box")!.hidden = true;
}

/** An event handler that clears the box, runs `action`, and shows what it throws (also asynchronously). */
export function guarded<E extends Event>(action: (event: E) => unknown): (event: E) => void {
  return (event: E) => {
    clearError();
    try {
      Promise.resolve(action(event)).catch(showError); // a rejected promise
    } catch (error) {
      showError(error); // a synchronous throw
    }
  };
}

/** Catch what no handler did: a thrown error or a rejected promise anywhere in the page goes to the box too. */
export function catchUnhandledErrors(): void {
  addEventListener("error", (event) => showError(event.error ?? event.message));
  addEventListener("unhandledrejection", (event) => showError(event.reason));
  document.getElementById("error-dismiss")!.addEventListener("click", clearError);
}
