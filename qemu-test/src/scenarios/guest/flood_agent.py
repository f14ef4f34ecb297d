# Run inside a sandbox as root by the "hostile guest" scenario: replaces the sandbox's agent
# with an impostor on the agent's vsock port that answers a directory listing with endless
# DirEntries frames (the agent protocol's framing: "OC", version 1, kind, u32 length).
import os
import signal
import socket
import struct
import sys
import threading
import time

AGENT_PORT = 1024
FILE_LIST = 0x0A
DIR_ENTRIES = 0x8A

time.sleep(1.0)  # the command that started this script answers first


def agent_pids():
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in (1, os.getpid()):
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"sandbox" in args and b"agent" in args:
            found.append(int(pid))
    return found


def kill_agents():
    for pid in agent_pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
kill_agents()
deadline = time.time() + 10
while True:
    try:
        listener.bind((socket.VMADDR_CID_ANY, AGENT_PORT))
        break
    except OSError:
        if time.time() > deadline:
            sys.exit(1)
        kill_agents()  # init restarts the real agent; keep it off the port
        time.sleep(0.001)
listener.listen(16)


def frame(kind, payload):
    return b"OC" + bytes([1, kind]) + struct.pack(">I", len(payload)) + payload


def text(b):
    return struct.pack(">I", len(b)) + b


entries = b"".join(text(b"f%06d" % i) + b"\0" + text(b"/root/f%06d" % i) + struct.pack(">Q", 0) for i in range(100))
flood = frame(DIR_ENTRIES, struct.pack(">I", 100) + entries + b"\x01")


def serve(conn):
    try:
        head = conn.recv(8, socket.MSG_WAITALL)
        if len(head) == 8:
            length = struct.unpack(">I", head[4:8])[0]
            if length:
                conn.recv(length, socket.MSG_WAITALL)
            if head[3] == FILE_LIST:
                while True:
                    conn.sendall(flood)
    except OSError:
        pass
    finally:
        conn.close()


while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
