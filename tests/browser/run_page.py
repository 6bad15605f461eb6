#!/usr/bin/env python3
"""Runs one of this folder's pages in a headless browser's WebGPU.

Usage: run_page.py PAGE DIR [--browser chromium|firefox] [--hash TEXT]
                            [--timeout SECONDS]

Serves PAGE (a file of tests/browser/) and the files of DIR on a loopback
port, opens the page in the headless browser, waits for the page to POST
its report to /result and prints it as JSON on stdout, with the browser's
version.
- wgsl.html compiles DIR/kernels.json, which the crate's test
  src/browser_wgsl_tests.rs writes and judges;
- attention.html runs the wasm module in DIR/pkg
  (tests/browser/check_attention.sh builds it and judges the result).
The browser is --browser, else FLASH_ATTN_BROWSER, else Chromium:
- Chromium (Dawn, Tint) from FLASH_ATTN_CHROMIUM or the PATH (Debian:
  apt-get install chromium);
- Firefox (wgpu, naga) from FLASH_ATTN_FIREFOX or the PATH: a release
  that offers WebGPU on Linux (Firefox ESR 140 refuses it);
  tests/browser/firefox/setup.sh builds one in a chroot and names its
  launcher.
"""
import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# Firefox's preferences for a headless test run: WebGPU on (its blocklist
# refuses software adapters such as lavapipe), nothing that calls the
# network or asks a question.
FIREFOX_PREFS = {
    "dom.webgpu.enabled": True,
    "gfx.webgpu.ignore-blocklist": True,
    "browser.shell.checkDefaultBrowser": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "browser.startup.homepage_override.mstone": "ignore",
}


class Files(http.server.SimpleHTTPRequestHandler):
    """The pages from this folder, everything else from DIR; the page's
    report arrives as a POST to /result."""

    def __init__(self, *args, data_dir, reported, **kwargs):
        self.reported = reported
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

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204)
        self.end_headers()
        if self.path == "/result":
            self.reported(body)

    def log_message(self, *args):
        pass


def browser_command(browser, profile, page):
    """The command line that opens `page` headless with a fresh profile."""
    if browser == "firefox":
        program = os.environ.get("FLASH_ATTN_FIREFOX") or shutil.which("firefox") or "firefox"
        with open(os.path.join(profile, "user.js"), "w") as prefs:
            for name, value in FIREFOX_PREFS.items():
                prefs.write(f"user_pref({json.dumps(name)}, {json.dumps(value)});\n")
        return [program, "--headless", "--no-remote", "--profile", profile, page]
    program = os.environ.get("FLASH_ATTN_CHROMIUM") or shutil.which("chromium") or "chromium"
    # Sandbox off (CI runs as root), WebGPU on (Chromium on Linux offers it
    # behind this flag), nothing that calls the network.
    command = [
        program,
        "--headless=new",
        "--no-sandbox",
        "--enable-unsafe-webgpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    # The browser's own log (GPU process crashes, Dawn's messages).
    log = os.environ.get("FLASH_ATTN_BROWSER_LOG")
    if log:
        command += ["--enable-logging", f"--log-file={os.path.abspath(log)}", "--v=0"]
    return command + [page]


def main():
    args = sys.argv[1:]
    page_name, data_dir = args[0], args[1]

    def option(name, default):
        return args[args.index(name) + 1] if name in args else default

    fragment = "#" + option("--hash", "") if "--hash" in args else ""
    timeout = float(option("--timeout", "600"))
    browser = option("--browser", os.environ.get("FLASH_ATTN_BROWSER") or "chromium")
    if browser not in ("chromium", "firefox"):
        sys.exit(f"unknown browser {browser!r}: chromium or firefox")

    report = {}
    arrived = threading.Event()

    def reported(body):
        report["body"] = body
        arrived.set()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Files, data_dir=data_dir, reported=reported)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # Under /tmp: Firefox's launcher binds it into its chroot at that path.
    profile = tempfile.mkdtemp(prefix=f"flash-attn-{browser}-", dir="/tmp")
    page = f"http://127.0.0.1:{server.server_address[1]}/{page_name}{fragment}"
    command = browser_command(browser, profile, page)
    version = subprocess.run(command[:1] + ["--version"], capture_output=True, text=True).stdout.strip()
    # Its own session, so that the browser's helper processes (and a
    # launcher's chroot) end with it.
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout
        while not arrived.wait(1) and process.poll() is None and time.monotonic() < deadline:
            pass
        if arrived.is_set():
            result = json.loads(report["body"])
        elif process.poll() is not None:
            result = {"error": f"the browser exited ({process.returncode}) before the page reported"}
        else:
            result = {"error": f"the page did not finish within {timeout:.0f} s"}
        result["browser"] = version or browser
        json.dump(result, sys.stdout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
