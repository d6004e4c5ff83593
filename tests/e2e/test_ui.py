"""A data scientist's day in the web UI, in a real browser against the real running platform.

Sign in, register a dataset and snapshot it, train two runs and watch them succeed, compare them,
alias a model version, deploy it, add a challenger at 10% (90/10), watch the live charts update as
events are scored, roll back; then a viewer is refused an edit. Every page is screenshotted to
test-artifacts/screenshots/ for reviewers.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Producer
from playwright.sync_api import Browser, Page, expect

from carrara.streams.client_config import producer_config
from carrara.streams.topics import TopicAdmin
from tests.e2e.conftest import UiStack

FEATURES = [f"f{i}" for i in range(4)]
README_SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
PHONE = {"width": 390, "height": 844}
TRAINING_EVENTS = 2000
RUN_TIMEOUT_MS = 150_000
LIVE_TIMEOUT_MS = 90_000


def events(n: int, seed: int, key_prefix: str) -> list[dict[str, Any]]:
    """Card-like events whose label depends on two features and the merchant (learnable)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURES)))
    merchants = rng.choice(["grocery", "travel", "online"], size=n)
    logit = 2.0 * x[:, 0] - 1.5 * x[:, 1] + np.where(merchants == "online", 1.0, -0.5)
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return [
        {
            "card_id": f"{key_prefix}-{i}",
            **{name: round(float(x[i, j]), 5) for j, name in enumerate(FEATURES)},
            "merchant": str(merchants[i]),
            "fraud": int(label[i]),
        }
        for i in range(n)
    ]


def produce(stack: UiStack, topic: str, records: list[dict[str, Any]]) -> None:
    """What the producers of the platform's users do: JSON events keyed by the card."""
    producer = Producer(producer_config(stack.settings.kafka_bootstrap))
    for record in records:
        producer.produce(topic, key=record["card_id"], value=orjson.dumps(record))
        producer.poll(0)
    assert producer.flush(30) == 0


def nav(page: Page, name: str) -> None:
    """Follow a link of the main navigation bar."""
    page.get_by_role("navigation", name="Main").get_by_role("link", name=name).click()


def shot(page: Page, folder: Path, name: str, readme: str | None = None) -> None:
    """A full-page screenshot for reviewers; `readme`: also the README's docs/screenshots one."""
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)
    if readme is not None:
        page.screenshot(path=str(README_SHOTS / f"{readme}.png"), full_page=True)


def watch(page: Page) -> list[str]:
    """Console errors and 404s of every page `page` shows, as they happen (asserted empty)."""
    problems: list[str] = []

    def on_console(message: Any) -> None:
        # A form answered 422 (validation errors on the page) is logged as a failed load.
        if message.type == "error" and "status of 422" not in message.text:
            problems.append(f"console error on {page.url}: {message.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(f"script error on {page.url}: {error}"))
    page.on(
        "response",
        lambda response: (
            response.status == 404 and problems.append(f"404 for {response.url} (on {page.url})")
        ),
    )
    return problems


NAV_ITEMS = ("Overview", "Datasets", "Runs", "Models", "Deployments")
# The page is as wide as the window (no horizontal scroll), and every item of the top bar is
# visible inside the dark header (not wrapped out of it as light text on a light background).
FITS = """() => {
  const header = document.querySelector("header.topbar").getBoundingClientRect();
  const items = [...document.querySelectorAll(".mainnav a, .whoami .who, .whoami button")];
  const outside = items.filter((el) => {
    const r = el.getBoundingClientRect();
    return r.width === 0 || r.top < header.top || r.bottom > header.bottom + 0.5
      || r.left < 0 || r.right > window.innerWidth;
  }).map((el) => el.textContent.trim());
  // What sticks out, to say so when it does: the outermost elements past the right edge that
  // no scrolling box clips.
  const past = (el) => el.getBoundingClientRect().right > window.innerWidth + 0.5;
  const clipped = (el) => {
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      if (getComputedStyle(a).overflowX !== "visible") return true;
    }
    return false;
  };
  const wide = [...document.querySelectorAll("body *")]
    .filter((el) => past(el) && !clipped(el) && !(el.parentElement && past(el.parentElement)
      && !clipped(el.parentElement) && el.parentElement !== document.body))
    .slice(0, 5)
    .map((el) => `${el.tagName.toLowerCase()}.${el.className}#${el.id} `
      + `${Math.round(el.getBoundingClientRect().right)}`);
  return {scroll: document.documentElement.scrollWidth, width: window.innerWidth, outside, wide};
}"""


def fits_a_phone(page: Page, url: str) -> None:
    page.goto(url)
    page.wait_for_load_state("networkidle")
    layout = page.evaluate(FITS)
    assert layout["scroll"] <= layout["width"], (url, layout)
    assert layout["outside"] == [], (url, layout)
    nav_links = page.get_by_role("navigation", name="Main").get_by_role("link")
    assert nav_links.all_inner_texts() == list(NAV_ITEMS), url


def sign_in(page: Page, stack: UiStack, token: str) -> None:
    page.goto(f"{stack.ui}/")
    expect(page).to_have_url(re.compile(r"/ui/sign-in\?next="))
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator(".flash-success")).to_contain_text("Signed in as")


