"""The web page in a real headless Chromium: choose an image, see its captions appear.

Needs Debian's ``chromium`` and ``chromium-driver`` (scripts/test.sh installs them); without them
this test fails rather than skips, so CI cannot pass without having run it.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import threading
import urllib.request

import pytest
from PIL import Image
from werkzeug.serving import make_server

from service import create_app, stop_app

pytestmark = pytest.mark.slow  # a browser and a server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _serve(app):
    """The app on Flask's threaded server at a free loopback port, until the generator is closed."""
    model_process = app.extensions["captioner"].model_process
    assert model_process.wait_ready(60), model_process.load_error
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)
    server.server_close()
    stop_app(app)


@pytest.fixture(scope="module")
def live_server(trained_run):
    yield from _serve(create_app({"MODEL_PATH": str(trained_run / "model.pt")}))


API_KEY = "page-user-0123456789abcdef"


@pytest.fixture(scope="module")
def locked_server(trained_run, tmp_path_factory):
    """The app with API keys on."""
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text(f"{API_KEY}\n")
    keys.chmod(0o600)
    yield from _serve(create_app({"MODEL_PATH": str(trained_run / "model.pt"), "API_KEYS_FILE": str(keys)}))


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


def caption_posts(base: str) -> float:
    """How many caption requests the service has answered (from /metrics)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.findall(r'^captioner_http_requests_total\{endpoint="/v1/captions",method="POST",status="\d+"\} (\S+)$', text, re.M)
    return sum(float(n) for n in found)


def scene_png(path, colour=(220, 30, 30), size=(40, 30)):
    scene = Image.new("RGB", size, "white")
    scene.paste(colour, (5, 5, 18, 18))
    scene.save(path)
    return path


def open_page(browser, base):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(base + "/")
    wait.until(lambda d: "captioner-resnet18-lstm" in d.find_element(By.ID, "model").text)
    return wait


def shown_captions(browser) -> list[str]:
    """Each shown caption's words, as text (the end-of-caption mark left out)."""
    return browser.execute_script(
        "return [...document.querySelectorAll('#captions li')].map(li => "
        "[...li.querySelectorAll('.word:not(.end)')].map(w => w.textContent).join(' '))"
    )


def caption_now(browser, wait):
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "submit").click()
    return wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#captions li"))


