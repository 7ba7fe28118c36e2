// The few @std/assert functions our tests use, on top of Deno's built-in node:assert
// (JSR, where @std/assert lives, is not reachable from our machines).

import nodeAssert from "node:assert/strict";

/** Assert that a condition holds. */
export function assert(condition: unknown, message = "assertion failed"): asserts condition {
  nodeAssert.ok(condition, message);
}

/** Assert deep equality (arrays, objects, numbers). */
export function assertEquals<T>(actual: T, expected: T, message?: string): void {
  nodeAssert.deepStrictEqual(actual, expected, message);
}

/** Assert that a string matches a regular expression. */
export function assertMatch(actual: string, pattern: RegExp): void {
  nodeAssert.match(actual, pattern);
}

function checkError(error: unknown, ErrorClass: new (...args: never[]) => Error, includes?: string): void {
  if (!(error instanceof ErrorClass)) throw new Error(`expected a ${ErrorClass.name}, got ${error}`);
  if (includes && !error.message.includes(includes)) {
    throw new Error(`expected the error message to include "${includes}", got: ${error.message}`);
  }
}

/** Assert that `fn` throws an `ErrorClass` whose message includes `includes`. */
export function assertThrows(fn: () => unknown, ErrorClass: new (...args: never[]) => Error, includes?: string): void {
  try {
    fn();
  } catch (error) {
    return checkError(error, ErrorClass, includes);
  }
  throw new Error(`expected ${ErrorClass.name}${includes ? ` with "${includes}"` : ""}, but nothing was thrown`);
}

/** Assert that `fn` rejects with an `ErrorClass` whose message includes `includes`. */
export async function assertRejects(
  fn: () => Promise<unknown>,
  ErrorClass: new (...args: never[]) => Error,
  includes?: string,
): Promise<void> {
  try {
    await fn();
  } catch (error) {
    return checkError(error, ErrorClass, includes);
  }
  throw new Error(`expected ${ErrorClass.name}${includes ? ` with "${includes}"` : ""}, but nothing was thrown`);
}
