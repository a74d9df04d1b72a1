"""The web UI in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright. Load B's page, add A's folder by pasting its ticket, watch a file written at A
arrive in the page's live event list and folder view, take a screenshot.

Skipped (with the reason) unless both are installed; `make browser-test` installs
Playwright (the ``browser`` extra) and runs this file; Chromium comes from the system
(`apt-get install chromium`): Playwright's own browser download is never used.
Screenshots go to $P2PFS_TEST_ARTIFACTS when set (CI keeps that directory), else to the
test's temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e_helpers import wait_until
from tests.support.daemons import DaemonProcess

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install '.[browser]'")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)"),
    pytest.mark.timeout(120),
]
WAIT_MS = 30_000


def api_info(daemon: DaemonProcess) -> dict[str, str]:
    wait_until(lambda: daemon.call("id")["api"] is not None, timeout=30)
    info: dict[str, str] = daemon.call("id")["api"]
    return info


def post(info: dict[str, str], path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        info["url"] + path, data=json.dumps(body).encode(), method="POST"
    )
    request.add_header("X-API-Key", info["key"])
    with urllib.request.urlopen(request, timeout=30) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    place = Path(os.environ.get("P2PFS_TEST_ARTIFACTS") or tmp_path / "artifacts")
    place.mkdir(parents=True, exist_ok=True)
    return place


def test_web_ui_adds_a_folder_by_ticket_and_shows_a_file_arrive(
    pair: tuple[DaemonProcess, DaemonProcess], tmp_path: Path, artifacts: Path
) -> None:
    a, b = pair
    (tmp_path / "fa").mkdir()
    created = post(api_info(a), "/api/folders", {"path": str(tmp_path / "fa")})
    with playwright_api.sync_playwright() as playwright:
        # As root (CI), Chromium's sandbox cannot start; the page is our own.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1600})
            failures: list[str] = []
            page.on("pageerror", lambda error: failures.append(str(error)))
            page.on("requestfailed", lambda request: failures.append(request.url))
            page.goto(api_info(b)["ui"])
            expect = playwright_api.expect
            expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
            expect(page.locator("#node-id")).to_have_text(b.node_id())
            expect(page.locator("#node-qr svg")).to_be_visible()
            assert "key=" not in page.url  # the key left the address bar

            page.fill("#add-folder input[name=path]", str(tmp_path / "fb"))
            page.fill("#add-folder input[name=ticket]", created["rw"])
            page.click("#add-folder button")
            # Joining lists the folder and shows its tickets (text and QR).
            folder = page.locator(".folder", has_text=str(tmp_path / "fb"))
            expect(folder).to_be_visible(timeout=WAIT_MS)
            shown = post(api_info(b), "/api/control/sync_show", {"path": str(tmp_path / "fb")})
            expect(page.locator("#tickets .ticket[data-kind=ro]")).to_have_text(shown["ro"])
            expect(page.locator("#tickets .qr svg").first).to_be_visible()
            expect(folder.locator(".members li")).to_contain_text("direct", timeout=WAIT_MS)
            expect(page.locator("#peer-list .path")).to_have_text(["direct"], timeout=WAIT_MS)

            (tmp_path / "fa" / "hello.txt").write_bytes(b"seen in a browser")
            event = page.locator("#event-list li[data-type=folder-changes]", has_text="hello.txt")
            expect(event).to_be_visible(timeout=WAIT_MS)
            expect(folder).to_contain_text("1 file", timeout=WAIT_MS)
            assert (tmp_path / "fb" / "hello.txt").read_bytes() == b"seen in a browser"

            page.screenshot(path=str(artifacts / "web-ui-synced.png"), full_page=True)
            page.click("#tickets-close")
            folder.get_by_role("button", name="Pause").click()
            expect(folder.locator(".state")).to_have_text("paused", timeout=WAIT_MS)
            page.screenshot(path=str(artifacts / "web-ui-paused.png"), full_page=True)
            assert failures == []
        finally:
            browser.close()
