"""The web console in a real browser: Debian's chromium, driven by Selenium through
chromium-driver (tests/ensure-peers installs both), against the real daemon on loopback.

A small campaign goes out through SMTP to a sink that takes it (Google's MX) and to one that
answers 451 (Microsoft's); then the admin logs in, sees the charts, holds and releases a
deferred message, adds and removes a suppression, and logs out. A POST without the CSRF
token, from a plain HTTP client, is refused.

Set MAILHOST_SCREENSHOTS=1 to also write the dashboard's screenshot to docs/ for the README.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import smtplib
import ssl
from pathlib import Path

import pytest

from tests.e2e.conftest import free_port
from tests.e2e.test_sending import MX_PORT, sinks, wait_for  # noqa: F401  (sinks: a fixture)
from tests.support.dns import DNSServer

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException, StaleElementReferenceException, WebDriverException)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

ZONE = [("gmail.test", "MX", "10 gmail-smtp-in.l.google.com"), ("gmail-smtp-in.l.google.com", "A", "127.0.0.5"),
        ("outlook.test", "MX", "10 mail.protection.outlook.com"), ("mail.protection.outlook.com", "A", "127.0.0.6")]
PASSWORD = "s3cret-pass"  # the e2e fixture's users
DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture
def browser(tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "chromium and chromium-driver are installed by tests/ensure-peers"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--ignore-certificate-errors",  # the daemon's generated self-signed pair
                 "--window-size=1280,1900", f"--user-data-dir={tmp_path / 'chromium'}",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-default-apps", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(driver))
    browser.set_page_load_timeout(20)
    yield browser
    browser.quit()


def shows(browser, css_class: str, text: str) -> None:
    """Wait until the page (the one a click led to, not the one before) shows `text` in an
    element of `css_class`: a click does not wait for the next page."""

    def found(driver) -> bool:
        try:
            return text in driver.find_element(By.CLASS_NAME, css_class).text
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        except WebDriverException as e:
            # The old page's element went away between finding it and reading it, said the
            # way chromium's inspector says it (not as a stale element): the next look finds
            # the new page's.
            if "does not belong to the document" in (e.msg or ""):
                return False
            raise

    WebDriverWait(browser, 10).until(found, f"{text!r} in .{css_class}")


def arrives(browser, url: str) -> None:
    WebDriverWait(browser, 10).until(lambda driver: driver.current_url == url, f"at {url}")


def send_campaign(port: int, recipients: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        for number, rcpt in enumerate(recipients):
            message = (f"From: Alice <alice@example.test>\r\nTo: {rcpt}\r\nSubject: Spring offer {number}\r\n"
                       f"Message-ID: <offer-{number}@example.test>\r\n\r\nHello.\r\n")
            client.sendmail("alice@example.test", [rcpt], message.encode())


def plain_client(port: int) -> http.client.HTTPSConnection:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the daemon's self-signed pair
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)


def post(port: int, path: str, body: str, cookie: str | None) -> http.client.HTTPResponse:
    connection = plain_client(port)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if cookie:
        headers["Cookie"] = f"mailhost_console={cookie}"
    connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def deferrals(daemon) -> int:
    """Queued messages whose recipient was deferred, as the spool holds them (read directly:
    cheaper than polling the CLI)."""
    found = 0
    for path in (daemon.root / "state" / "spool" / "env").glob("*/*.json"):
        try:
            found += json.loads(path.read_text())["recipients"][0]["state"] == "deferred"
        except (OSError, ValueError):
            continue  # replaced meanwhile
    return found


def envelope(daemon, queue_id: str) -> dict:
    """A queued message's envelope as the spool holds it."""
    return json.loads((daemon.root / "state" / "spool" / "env" / queue_id[:2] / f"{queue_id}.json").read_text())


def suppressed(daemon) -> list[str]:
    return [e["address"] for e in json.loads(daemon.cli("suppress", "list", "--json").stdout)["suppressed"]]


