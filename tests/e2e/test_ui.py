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


def shot(page: Page, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


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
        shot(page, screenshots, "07-run-succeeded")

        second_run = start_run(page, stack, dataset, model, "0.05")
        wait_for_run(page)

        nav(page, "Runs")
        page.get_by_label(f"compare run {first_run}").check()
        page.get_by_label(f"compare run {second_run}").check()
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
        admin.create_topic(output, 3)
        admin.create_topic(outcomes, 3)
        nav(page, "Deployments")
        page.get_by_role("link", name="New deployment").first.click()
        page.get_by_label("Name", exact=True).fill(deployment)
        page.get_by_label("Input topic").fill(topic)
        page.get_by_label("Output topic").fill(output)
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
        page.get_by_role("button", name="Confirm and apply").click()
        expect(page.locator(".flash-success")).to_contain_text("Revision 1 stored")

        page.get_by_role("link", name="Add a challenger at 10%").click()
        expect(page.get_by_label("Variant 2 name")).to_have_value("challenger")
        expect(page.get_by_label("Variant 2 version or alias")).to_have_value("2")
        expect(page.get_by_label("Variant 1 weight in percent")).to_have_value("90")
        shot(page, screenshots, "11-deployment-edit")
        page.get_by_role("button", name="Review change").click()
        expect(page.locator("table.diff tr.diff-added")).to_contain_text("challenger")
        expect(page.locator("table.diff tr.diff-changed")).to_contain_text("90%")
        shot(page, screenshots, "12-deployment-confirm-diff")
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
        expect(page.locator("#drift")).to_contain_text("stable")
        page.wait_for_function("Number(document.getElementById('charts').dataset.updates) > 0")
        shot(page, screenshots, "13-deployment-live")

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

        nav(page, "Overview")
        expect(page.locator("#overview-live")).to_contain_text(deployment)
        shot(page, screenshots, "16-overview")
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
                form={"csrf_token": csrf or "", "rollback_to": "2", "expected_revision": "3"},
            )
            assert refused.status == 403
            assert "This needs the editor role" in refused.text()
            reader.goto(f"{stack.ui}/deployments/{deployment}/edit")
            expect(reader.locator("h1")).to_have_text("Not allowed")
            shot(reader, screenshots, "20-viewer-refused")
            assert stack.call("GET", f"/deployments/{deployment}").json()["revision"] == 3
        finally:
            viewer.close()
    finally:
        names = (topic, output, outcomes, f"{topic}.dead-letters")
        topics = [t for t in names if admin.partitions(t)]
        if topics:
            admin.delete_topics(topics)
