"""The dashboard (`/ui`) in a real browser: Debian's Chromium driven by Playwright, against
the live stack (uvicorn, PostgreSQL, Redis, a Celery worker).

`WARP_SCREENSHOTS=docs` saves each page's screenshot there (how docs/ui-*.png were made)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.service.conftest import create_key, wait_for

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
"""A closed network: without the background-networking flags Chromium keeps reaching out."""


@pytest.fixture(scope="module")
def browser() -> Browser:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, service) -> Page:
    context = browser.new_context(base_url=service.url, viewport={"width": 1100, "height": 900})
    page = context.new_page()
    yield page
    context.close()


def screenshot(page: Page, name: str) -> None:
    if folder := os.environ.get("WARP_SCREENSHOTS"):
        page.screenshot(path=str(Path(folder) / f"ui-{name}.png"), full_page=True)


def sign_in(page: Page, key: str) -> None:
    page.goto("/ui")
    page.fill("#key", key)
    page.click("#sign-in-form button")
    expect(page.locator("#jobs")).to_be_visible()


def test_without_a_key_the_page_is_the_sign_in_form_not_data(page, service):
    job_id = service.http.get("/v1/jobs?limit=1").json()["data"]
    page.goto("/ui")
    expect(page.locator("#sign-in")).to_be_visible()
    expect(page.locator("#jobs")).to_be_hidden()
    expect(page.locator("#job-rows tr")).to_have_count(0)
    screenshot(page, "sign-in")
    page.fill("#key", "warp_not_a_key")
    page.click("#sign-in-form button")
    expect(page.locator("#sign-in-error")).to_contain_text("refused this key")
    expect(page.locator("#jobs")).to_be_hidden()
    for job in job_id:
        assert job["id"] not in page.content()


def test_a_job_is_watched_from_the_list_to_success_with_a_live_chart(page, service, tiny_job):
    spec = copy.deepcopy(tiny_job)
    spec["hyperparameters"]["max_steps"] = 4
    sign_in(page, service.key)
    job_id = service.http.post("/v1/jobs", json=spec).json()["id"]
    row = page.locator(f"tr[data-id='{job_id}']")
    expect(row).to_be_visible()
    first_status = row.get_attribute("data-status")
    screenshot(page, "jobs")
    row.locator("a").click()
    expect(page.locator("#job-id")).to_have_text(job_id)
    # what the page shows, each time it changes: statuses, and each redraw of the chart (a
    # record per change, so events that arrive together still count one by one)
    page.evaluate(
        """() => {
          window.seen = {status: [document.querySelector('#job-status').textContent],
                         points: []};
          new MutationObserver(() => window.seen.status.push(
            document.querySelector('#job-status').textContent))
            .observe(document.querySelector('#job-status'), {childList: true});
          new MutationObserver((records) => records.forEach((record) =>
            window.seen.points.push(Number(record.oldValue))))
            .observe(document.querySelector('#loss-chart'),
                     {attributeFilter: ['data-points'], attributeOldValue: true});
        }"""
    )
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=240_000)
    seen = page.evaluate("window.seen")
    assert first_status in {"queued", "running"}
    assert seen["status"][-1] == "succeeded" and "running" in seen["status"] + [first_status]
    # every metrics event redrew the chart: the point counts it went through, one by one
    points = [*seen["points"], int(page.locator("#loss-chart").get_attribute("data-points"))]
    assert points == sorted(points) and len(set(points)) >= 2
    assert page.locator("#loss-chart").get_attribute("data-last-step") == "4"
    expect(page.locator("#metrics")).to_contain_text("refusal_rate")
    expect(page.locator("#report-plot")).to_be_visible()
    expect(page.locator("#events li").last).to_contain_text("finished")
    report = page.locator("#artifacts button[data-name='report.md']")
    expect(report).to_be_visible()
    screenshot(page, "job")
    with page.expect_download() as download:
        report.click()
    saved = Path(download.value.path()).read_bytes()
    assert saved == service.http.get(f"/v1/jobs/{job_id}/artifacts/report.md").content


def test_a_running_job_is_cancelled_from_its_page(page, service, long_job):
    job_id = service.http.post("/v1/jobs", json=long_job).json()["id"]
    sign_in(page, service.key)
    page.goto(f"/ui#/jobs/{job_id}")
    cancel = page.locator("#cancel")
    expect(cancel).to_be_visible()
    cancel.click()
    expect(page.locator("#job-status")).to_have_text("cancelled", timeout=120_000)
    expect(cancel).to_be_hidden()
    assert wait_for(service.http, job_id, {"cancelled"}, 10)["status"] == "cancelled"


def test_another_keys_jobs_never_appear(page, service, tiny_job):
    theirs = service.http.post("/v1/jobs", json=tiny_job).json()["id"]
    key = create_key(service.env, "ui-other")
    mine = httpx.post(
        f"{service.url}/v1/jobs", json=tiny_job, headers={"Authorization": f"Bearer {key}"}
    ).json()["id"]
    sign_in(page, key)
    expect(page.locator(f"tr[data-id='{mine}']")).to_be_visible()
    expect(page.locator("#job-rows tr")).to_have_count(1)
    page.goto(f"/ui#/jobs/{theirs}")
    expect(page.locator("#job-error")).to_contain_text("no job")
    expect(page.locator("#job-status")).to_have_text("")
    assert service.http.post(f"/v1/jobs/{mine}/cancel").status_code == 200


def test_two_finished_jobs_are_compared_as_warp_compare_shows_them(page, service, tiny_job):
    jobs = []
    for method in ("warp", "full"):
        spec = copy.deepcopy(tiny_job)
        spec["method"] = method
        spec["hyperparameters"]["max_steps"] = 2
        jobs.append(service.http.post("/v1/jobs", json=spec).json()["id"])
    for job_id in jobs:
        assert wait_for(service.http, job_id, {"succeeded"})["status"] == "succeeded"
    api = service.http.get("/v1/compare", params={"ids": jobs}).json()
    sign_in(page, service.key)
    for job_id in jobs:
        page.locator(f"tr[data-id='{job_id}'] input[type=checkbox]").check()
    page.click("#compare")
    rows = page.locator("#comparison-table tr")
    expect(rows).to_have_count(3)
    header = api["markdown"].splitlines()[0]
    expect(rows.first).to_contain_text(header.split(" | ")[1])
    assert [rows.nth(i).locator("td").first.inner_text() for i in (1, 2)] == api["labels"]
    expect(page.locator("#verdicts li")).to_contain_text("of full's utility-loss drop")
    arrows = page.locator("#tradeoff g.arrow")
    expect(arrows).to_have_count(2)
    assert [arrows.nth(i).get_attribute("data-label") for i in (0, 1)] == ["warp", "full"]
    screenshot(page, "compare")


def test_a_spec_is_submitted_from_the_page_with_the_servers_field_errors(page, service, tiny_job):
    sign_in(page, service.key)
    page.click("#nav a[href='#/submit']")
    page.fill("#spec", "{not json")
    page.click("#submit-form button")
    expect(page.locator("#spec-errors li")).to_contain_text("not JSON")
    bad = copy.deepcopy(tiny_job)
    bad["hyperparameters"]["learning_rate"] = -1
    bad["eval"]["attacks"] = ["dan"]
    page.fill("#spec", json.dumps(bad, indent=2))
    page.click("#submit-form button")
    errors = page.locator("#spec-errors li")
    expect(errors).to_have_count(2)
    expect(errors.first).to_contain_text("eval.attacks: ")
    expect(page.locator("#spec-errors")).to_contain_text("hyperparameters.learning_rate: ")
    screenshot(page, "submit")
    page.fill("#spec", json.dumps(tiny_job))
    page.click("#submit-form button")
    expect(page.locator("#job")).to_be_visible()
    job_id = page.locator("#job-id").inner_text()
    assert (
        service.http.get(f"/v1/jobs/{job_id}").json()["spec"]["base_model"]
        == tiny_job["base_model"]
    )
    service.http.post(f"/v1/jobs/{job_id}/cancel")
