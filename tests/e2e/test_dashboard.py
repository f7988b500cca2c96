"""The dashboard at ``/`` in a real headless Chromium, over real data and a real WebSocket.

The gateway serves the recorded data (PostgreSQL + Redis, the gateway suite's fixtures) and the
page; a real ws-broadcaster reads the test's ``token.metrics`` topic. The browser (Debian's
``chromium`` driven by ``chromedriver`` through selenium) loads the page with an API key, shows
the ranking, re-sorts it by velocity, draws the charts, and changes a row when a new sample is
produced into Kafka. A screenshot is kept as ``artifacts/dashboard.png``.

Selenium is synchronous, and the servers run on this test's event loop: every browser step
runs in a thread (``asyncio.to_thread``) so that the loop keeps serving the page meanwhile.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.integration.gateway.conftest import PEPPER, Api, create_key, gateway_settings, serve
from tests.integration.gateway.dataset import Dataset
from tests.support.ws import free_port, publish, ws_settings
from tests.support.ws import serve as serve_ws
from tokvel_common.settings import CommonSettings

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
APT_LINE = "apt-get install -y chromium chromium-driver"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
SCREENSHOT = ARTIFACTS / "dashboard.png"
BITCOIN = 1
WAIT_SECONDS = 20.0
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--window-size=1600,1000",
)

T = TypeVar("T")


@contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: the browser test needs `{APT_LINE}`")
    with tempfile.TemporaryDirectory(prefix="tokvel-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        try:
            yield driver
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)


@dataclass
class Page:
    """The dashboard in the browser; every method blocks (call it through ``run``)."""

    driver: webdriver.Chrome

    def wait(self, condition: Callable[[WebDriver], T], what: str) -> T:
        result: T = WebDriverWait(self.driver, WAIT_SECONDS, poll_frequency=0.1).until(
            condition, f"timed out waiting for {what}"
        )
        return result

    def open(self, url: str, key: str) -> None:
        self.driver.get(url)
        field = self.driver.find_element(By.ID, "api-key")
        field.send_keys(key)
        self.driver.find_element(By.CSS_SELECTOR, "#key-form button").click()

    def script(self, source: str, *args: Any) -> Any:
        """Reads the DOM in one step: rows are re-rendered on every update."""
        return self.driver.execute_script(source, *args)

    def row_ids(self) -> list[int]:
        ids: list[str] = self.script(
            "return [...document.querySelectorAll('#tokens tbody tr')].map(r => r.dataset.cmcId)"
        )
        return [int(cmc_id) for cmc_id in ids]

    def wait_rows(self, expected: list[int], what: str) -> None:
        self.wait(lambda _: self.row_ids() == expected, what)

    def cell(self, cmc_id: int, name: str) -> str:
        selector = f'#tokens tr[data-cmc-id="{cmc_id}"] td.{name}'
        text: str = self.script(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
            selector,
        )
        return text

    def row_ts(self, cmc_id: int) -> str:
        ts: str = self.script(
            "const e = document.querySelector(arguments[0]); return e ? e.dataset.ts : '';",
            f'#tokens tr[data-cmc-id="{cmc_id}"]',
        )
        return ts

    def text(self, element_id: str) -> str:
        value: str = self.driver.find_element(By.ID, element_id).text
        return value

    def count(self, selector: str) -> int:
        return len(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def sort_by(self, field: str) -> None:
        self.driver.find_element(By.CSS_SELECTOR, f'th[data-sort="{field}"]').click()

    def errors(self) -> list[str]:
        entries: list[dict[str, Any]] = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
        return [e["message"] for e in entries if e["level"] == "SEVERE"]


async def run(function: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(function, *args)


@asynccontextmanager
async def browser() -> AsyncIterator[Page]:
    manager = chromium()
    driver = await run(manager.__enter__)
    try:
        yield Page(driver)
    finally:
        await run(manager.__exit__, None, None, None)


async def ranking(api: Api, sort: str) -> list[int]:
    body = await api.json("/v1/tokens", sort=sort, order="desc", limit=50)
    return [token["cmc_id"] for token in body["data"]]


async def test_dashboard_shows_real_data_sorts_and_updates_live(
    settings: CommonSettings,
    topic_prefix: str,
    db_url: str,
    redis_url: str,
    dataset: Dataset,
) -> None:
    key = await create_key(db_url, "enterprise")
    ws_port = free_port()
    gateway = gateway_settings(
        db_url, redis_url, dashboard_ws_url=f"ws://127.0.0.1:{ws_port}/v1/ws"
    )
    async with serve(gateway, key) as api:
        ws = ws_settings(
            settings,
            topic_prefix=topic_prefix,
            database_url=db_url,
            redis_url=redis_url,
            api_key_pepper=PEPPER,
            ws_port=ws_port,
            ws_allowed_origins=[api.base_url],
        )
        by_market_cap = await ranking(api, "market_cap")
        by_velocity = await ranking(api, "velocity")
        assert by_market_cap[0] == BITCOIN
        assert by_velocity != by_market_cap
        async with serve_ws(ws), browser() as page:
            # The page loads, with the real ranking, its freshness and the charts.
            await run(page.open, api.base_url + "/", key)
            await run(page.wait_rows, by_market_cap, "the market-cap ranking")
            assert await run(page.cell, BITCOIN, "token") == "BTC Bitcoin"
            assert dataset.newest.strftime("%Y-%m-%d %H:%M:%S") in await run(page.text, "as-of")
            await run(page.wait, lambda _: page.count("#windows-chart rect.bar") == 5, "bars")
            await run(page.wait, lambda _: page.count("#history-chart polyline") == 1, "history")
            await run(
                page.wait,
                lambda _: page.text("ws-status").startswith("live"),
                "the WebSocket subscription",
            )

            # Sortable by velocity and back by market cap (the server's order, page by page).
            await run(page.sort_by, "velocity")
            await run(page.wait_rows, by_velocity, "the velocity ranking")
            await run(page.sort_by, "market_cap")
            await run(page.wait_rows, by_market_cap, "the market-cap ranking again")
            await run(
                page.wait,
                lambda _: page.text("ws-status").startswith("live"),
                "the WebSocket subscription of the new page",
            )

            # A new sample produced into token.metrics changes Bitcoin's row.
            old = dataset.latest[BITCOIN]
            new_velocity = round((old.velocity or 0.1) * 1.5 + 0.0123, 8)
            sample = old.model_copy(
                update={
                    "ts": old.ts + timedelta(minutes=5),
                    "velocity": new_velocity,
                    "velocity_24h": new_velocity,
                    "trend": "increasing",
                }
            )
            before = await run(page.cell, BITCOIN, "velocity")
            assert before != f"{new_velocity:.4f}"
            await publish(ws, [sample])
            await run(
                page.wait,
                lambda _: page.cell(BITCOIN, "velocity") == f"{new_velocity:.4f}",
                "Bitcoin's row to show the new sample",
            )
            assert datetime.fromisoformat(await run(page.row_ts, BITCOIN)) == sample.ts
            assert await run(page.cell, BITCOIN, "trend") == "increasing"
            assert (await run(page.cell, BITCOIN, "updated")).endswith("s ago")
            new_time = sample.ts.strftime("%Y-%m-%d %H:%M:%S")
            assert new_time in await run(page.text, "as-of")
            assert await run(page.errors) == []

            ARTIFACTS.mkdir(exist_ok=True)
            assert await run(page.driver.save_screenshot, str(SCREENSHOT))
