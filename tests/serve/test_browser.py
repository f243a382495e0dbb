"""The web page in a real browser: Playwright drives Debian's chromium headless against a live server.

It types a query, uploads an image (file picker and drag-and-drop) and clicks "more like this"; each step
checks what the page shows against the index, and saves a screenshot in the test's folder.
"""

from __future__ import annotations

import base64

import pytest
from playwright.sync_api import expect, sync_playwright
from serve_helpers import png_bytes, serve

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def live(corpus, tmp_path_factory):
    server, index = serve(corpus, tmp_path_factory.mktemp("browser") / "corpus")
    with server:
        yield server.url, index


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, live):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(live[0] + "/")
    expect(page.locator("#index-select option")).to_have_count(1)
    yield page
    page.close()
    assert errors == []


def card_keys(page) -> list[str]:
    return page.locator("#results .card").evaluate_all("cards => cards.map(c => c.dataset.key)")


def test_typing_a_query_shows_the_index_results(page, live, corpus, tmp_path):
    _, index = live
    page.fill("#q", corpus.captions[2])
    page.press("#q", "Enter")
    expect(page.locator("#results .card")).to_have_count(24)
    expected = index.search(corpus.encoder.encode_texts([corpus.captions[2]]), 24)[0]
    assert card_keys(page) == [hit.key for hit in expected]
    first = page.locator("#results .card").first
    expect(first.locator(".caption")).to_have_text(corpus.captions[corpus.keys.index(expected[0].key)])
    expect(first.locator(".score")).to_have_text(f"{expected[0].score:.3f}")
    assert first.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")
    expect(page.locator("#status")).to_contain_text("24 results")
    page.screenshot(path=str(tmp_path / "text_query.png"), full_page=True)
    # the source filter narrows the results to one corpus
    page.select_option("#source", "tuxpaint")
    expect(page.locator("#results .card")).to_have_count(12)
    assert set(page.locator("#results .source").all_inner_texts()) == {"tuxpaint"}


def test_uploading_an_image_with_the_file_picker(page, corpus, tmp_path):
    path = tmp_path / "query.png"
    path.write_bytes(png_bytes(corpus.images[15]))
    page.set_input_files("#file", str(path))
    expect(page.locator("#query-chip")).to_be_visible()
    expect(page.locator("#results .card").first).to_have_attribute("data-key", corpus.keys[15])
    expect(page.locator("#results .card .score").first).to_have_text("1.000")
    page.screenshot(path=str(tmp_path / "image_upload.png"), full_page=True)


def test_dropping_an_image_on_the_page(page, corpus, tmp_path):
    data = base64.b64encode(png_bytes(corpus.images[3])).decode()
    page.evaluate(
        """async (data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            const zone = document.getElementById("dropzone");
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        data,
    )
    expect(page.locator("#results .card").first).to_have_attribute("data-key", corpus.keys[3])
    expect(page.locator("#status")).to_contain_text("dropped.png")
    page.screenshot(path=str(tmp_path / "image_drop.png"), full_page=True)


def test_more_like_this_and_show_more(page, corpus, tmp_path):
    page.select_option("#k", "12")
    page.fill("#q", "a drawing")
    page.press("#q", "Enter")
    expect(page.locator("#results .card")).to_have_count(12)
    target = page.locator("#results .card").nth(5)
    key = target.get_attribute("data-key")
    target.locator(".more-like-this").click()
    expect(page.locator("#results .card").first).to_have_attribute("data-key", key)
    expect(page.locator("#results .card .score").first).to_have_text("1.000")
    expect(page.locator("#query-label")).to_contain_text(corpus.captions[corpus.keys.index(key)])
    page.screenshot(path=str(tmp_path / "more_like_this.png"), full_page=True)
    page.click("#more")
    expect(page.locator("#results .card")).to_have_count(24)
    expect(page.locator("#more")).to_be_hidden()
    assert len(set(card_keys(page))) == 24