def choose_algorithm(page: Page, algorithm: str) -> None:
    """Pick an algorithm and wait until HTMX has swapped in the inputs of its params."""
    page.evaluate(
        "document.querySelectorAll('#algorithm-section input').forEach(i => i.dataset.stale = 1)"
    )
    page.get_by_label("Algorithm").select_option(algorithm)
    page.wait_for_selector("#algorithm-section input[name='param.C']:not([data-stale])")


def wait_for_run(page: Page) -> None:
    """Watch the run page (HTMX polls the progress) until the run succeeded."""
    expect(page.locator("#run-progress .status-line .badge")).to_have_text(
        "succeeded", timeout=RUN_TIMEOUT_MS
    )
    expect(page.locator("#metrics-title")).to_be_visible()


def start_run(page: Page, stack: UiStack, dataset: str, model: str, c: str) -> int:
    page.goto(f"{stack.ui}/runs/new?dataset_version={dataset}@1")
    choose_algorithm(page, "logistic_regression")
    page.locator("input[name='param.C']").fill(c)
    page.get_by_label("Register as model").fill(model)
    page.get_by_role("button", name="Start run").click()
    expect(page.locator(".flash-success")).to_contain_text("queued")
    return int(re.search(r"/ui/runs/(\d+)", page.url)[1])


