#!/usr/bin/python3
"""Guest agent: runs commands for the host over a virtio-serial port.

Installed into the guest image as /usr/local/sbin/smx-agent and started by
smx-agent.service.  Protocol: one JSON object per line in each direction.
On (re)opening the port the agent sends {"ready": true, ...}; each request
{"id", "argv", "timeout", "input", "cwd", "env"} gets one reply
{"id", "returncode", "stdout", "stderr", "timed_out"} (byte strings as
base64) or {"id", "error"} when the command could not be started.
Standard library only: it runs on the guest's Debian python3.
"""
import base64
import json
import os
import platform
import subprocess
import time

PORT = "/dev/virtio-ports/smx.agent"


def b64(data):
    return base64.b64encode(data or b"").decode("ascii")


def execute(request):
    env = dict(os.environ, **(request.get("env") or {}))
    stdin = base64.b64decode(request["input"]) if request.get("input") else None
    proc = subprocess.Popen(
        request["argv"],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=request.get("cwd"),
        env=env,
        start_new_session=True,  # so a timeout can kill the whole group
    )
    timed_out = False
    try:
        out, err = proc.communicate(stdin, timeout=request.get("timeout"))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
    return {
        "returncode": proc.returncode,
        "stdout": b64(out),
        "stderr": b64(err),
        "timed_out": timed_out,
    }


def send(fd, message):
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def serve(fd):
    send(fd, {"ready": True, "kernel": platform.release(), "pid": os.getpid()})
    with open(fd, "rb", closefd=False) as reader:
        for line in reader:  # ends when the host side disconnects
            request = json.loads(line)
            try:
                reply = execute(request)
            except Exception as exc:  # report, don't die: the host is waiting
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            reply["id"] = request.get("id")
            send(fd, reply)


def main():
    while True:
        # udev creates the port symlink some time after we may be started;
        # EOF means the host end is not connected: reopen until it is.
        try:
            fd = os.open(PORT, os.O_RDWR)
        except FileNotFoundError:
            time.sleep(0.5)
            continue
        try:
            serve(fd)
        finally:
            os.close(fd)
        time.sleep(0.5)


if __name__ == "__main__":
    main()
