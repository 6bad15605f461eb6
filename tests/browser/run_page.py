#!/usr/bin/env python3
"""Runs one of this folder's pages in headless Chromium's WebGPU.

Usage: run_page.py PAGE DIR [--hash TEXT] [--timeout SECONDS]

Serves PAGE (a file of tests/browser/) and the files of DIR on a loopback
port, opens the page in headless Chromium through chromedriver (WebDriver
over HTTP: the standard library is enough), waits for the page's
window.RESULT and prints it as JSON on stdout, with the browser's version.
- wgsl.html compiles DIR/kernels.json, which the crate's test
  src/browser_wgsl_tests.rs writes and judges;
- attention.html runs the wasm module in DIR/pkg
  (tests/browser/check_attention.sh builds it and judges the result).
Chromium and chromedriver come from FLASH_ATTN_CHROMIUM /
FLASH_ATTN_CHROMEDRIVER or the PATH (Debian: apt-get install chromium
chromium-driver).
"""
import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Files(http.server.SimpleHTTPRequestHandler):
    """The pages from this folder, everything else from DIR."""

    def __init__(self, *args, data_dir, **kwargs):
        super().__init__(*args, directory=data_dir, **kwargs)

    def translate_path(self, path):
        name = path.split("?")[0].split("#")[0].lstrip("/")
        if name.endswith(".html") and "/" not in name:
            return os.path.join(HERE, name)
        return super().translate_path(path)

    def guess_type(self, path):
        # Browsers compile wasm modules as they stream only with this type.
        if str(path).endswith(".wasm"):
            return "application/wasm"
        return super().guess_type(path)

    def log_message(self, *args):
        pass


def webdriver(port, method, path, body=None):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())["value"]


def main():
    args = sys.argv[1:]
    page_name, data_dir = args[0], args[1]
    fragment = "#" + args[args.index("--hash") + 1] if "--hash" in args else ""
    timeout = float(args[args.index("--timeout") + 1]) if "--timeout" in args else 600.0
    chromium = os.environ.get("FLASH_ATTN_CHROMIUM") or shutil.which("chromium") or "chromium"
    chromedriver = os.environ.get("FLASH_ATTN_CHROMEDRIVER") or shutil.which("chromedriver") or "chromedriver"

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Files, data_dir=data_dir)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver_port = free_port()
    driver = subprocess.Popen(
        [chromedriver, f"--port={driver_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    profile = tempfile.mkdtemp(prefix="flash-attn-chromium-")
    try:
        for _ in range(100):
            try:
                webdriver(driver_port, "GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        # Headless, sandbox off (CI runs as root), WebGPU on (Chromium on
        # Linux offers it behind this flag), nothing that calls the network.
        options = {
            "binary": chromium,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--enable-unsafe-webgpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
            ],
        }
        # The browser's own log (GPU process crashes, Dawn's messages).
        log = os.environ.get("FLASH_ATTN_BROWSER_LOG")
        if log:
            options["args"] += ["--enable-logging", f"--log-file={os.path.abspath(log)}", "--v=0"]
        created = webdriver(
            driver_port,
            "POST",
            "/session",
            {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}},
        )
        session = created["sessionId"]
        try:
            page = f"http://127.0.0.1:{server.server_address[1]}/{page_name}{fragment}"
            webdriver(driver_port, "POST", f"/session/{session}/url", {"url": page})
            start = time.time()
            while True:
                result = webdriver(
                    driver_port, "POST", f"/session/{session}/execute/sync", {"script": "return window.RESULT", "args": []}
                )
                if result is not None:
                    break
                if time.time() - start > timeout:
                    result = {"error": f"the page did not finish within {timeout:.0f} s"}
                    break
                time.sleep(1)
        finally:
            webdriver(driver_port, "DELETE", f"/session/{session}")
        result["browser"] = "Chromium " + created.get("capabilities", {}).get("browserVersion", "?")
        json.dump(result, sys.stdout)
    finally:
        driver.kill()
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