def test_a_data_scientist_trains_deploys_watches_and_rolls_back(
    page: Page, browser: Browser, ui_stack: UiStack, screenshots: Path
) -> None:
    stack = ui_stack
    suffix = uuid.uuid4().hex[:6]
    dataset, model, deployment = f"cards-{suffix}", f"fraud-{suffix}", f"scoring-{suffix}"
    topic = f"e2e-cards-{suffix}"
    output, outcomes = f"{topic}.predictions", f"{topic}.outcomes"
    admin = TopicAdmin(stack.settings.kafka_bootstrap)
    problems = watch(page)
    try:
        # Sign in with an editor token.
        page.goto(f"{stack.ui}/")
        shot(page, screenshots, "01-sign-in")
        sign_in(page, stack, stack.editor_token)
        shot(page, screenshots, "02-overview-empty")

        # Register a dataset (its topic created by the form), produce events, snapshot it.
        nav(page, "Datasets")
        page.get_by_role("link", name="New dataset").first.click()
        page.get_by_label("Name", exact=True).fill(dataset)
        page.get_by_label("Kafka topic").fill(topic)
        page.get_by_label("Create the topic (it must not exist yet) with").check()
        page.get_by_label("partitions").fill("3")
        page.get_by_label("Key field").fill("card_id")
        page.get_by_label("Label field").fill("fraud")
        page.get_by_label("Task").select_option("binary")
        lines = [f"{name}: float" for name in FEATURES] + ["merchant: category"]
        page.get_by_label("Features").fill("\n".join(lines))
        page.get_by_label("Owner").fill("risk-team")
        shot(page, screenshots, "03-dataset-new")
        page.get_by_role("button", name="Register dataset").click()
        expect(page.locator(".flash-success")).to_contain_text(f"topic {topic} created")

        produce(stack, topic, events(TRAINING_EVENTS, seed=1, key_prefix="train"))
        page.get_by_role("button", name="Refresh").click()
        expect(page.locator("#sample")).to_contain_text("all match the schema", timeout=20_000)
        page.get_by_role("button", name="Take snapshot").click()
        expect(page.locator(".flash-success")).to_contain_text(
            f"Snapshot v1 pinned: {TRAINING_EVENTS:,} events over 3 partition(s)."
        )
        expect(page.locator("#sample")).to_contain_text("all match the schema", timeout=20_000)
        shot(page, screenshots, "04-dataset-detail")

        # Start a run from the algorithm picker and watch it succeed; then a second one.
        page.get_by_role("link", name="Train on v1").click()
        choose_algorithm(page, "logistic_regression")
        page.locator("input[name='param.C']").fill("0")
        page.get_by_label("Register as model").fill(model)
        page.get_by_role("button", name="Start run").click()
        # Validated as the API validates it: C must be > 0.
        expect(page.locator("#param\\.C-error")).to_contain_text("greater than 0")
        shot(page, screenshots, "05-run-new-invalid")
        page.locator("input[name='param.C']").fill("1")
        page.get_by_role("button", name="Start run").click()
        expect(page.locator(".flash-success")).to_contain_text("queued")
        first_run = int(re.search(r"/ui/runs/(\d+)", page.url)[1])
        shot(page, screenshots, "06-run-queued")
        wait_for_run(page)
        expect(page.locator(".plots img").first).to_be_visible(timeout=30_000)
        page.wait_for_function(
            "Array.from(document.querySelectorAll('.plots img')).every(i => i.complete)"
        )
        # The baseline is named, with how it was computed.
        expect(page.locator("#baseline-description")).to_contain_text("majority-class baseline")
        expect(page.locator("#baseline-description")).to_contain_text("holdout positive rate")
        expect(page.locator("#metrics-title ~ div table thead")).to_contain_text(
            "Model vs. baseline"
        )
        shot(page, screenshots, "07-run-succeeded", readme="run")

        second_run = start_run(page, stack, dataset, model, "0.05")
        wait_for_run(page)

        nav(page, "Runs")
        compare = page.get_by_role("button", name=re.compile(r"^Compare selected"))
        expect(compare).to_be_disabled()
        page.get_by_label(f"compare run {first_run}").check()
        expect(compare).to_be_disabled()  # one run: nothing to compare
        page.get_by_label(f"compare run {second_run}").check()
        expect(compare).to_be_enabled()
        shot(page, screenshots, "08-runs-list")
        page.get_by_role("button", name=re.compile(r"^Compare selected")).click()
        expect(page.locator("h1")).to_have_text("Compare 2 runs")
        expect(page.locator("tr.differs").first).to_contain_text("C")
        shot(page, screenshots, "09-runs-compare")

        # The model: two versions with lineage; alias v1 as champion.
        page.goto(f"{stack.ui}/models/{model}")
        expect(page.locator("li.version")).to_have_count(2)
        expect(page.locator("#v1 .lineage")).to_contain_text(f"{dataset} v1")
        page.get_by_label("Alias", exact=True).fill("champion")
        page.get_by_label("Version", exact=True).select_option("1")
        page.get_by_role("button", name="Set alias").click()
        expect(page.locator(".flash-success")).to_contain_text(f"champion → {model} v1")
        shot(page, screenshots, "10-model")

        # Deploy the champion (by alias), then add a challenger at 10%: 90/10.
        admin.create_topic(outcomes, 3)  # the output topic is created by the form
        nav(page, "Deployments")
        page.get_by_role("link", name="New deployment").first.click()
        page.get_by_label("Name", exact=True).fill(deployment)
        page.get_by_label("Input topic").fill(topic)
        page.get_by_label("Output topic", exact=True).fill(output)
        page.get_by_label("Create it (it must not exist yet) with").check()
        page.get_by_label("Output topic partitions").fill("3")
        page.get_by_label("Key field").fill("card_id")
        page.get_by_label("Variant 1 name").fill("champion")
        page.get_by_label("Variant 1 model").fill(model)
        page.get_by_label("Variant 1 version or alias").fill("champion")
        page.get_by_label("Variant 1 weight in percent").fill("100")
        page.get_by_label("Outcomes topic").fill(outcomes)
        page.get_by_label("Outcome field").fill("fraud")
        page.get_by_label("Scorer pool").fill(stack.pool)
        page.get_by_label("Reason for this change").fill("first deployment")
        page.get_by_role("button", name="Review change").click()
        expect(page.locator("h1")).to_have_text(f"Create deployment {deployment}")
        expect(page.locator("#create-topic-note")).to_contain_text(output)
        expect(page.locator("#pool-warning")).to_have_count(0)  # the pool has a scorer
        page.get_by_role("button", name="Confirm and apply").click()
        expect(page.locator(".flash-success")).to_contain_text("Revision 1 stored")
        expect(page.locator(".flash-success")).to_contain_text(
            f"Topic {output} created with 3 partitions."
        )
        assert len(admin.partitions(output)) == 3

        page.get_by_role("link", name="Add a challenger at 10%").click()
        expect(page.get_by_label("Variant 2 name")).to_have_value("challenger")
        expect(page.get_by_label("Variant 2 version or alias")).to_have_value("2")
        expect(page.get_by_label("Variant 1 weight in percent")).to_have_value("90")
        shot(page, screenshots, "11-deployment-edit")
        page.get_by_role("button", name="Review change").click()
        expect(page.locator("table.diff tr.diff-added")).to_contain_text("challenger")
        expect(page.locator("table.diff tr.diff-changed")).to_contain_text("90%")
        shot(page, screenshots, "12-deployment-confirm-diff", readme="deployment-diff")
        page.get_by_role("button", name="Confirm and apply").click()
        expect(page.locator(".flash-success")).to_contain_text("Revision 2 stored")
        expect(page.locator("#rollout")).to_contain_text(
            "1/1 scorers on revision 2", timeout=LIVE_TIMEOUT_MS
        )

        # Events are scored; the live panel (HTMX, every 5 s) redraws the charts.
        live = events(1500, seed=7, key_prefix=f"live-{suffix}")
        produce(stack, topic, live[:1000])
        total = page.locator("#live [data-total-predictions]")
        expect(total).not_to_have_attribute("data-total-predictions", "0", timeout=LIVE_TIMEOUT_MS)
        first_total = int(total.get_attribute("data-total-predictions") or 0)
        first_updates = int(page.locator("#charts").get_attribute("data-updates") or 0)
        outcome_records = [{"card_id": e["card_id"], "fraud": e["fraud"]} for e in live]
        producing = threading.Thread(
            target=lambda: (
                produce(stack, topic, live[1000:]),
                time.sleep(2),
                produce(stack, outcomes, outcome_records),
            )
        )
        producing.start()
        # The numbers grow, and the charts are redrawn with them (app.js counts redraws).
        page.wait_for_function(
            f"Number(document.querySelector('#live [data-total-predictions]')"
            f"?.dataset.totalPredictions) > {first_total}"
            f" && Number(document.getElementById('charts').dataset.updates) > {first_updates}",
            timeout=LIVE_TIMEOUT_MS,
        )
        producing.join(60)
        plotted = page.evaluate(
            "window.carrara.charts.throughput.data.datasets"
            ".map(d => d.data.reduce((a, b) => a + (b || 0), 0))"
        )
        assert sum(plotted) > first_total
        assert len(plotted) == 2  # champion and challenger
        expect(page.locator("#live")).to_contain_text("outcomes joined", timeout=LIVE_TIMEOUT_MS)
        # Everything at once for the screenshot: charts, accuracy, verdict and drift.
        page.reload()
        expect(page.locator("#verdict")).to_contain_text("challenger vs. champion")
        # The verdict in a sentence, every number labelled by its variant.
        sentence = page.locator("#verdict .verdict-sentence").first
        expect(sentence).to_contain_text(
            re.compile(
                r"challenger's [a-z ]+ is [0-9.e-]+ (lower|higher) \((better|worse)\) than "
                r"champion's(, [0-9.]+% confidence| so far, not significant yet)"
                r".*n = [0-9,]+ outcomes"
            ),
            timeout=LIVE_TIMEOUT_MS,
        )
        numbers = page.locator("#verdict .verdict-numbers").first
        expect(numbers.locator("thead")).to_contain_text("challenger")
        expect(numbers.locator("thead")).to_contain_text("champion")
        expect(page.locator("#verdict")).to_contain_text("Difference (challenger \u2212 champion)")
        expect(page.locator("#verdict")).to_contain_text("confidence = 1 \u2212 p")
        expect(page.locator("#drift")).to_contain_text("stable")
        page.wait_for_function("Number(document.getElementById('charts').dataset.updates) > 0")
        # The champion keeps the first colour with a challenger added.
        colours = page.evaluate(
            "Object.fromEntries(window.carrara.charts.throughput.data.datasets"
            ".map(d => [d.label, d.borderColor]))"
        )
        assert colours["champion"] == "#2f5bd3", colours
        shot(page, screenshots, "13-deployment-live", readme="deployment-live")

        # Roll back to revision 1, confirmed on its diff.
        page.get_by_role("button", name="Roll back to revision 1").click()
        expect(page.locator("h1")).to_have_text(f"Roll {deployment} back to revision 1")
        expect(page.locator("table.diff tr.diff-removed")).to_contain_text("challenger")
        page.get_by_label("Reason").fill("challenger looks off")
        shot(page, screenshots, "14-rollback-confirm")
        page.get_by_role("button", name="Roll back to r1").click()
        expect(page.locator(".flash-success")).to_contain_text(
            "Rolled back: revision 3 restores revision 1."
        )
        expect(page.locator("#revisions tr.current")).to_contain_text(
            "rollback to revision 1: challenger looks off"
        )
        current = stack.call("GET", f"/deployments/{deployment}").json()
        assert current["revision"] == 3
        assert [(v["name"], v["weight"]) for v in current["spec"]["variants"]] == [
            ("champion", 100)
        ]
        shot(page, screenshots, "15-deployment-rolled-back")

        # Stop it (confirmed in a dialog), see the topics it used, start it again.
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Stop", exact=True).click()
        expect(page.locator(".flash-success")).to_contain_text("Stopped: revision 4")
        expect(page.locator("#stopped-summary")).to_contain_text(f"{topic} → {output}")
        nav(page, "Overview")
        expect(page.locator("#overview-stopped")).to_contain_text(deployment)
        page.goto(f"{stack.ui}/deployments?status=stopped")
        expect(page.locator("table.data")).to_contain_text(f"{topic} → {output}")
        page.get_by_role("link", name=deployment).click()
        page.get_by_role("button", name=re.compile(r"^Start again")).click()
        expect(page.locator(".flash-success")).to_contain_text("Started: revision 5")
        expect(page.locator("h1 .badge")).to_have_text("running")
        expect(page.locator("#rollout")).to_contain_text(
            "1/1 scorers on revision 5", timeout=LIVE_TIMEOUT_MS
        )

        page.goto(f"{stack.ui}/models/{model}")
        expect(page.locator("#v1-deployments")).to_contain_text(deployment)  # lineage
        nav(page, "Overview")
        expect(page.locator("#overview-live")).to_contain_text(deployment)
        shot(page, screenshots, "16-overview", readme="overview")
        page.goto(f"{stack.ui}/datasets")
        shot(page, screenshots, "17-datasets")
        page.goto(f"{stack.ui}/models")
        shot(page, screenshots, "18-models")
        page.goto(f"{stack.ui}/deployments")
        shot(page, screenshots, "19-deployments")

        # A viewer sees no edit controls, and the server refuses an edit anyway.
        viewer = browser.new_context(viewport={"width": 1280, "height": 900})
        try:
            reader = viewer.new_page()
            sign_in(reader, stack, stack.viewer_token)
            reader.goto(f"{stack.ui}/deployments/{deployment}")
            expect(reader.locator("#live-title")).to_be_visible()
            expect(reader.get_by_role("link", name="Add a challenger at 10%")).to_have_count(0)
            expect(reader.get_by_role("button", name=re.compile("Roll back"))).to_have_count(0)
            csrf = reader.locator("input[name=csrf_token]").first.get_attribute("value")
            refused = reader.request.post(
                f"{stack.ui}/deployments/{deployment}/rollback",
                form={"csrf_token": csrf or "", "rollback_to": "2", "expected_revision": "5"},
            )
            assert refused.status == 403
            assert "This needs the editor role" in refused.text()
            reader.goto(f"{stack.ui}/deployments/{deployment}/edit")
            expect(reader.locator("h1")).to_have_text("Not allowed")
            shot(reader, screenshots, "20-viewer-refused")
            assert stack.call("GET", f"/deployments/{deployment}").json()["revision"] == 5
        finally:
            viewer.close()

        # At phone width every page fits (no horizontal scroll), with every menu item visible.
        phone = browser.new_context(viewport=PHONE)
        try:
            mobile = phone.new_page()
            problems += watch(mobile)
            sign_in(mobile, stack, stack.editor_token)
            for path in (
                "/",
                "/datasets",
                f"/datasets/{dataset}",
                "/datasets/_new",
                "/runs",
                f"/runs/{first_run}",
                f"/runs/new?dataset_version={dataset}@1",
                f"/runs/compare?ids={first_run}&ids={second_run}",
                "/models",
                f"/models/{model}",
                "/deployments",
                f"/deployments/{deployment}",
                f"/deployments/{deployment}/edit",
                "/deployments/_new",
            ):
                fits_a_phone(mobile, f"{stack.ui}{path}")
            mobile.goto(f"{stack.ui}/deployments/{deployment}")
            expect(mobile.locator("#live [data-total-predictions]")).to_be_attached()
            mobile.wait_for_function(
                "Number(document.getElementById('charts').dataset.updates) > 0"
            )
            # The charts take the phone's full width (one column).
            widths = mobile.evaluate(
                "[...document.querySelectorAll('.chart-card')].map(c => c.offsetWidth)"
            )
            assert min(widths) > 0.8 * mobile.evaluate(
                "document.querySelector('.charts').offsetWidth"
            )
            shot(mobile, screenshots, "21-phone-deployment", readme="phone-deployment")

            # The REST API's docs render with every request off the platform refused.
            offline = phone.new_page()
            problems += watch(offline)
            offline.route(
                "**/*",
                lambda route: (
                    route.continue_()
                    if route.request.url.startswith(stack.api.url)
                    else route.abort()
                ),
            )
            offline.goto(f"{stack.api.url}/docs")
            expect(offline.locator(".swagger-ui .info .title")).to_contain_text("Carrara")
            expect(offline.locator(".opblock").first).to_be_visible()
            offline.goto(f"{stack.api.url}/redoc")
            expect(offline.get_by_role("heading", name=re.compile("Carrara")).first).to_be_visible(
                timeout=30_000
            )
        finally:
            phone.close()
        assert problems == [], problems
    finally:
        names = (topic, output, outcomes, f"{topic}.dead-letters")
        topics = [t for t in names if admin.partitions(t)]
        if topics:
            admin.delete_topics(topics)


