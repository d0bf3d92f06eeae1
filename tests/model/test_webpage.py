"""The clinicians' web page of the Bento, end to end in a real headless browser (Debian's
``chromium`` driven by Playwright), against a real `bentoml serve` on 127.0.0.1 (the ``server``
and ``trusted_server`` fixtures of tests/model/conftest.py: tiny untrained models packaged into a
temporary BENTOML_HOME, the second with a temperature and an OOD detector).

The page, using only the service's public endpoints with fetch, shows a risk class, the seven
diagnosis probabilities, the referral decision and the Grad-CAM overlay of a real image, and the
service's own error text for a text file renamed ``.jpg``, and for a photograph that is not
dermoscopy a warning and no referral; the drop zone works from the keyboard;
nothing overflows at phone width. Screenshots of each state go to the test's ``tmp_path``.
``POST /gradcam`` answers a PNG of the input's own size. No browser: the tests FAIL (CI must
install ``chromium``), they never skip.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pipeline.model import quality
from tests.service_fixtures import IMAGES_DIR, MAX_BYTES, THRESHOLD, token_for
from tests.service_fixtures import real_images as _real_images

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DX = {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
RISK_SHOWN = {"benign", "benign-at-risk", "malignant"}
TIMEOUT_MS = 30_000


def wait_until(page, expression: str, timeout_ms: int = TIMEOUT_MS) -> None:
    """Wait until ``expression`` is true in the page. Polled with ``page.evaluate`` (the DevTools
    protocol): Playwright's own ``wait_for_function`` compiles its predicate inside the page, which
    the service's Content-Security-Policy (no eval) rightly forbids."""
    import time

    deadline = time.monotonic() + timeout_ms / 1000
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_ms} ms waiting for: {expression}")
        page.wait_for_timeout(50)


