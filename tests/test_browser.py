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
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # An element found just before the page replaced its results is stale: ask the condition again.
    return WebDriverWait(driver, timeout, ignored_exceptions=[StaleElementReferenceException]).until(condition)


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


# --- the mode, sort and model switches -----------------------------------------------------------


def _api(url: str, **params: object) -> list[dict]:
    """The JSON API's answer to a text search, as the page would ask it (k=48)."""
    import json
    from urllib.parse import urlencode
    from urllib.request import urlopen

    with urlopen(f"{url}/api/search?{urlencode({'k': 48, **params})}", timeout=30) as response:
        return json.load(response)


def _info(url: str) -> dict:
    """The server's /api/info."""
    import json
    from urllib.request import urlopen

    with urlopen(f"{url}/api/info", timeout=30) as response:
        return json.load(response)


def _api_names(url: str, **params: object) -> list[str]:
    return [Path(r["path"]).name for r in _api(url, **params)]


def _query(driver) -> dict[str, list[str]]:
    return parse_qs(urlparse(driver.current_url).query)


def _choose(driver, control: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, control)).select_by_value(value)


def _chosen(driver, control: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, control).get_attribute("value")


def _shows(driver, want: list[str]) -> bool:
    """Whether the page shows exactly `want` (its search has finished)."""
    from selenium.webdriver.common.by import By

    return "searching" not in driver.find_element(By.ID, "status").text and _names(driver) == want


def _search_here(driver, text: str) -> None:
    """Type a query into the page on show (keeping its switches) and send it."""
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "q")
    box.clear()
    box.send_keys(text + "\n")


def test_words_only_switch_asks_the_api_in_words_mode_and_a_reload_keeps_it(browser, served: str) -> None:
    from selenium.webdriver.common.by import By

    _search(browser, served, "blue star")
    hybrid, words = _api_names(served, q="blue star"), _api_names(served, q="blue star", mode="words")
    assert _names(browser) == hybrid and words != hybrid  # words only: just the files whose names say so
    assert _chosen(browser, "mode") == "hybrid" and "mode" not in _query(browser)  # the default stays out of the URL
    assert not browser.find_element(By.ID, "model").is_displayed()  # one model: nothing to choose

    _choose(browser, "mode", "words")  # the search on show runs again, words only
    _wait(browser, lambda d: _shows(d, words))
    assert _query(browser) == {"q": ["blue star"], "mode": ["words"]}

    browser.refresh()
    _wait(browser, lambda d: _shows(d, words))
    assert _chosen(browser, "mode") == "words"
    _search_here(browser, "a red circle")  # a new search keeps the switch
    red = _api_names(served, q="a red circle", mode="words")
    _wait(browser, lambda d: _shows(d, red))
    assert _query(browser)["mode"] == ["words"]


