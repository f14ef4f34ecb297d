"""The published Python SDK (opencomputer-sdk, pinned by qemu-test) against the appliance,
unchanged: only OPENCOMPUTER_API_URL, OPENCOMPUTER_API_KEY and SSL_CERT_FILE are set.

Prints one `ok <what>` line per check (qemu-test compares them with what it expects) and
exits non-zero at the first failure, naming it.
"""

import asyncio
import os
import sys
import time
import uuid

import httpx
from opencomputer import Sandbox, SecretStore


def ok(what: str) -> None:
    print(f"ok {what}", flush=True)


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


async def resize_pty(sb: Sandbox, session_id: str, cols: int, rows: int) -> None:
    # Neither SDK has a resize call; the API route is the one the hosted service documents.
    url = os.environ["OPENCOMPUTER_API_URL"].rstrip("/") + "/api"
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": os.environ["OPENCOMPUTER_API_KEY"]}) as c:
        resp = await c.post(f"/sandboxes/{sb.id}/pty/{session_id}/resize", json={"cols": cols, "rows": rows})
        resp.raise_for_status()


async def pty(sb: Sandbox) -> None:
    seen = bytearray()
    got = asyncio.Event()

    def on_output(data: bytes) -> None:
        seen.extend(data)
        got.set()

    async def wait_for(text: str) -> None:
        deadline = time.monotonic() + 30
        while text.encode() not in seen:
            expect(time.monotonic() < deadline, f"pty never printed {text!r}; it printed {bytes(seen)[-400:]!r}")
            got.clear()
            try:
                await asyncio.wait_for(got.wait(), 1)
            except asyncio.TimeoutError:
                pass

    # The SDK opens its WebSocket at {url}/sandboxes/{id}/pty/{sid} (no /api) with ?api_key=.
    term = await sb.pty.create(cols=80, rows=24, on_output=on_output)
    await term.send("tty; stty size; echo mark-$((40+2))\n")
    await wait_for("mark-42")
    text = bytes(seen).decode(errors="replace")
    expect("/dev/pts/" in text, f"tty did not name a pseudo-terminal: {text!r}")
    expect("24 80" in text, f"stty size was not 24 80: {text!r}")
    await resize_pty(sb, term.session_id, 120, 40)
    await term.send("stty size; echo mark-$((50+3))\n")
    await wait_for("mark-53")
    expect("40 120" in bytes(seen).decode(errors="replace"), "stty size did not follow the resize")
    # A full-screen program draws with escape sequences only on a terminal it can size.
    before = len(seen)
    await term.send("top -n 1; echo mark-$((60+4))\n")
    await wait_for("mark-64")
    drawn = bytes(seen[before:])
    expect(b"load average" in drawn and b"\x1b[" in drawn, f"top did not draw a screen: {drawn[:300]!r}")
    await term.close()
    ok("pty: tty, stty size 24 80, resized to 40 120, top draws its screen")


async def sessions(sb: Sandbox) -> None:
    out = bytearray()
    session = await sb.exec.start(
        "sh", args=["-c", "for i in 1 2 3; do echo line$i; sleep 1; done"], on_stdout=out.extend
    )
    listed = await sb.exec.list()
    expect(any(s.session_id == session.session_id and s.running for s in listed), f"not listed running: {listed}")
    code = await asyncio.wait_for(session.done, 60)
    expect(code == 0, f"background command exit {code}")
    expect(out.decode() == "line1\nline2\nline3\n", f"streamed {out!r}")
    ok("exec.start streams over the WebSocket with ?api_key=")

    shell = await sb.exec.shell()
    first = await shell.run("cd /tmp && export GREETING=hello")
    second = await shell.run('echo "$GREETING from $(pwd)"')
    expect((first.exit_code, second.stdout) == (0, "hello from /tmp\n"), f"shell: {first} {second}")
    await shell.close()
    ok("exec.shell keeps its state between runs")


