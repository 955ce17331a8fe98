"""Take the README's Prefect UI screenshots in headless Chromium (docs tooling, not part of docroute).

Needs Debian's chromium (`apt-get install chromium`) and `pip install playwright` (its driver only: no browser is
downloaded, `/usr/bin/chromium` is used). Run it after the README's walkthrough, with the server still up:

    python docs/take_screenshots.py --flow-run <flow run id> --job demo-support-intents
"""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

CHROMIUM_FLAGS = [  # no background traffic: this machine has no internet
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def shoot(page: Page, url: str, path: Path, wait_for: str, tab: str | None = None) -> None:
    page.goto(url, wait_until="networkidle")
    if tab is not None:
        page.get_by_text(tab, exact=True).first.click()
    page.get_by_text(wait_for).last.wait_for(timeout=30_000)
    page.wait_for_timeout(1500)  # charts and tables animate in
    page.screenshot(path=str(path), full_page=False)
    print(f"wrote {path}")


def artifact_id(ui: str, key: str, flow_run: str) -> str:
    """The id of the version of artifact `key` that `flow_run` published (the UI's key page lists them all)."""
    body = {"artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [flow_run]}}, "limit": 1}
    found = httpx.post(f"{ui}/api/artifacts/filter", json=body, timeout=30).raise_for_status().json()
    if not found:
        raise SystemExit(f"flow run {flow_run} published no artifact {key!r}")
    return found[0]["id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ui", default="http://127.0.0.1:4200")
    parser.add_argument("--flow-run", required=True)
    parser.add_argument("--job", required=True, help="the job's name (its artifact keys start with it)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1400})
        run = f"{args.ui}/runs/flow-run/{args.flow_run}"
        shoot(page, run, args.out / "ui-flow-run.png", "shard 0")
        shoot(page, run, args.out / "ui-flow-run-artifacts.png", f"{args.job}-output", tab="Artifacts")
        shoot(page, f"{args.ui}/artifacts/key/{args.job}-summary", args.out / "ui-summary-history.png", "Created")
        for kind, marker in (("summary", "all-frontier estimate"), ("costs", "engine_seconds")):
            key = f"{args.job}-{kind}"
            url = f"{args.ui}/artifacts/artifact/{artifact_id(args.ui, key, args.flow_run)}"
            shoot(page, url, args.out / f"ui-{kind}-artifact.png", marker)
        shoot(page, f"{args.ui}/deployments", args.out / "ui-deployments.png", "nightly")
        browser.close()


if __name__ == "__main__":
    main()
