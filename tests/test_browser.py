"""The web page in a real headless Chromium: choose an image, see its captions appear.

Needs Debian's ``chromium`` and ``chromium-driver`` (scripts/test.sh installs them); without them
this test fails rather than skips, so CI cannot pass without having run it.
"""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request

import pytest
from PIL import Image
from werkzeug.serving import make_server

from service import create_app

pytestmark = pytest.mark.slow  # a browser and a server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def live_server(trained_run):
    """The app on Flask's threaded server at a free loopback port."""
    app = create_app({"MODEL_PATH": str(trained_run / "model.pt")})
    batcher = app.extensions["captioner"].batcher
    assert batcher.wait_ready(60), batcher.load_error
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)
    server.server_close()
    batcher.stop()


@pytest.fixture
def browser(tmp_path):
    for program in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(program), f"{program} is missing: apt-get install -y chromium chromium-driver"
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1000,1200",
    ):
        options.add_argument(argument)
    # Naming both programs keeps Selenium from looking for (or downloading) others.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def api_captions(base: str, image: bytes, query: str) -> list[str]:
    request = urllib.request.Request(f"{base}/v1/captions?{query}", data=image, headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return [c["text"] for c in json.load(response)["captions"]]


def test_choose_an_image_and_see_its_captions(browser, live_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    picture = tmp_path / "shapes.png"
    scene = Image.new("RGB", (40, 30), "white")
    scene.paste((220, 30, 30), (5, 5, 18, 18))
    scene.save(picture)
    wait = WebDriverWait(browser, 30)

    browser.get(live_server + "/")
    wait.until(lambda d: "captioner-resnet18-lstm" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "image-input").send_keys(str(picture))
    Select(browser.find_element(By.ID, "mode")).select_by_value("beam")
    captions_field = browser.find_element(By.NAME, "num_captions")
    captions_field.clear()
    captions_field.send_keys("2")
    assert not browser.find_element(By.NAME, "temperature").is_displayed()  # sampling only
    browser.find_element(By.ID, "submit").click()

    items = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#captions li"))
    shown = [item.text for item in items]
    expected = api_captions(live_server, picture.read_bytes(), "mode=beam&num_captions=2")
    assert len(shown) == 2
    for line, text in zip(shown, expected, strict=True):
        assert line.startswith(text) and "perplexity" in line
    assert "PNG 40×30" in browser.find_element(By.ID, "status").text

    # A file that is not an image: the service's message appears, and no captions.
    fake = tmp_path / "holiday.jpg"
    fake.write_text("not a picture")
    browser.find_element(By.ID, "image-input").send_keys(str(fake))
    browser.find_element(By.ID, "submit").click()
    error = wait.until(lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error"))
    assert "unsupported_format" in error.text
    assert browser.find_elements(By.CSS_SELECTOR, "#captions li") == []