def chromium_path() -> str:
    """``$LESIONFLOW_CHROMIUM``, else ``chromium`` on PATH; fails (never skips) without one."""
    found = os.environ.get("LESIONFLOW_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found or not Path(found).exists():
        pytest.fail(
            "no chromium browser found: install Debian's `chromium` (apt-get install -y chromium), "
            "or point $LESIONFLOW_CHROMIUM at a Chromium executable"
        )
    return found


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def pages(browser):
    """Pages opened by a test, closed after it."""
    opened: list = []
    yield opened
    for page in opened:
        page.close()


def _open(browser, pages: list, base: str, width: int = 1280, height: int = 900, token: str | None = None):
    """The page of the service at ``base`` (``token``: it requires one, typed into the page's token
    form, which appears when the service answers 401 and keeps the token for the tab)."""
    page = browser.new_page(viewport={"width": width, "height": height})
    pages.append(page)
    page.set_default_timeout(TIMEOUT_MS)
    # listening to file choosers switches Playwright's interception on; doing it before the page
    # loads avoids a race with a chooser opened right away (by a key press on the drop zone)
    page.on("filechooser", lambda chooser: None)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(base + "/")
    if token is not None:
        page.wait_for_selector("#auth:not([hidden])")
        assert "Authorization: Bearer" in page.locator("#auth-reason").inner_text()
        page.fill("#token", token)
        page.click("#auth-submit")
    wait_until(page, "document.getElementById('model-tag').textContent !== 'loading…'")
    if token is not None:
        assert page.evaluate("sessionStorage.getItem('lesionflow.token')") == token
    return page, errors


def _wait_for_result(page) -> None:
    page.wait_for_selector("#result:not([hidden])")
    wait_until(
        page,
        "(() => { const i = document.getElementById('overlay');"
        " return !i.hidden && i.complete && i.naturalWidth > 0; })()",
    )
    wait_until(page, "document.getElementById('form').getAttribute('aria-busy') === 'false'")


def _shown_probabilities(page) -> dict[str, float]:
    rows = page.locator("#dx-bars .bar-row")
    out = {}
    for i in range(rows.count()):
        row = rows.nth(i)
        out[row.get_attribute("data-dx")] = float(row.locator(".bar-value").inner_text().rstrip("%")) / 100
    return out


def test_page_shows_a_real_image_result(server, client, browser, pages, tmp_path):
    base, tag, _ = server
    path = _real_images(1)[0]
    page, js_errors = _open(browser, pages, base)
    assert page.locator("#notice").is_visible()
    assert "not a diagnostic device" in page.locator("#notice").inner_text().lower()
    assert page.locator("#model-tag").inner_text() == tag
    # the vocabularies come from /model
    assert "back" in page.locator("#localization option").all_inner_texts()
    page.screenshot(path=tmp_path / "empty-desktop.png", full_page=True)

    page.set_input_files("#image", str(path))
    page.fill("#age", "45")
    page.select_option("#sex", "female")
    page.select_option("#localization", "back")
    page.evaluate("""(() => { window.__states = [];  // record the loading state as it happens
        const form = document.getElementById('form'), status = document.getElementById('status');
        new MutationObserver(() => window.__states.push([form.getAttribute('aria-busy'), status.textContent,
            document.getElementById('submit').disabled])).observe(form, {attributes: true, childList: true,
            subtree: true, characterData: true}); })()""")
    page.click("#submit")
    _wait_for_result(page)
    states = page.evaluate("window.__states")
    assert ["true", "Analysing the image…", True] in states  # busy, said so, button disabled
    page.screenshot(path=tmp_path / "result-desktop.png", full_page=True)

    # what the page shows is the service's answer for the same request
    api = client.post(
        "/classify",
        files={"image": (path.name, path.read_bytes(), "image/jpeg")},
        data={"age": "45", "sex": "female", "localization": "back"},
    ).json()
    risk_shown = page.locator("#risk-class").inner_text()
    assert risk_shown in RISK_SHOWN
    assert risk_shown == api["risk_class"].replace("_", "-")
    assert (
        page.locator("#risk-prob").inner_text()
        == f"probability {100 * api['risk_probabilities'][api['risk_class']]:.1f}%"
    )
    shown = _shown_probabilities(page)
    assert set(shown) == DX and len(shown) == 7
    for code, p in api["dx_probabilities"].items():
        assert shown[code] == pytest.approx(p, abs=0.0006), code
    decision = page.locator("#decision-text").inner_text()
    if api["p_malignant"] >= THRESHOLD:
        assert decision.startswith("Decision: refer")
    else:
        assert "no referral indicated at this threshold" in decision
    assert f"{100 * THRESHOLD:.1f}%" in page.locator("#thr").inner_text()
    # the overlay is the image's own size and next to it, with the preview of the upload
    size = page.evaluate(
        "(() => { const i = document.getElementById('overlay'); return [i.naturalWidth, i.naturalHeight]; })()"
    )
    assert tuple(size) == Image.open(path).size
    assert page.locator("#preview").is_visible() and page.locator("#overlay").is_visible()
    assert not page.locator("#overlay-status").is_visible()
    assert page.locator("#data-version").inner_text() == api["data_version"]
    assert not page.locator("#error").is_visible()

    # a clinician who disagrees records a diagnosis with the answer's id in the inference log
    answer_id = page.evaluate("answerId")
    page.select_option("#disagree-dx", "mel")
    page.fill("#disagree-note", "atypical network")
    page.click("#disagree-submit")
    wait_until(page, "document.getElementById('disagree-status').textContent.startsWith('Recorded')")
    from pipeline.monitoring import inferencelog

    logged = inferencelog.read(server[2].parent / "inference-log").set_index("request_id")
    assert logged.loc[answer_id, "disputed_dx"] == "mel" and logged.loc[answer_id, "dispute_note"] == "atypical network"
    assert js_errors == []

    # phone width: one column, nothing wider than the screen
    phone, phone_errors = _open(browser, pages, base, width=390, height=844)
    phone.set_input_files("#image", str(path))
    phone.click("#submit")
    _wait_for_result(phone)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    assert len(_shown_probabilities(phone)) == 7
    phone.screenshot(path=tmp_path / "result-phone.png", full_page=True)
    assert phone_errors == []


def test_page_shows_the_service_error_for_a_text_file(server, client, browser, pages, tmp_path):
    base, _, _ = server
    fake = tmp_path / "notes.jpg"
    fake.write_text("Patient notes: this is a text file, not a dermoscopic image.\n" * 5)
    expected = client.post("/classify", files={"image": (fake.name, fake.read_bytes(), "image/jpeg")})
    assert expected.status_code == 400, expected.text
    page, js_errors = _open(browser, pages, base)
    page.set_input_files("#image", str(fake))
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    wait_until(page, "document.getElementById('form').getAttribute('aria-busy') === 'false'")
    message = page.locator("#error").inner_text()
    assert expected.json()["error"] in message  # the service's own text, shown as is
    assert page.locator("#error").get_attribute("role") == "alert"
    assert not page.locator("#result").is_visible()
    assert page.locator("#submit").is_enabled()  # can try another file
    page.screenshot(path=tmp_path / "error-desktop.png", full_page=True)

    # too large (the server's byte limit): the service's 413 text, and the next image works again
    big = tmp_path / "huge.jpg"
    big.write_bytes(_real_images(1)[0].read_bytes() + os.urandom(MAX_BYTES))
    page.set_input_files("#image", str(big))
    page.click("#submit")
    wait_until(page, "document.getElementById('error').textContent.includes('exceeds the limit')")
    assert "field 'image'" in page.locator("#error").inner_text()
    page.screenshot(path=tmp_path / "error-too-large.png", full_page=True)
    page.set_input_files("#image", str(_real_images(1)[0]))
    page.click("#submit")
    _wait_for_result(page)
    assert not page.locator("#error").is_visible()
    assert js_errors == []


def test_drop_zone_and_form_work_from_the_keyboard(server, browser, pages, tmp_path):
    base, _, _ = server
    path = _real_images(2)[1]
    page, _ = _open(browser, pages, base)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "drop"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(path))
    assert path.name in page.locator("#file-name").inner_text()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "age"
    page.keyboard.type("70")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "sex"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "localization"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "submit"
    page.keyboard.press("Enter")
    _wait_for_result(page)
    assert len(_shown_probabilities(page)) == 7
    # every form control has a label
    unlabelled = page.evaluate("""[...document.querySelectorAll('input, select')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.id)""")
    assert unlabelled == []
    page.screenshot(path=tmp_path / "keyboard-result.png", full_page=True)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_gradcam_endpoint_returns_an_overlay_of_the_input_size(client):
    path = _real_images(1)[0]
    original = Image.open(path).convert("RGB")
    cases = [
        (
            "jpeg multipart",
            {"files": {"image": (path.name, path.read_bytes(), "image/jpeg")}, "data": {"age": "50"}},
            original,
        ),
        ("600x450 png raw", None, original.resize((600, 450))),
        ("portrait png raw", None, original.resize((150, 200))),
    ]
    for name, kwargs, img in cases:
        if kwargs is None:
            kwargs = {"content": _png(img), "headers": {"Content-Type": "image/png"}}
        r = client.post("/gradcam", **kwargs)
        assert r.status_code == 200, (name, r.text)
        assert r.headers["content-type"] == "image/png"
        assert r.headers["x-gradcam-class"] in DX
        out = Image.open(io.BytesIO(r.content))
        assert out.format == "PNG" and out.mode == "RGB"
        assert out.size == img.size, name
        diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(img, dtype=np.int16))
        assert diff.mean() > 2, name  # a heatmap was blended in
    bad = client.post("/gradcam", content=b"not an image at all", headers={"Content-Type": "image/jpeg"})
    assert bad.status_code == 400
    assert bad.json()["field"] == "image" and bad.json()["error"]


