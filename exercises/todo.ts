// The error an unsolved exercise throws. `deno task exercise <name>` recognises it and
// says "not written yet" instead of showing a stack trace.

/** Thrown by an exercise stub where the student's code goes. */
export class TodoError extends Error {
  constructor(task: string) {
    super(task);
    this.name = "TodoError";
  }
}
