// The published TypeScript SDK (@opencomputer/sdk, pinned by qemu-test) against the appliance,
// unchanged: only OPENCOMPUTER_API_URL, OPENCOMPUTER_API_KEY and NODE_EXTRA_CA_CERTS are set.
// The SDK uses the global WebSocket; Node releases without one get the `ws` package's, as a
// Node user of the SDK would do.
//
// Prints one `ok <what>` line per check and exits non-zero at the first failure, naming it.

if (typeof globalThis.WebSocket === "undefined") {
  globalThis.WebSocket = (await import("ws")).WebSocket;
}
const { Sandbox, SecretStore } = await import("@opencomputer/sdk");

const ok = (what) => console.log(`ok ${what}`);
function expect(cond, what) {
  if (!cond) throw new Error(what);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(seen, text, what) {
  const deadline = Date.now() + 30_000;
  while (!seen().includes(text)) {
    expect(Date.now() < deadline, `${what}: never printed ${JSON.stringify(text)}; got ${JSON.stringify(seen().slice(-400))}`);
    await sleep(100);
  }
}

async function pty(sb) {
  let text = "";
  const decoder = new TextDecoder();
  const term = await sb.pty.create({ cols: 100, rows: 30, onOutput: (d) => (text += decoder.decode(d)) });
  // The SDK does not wait for the socket to open before it lets us send.
  await sleep(1000);
  term.send("tty; stty size; echo mark-$((40+2))\n");
  await waitFor(() => text, "mark-42", "pty");
  expect(text.includes("/dev/pts/"), `tty did not name a pseudo-terminal: ${JSON.stringify(text)}`);
  expect(text.includes("30 100"), `stty size was not 30 100: ${JSON.stringify(text)}`);
  // Neither SDK has a resize call; this is the API route the hosted service documents.
  const resp = await fetch(`${sb.apiUrl}/sandboxes/${sb.sandboxId}/pty/${term.sessionId}/resize`, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-API-Key": process.env.OPENCOMPUTER_API_KEY },
    body: JSON.stringify({ cols: 132, rows: 43 }),
  });
  expect(resp.ok, `resize answered ${resp.status}`);
  term.send("stty size; echo mark-$((50+3))\n");
  await waitFor(() => text, "mark-53", "pty after resize");
  expect(text.includes("43 132"), "stty size did not follow the resize");
  term.close();
  ok("pty: tty, stty size 30 100, resized to 43 132");
}

async function sessions(sb) {
  let out = "";
  const decoder = new TextDecoder();
  const session = await sb.exec.start("sh", {
    args: ["-c", "for i in 1 2 3; do echo line$i; sleep 1; done"],
    onStdout: (d) => (out += decoder.decode(d)),
  });
  const listed = await sb.exec.list();
  const me = listed.find((s) => s.sessionID === session.sessionId);
  expect(me && typeof me.command === "string" && typeof me.startedAt === "string", `listed ${JSON.stringify(listed)}`);
  const code = await session.done;
  expect(code === 0, `background command exit ${code}`);
  expect(out === "line1\nline2\nline3\n", `streamed ${JSON.stringify(out)}`);
  ok("exec.start streams over the WebSocket with ?api_key=");

  const shell = await sb.exec.shell();
  await shell.run("cd /tmp && export GREETING=hello");
  const r = await shell.run('echo "$GREETING from $(pwd)"');
  expect(r.stdout === "hello from /tmp\n", `shell printed ${JSON.stringify(r)}`);
  await shell.close();
  ok("exec.shell keeps its state between runs");
}

async function files(sb) {
  const payload = new Uint8Array(1 << 20).map((_, i) => i % 251);
  await sb.files.makeDir("/tmp/published-ts");
  await sb.files.write("/tmp/published-ts/blob.bin", payload);
  const back = await sb.files.readBytes("/tmp/published-ts/blob.bin");
  expect(back.length === payload.length && back.every((b, i) => b === payload[i]), "binary round trip differs");
  await sb.files.write("/tmp/published-ts/note.txt", "héllo\n");
  expect((await sb.files.read("/tmp/published-ts/note.txt")) === "héllo\n", "text round trip differs");
  const names = (await sb.files.list("/tmp/published-ts")).map((e) => e.name).sort();
  expect(JSON.stringify(names) === '["blob.bin","note.txt"]', `listed ${names}`);
  await sb.files.remove("/tmp/published-ts/note.txt");
  expect(!(await sb.files.exists("/tmp/published-ts/note.txt")), "still exists after remove");
  ok("files: 1 MiB binary and UTF-8 text round trip, list, remove");

  // Signed URLs: usable by anyone, no API key, for that one file until they expire.
  const up = await sb.uploadUrl("/tmp/published-ts/signed.txt", { expiresIn: 600 });
  const put = await fetch(up, { method: "PUT", body: "via a signed URL" });
  expect(put.ok, `signed upload answered ${put.status}`);
  const down = await sb.downloadUrl("/tmp/published-ts/signed.txt", { expiresIn: 600 });
  const got = await fetch(down);
  expect(got.ok && (await got.text()) === "via a signed URL", `signed download answered ${got.status}`);
  const other = await fetch(down.replace("signed.txt", "blob.bin"));
  expect(other.status === 403, `a signed URL with another path answered ${other.status}`);
  ok("signed URLs: upload and download without a key; another path is refused");
}

const sb = await Sandbox.create({ timeout: 60 });
ok("created a sandbox with timeout=60");
const ran = await sb.commands.run("echo out; echo err >&2; exit 3");
expect(ran.exitCode === 3 && ran.stdout === "out\n" && ran.stderr === "err\n", `commands.run gave ${JSON.stringify(ran)}`);
ok("commands.run (run-async, answered inline): exit code, stdout and stderr");

const longRun = (async () => {
  const t = Date.now();
  // Through run-async and result polls; longer than the 60 s idle timeout.
  const r = await sb.commands.run("sleep 65; echo long-done", { timeout: 120 });
  expect(r.exitCode === 0 && r.stdout === "long-done\n", `long run gave ${JSON.stringify(r)}`);
  ok(`commands.run of a 65 s command through run-async answered after ${Math.round((Date.now() - t) / 1000)}s`);
})();
{
  // 256 MiB: beside the Python client's sandboxes, another 512 MiB guest would not fit the test
  // appliance (admission control answers 503).
  const nodeBox = await Sandbox.create({ template: "node", timeout: 0, memoryMB: 256 });
  try {
    const r = await nodeBox.commands.run("node -e 'console.log(6*7)' && npm --version", { timeout: 120 });
    expect(r.exitCode === 0 && r.stdout.startsWith("42\n"), `node and npm: ${JSON.stringify(r)}`);
  } finally {
    await nodeBox.kill();
  }
  ok("template node: node and npm run");
}
await sessions(sb);
await files(sb);
await pty(sb);
await longRun;

await sb.setTimeout(0);
await sb.setTimeout(300);
expect(await sb.isRunning(), "not running after setTimeout");
ok("setTimeout(0), setTimeout(300), isRunning");
await sb.kill();
expect(!(await sb.isRunning()), "still running after kill");
ok("killed");