def test_page_and_assets_are_served(server):
    base = server[0]
    page = httpx.get(base + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Not a diagnostic device" in page.text
    for asset, ctype in (("/web/app.js", "javascript"), ("/web/app.css", "text/css")):
        r = httpx.get(base + asset, timeout=10)
        assert r.status_code == 200 and ctype in r.headers["content-type"], asset
    assert httpx.get(base + "/web/missing.js", timeout=10).status_code == 404
    assert httpx.get(base + "/health", timeout=10).status_code == 200  # the APIs are still there


def test_page_withholds_the_referral_for_a_photo_that_is_not_dermoscopy(
    trusted_server, trusted_client, browser, pages, tmp_path
):
    """An image the model cannot judge: a visible warning with the service's message, and no risk
    class, no probabilities and no referral box; a dermoscopic image afterwards is shown as usual."""
    from pipeline.evaluation import oodsets
    from tests.model.conftest import trust_sample

    coffee = next(o for o in oodsets.photographs() if o.name == "coffee")
    photo = tmp_path / "coffee.jpg"
    Image.fromarray(coffee.rgb).save(photo, quality=90)
    api = trusted_client.post("/classify", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")}).json()
    assert api["in_distribution"] is False
    page, js_errors = _open(browser, pages, trusted_server[0], token=token_for(trusted_server[0]))
    page.set_input_files("#image", str(photo))
    page.click("#submit")
    page.wait_for_selector("#ood-warning:not([hidden])")
    wait_until(page, "document.getElementById('form').getAttribute('aria-busy') === 'false'")
    warning = page.locator("#ood-warning").inner_text()
    assert "does not look like" in warning  # the detector's verdict
    for reason in api["quality_reasons"]:  # and the image-quality checks' reasons, named
        assert quality.REASONS[reason] in warning
    assert "no risk estimate is given" in warning
    for hidden in ("#decision", "#risk", "#dx-bars"):
        assert not page.locator(hidden).is_visible(), hidden
    assert "refer" not in page.locator("#result").inner_text().lower().replace("referral", "")
    page.screenshot(path=tmp_path / "ood-desktop.png", full_page=True)

    assert not page.locator("#similar").is_visible(), "no similar cases for an image the model cannot judge"

    # a dermoscopic image next: the usual result, no warning, and its similar confirmed cases
    ham = IMAGES_DIR / f"{trust_sample()['image_id'][0]}.jpg"
    page.set_input_files("#image", str(ham))
    page.click("#submit")
    _wait_for_result(page)
    assert not page.locator("#ood-warning").is_visible() and page.locator("#decision").is_visible()
    cases = page.locator("#similar-grid .case")
    assert page.locator("#similar-title").inner_text() == "Most similar training lesions (confirmed diagnoses)"
    assert cases.count() == 6 and "HAM10000" in page.locator("#similar .attribution").inner_text()
    wait_until(page, "[...document.querySelectorAll('#similar-grid img')].every(i => i.complete && i.naturalWidth > 0)")
    names = {"Melanoma", "Melanocytic nevus", "Benign keratosis", "Basal cell carcinoma", "Dermatofibroma"}
    for i in range(cases.count()):
        text = cases.nth(i).inner_text()
        assert "similarity" in text and any(n.lower() in text.lower() for n in names | {"keratosis", "vascular"}), text
    cases.first.focus()  # keyboard: each case takes the focus and is announced whole
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.classList.contains('case')")
    assert "confirmed by" in page.evaluate("document.activeElement.getAttribute('aria-label')")
    page.screenshot(path=tmp_path / "similar-desktop.png", full_page=True)
    phone, phone_errors = _open(
        browser, pages, trusted_server[0], width=390, height=844, token=token_for(trusted_server[0])
    )
    phone.set_input_files("#image", str(ham))
    phone.click("#submit")
    _wait_for_result(phone)
    assert phone.locator("#similar-grid .case").count() == 6
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    phone.screenshot(path=tmp_path / "similar-phone.png", full_page=True)
    assert js_errors == [] and phone_errors == []


def test_page_lets_a_clinician_choose_the_site_and_says_when_it_gives_no_decision(
    trusted_server, browser, pages, tmp_path
):
    """The sites recorded with the model (tests/model/conftest.py: clinic-a suitable at 0.999,
    clinic-b not suitable) are offered on the page; choosing one sends it, the result names the
    site's threshold, and at a site not suitable for the model the page shows the probability and
    "No decision" with the reason instead of a referral."""
    from tests.model.conftest import trust_sample

    page, js_errors = _open(browser, pages, trusted_server[0], token=token_for(trusted_server[0]))
    wait_until(page, "document.querySelectorAll('#site option').length === 3")
    assert page.locator("#site-field").is_visible()
    ham = IMAGES_DIR / f"{trust_sample()['image_id'][2]}.jpg"
    page.set_input_files("#image", str(ham))
    page.select_option("#site", "clinic-a")
    page.click("#submit")
    _wait_for_result(page)
    assert "of site clinic-a: 99.9%" in page.locator("#thr").inner_text()
    assert "Decision: " in page.locator("#decision-text").inner_text()
    page.select_option("#site", "clinic-b")
    page.click("#submit")
    wait_until(page, "document.getElementById('thr').innerText.includes('clinic-b')")
    wait_until(page, "document.getElementById('form').getAttribute('aria-busy') === 'false'")
    text = page.locator("#decision-text").inner_text()
    assert text.startswith("No decision: not suitable for this model") and "min_site_specificity" in text
    assert "Malignancy probability" in page.locator("#p-mal").inner_text()
    page.screenshot(path=tmp_path / "site-not-suitable.png", full_page=True)
    assert js_errors == []