def test_mode_switch_is_off_where_the_api_ignores_it_and_keeps_its_choice(browser, served: str) -> None:
    from selenium.webdriver.common.by import By

    mode = lambda d: d.find_element(By.ID, "mode")  # noqa: E731
    browser.get(served + "/?q=a+red+circle&mode=words")
    _wait(browser, lambda d: _shows(d, _api_names(served, q="a red circle", mode="words")))
    assert mode(browser).is_enabled()
    text_title = mode(browser).get_attribute("title")

    _results(browser)[0].find_element(By.CSS_SELECTOR, "button.more").click()  # /api/similar takes no mode
    _wait(browser, lambda d: "for item" in d.find_element(By.ID, "status").text)
    assert not mode(browser).is_enabled() and _chosen(browser, "mode") == "words"
    assert "More like this" in mode(browser).get_attribute("title")
    browser.back()
    _wait(browser, lambda d: "for “a red circle”" in d.find_element(By.ID, "status").text)
    assert mode(browser).is_enabled() and mode(browser).get_attribute("title") == text_title

    browser.find_element(By.ID, "image").send_keys(str(DEMO / "blue_star_01.webp"))  # nor an image search
    _wait(browser, lambda d: "image blue_star_01.webp" in d.find_element(By.ID, "status").text)
    assert not mode(browser).is_enabled() and "image search" in mode(browser).get_attribute("title")
    assert "text" in _results(browser)[0].get_attribute("class")
    _choose(browser, "target", "images")  # the other switches still apply: the image is searched again
    _wait(browser, lambda d: "image" in _results(d)[0].get_attribute("class")
          and "searching" not in d.find_element(By.ID, "status").text)
    assert not mode(browser).is_enabled()

    _search_here(browser, "a blue star")  # a text search again: the mode chosen before
    _wait(browser, lambda d: "for “a blue star”" in d.find_element(By.ID, "status").text)
    assert mode(browser).is_enabled() and _query(browser)["mode"] == ["words"]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory, model_cache: Path, tiny_model: str) -> Iterator[str]:
    """A server over a few demo images indexed with shapes-mini and the tiny random model, their files
    dated newest first by name (so a date order is not the score order)."""
    import shutil

    import retrieval

    root = tmp_path_factory.mktemp("two-models")
    (root / "photos").mkdir()
    names = sorted(p.name for p in DEMO.iterdir() if p.name.startswith(("red_", "blue_")))
    for day, name in enumerate(reversed(names)):
        shutil.copy(DEMO / name, root / "photos" / name)
        os.utime(root / "photos" / name, (1.7e9 + day * 86400,) * 2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMSEARCH_CACHE", str(model_cache))
        mp.setenv("MMSEARCH_OFFLINE", "1")
        with retrieval.open_index(root / "index", model="shapes-mini") as idx:
            idx.add([root / "photos"], workers=0)
            idx.add_model(tiny_model, "random", workers=0)
    proc, url = start_server(root / "index", env={"MMSEARCH_CACHE": str(model_cache)})
    yield url
    stop_server(proc)


def test_model_and_sort_switches_ask_the_api_and_live_in_the_url(browser, two_models: str) -> None:
    from selenium.webdriver.common.by import By

    url = two_models
    default, tiny = (m["key"] for m in _info(url)["models"])
    browser.get(url + "/")
    model = _wait(browser, lambda d: d.find_element(By.ID, "model") if d.find_element(By.ID, "model")
                  .is_displayed() else None)
    options = model.find_elements(By.TAG_NAME, "option")
    assert [o.get_attribute("value") for o in options] == [default, tiny]
    assert _chosen(browser, "model") == default and "shapes-mini" in options[0].text

    _choose(browser, "model", tiny)
    _search_here(browser, "a red circle")
    by_tiny = _api_names(url, q="a red circle", model=tiny)
    assert by_tiny != _api_names(url, q="a red circle")  # really the other model's ranking
    _wait(browser, lambda d: _shows(d, by_tiny))
    assert _query(browser) == {"q": ["a red circle"], "model": [tiny]}

    _choose(browser, "sort", "date")
    dated = _api(url, q="a red circle", model=tiny, sort="date")
    assert [Path(r["path"]).name for r in dated] != by_tiny
    _wait(browser, lambda d: _shows(d, [Path(r["path"]).name for r in dated]))
    assert _query(browser) == {"q": ["a red circle"], "model": [tiny], "sort": ["date"]}
    first_date = browser.find_element(By.CSS_SELECTOR, "#results figure .taken").text
    assert first_date == dated[0]["taken"].replace("T", " ")  # the order shown is explained

    browser.refresh()  # a reload (or the link, shared) gives the same page
    _wait(browser, lambda d: _shows(d, [Path(r["path"]).name for r in dated]) and _chosen(d, "model") == tiny)
    assert _chosen(browser, "sort") == "date"

    browser.get(url + "/?q=a+red+circle&model=nope")  # a link from another index: the API's error, one line
    status = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#status.error"))
    assert "no model nope" in status.text and not _results(browser)
    assert _chosen(browser, "model") == default and "images" in browser.find_element(By.ID, "footer").text


def test_footer_names_the_model_of_the_results_on_show(browser, two_models: str, tiny_model: str) -> None:
    from selenium.webdriver.common.by import By

    url = two_models
    default, tiny = (m["key"] for m in _info(url)["models"])
    footer = lambda d: d.find_element(By.ID, "footer").text  # noqa: E731
    browser.get(f"{url}/?q=a+red+circle&model={tiny}")
    _wait(browser, lambda d: _shows(d, _api_names(url, q="a red circle", model=tiny)) and "images" in footer(d))
    assert f"{tiny_model} / random" in footer(browser) and "shapes-mini" not in footer(browser)
    _choose(browser, "model", default)
    _wait(browser, lambda d: _shows(d, _api_names(url, q="a red circle")))
    assert "model shapes-mini / " in footer(browser) and tiny_model not in footer(browser)