def test_forms_say_what_is_wrong_on_the_right_field_all_at_once(
    page: Page, ui_stack: UiStack
) -> None:
    """Validation in words: no patterns, no zero-based indexes, over-long text refused, not cut."""
    stack = ui_stack
    problems = watch(page)
    sign_in(page, stack, stack.editor_token)

    # An empty dataset form flags every required field at once.
    page.goto(f"{stack.ui}/datasets/_new")
    page.get_by_role("button", name="Register dataset").click()
    for field in ("name", "topic", "key_field"):
        expect(page.locator(f"#{field}-error")).to_have_text("required")
    expect(page.locator("#features-error")).to_contain_text("declare at least one feature")
    # 300 characters are refused (not cut to 100); control characters too.
    page.get_by_label("Name", exact=True).fill("a" * 300)
    page.get_by_label("Kafka topic").fill(f"e2e-missing-{uuid.uuid4().hex[:6]}")
    page.get_by_label("Key field").fill("card\u0007id")
    page.get_by_label("Label field").fill("fraud")
    page.get_by_label("Features").fill("f0: float")
    page.get_by_role("button", name="Register dataset").click()
    expect(page.locator("#name-error")).to_have_text(
        "too long: at most 100 characters (this has 300)"
    )
    expect(page.locator("#key_field-error")).to_contain_text("must not contain control characters")
    # A topic that does not exist: said in the form's words (its checkbox), on the topic.
    page.get_by_label("Name", exact=True).fill(f"e2e-valid-{uuid.uuid4().hex[:6]}")
    page.get_by_label("Key field").fill("card_id")
    page.get_by_role("button", name="Register dataset").click()
    expect(page.locator("#topic-error")).to_contain_text("no such Kafka topic")
    expect(page.locator(".flash-error")).to_contain_text("tick “Create the topic”")
    expect(page.locator("main")).not_to_contain_text("create_topic")
    # Reloading the address the form was posted to shows the form again, not a 404.
    page.reload()
    expect(page.locator("h1")).to_have_text("New dataset")

    # The deployment form: every invalid field at once, variants numbered as the form does.
    page.goto(f"{stack.ui}/deployments/_new")
    page.get_by_label("Variant 1 model").fill("no-such-model")
    page.get_by_label("Variant 1 version or alias").fill("Champion!")
    page.get_by_role("button", name="Review change").click()
    for field in ("name", "input_topic", "output_topic", "key_field"):
        expect(page.locator(f"#{field}-error")).to_have_text("required")
    expect(page.locator("#variants-0-version-error")).to_contain_text(
        "Variant 1 version or alias: use lowercase letters"
    )
    expect(page.locator("#variants-0-model-error")).to_contain_text(
        "Variant 1 model: no registered model is named 'no-such-model'"
    )
    text = page.locator("main").inner_text()
    assert "pattern" not in text
    assert "0.weight" not in text
    assert "variants.0" not in text
    assert problems == [], problems


