"""End to end in headless Chromium: open the page, draw a box on a VOC image, see the mask,
accept it, reload, find it in the labels file (`decoder serve` runs in a subprocess).

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``); skipped only when the browser is absent. Screenshots go to the
test's tmp folder, or to ``$SAMCACHE_SCREENSHOTS`` when set.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.decoder_runs import make_run
from tests.serve_process import serving
from tests.test_predict import build_voc_cache

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
BOX = (60.0, 40.0, 300.0, 260.0)  # image 000032 (500×281): the fine-tuned mask is not empty

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs /usr/bin/chromium (apt-get install chromium chromium-driver)",
)


@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)  # fmt: skip
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script: str, what: str, timeout: float = 60.0):
    """Poll a JS expression until it is truthy (bounded); its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return ({script});")
        if value:
            return value
        time.sleep(0.1)
    status = driver.execute_script("return document.getElementById('status').textContent;")
    raise AssertionError(f"timed out waiting for {what}; page status: {status!r}")


PAINTED = """
const c = document.querySelector('.panel[data-decoder="fine_tuned"] canvas.overlay');
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;
"""


def drag_box(driver, box: tuple[float, float, float, float]) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("css selector", '.panel[data-decoder="fine_tuned"] canvas.overlay')
    width, height = driver.execute_script(
        "const c = arguments[0]; const r = c.getBoundingClientRect();"
        "return [r.width / c.width, r.height / c.height];", canvas,
    )  # fmt: skip
    size = canvas.size
    x0, y0, x1, y1 = box

    def offset(x: float, y: float) -> tuple[int, int]:  # from the element's centre, screen px
        return round(x * width - size["width"] / 2), round(y * height - size["height"] / 2)

    actions = ActionChains(driver)
    actions.move_to_element_with_offset(canvas, *offset(x0, y0)).click_and_hold()
    actions.move_to_element_with_offset(canvas, *offset((x0 + x1) / 2, (y0 + y1) / 2))
    actions.move_to_element_with_offset(canvas, *offset(x1, y1)).release().perform()


def test_click_accept_reload(browser, tmp_path, voc_sample_dir, tiny_checkpoint):
    cache = build_voc_cache(tmp_path / "cache.zarr", voc_sample_dir, tiny_checkpoint)
    make_run(tmp_path / "run", cache, tiny_checkpoint)
    labels = tmp_path / "labels.json"
    shots = Path(os.environ.get("SAMCACHE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    args = ["--cache", str(cache), "--run", str(tmp_path / "run"), "--labels", str(labels)]
    with serving(args) as served:
        url = served.url
        browser.get(url + "#id=000032")
        wait_for(browser, "document.body.dataset.ready === '1'", "the page to load")
        assert browser.find_element("id", "image-title").text == "000032"
        assert len(browser.find_elements("css selector", "#image-list li")) == 5
        assert len(browser.find_elements("css selector", ".panel")) == 2  # side by side
        before = browser.execute_script(PAINTED)  # ground-truth outlines only
        drag_box(browser, BOX)
        wait_for(browser, "Number(document.body.dataset.predictions) >= 1", "a mask")
        area = int(
            browser.find_element("css selector", '.panel[data-decoder="fine_tuned"]').get_attribute(
                "data-mask-area"
            )
        )
        assert area > 0
        assert browser.execute_script(PAINTED) > before + area // 2  # the mask is drawn
        assert "IoU pred" in browser.find_element("css selector", ".choices button").text
        browser.save_screenshot(str(shots / "serve_mask.png"))

        browser.find_element("id", "accept").click()
        wait_for(browser, "document.querySelectorAll('#objects li[data-id]').length === 1",
                 "the accepted object")  # fmt: skip
        saved = json.loads(labels.read_text())
        assert [i["file_name"] for i in saved["images"]] == ["000032.jpg"]
        assert len(saved["annotations"]) == 1 and saved["annotations"][0]["area"] == area

        browser.refresh()
        wait_for(browser, "document.body.dataset.ready === '1'", "the page to reload")
        assert browser.find_element("id", "image-title").text == "000032"
        wait_for(browser, "document.querySelectorAll('#objects li[data-id]').length === 1",
                 "the saved object after a reload")  # fmt: skip
        badge = browser.find_element("css selector", '#image-list li[data-id="000032"] .done')
        assert badge.text == "1 labelled"
        browser.save_screenshot(str(shots / "serve_reloaded.png"))

        browser.find_element("tag name", "body").send_keys("j")  # keyboard: next image
        wait_for(browser, "document.getElementById('image-title').textContent === '000033'",
                 "the next image")  # fmt: skip
        browser.find_element("id", "label-next").click()  # unlabelled, most unsure first
        wait_for(browser, "document.getElementById('status').textContent.startsWith('label next')",
                 "label next")  # fmt: skip
        assert browser.find_element("id", "image-title").text != "000032"  # 000032 is labelled
