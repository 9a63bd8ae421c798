"""Screenshots of the web page with a word pointed at, at desktop and phone widths, for the README.

Serves MODEL on a free loopback port, opens the page in headless Chromium (Debian's chromium and
chromium-driver, as tests/test_browser.py uses), clicks an example image, asks for beam captions
with their explanations and points at a word, then saves one PNG per width.

    .venv/bin/python scripts/page_screenshots.py runs/shapes/model.pt --out docs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WIDTHS = {"desktop": (1100, 880), "phone": (390, 844)}  # (width, height) in CSS pixels


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model.pt to serve")
    parser.add_argument("--out", default="docs", help="folder for page-desktop.png and page-phone.png")
    parser.add_argument("--example", type=int, default=2, help="which example image to click (1-based)")
    parser.add_argument("--word", type=int, default=3, help="which word of the first caption to point at (0-based)")
    return parser.parse_args(argv)


def chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                     f"--user-data-dir={profile}"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)


def shoot(driver, base: str, size: tuple[int, int], args: argparse.Namespace, path: Path) -> str:
    """Loads the page at ``size``, captions an example, points at a word; returns that word."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.set_window_size(*size)
    wait = WebDriverWait(driver, 60)
    driver.get(base + "/")
    wait.until(lambda d: not d.find_element(By.ID, "knows").get_attribute("hidden"))
    examples = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples .example"))
    examples[args.example - 1].click()
    wait.until(lambda d: d.find_element(By.ID, "submit").is_enabled())
    Select(driver.find_element(By.ID, "mode")).select_by_value("beam")
    driver.find_element(By.ID, "submit").click()
    words = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#captions li:first-child .word"))
    word = words[min(args.word, len(words) - 1)]
    if size[0] < 600:  # a phone: the word is tapped (it stays chosen), below the image kept in view
        driver.execute_script("arguments[0].scrollIntoView({block: 'end'}); window.scrollBy(0, 120)", word)
        word.click()
    else:
        ActionChains(driver).move_to_element(word).perform()
    wait.until(lambda d: d.find_element(By.ID, "overlay").is_displayed())
    driver.save_screenshot(str(path))
    return word.text


def main(args: argparse.Namespace) -> None:
    from werkzeug.serving import make_server

    from service import create_app

    app = create_app({"MODEL_PATH": args.model})
    model_process = app.extensions["captioner"].model_process
    if not model_process.wait_ready(120):
        raise SystemExit(f"the model did not load: {model_process.load_error}")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        driver = chromium(Path(profile))
        try:
            for name, size in WIDTHS.items():
                path = out / f"page-{name}.png"
                word = shoot(driver, f"http://127.0.0.1:{server.server_port}", size, args, path)
                print(f"{path}: {size[0]} px wide, pointing at {word!r}, {path.stat().st_size / 1024:.0f} KB")
        finally:
            driver.quit()
            server.shutdown()
            model_process.stop()


if __name__ == "__main__":
    main(parse_args())