def test_console_in_a_real_browser(make_daemon, sinks, browser, tmp_path):  # noqa: F811
    good = sinks("127.0.0.5")
    sinks("127.0.0.6", script=[{"when": "RCPT", "reply": "451 4.7.1 Try again later"}])
    http_port = free_port()
    with DNSServer(ZONE) as dns:
        daemon = make_daemon(start=False, extra=(
            f'nameservers = ["{dns.nameserver}"]\nmx_port = {MX_PORT}\n[queue]\nretry = ["1h"]\n'
            f'[http]\nendpoint = "tcp:{http_port}:interface=127.0.0.1"\n'))
        assert "may now log in" in daemon.cli("user", "admin", "alice@example.test").stdout
        daemon.start()
        send_campaign(daemon.port, [f"reader{n}@gmail.test" for n in range(5)] + ["ann@outlook.test", "ben@outlook.test"])
        wait_for(lambda: len(good.messages()) == 5, what="the Google sink's 5 messages")
        wait_for(lambda: deferrals(daemon) == 2, what="2 deferred messages")
        base = f"https://127.0.0.1:{http_port}/console"

        # Not logged in: the login form. Bob's password is right, but he is no admin: refused
        # with the words of a wrong password.
        browser.get(f"{base}/")
        assert browser.current_url == f"{base}/login"
        browser.find_element(By.NAME, "address").send_keys("bob@example.test")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.CSS_SELECTOR, "form.login button").click()
        shows(browser, "problem", "Wrong address or password")
        browser.find_element(By.NAME, "address").clear()
        browser.find_element(By.NAME, "address").send_keys("alice@example.test")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.CSS_SELECTOR, "form.login button").click()
        arrives(browser, f"{base}/")
        cookie = browser.get_cookie("mailhost_console")
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"

        # The dashboard's charts: SVG drawn on the server, with the campaign in them.
        def series(section: str) -> dict[str, float]:
            return {e.get_attribute("data-series"): float(e.get_attribute("data-total"))
                    for e in browser.find_elements(By.CSS_SELECTOR, f"#{section} svg [data-series]")}

        assert series("flow") == {"received": 7, "delivered": 5}
        assert series("groups") == {"google": 5}
        assert sum(v for k, v in series("failures").items() if k.startswith("deferred")) == 2
        assert len(browser.find_elements(By.CSS_SELECTOR, "#complaints svg line.limit")) == 2  # 0.1% and 0.3%
        assert "microsoft" in browser.find_element(By.ID, "paces").text
        cards = browser.find_element(By.CLASS_NAME, "cards").text
        assert "Queue\n2" in cards
        screenshot = tmp_path / "console-dashboard.png"
        browser.save_screenshot(str(screenshot))
        print(f"dashboard screenshot: {screenshot}")
        if os.environ.get("MAILHOST_SCREENSHOTS"):
            DOCS.mkdir(exist_ok=True)
            shutil.copy(screenshot, DOCS / "console-dashboard.png")

        # A deferred message: its page, its attempt, hold and release through the buttons.
        browser.get(f"{base}/queue?state=deferred&destination=outlook")
        links = browser.find_elements(By.CSS_SELECTOR, "table.queue a")
        assert len(links) == 2
        queue_id = links[0].text
        links[0].click()
        shows(browser, "attempts", "451 4.7.1 Try again later")
        assert "451 4.7.1 Try again later" in browser.find_element(By.CSS_SELECTOR, "table.attempts").text
        assert "Subject: Spring offer" in browser.find_element(By.CSS_SELECTOR, "pre.headers").text
        browser.find_element(By.XPATH, "//button[text()='Hold']").click()
        shows(browser, "notice", f"{queue_id}: held.")
        assert envelope(daemon, queue_id)["held"] is True
        if os.environ.get("MAILHOST_SCREENSHOTS"):
            browser.save_screenshot(str(DOCS / "console-message.png"))
        browser.find_element(By.XPATH, "//button[text()='Release']").click()
        shows(browser, "notice", f"{queue_id}: released.")
        assert envelope(daemon, queue_id)["held"] is False

        # Suppressions: add one, find it, remove it.
        browser.get(f"{base}/suppressions")
        browser.find_element(By.NAME, "address").send_keys("reader3@gmail.test")
        browser.find_element(By.XPATH, "//button[text()='Add']").click()
        shows(browser, "notice", "reader3@gmail.test suppressed.")
        browser.find_element(By.XPATH, "//table[contains(@class,'suppressions')]//button[text()='Remove']").click()
        shows(browser, "notice", "may be sent to again")

        # A POST without the CSRF token (or with another), with the admin's own cookie: 403, nothing changed.
        session = cookie["value"]
        for body in ("action=add&address=forged%40gmail.test", "action=add&address=forged%40gmail.test&csrf=guess"):
            assert post(http_port, "/console/suppressions", body, session).status == 403
        assert post(http_port, f"/console/queue/{queue_id}", "action=delete", session).status == 403
        assert post(http_port, "/console/login", "address=alice%40example.test&password=x", None).status == 403
        assert suppressed(daemon) == [] and envelope(daemon, queue_id)["id"] == queue_id

        # Every answer carries HSTS and the strict CSP.
        connection = plain_client(http_port)
        connection.request("GET", "/console/login")
        response = connection.getresponse()
        response.read()
        assert response.getheader("Strict-Transport-Security") == "max-age=31536000"
        assert "style-src 'self'" in response.getheader("Content-Security-Policy")
        assert "script-src" not in response.getheader("Content-Security-Policy")

        # Log out: the old session id opens nothing any more.
        browser.get(f"{base}/")
        browser.find_element(By.XPATH, "//button[text()='Log out']").click()
        arrives(browser, f"{base}/login")
        connection.request("GET", "/console/", headers={"Cookie": f"mailhost_console={session}"})
        response = connection.getresponse()
        response.read()
        assert response.status == 303 and response.getheader("Location") == "/console/login"
        connection.close()

        daemon.stop()
        log = daemon.log()
        assert f"console: alice@example.test hold {queue_id}" in log
        assert "console: alice@example.test suppression add <reader3@gmail.test>" in log
        assert session not in log and PASSWORD not in log
        # The figures behind the charts were written to state_dir, for the next start.
        figures = json.loads((daemon.root / "state" / "traffic.json").read_text())["minutes"]
        assert sum(m.get("received", 0) for m in figures.values()) == 7
