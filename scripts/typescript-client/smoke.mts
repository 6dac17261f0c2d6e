// Drives a live server through a client generated from its /openapi.json: openapi-typescript
// writes the types (schema.d.ts, next to this file), openapi-fetch makes the calls, and tsc
// checks this program against those types before node runs it.
//
// Usage: OPTSERVER_URL=http://127.0.0.1:8000 OPTSERVER_ADMIN_KEY=... node build/smoke.mjs
// Exits with status 1 and a message on the first mismatch; prints "ok" when all is well.

import createClient from "openapi-fetch";
import type { components, operations, paths } from "./schema.js";

type Matrix = number[][];
type Problem = components["schemas"]["Problem"];
type CreateSession = operations["createSession"]["requestBody"]["content"]["application/json"];

const LR = 0.1;

function env(name: string): string {
  const value = process.env[name];
  if (value === undefined || value === "") throw new Error(`${name} is not set`);
  return value;
}

function check(condition: boolean, message: string): asserts condition {
  if (!condition) throw new Error(message);
}

/** The JSON body of a successful answer (not a safetensors one), or an error naming `what`. */
function json<T>(result: { data?: T | string; error?: unknown }, what: string): T {
  const { data, error } = result;
  check(data !== undefined && typeof data !== "string", `${what}: ${JSON.stringify(error)}`);
  return data;
}

function close(actual: unknown, expected: Matrix, what: string): void {
  const rows = actual as unknown[];
  check(Array.isArray(rows) && rows.length === expected.length, `${what}: ${String(actual)}`);
  expected.forEach((row, i) => {
    const got = rows[i] as unknown[];
    check(Array.isArray(got) && got.length === row.length, `${what}[${i}]: ${String(got)}`);
    row.forEach((want, j) => {
      const value = got[j];
      check(
        typeof value === "number" && Math.abs(value - want) <= 1e-6 * Math.abs(want) + 1e-7,
        `${what}[${i}][${j}] is ${String(value)}; expected ${want}`,
      );
    });
  });
}

/** SGD without momentum, in float32: w - lr * g. */
function sgd(w: Matrix, g: Matrix, lr: number): Matrix {
  const rate = Math.fround(lr);
  return w.map((row, i) => row.map((x, j) => Math.fround(x - rate * (g[i]?.[j] ?? NaN))));
}

function matrix(rows: number, cols: number, f: (i: number, j: number) => number): Matrix {
  const row = (i: number) => Array.from({ length: cols }, (_, j) => Math.fround(f(i, j)));
  return Array.from({ length: rows }, (_, i) => row(i));
}

async function main(): Promise<void> {
  const baseUrl = env("OPTSERVER_URL");
  const admin = createClient<paths>({
    baseUrl,
    headers: { Authorization: `Bearer ${env("OPTSERVER_ADMIN_KEY")}` },
  });

  const w0 = matrix(2, 3, (i, j) => (i * 3 + j + 1) / 4);
  const create: CreateSession = { optimizer: { name: "sgd", lr: LR }, params: { w: w0 } };
  const createAnswer = await admin.POST("/v1/sessions", { body: create });
  check(createAnswer.response.status === 201, `create: ${createAnswer.response.status}`);
  const created = json(createAnswer, "create");
  check(created.version === 0, `create: version ${created.version}`);
  const session = createClient<paths>({
    baseUrl,
    headers: { Authorization: `Bearer ${created.token}` },
  });
  const path = { session_id: created.id };

  const g1 = matrix(2, 3, (i, j) => 0.5 - (i * 3 + j) / 8);
  const stepped = json(
    await session.POST("/v1/sessions/{session_id}/step", {
      params: { path },
      body: { grads: { w: g1 } },
    }),
    "step",
  );
  check(stepped.version === 1 && stepped.applied, `step: ${JSON.stringify(stepped)}`);
  close(stepped.params?.["w"], sgd(w0, g1, LR), "step answer w");

  const w2 = matrix(2, 3, (i, j) => (j - i) / 3);
  const put = json(
    await session.PUT("/v1/sessions/{session_id}/params", {
      params: { path, query: { reset_state: true } },
      body: { params: { w: w2 } },
    }),
    "put",
  );
  check(put.version === 1, `put: version ${put.version}`); // putting weights is not a step

  const g2 = matrix(2, 3, (i, j) => (i + 1) * (j - 1));
  const acknowledged = json(
    await session.POST("/v1/sessions/{session_id}/step", {
      params: { path, query: { return: "none" } },
      body: { grads: { w: g2 } },
    }),
    "step",
  );
  check(
    acknowledged.version === 2 && acknowledged.params === undefined,
    `return=none: ${JSON.stringify(acknowledged)}`,
  );

  const pulled = json(
    await session.GET("/v1/sessions/{session_id}/params", {
      params: { path, query: { names: "w" } },
    }),
    "pull",
  );
  check(pulled.version === 2, `pull: version ${pulled.version}`);
  const names = Object.keys(pulled.params).join();
  check(names === "w", `pull: ${names}`);
  close(pulled.params["w"], sgd(w2, g2, LR), "pulled w");

  const deleted = await session.DELETE("/v1/sessions/{session_id}", { params: { path } });
  check(deleted.response.status === 204, `delete: status ${deleted.response.status}`);
  const gone = await admin.GET("/v1/sessions/{session_id}", { params: { path } });
  const problem: Problem | undefined = gone.error;
  check(
    gone.response.status === 404 && problem?.status === 404,
    `after delete: ${JSON.stringify(problem)}`,
  );
  console.log("ok");
}

main().catch((error: unknown) => {
  console.error(error instanceof Error ? error.message : error);
  process.exit(1);
});
