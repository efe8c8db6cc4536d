"""The front door against the real service: ``/``, ``/docs`` (Swagger UI from a package, no CDN), the
contract viewable in a browser, and ``Accept`` on the ``?wait=`` answer. Every response is checked against
``openapi.yaml`` (the ``api`` fixture)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from audit_service import __version__
from conftest import ROOT, tiny_spec

pytestmark = pytest.mark.slow


def test_front_page_names_the_service_and_has_the_form(api):
    r = api("GET", "/")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    page = r.text
    assert "Invariance audit service" in page and __version__ in page
    for element in ('id="model"', 'id="group"', 'id="probes"', 'id="submit"', 'id="recent"'):
        assert element in page
    assert 'id="token"' not in page  # tokens are off in the test service
    assert not re.search(r'(src|href)="https?://', page), "no assets from elsewhere"


def test_every_group_the_page_offers_is_a_spec_the_api_accepts(api):
    import html

    from audit_service.engine.groups.build import GROUPS
    from audit_service.engine.spec import parse_audit_spec

    select = re.search(r'<select id="group".*?</select>', api("GET", "/").text, re.S).group(0)
    values = [json.loads(html.unescape(v)) for v in re.findall(r'<option value="([^"]+)"', select)]
    assert [v["name"] for v in values] == list(GROUPS)           # every group, from the one table
    for value in values:
        assert parse_audit_spec({"group": value}).group.name == value["name"]   # a translation has its order


def test_docs_serve_swagger_ui_from_the_package(api):
    page = api("GET", "/docs").text
    assert "SwaggerUIBundle" in page and "/openapi.yaml" in page
    assert not re.search(r'(src|href)="https?://', page), "no CDN"
    for asset in re.findall(r'(?:src|href)="(/docs/static/[^"]+)"', page):
        r = api("GET", asset)
        assert r.status_code == 200 and len(r.content) > 100, asset
    assert api("GET", "/docs/static/no-such-file.js").status_code == 404


def test_openapi_is_shown_inline_in_a_browser(api):
    browser = api("GET", "/openapi.yaml", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert browser.headers["Content-Type"].startswith("text/plain")
    assert browser.headers["Content-Disposition"].startswith("inline")
    assert browser.text == (ROOT / "openapi.yaml").read_text()
    tool = api("GET", "/openapi.yaml")
    assert tool.headers["Content-Type"].startswith("application/yaml")


def test_wait_answer_as_html_when_asked(api, models):
    r = api("POST", "/audit", files={"model": (Path(models["plain"]).name, open(models["plain"], "rb"))},
            data={"spec": json.dumps(tiny_spec())}, params={"wait": 120}, headers={"Accept": "text/html"})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert "Verdict" in r.text and "{'" not in r.text
    job_id = r.headers["Location"].rsplit("/", 1)[-1]
    # the JSON link is absolute, so a saved copy of the page still works
    assert re.search(rf'href="http://[^"]+/audits/{job_id}/report"', r.text)


def test_the_audit_examples_are_accepted_as_swagger_sends_them(api, models):
    """Issue 23: the `/audit` request examples in openapi.yaml make a valid request, sent as Swagger UI's "Try it
    out" sends a form: every field with its example, every empty file input as a part with no file name and no
    bytes, and the one thing a browser cannot pre-fill, the model file."""
    import yaml

    form = (yaml.safe_load((ROOT / "openapi.yaml").read_text())["paths"]["/audit"]["post"]["requestBody"]
            ["content"]["multipart/form-data"]["schema"]["properties"])
    assert form["timeout_s"]["example"] > 1 and form["model_uri"]["example"] != "string"
    fields, parts = {}, [("model", (Path(models["invariant"]).name, open(models["invariant"], "rb")))]
    for name, prop in form.items():
        if name == "model":
            continue
        binary = prop.get("format") == "binary" or (prop.get("items") or {}).get("format") == "binary"
        if binary:
            parts.append((name, (None, b"")))                      # an empty file input
        else:
            value = prop.get("example", prop.get("default"))
            assert value is not None, f"{name} has neither an example nor a default"
            fields[name] = json.dumps(value) if isinstance(value, bool) else str(value)
    json.loads(fields["spec"])                                      # the spec example is JSON
    r = api("POST", "/audit", data=fields, files=parts)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["timeout_s"] == min(form["timeout_s"]["example"], 300)   # the test service caps it at 300 s
    assert set(job["inputs"]) == {"model"}                          # the empty parts counted as absent