async def files(sb: Sandbox) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    await sb.files.make_dir("/tmp/published")
    await sb.files.write("/tmp/published/blob.bin", payload)
    back = await sb.files.read_bytes("/tmp/published/blob.bin")
    expect(back == payload, "binary round trip differs")
    await sb.files.write("/tmp/published/note.txt", "héllo\n")
    expect(await sb.files.read("/tmp/published/note.txt") == "héllo\n", "text round trip differs")
    names = sorted(e.name for e in await sb.files.list("/tmp/published"))
    expect(names == ["blob.bin", "note.txt"], f"listed {names}")
    expect(await sb.files.exists("/tmp/published/note.txt"), "exists() said no")
    await sb.files.remove("/tmp/published/note.txt")
    expect(not await sb.files.exists("/tmp/published/note.txt"), "still exists after remove")
    ok("files: 1 MiB binary and UTF-8 text round trip, list, exists, remove")

    # Signed URLs: usable by anyone, no API key, for that one file until they expire.
    up = await sb.upload_url("/tmp/published/signed.txt", expires_in=600)
    async with httpx.AsyncClient() as anyone:
        put = await anyone.put(up, content=b"via a signed URL")
        expect(put.status_code in (200, 204), f"signed upload answered {put.status_code}: {put.text}")
        down = await sb.download_url("/tmp/published/signed.txt", expires_in=600)
        got = await anyone.get(down)
        expect((got.status_code, got.content) == (200, b"via a signed URL"), f"signed download: {got.status_code}")
        other = await anyone.get(down.replace("signed.txt", "blob.bin"))
        expect(other.status_code == 403, f"a signed URL with another path answered {other.status_code}")
    ok("signed URLs: upload and download without a key; another path is refused")


async def secret_store() -> None:
    name = f"published-py-{uuid.uuid4().hex[:8]}"
    store = await SecretStore.create(name=name, egress_allowlist=["api.example.com"])
    await SecretStore.set_secret(store["id"], "SERVICE_KEY", "sk-published-python-0000")
    listed = await SecretStore.list_secrets(store["id"])
    expect([s["name"] for s in listed] == ["SERVICE_KEY"], f"secrets {listed}")
    sb = await Sandbox.create(secret_store=name, timeout=0)
    try:
        out = await sb.exec.run("echo $SERVICE_KEY")
        expect(out.stdout.startswith("osb_sealed_"), f"the sandbox saw {out.stdout!r}, not a sealed token")
    finally:
        await sb.kill(delete_secret_store=True)
    expect(name not in [s["name"] for s in await SecretStore.list()], "the store outlived delete_secret_store")
    ok("secret store: created, secret set, sealed in the sandbox, deleted with it")


async def python_template() -> None:
    # 256 MiB: with the Node client's sandboxes beside these, five 512 MiB guests would not fit
    # the test appliance (admission control answers 503).
    sb = await Sandbox.create(template="python", timeout=0, memory_mb=256)
    try:
        out = await sb.exec.run("python3 -m venv /tmp/venv && /tmp/venv/bin/pip --version", timeout=120)
        expect(out.exit_code == 0 and out.stdout.startswith("pip "), f"venv and pip: {out}")
    finally:
        await sb.kill()
    ok("template python: a venv with pip")


async def idle_timeouts(busy: Sandbox, idle: Sandbox) -> None:
    started = time.monotonic()
    # A command every 15 s keeps the 60 s idle timeout from firing; the idle one hibernates.
    while time.monotonic() - started < 120:
        out = await busy.exec.run("echo tick")
        expect(out.stdout == "tick\n", f"tick at {time.monotonic() - started:.0f}s: {out}")
        await asyncio.sleep(15)
    expect(await busy.is_running(), "the sandbox given a command every 15 s stopped")
    expect(not await idle.is_running(), "the idle sandbox still runs after 120 s with a 60 s timeout")
    ok("timeout=60: a command every 15 s keeps it for 120 s; the idle one no longer runs")


async def main() -> None:
    sb = await Sandbox.create(timeout=60)
    idle = await Sandbox.create(timeout=60)
    expect(sb.end_at is not None, "a sandbox with timeout=60 has no endAt")
    ok("created two sandboxes with timeout=60")
    ran = await sb.exec.run("echo out; echo err >&2; exit 3")
    expect((ran.exit_code, ran.stdout, ran.stderr) == (3, "out\n", "err\n"), f"exec.run gave {ran}")
    ok("exec.run: exit code, stdout and stderr")

    async def long_run() -> None:
        # Longer than the SDK's 30 s read timeout and than the 60 s idle timeout.
        t = time.monotonic()
        out = await sb.exec.run("sleep 65; echo long-done", timeout=120)
        took = time.monotonic() - t
        expect((out.exit_code, out.stdout) == (0, "long-done\n"), f"long exec.run gave {out}")
        ok(f"exec.run of a 65 s command answered after {took:.0f}s")

    async def the_rest() -> None:
        await python_template()
        await sessions(sb)
        await files(sb)
        await pty(sb)
        await secret_store()

    await asyncio.gather(long_run(), the_rest(), idle_timeouts(sb, idle))

    await sb.set_timeout(0)
    await sb.set_timeout(300)
    ok("set_timeout(0) and set_timeout(300)")
    await sb.kill()
    expect(not await sb.is_running(), "still running after kill")
    await idle.kill()
    ok("killed")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # noqa: BLE001 - the harness reads the reason from stderr
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