def test_a_data_scientist_writes_features_in_sql_and_previews_them(
    page: Page, browser: Browser, ui_stack: UiStack, screenshots: Path
) -> None:
    """The feature-set page: the parser's error at its line and column (the cursor put there),
    a revision saved, the preview's table, an older revision viewed; and it fits a phone."""
    stack = ui_stack
    suffix = uuid.uuid4().hex[:6]
    topic, dataset = f"e2e-feats-{suffix}", f"e2e-feats-{suffix}"
    TopicAdmin(stack.settings.kafka_bootstrap).create_topic(topic, 2)
    try:
        base_ms = 1_714_564_800_000
        records = [
            {**e, "ts": base_ms + 60_000 * (i // 4), "fraud": e["fraud"]}
            for i, e in enumerate(events(40, seed=5, key_prefix="feat"))
        ]
        for i, record in enumerate(records):
            record["card_id"] = f"feat-{i % 4}"  # four cards, ten payments each
        produce(stack, topic, records)
        created = stack.call(
            "POST",
            "/datasets",
            json={
                "name": dataset,
                "topic": topic,
                "key_field": "card_id",
                "event_time_field": "ts",
                "label_field": "fraud",
                "task": "binary",
                "features": [{"name": f, "type": "float"} for f in FEATURES]
                + [{"name": "merchant", "type": "category"}],
            },
        )
        assert created.status_code == 201, created.text
        problems = watch(page)
        sign_in(page, stack, stack.editor_token)
        page.goto(f"{stack.ui}/datasets/{dataset}")
        page.get_by_role("link", name="Feature set", exact=True).click()
        expect(page.locator("h1")).to_have_text("Feature set")
        expect(page.locator(".empty-title")).to_have_text("No feature set yet")

        editor = page.get_by_label("SQL", exact=True)
        wrong = (
            "SELECT f0 * 2 AS double_f0,\n"
            "       COUNT(*) OVER (PARTITION BY merchant ORDER BY ts\n"
            "                      RANGE INTERVAL '5' MINUTE PRECEDING) AS n_5m\n"
            f'FROM "{dataset}"'
        )
        editor.fill(wrong)
        page.get_by_role("button", name="Save as a new revision").click()
        expect(page.locator("#sql-error")).to_contain_text(
            "line 2, column 36: COUNT OVER must be PARTITION BY card_id"
        )
        expect(page.locator("pre.sql-error")).to_contain_text("^")
        # The cursor is where the parser points: line 2, column 36 ("merchant").
        cursor = page.evaluate("document.getElementById('sql').selectionStart")
        assert wrong[cursor : cursor + len("merchant")] == "merchant"
        shot(page, screenshots, "30-feature-set-error")

        editor.fill(wrong.replace("PARTITION BY merchant", "PARTITION BY card_id"))
        page.get_by_label("Reason for this change").fill("five-minute velocity")
        page.get_by_role("button", name="Save as a new revision").click()
        expect(page.locator(".flash-success")).to_contain_text("Revision 1 saved: 2 feature(s)")
        page.get_by_label("Preview on the newest").fill("12")
        page.get_by_role("button", name="Preview").click()
        table = page.locator("table.preview-table")
        expect(table.locator("tbody tr")).to_have_count(12)
        expect(table.locator("thead")).to_contain_text("n_5m")
        counts = table.locator("tbody tr td:nth-child(6)").all_inner_texts()
        assert all(c.isdigit() and int(c) >= 1 for c in counts), counts
        shot(page, screenshots, "31-feature-set-preview", readme="feature-set")

        editor.fill(
            wrong.replace("PARTITION BY merchant", "PARTITION BY card_id").replace("'5'", "'10'")
        )
        page.get_by_role("button", name="Save as a new revision").click()
        expect(page.locator(".flash-success")).to_contain_text("Revision 2 saved")
        page.get_by_role("link", name="View revision 1", exact=True).click()
        expect(page.locator("#revision-title")).to_contain_text("Revision 1")
        expect(page.locator("pre.sql-source")).to_contain_text("INTERVAL '5' MINUTE")
        expect(page.locator("main")).to_contain_text("This is an older revision")

        phone = browser.new_context(viewport=PHONE)
        try:
            mobile = phone.new_page()
            problems += watch(mobile)
            sign_in(mobile, stack, stack.viewer_token)
            fits_a_phone(mobile, f"{stack.ui}/datasets/{dataset}/features")
            mobile.get_by_role("button", name="Preview").click()
            expect(mobile.locator("table.preview-table tbody tr")).to_have_count(20)
            layout = mobile.evaluate(FITS)
            assert layout["scroll"] <= layout["width"], layout
            shot(mobile, screenshots, "32-phone-feature-set")
        finally:
            phone.close()
        assert problems == [], problems
    finally:
        TopicAdmin(stack.settings.kafka_bootstrap).delete_topics([topic])