def test_choose_an_image_and_see_its_captions(browser, live_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    picture = scene_png(tmp_path / "shapes.png")
    wait = open_page(browser, live_server)
    browser.find_element(By.ID, "image-input").send_keys(str(picture))
    Select(browser.find_element(By.ID, "mode")).select_by_value("beam")
    captions_field = browser.find_element(By.NAME, "num_captions")
    captions_field.clear()
    captions_field.send_keys("2")
    assert not browser.find_element(By.NAME, "temperature").is_displayed()  # sampling only
    items = caption_now(browser, wait)
    expected = api_captions(live_server, picture.read_bytes(), "mode=beam&num_captions=2")
    assert shown_captions(browser) == expected  # ranked by perplexity, as beam search ranks
    for item in items:
        assert item.find_element(By.CLASS_NAME, "score").text.startswith("perplexity ")  # the ranking key first
    assert "Ranked by perplexity" in browser.find_element(By.ID, "ranking").text
    assert "PNG 40×30" in browser.find_element(By.ID, "status").text
    assert "shapes.png" in browser.find_element(By.ID, "file-name").text
    assert "shapes world" in browser.find_element(By.ID, "knows").text  # what the model knows


def test_pointing_at_a_word_overlays_its_attention_and_probability(browser, live_server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    wait = open_page(browser, live_server)
    browser.find_element(By.ID, "image-input").send_keys(str(scene_png(tmp_path / "a.png")))
    caption_now(browser, wait)
    overlay = browser.find_element(By.ID, "overlay")
    assert not overlay.is_displayed()
    word = browser.find_element(By.CSS_SELECTOR, "#captions .word")
    ActionChains(browser).move_to_element(word).perform()
    wait.until(lambda d: overlay.is_displayed())
    assert overlay.get_attribute("data-word") == word.text
    assert f"“{word.text}”: probability 0." in browser.find_element(By.ID, "word-readout").text
    painted = browser.execute_script(
        "const c = arguments[0]; const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < px.length; i += 4) if (px[i] > 0) n++; return n;", overlay
    )
    assert painted > 0
    ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()
    wait.until(lambda d: not overlay.is_displayed())


def drop_file(browser, name: str, data: bytes, mime: str = "image/png"):
    """Drops a file on the drop zone as a person's drag and drop does (a DataTransfer holding it)."""
    browser.execute_script(
        "const bytes = Uint8Array.from(atob(arguments[1]), c => c.charCodeAt(0));"
        "const transfer = new DataTransfer();"
        "transfer.items.add(new File([bytes], arguments[0], {type: arguments[2]}));"
        "document.getElementById('drop-zone').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));",
        name, base64.b64encode(data).decode(), mime,
    )


def test_dropping_after_choosing_shows_the_dropped_file_and_clears_the_old_answer(browser, live_server, tmp_path):
    from selenium.webdriver.common.by import By

    wait = open_page(browser, live_server)
    browser.find_element(By.ID, "image-input").send_keys(str(scene_png(tmp_path / "chosen.png")))
    caption_now(browser, wait)
    assert browser.find_element(By.ID, "status").text
    dropped = scene_png(tmp_path / "dropped.png", colour=(30, 30, 220))
    drop_file(browser, "dropped.png", dropped.read_bytes())
    wait.until(lambda d: "dropped.png" in d.find_element(By.ID, "file-name").text)
    assert "chosen.png" not in browser.find_element(By.ID, "file-name").text
    assert browser.find_elements(By.CSS_SELECTOR, "#captions li") == []
    assert browser.find_element(By.ID, "status").text == ""
    caption_now(browser, wait)
    assert shown_captions(browser) == api_captions(live_server, dropped.read_bytes(), "mode=greedy")


def test_cancelling_the_dialog_keeps_the_image_and_option_changes_mark_captions_stale(browser, live_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    wait = open_page(browser, live_server)
    image_input = browser.find_element(By.ID, "image-input")
    image_input.send_keys(str(scene_png(tmp_path / "kept.png")))
    caption_now(browser, wait)
    # A cancelled file dialog: the input empties and says so with a change event.
    browser.execute_script("arguments[0].value = ''; arguments[0].dispatchEvent(new Event('change'));", image_input)
    assert "kept.png" in browser.find_element(By.ID, "file-name").text
    assert browser.find_element(By.ID, "preview").is_displayed()
    assert browser.find_element(By.ID, "submit").is_enabled()
    assert not browser.find_element(By.ID, "stale-note").is_displayed()
    Select(browser.find_element(By.ID, "mode")).select_by_value("sample")
    assert browser.find_element(By.ID, "stale-note").is_displayed()
    assert "stale" in browser.find_element(By.ID, "captions").get_attribute("class")
    caption_now(browser, wait)
    assert not browser.find_element(By.ID, "stale-note").is_displayed()
    assert "stale" not in browser.find_element(By.ID, "captions").get_attribute("class")


def test_a_caption_cut_at_the_length_limit_is_marked(browser, live_server, tmp_path):
    from selenium.webdriver.common.by import By

    wait = open_page(browser, live_server)
    browser.find_element(By.ID, "image-input").send_keys(str(scene_png(tmp_path / "a.png")))
    browser.find_element(By.NAME, "max_length").send_keys("1")
    [item] = caption_now(browser, wait)
    assert "unfinished" in item.get_attribute("class")
    assert "cut off at the length limit" in item.text


def test_too_large_and_non_image_files_are_refused_before_upload(browser, live_server, tmp_path):
    from selenium.webdriver.common.by import By

    wait = open_page(browser, live_server)
    posts = caption_posts(live_server)
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(17 * 1024 * 1024))
    browser.find_element(By.ID, "image-input").send_keys(str(huge))
    error = wait.until(lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error"))
    assert "huge.png is 17 MB; the service accepts images up to 16 MB" in error.text
    assert not browser.find_element(By.ID, "submit").is_enabled()
    fake = tmp_path / "holiday.jpg"
    fake.write_text("not a picture")
    browser.find_element(By.ID, "image-input").send_keys(str(fake))
    wait.until(lambda d: "holiday.jpg is not an image" in d.find_element(By.ID, "error").text)
    assert not browser.find_element(By.ID, "submit").is_enabled()
    assert not browser.find_element(By.ID, "preview").is_displayed()
    assert caption_posts(live_server) == posts  # nothing was sent


def test_an_error_page_from_a_proxy_reads_as_the_status(browser, live_server, tmp_path):
    from selenium.webdriver.common.by import By

    wait = open_page(browser, live_server)
    browser.execute_script(
        "window.fetch = async () => new Response('<html><body>Bad Gateway</body></html>',"
        " {status: 502, headers: {'Content-Type': 'text/html'}});"
    )
    browser.find_element(By.ID, "image-input").send_keys(str(scene_png(tmp_path / "a.png")))
    browser.find_element(By.ID, "submit").click()
    error = wait.until(lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error"))
    assert error.text == "the service answered with an error (status 502)"


def test_an_example_image_is_captioned_and_a_caption_copied(browser, live_server):
    from selenium.webdriver.common.by import By

    wait = open_page(browser, live_server)
    browser.execute_cdp_cmd(
        "Browser.grantPermissions",
        {"origin": live_server, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
    )
    examples = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples .example"))
    examples[0].click()
    wait.until(lambda d: "shapes-1.png" in d.find_element(By.ID, "file-name").text)
    [item] = caption_now(browser, wait)
    [text] = shown_captions(browser)
    assert text
    item.find_element(By.CLASS_NAME, "copy").click()
    wait.until(lambda d: item.find_element(By.CLASS_NAME, "copy").text == "copied")
    pasted = browser.execute_async_script("navigator.clipboard.readText().then(arguments[0], e => arguments[0](String(e)))")
    assert pasted == text


def test_on_a_390_px_touch_screen_the_page_fits_and_a_tapped_word_stays_shown(browser, live_server, tmp_path):
    from selenium.webdriver.common.by import By

    browser.set_window_size(390, 844)
    browser.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 1})
    wait = open_page(browser, live_server)
    assert browser.execute_script("return matchMedia('(pointer: coarse)').matches")
    hint = browser.find_element(By.ID, "drop-hint").text
    assert hint.startswith("Tap") and "Drop" not in hint  # nothing to drop on a phone
    browser.find_element(By.ID, "image-input").send_keys(str(scene_png(tmp_path / "a.png")))
    caption_now(browser, wait)
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    assert "Tap a word" in browser.find_element(By.ID, "hover-hint").text
    word = browser.find_element(By.CSS_SELECTOR, "#captions .word")
    word.click()
    overlay = browser.find_element(By.ID, "overlay")
    wait.until(lambda d: overlay.is_displayed())
    browser.find_element(By.TAG_NAME, "h1").click()  # the tapped word stays until tapped again
    assert overlay.is_displayed() and "shown" in word.get_attribute("class")
    word.click()
    wait.until(lambda d: not overlay.is_displayed())


def test_the_page_asks_for_a_key_once_says_when_it_is_refused_and_keeps_it_in_the_tab(browser, locked_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(locked_server + "/")
    key_form, why, key_input = (browser.find_element(By.ID, name) for name in ("key-form", "key-why", "api-key"))
    wait.until(lambda d: key_form.is_displayed())
    assert why.text == "This service needs an API key."
    key_input.send_keys("not-the-key-000000000000")
    key_form.find_element(By.TAG_NAME, "button").click()
    wait.until(lambda d: "refused" in why.text and key_form.is_displayed())
    assert browser.execute_script("return sessionStorage.length") == 0  # a refused key is not kept
    key_input.send_keys(API_KEY)
    key_form.find_element(By.TAG_NAME, "button").click()
    wait.until(lambda d: "captioner-resnet18-lstm" in d.find_element(By.ID, "model").text)
    assert not key_form.is_displayed()
    picture = scene_png(tmp_path / "shapes.png")
    browser.find_element(By.ID, "image-input").send_keys(str(picture))
    caption_now(browser, wait)
    request = urllib.request.Request(
        f"{locked_server}/v1/captions?mode=greedy",
        data=picture.read_bytes(),
        headers={"Content-Type": "image/png", "Authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        expected = [c["text"] for c in json.load(response)["captions"]]
    assert shown_captions(browser) == expected
    # In this tab's session storage, nowhere else; a reload of the page does not ask again.
    assert browser.execute_script("return [sessionStorage.getItem('captioner-api-key'), localStorage.length, document.cookie]") == [
        API_KEY, 0, ""
    ]
    browser.refresh()
    wait.until(lambda d: "captioner-resnet18-lstm" in d.find_element(By.ID, "model").text)
    assert not browser.find_element(By.ID, "key-form").is_displayed()


@pytest.fixture(scope="module")
def photo_server(photo_model):
    """The tiny model, recorded as trained on Flickr8k: what the page says such a model knows."""
    yield from _serve(create_app({"MODEL_PATH": str(photo_model)}))


def test_a_flickr8k_model_says_it_knows_photographs_not_shapes(browser, photo_server):
    from selenium.webdriver.common.by import By

    open_page(browser, photo_server)
    knows = browser.find_element(By.ID, "knows").text
    assert "Trained on Flickr8k: 7,000 photographs (6,000 for training)" in knows
    assert "people and dogs" in knows and "shapes" not in knows
    # No shapes scenes to offer a photo model, and no operator's folder: no examples at all.
    assert not browser.find_element(By.ID, "examples").is_displayed()
    assert not browser.find_element(By.ID, "model-choice").is_displayed()  # one model: nothing to choose


@pytest.fixture(scope="module")
def two_model_server(trained_run, photo_model, tmp_path_factory):
    """Two models: the shapes one (the default), whose default decoding is a beam of 5 with two
    captions, and a photo one, with an operator's folder of examples (one image)."""
    from tests import service_models

    examples = tmp_path_factory.mktemp("examples")
    scene_png(examples / "street.png", colour=(30, 160, 30))
    with pytest.MonkeyPatch.context() as patch:
        import service.app

        patch.setattr(service.app, "load_model", service_models.load_with_default_decoding)
        app = create_app({"MODELS": f"shapes={trained_run / 'model.pt'},photos={photo_model}", "EXAMPLES_DIR": str(examples)})
    for slot in app.extensions["captioner"].models:
        assert slot.current.wait_ready(60), slot.current.load_error
    yield from _serve(app)


def test_the_page_chooses_a_model_and_shows_the_examples_and_decoding_that_fit_it(browser, two_model_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(two_model_server + "/")
    wait.until(lambda d: "shapes" in d.find_element(By.ID, "model").text)
    choice = Select(browser.find_element(By.ID, "model-choice"))
    assert [option.text for option in choice.options] == ["shapes", "photos"]
    assert choice.first_selected_option.text == "shapes"
    # The shapes model: the shapes world's scenes, and its own default decoding in the controls.
    examples = [image.get_attribute("alt") for image in browser.find_elements(By.CSS_SELECTOR, "#examples .example img")]
    assert examples == [f"shapes-{i}.png" for i in range(1, 5)]
    assert Select(browser.find_element(By.ID, "mode")).first_selected_option.get_attribute("value") == "beam"
    assert browser.find_element(By.NAME, "beam_size").get_attribute("value") == "5"
    assert browser.find_element(By.NAME, "num_captions").get_attribute("value") == "2"
    picture = scene_png(tmp_path / "shapes.png")
    browser.find_element(By.ID, "image-input").send_keys(str(picture))
    caption_now(browser, wait)
    assert shown_captions(browser) == api_captions(two_model_server, picture.read_bytes(), "model=shapes&mode=beam&beam_size=5&num_captions=2")

    # The photo model: the operator's example, what it knows, captions from it; the address says which.
    choice.select_by_value("photos")
    wait.until(lambda d: "Flickr8k" in d.find_element(By.ID, "knows").text)
    assert browser.find_elements(By.CSS_SELECTOR, "#captions li") == []  # the other model's answer is gone
    [example] = browser.find_elements(By.CSS_SELECTOR, "#examples .example")
    assert example.find_element(By.TAG_NAME, "img").get_attribute("alt") == "street.png"
    assert Select(browser.find_element(By.ID, "mode")).first_selected_option.get_attribute("value") == "greedy"  # none of its own
    example.click()
    wait.until(lambda d: "street.png" in d.find_element(By.ID, "file-name").text)
    caption_now(browser, wait)
    with urllib.request.urlopen(f"{two_model_server}/examples/photos/street.png", timeout=10) as response:
        street = response.read()
    assert shown_captions(browser) == api_captions(two_model_server, street, "model=photos&mode=greedy")
    assert browser.current_url.endswith("?model=photos")
    browser.refresh()  # the address keeps the choice
    wait.until(lambda d: "Flickr8k" in d.find_element(By.ID, "knows").text)
    assert Select(browser.find_element(By.ID, "model-choice")).first_selected_option.text == "photos"
