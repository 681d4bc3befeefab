#!/usr/bin/env python3
"""Start `regmux serve --config CONFIG`, time exec -> first 200 on GET /v2/, then idle RSS.

Usage: startup.py REGMUX CONFIG HOST PORT LOGFILE [SETTLE_SECONDS]
Prints one line: "<startup_ms> <VmRSS_kiB> <VmHWM_kiB>" and always stops the process it started.
Exit status: 0 ok, 2 regmux exited before answering, 3 no 200 within 10 s.
"""
import socket
import subprocess
import sys
import time


def status_of(host, port, request):
    """HTTP status code of one GET /v2/, or None if the server does not answer yet."""
    try:
        s = socket.create_connection((host, port), timeout=1)
    except OSError:
        return None
    try:
        s.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        return None
    finally:
        s.close()
    parts = data.split(b" ", 2)
    return parts[1].decode() if len(parts) > 1 else None


def proc_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def main():
    binary, config, host, port, log = sys.argv[1:6]
    port = int(port)
    settle = float(sys.argv[6]) if len(sys.argv) > 6 else 1.0
    request = f"GET /v2/ HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    with open(log, "ab") as lf:
        t0 = time.monotonic()
        proc = subprocess.Popen([binary, "serve", "--config", config],
                                stdin=subprocess.DEVNULL, stdout=lf, stderr=lf)
        try:
            while True:
                if proc.poll() is not None:
                    print(f"regmux exited with status {proc.returncode} before answering",
                          file=sys.stderr)
                    return 2
                if time.monotonic() - t0 > 10:
                    print("regmux gave no 200 on /v2/ within 10 s", file=sys.stderr)
                    return 3
                if status_of(host, port, request) == "200":
                    t1 = time.monotonic()
                    break
                time.sleep(0.0005)
            time.sleep(settle)
            if proc.poll() is not None:
                print(f"regmux exited with status {proc.returncode} while idle", file=sys.stderr)
                return 2
            print(f"{(t1 - t0) * 1000:.2f} {proc_kib(proc.pid, 'VmRSS')} {proc_kib(proc.pid, 'VmHWM')}")
            return 0
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    sys.exit(main())
