"""The gallery in a real browser: Debian's chromium driven headless by selenium, on the demo corpus.

`.ci/run` installs chromium and chromium-driver; elsewhere the test skips, saying what is missing.
Set MMSEARCH_SCREENSHOT=path.png to keep the gallery screenshot (docs/gallery.png is one).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install 'mmsearch[serve]'")
pytest.importorskip("selenium", reason="selenium is not installed: pip install 'mmsearch[test]'")

from conftest import EVIL_NAME, REPO, start_server, stop_server  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DEMO = REPO / "index_data" / "demo"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,860"):
        options.add_argument(arg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
        driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(gallery_index: Path, model_cache: Path) -> Iterator[str]:
    proc, url = start_server(gallery_index, env={"MMSEARCH_CACHE": str(model_cache)})
    yield url
    stop_server(proc)


def _wait(driver, condition, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def _results(driver) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#results figure")


def _names(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [f.find_element(By.CSS_SELECTOR, "figcaption .name").text for f in _results(driver)]


def _search(driver, url: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url + "/")
    box = _wait(driver, lambda d: d.find_element(By.ID, "q"))
    box.send_keys(text + Keys.ENTER)
    _wait(driver, lambda d: f"for “{text}”" in d.find_element(By.ID, "status").text)


def test_text_search_shows_red_circles_first(browser, served: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    _search(browser, served, "a red circle")
    names = _names(browser)
    assert names[0].startswith("red_circle_") and names[1].startswith("red_circle_")
    first = _results(browser)[0].find_element(By.TAG_NAME, "img")
    _wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", first))
    assert browser.execute_script("return arguments[0].naturalWidth", first) > 0  # the thumbnail loaded
    assert parse_qs(urlparse(browser.current_url).query)["q"] == ["a red circle"]  # bookmarkable
    score = _results(browser)[0].find_element(By.CSS_SELECTOR, ".score").text
    assert 0.5 < float(score) <= 1.0
    footer = browser.find_element(By.ID, "footer").text
    assert "shapes-mini" in footer and "51 images" in footer and "60 texts" in footer

    browser.get(browser.current_url)  # the bookmark itself runs the search again
    _wait(browser, lambda d: _results(d))
    assert _names(browser)[:2] == names[:2]
    screenshot = os.environ.get("MMSEARCH_SCREENSHOT") or str(tmp_path / "gallery.png")
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(screenshot)
    assert Path(screenshot).stat().st_size > 10_000


def test_image_from_the_file_picker_finds_its_caption(browser, served: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(served + "/")
    picker = _wait(browser, lambda d: d.find_element(By.ID, "image"))
    picker.send_keys(str(DEMO / "blue_star_01.webp"))
    _wait(browser, lambda d: "image blue_star_01.webp" in d.find_element(By.ID, "status").text)
    first = _results(browser)[0]
    assert "text" in first.get_attribute("class")
    assert "blue star" in first.find_element(By.TAG_NAME, "blockquote").text
    assert "captions.txt:" in first.find_element(By.CSS_SELECTOR, "figcaption .name").text


def test_dropped_image_searches(browser, served: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(served + "/")
    _wait(browser, lambda d: d.find_element(By.ID, "q"))
    # WebDriver cannot drag from the OS: build the File in the page and dispatch the drop it would cause.
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
        window.dispatchEvent(new DragEvent("dragenter", {dataTransfer: data, bubbles: true}));
        window.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
    """, base64.b64encode((DEMO / "green_circle_03.jpg").read_bytes()).decode())
    _wait(browser, lambda d: "image dropped.jpg" in d.find_element(By.ID, "status").text)
    assert "green circle" in _results(browser)[0].find_element(By.TAG_NAME, "blockquote").text
    assert not browser.find_element(By.ID, "drop").is_displayed()


def test_more_like_this(browser, served: str) -> None:
    from selenium.webdriver.common.by import By

    _search(browser, served, "a red circle")
    first = _results(browser)[0]
    clicked = first.find_element(By.CSS_SELECTOR, "a.open").get_attribute("href").rsplit("/", 1)[1]
    first.find_element(By.CSS_SELECTOR, "button.more").click()
    _wait(browser, lambda d: f"for item {clicked}" in d.find_element(By.ID, "status").text)
    assert parse_qs(urlparse(browser.current_url).query)["similar"] == [clicked]
    hrefs = [f.find_element(By.CSS_SELECTOR, "a.open").get_attribute("href") for f in _results(browser)]
    assert not any(h.endswith(f"/file/{clicked}") for h in hrefs)
    assert _names(browser)[0].startswith("red_circle_")
    browser.back()  # history: back to the text search, without a reload
    _wait(browser, lambda d: "for “a red circle”" in d.find_element(By.ID, "status").text)


def test_keyboard_only(browser, served: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(served + "/")
    _wait(browser, lambda d: d.find_element(By.ID, "q"))
    # Start from the top of the document (not from the autofocused box).
    browser.execute_script("document.body.tabIndex = -1; document.body.focus(); document.body.removeAttribute('tabindex')")
    keys = ActionChains(browser)
    seen = []
    for _ in range(3):  # Tab from the start of the page reaches the search box
        keys.send_keys(Keys.TAB).perform()
        seen.append(browser.switch_to.active_element.get_attribute("id"))
        if seen[-1] == "q":
            break
    assert seen[-1] == "q", seen
    keys.send_keys("a blue star", Keys.ENTER).perform()
    _wait(browser, lambda d: "for “a blue star”" in d.find_element(By.ID, "status").text)
    links = {f.find_element(By.CSS_SELECTOR, "a.open").get_attribute("href") for f in _results(browser)}
    reached = set()
    for _ in range(4 + 2 * len(links)):  # each result: its picture link, then its "More like this"
        keys.send_keys(Keys.TAB).perform()
        href = browser.switch_to.active_element.get_attribute("href")
        if href:
            reached.add(href)
    assert reached == links
    browser.execute_script("document.querySelector('#results a.open').focus()")
    first = browser.switch_to.active_element.get_attribute("href")
    windows = set(browser.window_handles)
    keys.send_keys(Keys.ENTER).perform()  # Enter opens the original
    _wait(browser, lambda d: len(d.window_handles) > len(windows))
    new = (set(browser.window_handles) - windows).pop()
    browser.switch_to.window(new)
    _wait(browser, lambda d: d.current_url == first)
    browser.close()
    browser.switch_to.window(windows.pop())


def test_file_name_with_html_is_shown_as_text(browser, served: str) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    _search(browser, served, "a red square")
    assert EVIL_NAME in _names(browser)
    assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
    assert browser.find_element(By.CSS_SELECTOR, f'img[alt="{EVIL_NAME}"]')
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - onerror=alert(1) never ran


def test_login_form_with_a_token(browser, gallery_index: Path, model_cache: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    proc, url = start_server(gallery_index, "--token", "browser-secret", env={"MMSEARCH_CACHE": str(model_cache)})
    try:
        browser.get(url + "/?q=a+green+star")
        token = _wait(browser, lambda d: d.find_element(By.ID, "token") if d.find_element(By.ID, "token")
                      .is_displayed() else None)
        assert not _results(browser)
        token.send_keys("wrong" + Keys.ENTER)
        _wait(browser, lambda d: "wrong token" in d.find_element(By.ID, "status").text)
        token.clear()
        token.send_keys("browser-secret" + Keys.ENTER)
        _wait(browser, lambda d: _results(d))
        assert _names(browser)[0].startswith("green_star_")
        assert "browser-secret" not in browser.execute_script("return document.cookie")  # HttpOnly
    finally:
        stop_server(proc)
