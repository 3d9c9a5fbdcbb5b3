"""The search page in a real browser: headless Chromium (Debian's package, driven by Playwright)
loads / from a real uvicorn server, uploads a photo, sees thumbnails with scores, filters by category."""

from __future__ import annotations

import json
import os

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture()
def browser_page():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            yield page
        finally:
            browser.close()


ALL_THUMBS_LOADED = """(n) => {
  const imgs = [...document.querySelectorAll('img.result-thumb')];
  return imgs.length === n && imgs.every((i) => i.complete && i.naturalWidth > 0);
}"""


def test_search_page_uploads_a_photo_and_shows_results(serve_env, index_copy, start_server, browser_page, tmp_path,
                                                       capsys):
    s = start_server(index_copy)
    page = browser_page
    console_errors = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.goto(s.url + "/", timeout=30_000)
    page.wait_for_function("document.querySelector('#info').textContent.includes('24 items')", timeout=20_000)

    page.set_input_files("#file", str(serve_env["queries"][0]))
    page.wait_for_function(ALL_THUMBS_LOADED, arg=10, timeout=30_000)
    cards = page.locator(".card")
    assert cards.count() == 10
    assert page.locator(".card .score").first.inner_text().startswith(("0.", "-0.", "1."))
    assert page.locator(".chips span").count() > 0  # predicted categories
    shot = tmp_path / "search-page.png"
    page.screenshot(path=str(shot), full_page=True)
    with capsys.disabled():  # in the CI log even under -q: where the screenshot artefact is
        print(f"\nsearch page screenshot: {shot}")
    assert shot.stat().st_size > 10_000

    # the result ids are the server's top 10 for that photo
    import httpx

    r = httpx.post(s.url + "/v1/search", files=[("image", ("q.jpg", serve_env["queries"][0].read_bytes()))],
                   data={"k": "10"})
    want = [x["id"] for x in r.json()["queries"][0]["results"]]
    assert [cards.nth(i).get_attribute("data-id") for i in range(10)] == want

    # filter by a category: only items of it remain
    items = [json.loads(x) for x in (index_copy / "items.jsonl").read_text().splitlines()]
    name = items[0]["categories"][0]
    having = {it["id"] for it in items if name in it["categories"]}
    page.select_option("#categories", [name])
    n = min(10, len(having))
    page.wait_for_function(
        "([n, ids]) => { const c = [...document.querySelectorAll('.card')];"
        " return c.length === n && c.every((x) => ids.includes(x.dataset.id)); }",
        arg=[n, sorted(having)], timeout=30_000)
    page.wait_for_function(ALL_THUMBS_LOADED, arg=n, timeout=30_000)
    page.screenshot(path=str(tmp_path / "search-page-filtered.png"), full_page=True)
    with capsys.disabled():
        print(f"\nfiltered search page screenshot: {tmp_path / 'search-page-filtered.png'}")
    assert not console_errors, console_errors
