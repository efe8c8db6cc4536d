"""The pages in a real browser: Debian's Chromium driven by Playwright (pointed at the system browser;
nothing is downloaded). The report of a real audit renders with no console errors and its images load;
the front door's form submits a shipped demo model and shows its verdict.

Screenshots go to ``$AUDIT_SCREENSHOTS`` when set (``make screenshots`` writes docs/report.png and
docs/front.png), else to the test's temporary directory. ``.ci/run`` installs Chromium."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY_OPTIONS

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
DEMO = ROOT / "models" / "demo"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no system Chromium at /usr/bin/chromium "
                       "(apt-get install chromium; .ci/run installs it)"),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the `test` extra")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    out = Path(os.environ.get("AUDIT_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def demo_probes(tmp_path_factory) -> Path:
    """The shipped demo probes, cut to 32 (the test service caps probe uploads at 1 MB)."""
    with np.load(DEMO / "probes.npz") as data:
        arrays = {k: data[k][:32] for k in data.files}
    path = tmp_path_factory.mktemp("demo") / "probes.npz"
    np.savez(path, **arrays)
    return path


def _page(browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    return page, problems


def test_report_renders_without_errors_and_its_images_load(browser, api, service, demo_probes, shots):
    spec = {"group": "C4", "shifts": [{"name": "blur", "severity": 2}, {"name": "gaussian_noise", "severity": 3}],
            "options": {**TINY_OPTIONS, "n_probes": 16, "ig_steps": 8}}
    r = api("POST", "/audit", params={"wait": 120}, data={"spec": json.dumps(spec)},
            files={"model": ("plain_cnn.onnx", open(DEMO / "plain_cnn.onnx", "rb")),
                   "probes": ("probes.npz", open(demo_probes, "rb"))})
    assert r.status_code == 200, r.text
    summary = r.json()
    page, problems = _page(browser)
    page.goto(service.url + summary["links"]["report_html"])
    assert page.locator(".verdict").get_attribute("data-label") == summary["verdict"]
    assert page.locator("#meaning").inner_text().strip()
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.complete, e.naturalWidth])")
    assert len(images) >= 5, images
    assert all(complete and width > 0 for _, complete, width in images), images
    assert page.locator("figure.saliency").count() >= 1
    assert "{'" not in page.locator("#timing-line").inner_text()
    assert "plain_cnn.onnx" in page.title()
    page.screenshot(path=str(shots / "report.png"), full_page=True)
    page.close()
    assert not problems, problems


def test_front_door_submits_a_demo_model_and_shows_its_verdict(browser, service, demo_probes, shots):
    page, problems = _page(browser)
    page.goto(service.url + "/")
    assert "Invariance audit service" in page.locator("h1").inner_text()
    page.set_input_files("#model", str(DEMO / "c4_averaged_cnn.onnx"))
    page.set_input_files("#probes", str(demo_probes))
    page.select_option("#group", "C4")
    page.fill("#spec", json.dumps({"shifts": [], "options": TINY_OPTIONS}))
    page.click("#submit")
    verdict = page.wait_for_selector("#verdict, #failure", timeout=240_000)
    assert verdict.get_attribute("id") == "verdict", verdict.inner_text()
    assert verdict.get_attribute("data-label") == "genuine"
    job_id = page.locator("#status code").last.inner_text()
    page.wait_for_function(f"document.querySelector('#recent tr[data-id=\"{job_id}\"]') !== null", timeout=30_000)
    row = page.locator(f'#recent tr[data-id="{job_id}"]').inner_text()
    assert "C4" in row and "succeeded" in row and "genuine" in row, row
    page.screenshot(path=str(shots / "front.png"), full_page=True)
    page.close()
    assert not problems, problems


def test_docs_render_the_contract_from_packaged_assets(browser, service):
    page, problems = _page(browser)
    remote: list[str] = []
    page.on("request", lambda r: remote.append(r.url) if not r.url.startswith((service.url, "data:")) else None)
    page.goto(service.url + "/docs")
    title = page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "audit" in title.inner_text().lower()
    page.close()
    assert not problems and not remote, (problems, remote)


def test_front_door_names_the_field_of_an_error(browser, service):
    """Issue 23: a refused submission says which field to fix, as the API's problem+json does."""
    page, problems = _page(browser)
    page.goto(service.url + "/")
    page.set_input_files("#model", str(DEMO / "plain_cnn.onnx"))
    page.fill("#spec", json.dumps({"group": "C5"}))
    page.click("#submit")
    failure = page.wait_for_selector("#failure", timeout=120_000)
    assert failure.get_attribute("data-field") == "spec.group", failure.inner_text()
    assert failure.inner_text().startswith("spec.group: "), failure.inner_text()
    assert "C4" in failure.inner_text()               # and what to write instead
    page.close()
    # the page's own 422 is the only error the browser saw
    assert [p for p in problems if "422" not in p] == [], problems


def test_front_door_shows_why_an_audit_failed(browser, service, models):
    """Issue 23: a failed job shows its reason (the error's type and message), on the page and in the list."""
    page, problems = _page(browser)
    page.goto(service.url + "/")
    page.set_input_files("#model", str(models["hog"]))        # loads, then asks for ~40 GB on an audit batch
    page.fill("#spec", json.dumps({"group": "C4", "shifts": [], "options": TINY_OPTIONS}))
    page.click("#submit")
    failure = page.wait_for_selector("#failure", timeout=240_000)
    text = failure.inner_text()
    assert text.startswith("Audit failed: [out_of_memory] "), text
    assert failure.get_attribute("data-code") == "out_of_memory"
    assert "memory" in page.locator("#failure .reason").inner_text().lower()
    job_id = page.locator("#failure code").inner_text()
    page.wait_for_function(f"document.querySelector('#recent tr[data-id=\"{job_id}\"]') !== null", timeout=30_000)
    cell = page.locator(f'#recent tr[data-id="{job_id}"] td.reason').inner_text()
    assert cell.startswith("[out_of_memory] ") and "memory" in cell.lower(), cell
    page.close()
    assert not problems, problems


def test_swagger_try_it_out_runs_as_prefilled(browser, service):
    """Issue 23: POST /audit in Swagger UI, "Try it out" with only a model file chosen (a browser cannot pre-fill
    a file): the pre-filled spec, timeout_s and the empty inputs are accepted (202), against the service that
    served the page (the contract's first server is relative)."""
    import yaml

    page, problems = _page(browser)
    page.goto(service.url + "/docs")
    op = "#operations-audits-submitAudit"
    page.wait_for_selector(op, timeout=60_000)
    page.click(f"{op} .opblock-summary")
    page.click(f"{op} .try-out__btn")
    page.locator(f"{op} input[type=file]").first.set_input_files(str(DEMO / "c4_averaged_cnn.onnx"))
    with page.expect_response(lambda r: r.request.method == "POST" and "/audit" in r.url, timeout=120_000) as answer:
        page.click(f"{op} .execute")
    response = answer.value
    assert response.url.startswith(service.url + "/audit"), response.url
    assert response.status == 202, response.text()
    job = response.json()
    form = (yaml.safe_load((ROOT / "openapi.yaml").read_text())["paths"]["/audit"]["post"]["requestBody"]
            ["content"]["multipart/form-data"]["schema"]["properties"])
    assert job["timeout_s"] == min(form["timeout_s"]["example"], 300)   # the test service caps it at 300 s
    assert job["spec"]["group"]["name"] == json.loads(form["spec"]["example"])["group"]
    assert job["inputs"]["model"]["filename"] == "c4_averaged_cnn.onnx"
    page.close()
    assert not problems, problems
