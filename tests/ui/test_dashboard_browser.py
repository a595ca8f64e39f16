"""`tunesmith ui` as a person uses it: Debian's Chromium, driven by Playwright, against a live dashboard.

Fill the new-run form, meet a validation error beside its field, fix it, preview the data, start a run, watch its
loss curve gain points, see it finish and open its report, chat with the tuned model and its base, score both with
`tunesmith compare` launched from the page (as a chain, with held-out text) and open its report; then stop a run
from its page and resume it. The delay from a metrics line being written to its point on the chart is measured
here (set TUNESMITH_UI_SHOTS=DIR to keep the screenshots).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tests.helpers import chat_rows
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.serve import find_free_port
from tunesmith.ui.jobs import read_jobs

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """A live `tunesmith ui` (its own process, as a user starts it) over an empty runs folder."""
    tmp = tmp_path_factory.mktemp("ui")
    runs = tmp / "runs"
    data = write_jsonl(tmp / "train.jsonl", chat_rows(32))
    port = find_free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(tmp / "ui.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "ui", "--runs", str(runs), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url + "api/runs", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("tunesmith ui did not start:\n" + (tmp / "ui.log").read_text()[-3000:])
            time.sleep(0.3)
    shots = Path(os.environ.get("TUNESMITH_UI_SHOTS") or tmp / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    yield {"url": url, "runs": runs, "data": data, "model": tiny_model_dir, "shots": shots, "env": env}
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    for job in read_jobs(runs):  # the trains this test started, should one outlive a failed assertion
        if job.alive and job.pid:
            os.kill(job.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def page(dashboard):
    """A Chromium page (Debian's browser, no download), offline but for the dashboard."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        # the page may reach the dashboard and nothing else: no CDN, no font or script from the network
        outside: list[str] = []

        def guard(route):
            if route.request.url.startswith(dashboard["url"]):
                return route.continue_()
            outside.append(route.request.url)
            return route.abort()

        context.route("**/*", guard)
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        yield pg
        browser.close()
        assert not outside, f"the page fetched from outside the dashboard: {outside}"
        assert not errors, f"script errors on the page: {errors}"


def _fill(page, key: str, value: str) -> None:
    field = page.locator(f'.field[data-key="{key}"]')
    if not field.is_visible():  # its section is folded: open it, as a person would
        page.click(f'details.section:has(.field[data-key="{key}"]) > summary')
    page.fill(f'.field[data-key="{key}"] input', value)


def _points(page) -> int:
    return int(page.get_attribute('[data-chart="loss"]', "data-points") or 0)


def _cli_message(override: str) -> str:
    try:
        load_config({"data": {"train": "x.jsonl"}}, [override])
    except TunesmithError as exc:
        return exc.problems[0]
    raise AssertionError(f"{override} was accepted")


def test_form_to_finished_run_report_and_chat(dashboard, page) -> None:
    page.goto(dashboard["url"] + "#/new")
    page.wait_for_selector('.field[data-key="train.max_steps"] input')
    page.select_option('.field[data-key="method"] select', "sft")
    _fill(page, "model", str(dashboard["model"]))
    _fill(page, "data.train", str(dashboard["data"]))
    _fill(page, "train.max_steps", "many")
    message = page.locator('.field[data-key="train.max_steps"] .msg')
    message.filter(has_text="expected").wait_for(timeout=15_000)
    assert message.inner_text() == _cli_message("train.max_steps=many")  # the command line's own words
    assert "problem" in page.inner_text("#problems")
    page.screenshot(path=str(dashboard["shots"] / "form-error.png"), full_page=True)

    settings = {"train.max_steps": "150", "train.batch_size": "4", "train.max_length": "128", "train.lr": "0.005",
                "train.warmup_ratio": "0", "train.eval_every": "0", "train.save_every": "0", "train.log_every": "1",
                "data.test": str(dashboard["data"]), "eval.max_rows": "4", "eval.max_new_tokens": "8",
                "log.report_to": "[]"}
    for key, value in settings.items():
        _fill(page, key, value)
    page.wait_for_function("document.querySelector('#check-state').textContent === 'ready to start'", timeout=20_000)
    assert page.locator(".field.bad").count() == 0
    assert "train.max_steps=150" in page.inner_text("#cli")
    assert "max_steps: 150" in page.inner_text("#yaml")
    assert not page.is_visible('.field[data-key="dpo.beta"]')  # sft reads no dpo settings

    page.click("#inspect")
    page.wait_for_selector("#preview-text mark", timeout=30_000)
    preview = page.inner_text("#preview-text")
    assert "format:  prompt_completion" in preview and "tokens:" in preview
    page.screenshot(path=str(dashboard["shots"] / "form.png"), full_page=True)

    page.click("#start")
    page.wait_for_url("**/#/run/*", timeout=30_000)
    name = page.url.rsplit("/", 1)[-1]
    page.wait_for_function("Number(document.querySelector('[data-chart=loss]').dataset.points) >= 3", timeout=60_000)
    first = _points(page)
    page.wait_for_function(f"Number(document.querySelector('[data-chart=loss]').dataset.points) > {first}",
                           timeout=30_000)
    assert _points(page) > first  # the curve grows while the run trains, without a reload
    page.screenshot(path=str(dashboard["shots"] / "run-live.png"), full_page=True)

    page.wait_for_selector("#run-badge .badge.finished", timeout=120_000)
    assert _points(page) == 150
    latencies = page.evaluate("window.tunesmith.latencies")
    assert len(latencies) >= 50, latencies
    ordered = sorted(latencies)
    stats = {"lines": len(ordered), "median_ms": statistics.median(ordered),
             "p95_ms": ordered[int(0.95 * (len(ordered) - 1))], "max_ms": ordered[-1]}
    print("metrics line -> chart point:", json.dumps(stats))
    (dashboard["shots"] / "latency.json").write_text(json.dumps(stats))
    assert stats["p95_ms"] < 1000, stats

    frame = page.wait_for_selector("iframe.report", timeout=30_000).content_frame()
    frame.wait_for_selector("#headline", timeout=15_000)
    assert "base vs tuned" in frame.inner_text("h1")
    page.screenshot(path=str(dashboard["shots"] / "run-finished.png"), full_page=True)

    page.goto(dashboard["url"] + "#/")
    row = page.locator(f'tr.run[data-run="{name}"]')
    row.locator(".badge.finished").wait_for(timeout=15_000)
    assert "150 / 150" in row.inner_text() and "Perplexity" in row.inner_text()
    page.screenshot(path=str(dashboard["shots"] / "runs.png"), full_page=True)

    page.goto(dashboard["url"] + "#/chat")
    page.wait_for_selector(f'#choices input[value="run:{name}"]')
    for box in page.locator("#choices input").all():
        box.uncheck()
    page.check(f'#choices input[value="base:{name}"]')
    page.check(f'#choices input[value="run:{name}"]')
    page.fill("#prompt", "Say apple 2 times")
    page.click("#send")
    page.wait_for_function("document.querySelector('#finish-0')?.textContent.startsWith('finished')"
                           " && document.querySelector('#finish-1')?.textContent.startsWith('finished')",
                           timeout=60_000)
    assert page.inner_text(".answer >> nth=1 >> h3") == name
    assert page.inner_text("#answer-1").strip()  # the tuned model answered, streamed through serve's endpoint

    page.screenshot(path=str(dashboard["shots"] / "chat.png"), full_page=True)

    # the same two models, scored on a data file by `tunesmith compare` launched from the page: as stages in order,
    # and on held-out plain text too; its report opens from the page
    docs = write_jsonl(dashboard["runs"].parent / "docs.jsonl", [{"text": " ".join(r["prompt"].split()[:6])}
                                                                 for r in chat_rows(6)])
    page.fill("#cmp-data", str(dashboard["data"]))
    page.fill("#cmp-limit", "4")
    page.fill("#cmp-text", str(docs))
    page.check("#cmp-chain")
    page.click("#compare")
    link = page.wait_for_selector('#jobs a:has-text("open the report")', timeout=120_000)
    job = page.inner_text("#jobs")
    assert "--chain" in job and f"--text {docs}" in job, job
    page.screenshot(path=str(dashboard["shots"] / "compare-job.png"), full_page=True)
    page.goto(dashboard["url"].rstrip("/") + link.get_attribute("href"))
    page.wait_for_selector("#headline")
    assert "this stage\u2019s gain" in page.inner_text("#scores") and "held-out text perplexity" in page.inner_text("#scores")
    assert "on the perplexity of 6 held-out documents" in page.inner_text(".meta")
    page.screenshot(path=str(dashboard["shots"] / "compare-report.png"), full_page=True)


def test_stop_and_resume_from_the_page(dashboard, page) -> None:
    values = {"model": str(dashboard["model"]), "data.train": str(dashboard["data"]),
              "output_dir": str(dashboard["runs"] / "long"), "train.max_steps": "150", "train.batch_size": "4",
              "train.max_length": "128", "train.save_every": "0", "eval.before": "false", "log.report_to": "[]"}
    started = page.request.post(dashboard["url"] + "api/start", data={"values": values})
    assert started.ok, started.text()
    page.goto(dashboard["url"] + "#/run/long")
    page.wait_for_function("Number(document.querySelector('[data-chart=loss]').dataset.points) >= 5", timeout=60_000)
    page.click("#stop")
    page.wait_for_selector("#run-badge .badge.stopped", timeout=60_000)
    detail = page.inner_text("#run-detail")
    assert "resumable from the checkpoint of step" in detail, detail
    stopped_at = int(detail.split("stopped at step ")[1].split(";")[0])
    assert 5 <= stopped_at < 150
    page.screenshot(path=str(dashboard["shots"] / "run-stopped.png"), full_page=True)

    page.click("#resume")
    page.wait_for_selector("#run-badge .badge.running", timeout=30_000)
    page.wait_for_selector("#run-badge .badge.finished", timeout=120_000)
    steps = [json.loads(line)["step"] for line in (dashboard["runs"] / "long" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 151))  # resumed where it stopped: every step once
    assert "(resumed at" in (read_jobs(dashboard["runs"])[-1].log_tail(10))


def test_an_rl_run_shows_reward_kl_and_its_sampled_completions(dashboard, page) -> None:
    prompts = write_jsonl(dashboard["runs"].parent / "prompts.jsonl",
                          [{"prompt": f"Write about {r['completion'].split()[0]}"} for r in chat_rows(8)])
    values = {"method": "grpo", "model": str(dashboard["model"]), "data.train": str(prompts),
              "output_dir": str(dashboard["runs"] / "rl"), "rl.rewards": "[tests.methods.test_rl_methods:share_of_e]",
              "rl.group_size": "4", "rl.max_new_tokens": "8", "rl.samples_every": "2", "train.max_steps": "6",
              "train.batch_size": "2", "train.max_length": "64", "train.save_every": "0", "eval.before": "false",
              "log.report_to": "[]"}
    started = page.request.post(dashboard["url"] + "api/start", data={"values": values})
    assert started.ok, started.text()
    page.goto(dashboard["url"] + "#/run/rl")
    page.wait_for_selector("#run-badge .badge.finished", timeout=120_000)
    for chart in ("reward", "kl"):  # the RL charts appear with the first line that carries their measures
        page.wait_for_function(f"Number(document.querySelector('[data-chart={chart}]')?.dataset.points) === 6",
                               timeout=30_000)
    samples = page.wait_for_selector("#samples table", timeout=30_000).inner_text()
    logged = [json.loads(x) for x in (dashboard["runs"] / "rl" / "samples.jsonl").read_text().splitlines()]
    last = [s for s in logged if s["step"] == logged[-1]["step"]]
    assert f"Latest sampled completions (step {last[0]['step']})" in page.inner_text("#samples")
    assert "reward" in samples.lower() and last[0]["prompt"].split()[-1] in samples
    page.screenshot(path=str(dashboard["shots"] / "run-rl.png"), full_page=True)
