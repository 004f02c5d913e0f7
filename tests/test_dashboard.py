"""The dashboard in a real headless browser (Debian's chromium with chromium-driver, through
selenium): it lists the workflows, its counts change after a store without a reload, and its
retry button requeues a dead message, which then completes."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from soupflow.store.sqlite import SqliteQueue
from tests import documents
from tests.dicom import RuntimeProcess, sample_file, send_files, unavailable, wait_for
from tests.documents import RECEIVER_ID
from tests.http_peer import HttpPeer
from tests.test_metrics import admin_url

HTTP_ID = "99999999-0000-4000-8000-0000000000b1"


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        unavailable("chromium and chromium-driver are not installed (make test installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,700"):
        options.add_argument(argument)
    session = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))
    try:
        yield session
    finally:
        session.quit()


def count(browser: webdriver.Chrome, kind: str) -> str:
    cells = browser.find_elements(
        By.CSS_SELECTOR, f'tr[data-workflow="{RECEIVER_ID}"] td[data-count="{kind}"]'
    )
    return str(cells[0].text) if cells else ""


def test_the_dashboard_lists_counts_live_and_retries_a_dead_message(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    peer = HttpPeer(statuses=[400])  # the first message is dead; once retried it goes through
    sender = documents.http_sender(HTTP_ID, Server=peer.url)
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    documents.write(workflows / "intake.json", documents.workflow(sender, Port=0))
    runtime = RuntimeProcess(workflows, data)
    try:
        browser.get(admin_url(data))
        # The page redraws every 2 s: an element found may be gone by the next call.
        wait = WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,))
        wait.until(lambda b: "Intake" in b.find_element(By.ID, "workflows").text)
        wait.until(lambda b: count(b, "received") == "0")
        assert send_files(runtime.port, [sample_file("CT_small.dcm")]) == [0]
        wait.until(lambda b: count(b, "dead") == "1")  # no reload: the page polls
        wait.until(lambda b: count(b, "received") == "1")
        assert browser.save_screenshot(str(tmp_path / "dashboard.png"))  # docs/ has one
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#dead button.retry").click() or True)
        wait.until(lambda b: count(b, "completed") == "1" and count(b, "dead") == "0")
        queue = SqliteQueue(data)
        try:
            assert [m.state.value for m in queue.messages()] == ["completed"]
        finally:
            queue.close()
        assert len(peer.requests) == 2
    finally:
        peer.close()
        assert runtime.terminate() == 0


def test_write_actions_need_the_dashboards_header(tmp_path: Path) -> None:
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    documents.write(workflows / "intake.json", documents.workflow(Port=0))
    runtime = RuntimeProcess(workflows, data)
    try:
        request = urllib.request.Request(
            admin_url(data) + "api/dead/purge",
            data=b'{"ids": []}',
            method="POST",
            headers={"Content-Type": "text/plain"},  # what a cross-site form can send
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 403
    finally:
        assert runtime.terminate() == 0
    wait_for(lambda: not (data / "admin.json").exists(), "admin.json removed at stop")
