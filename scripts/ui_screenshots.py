"""Takes the dashboard's screenshots for docs/ui/ from a real cluster in a real browser.

Starts three nodes and an execution node on free loopback ports in a temp dir, gives them
something to show (keys, memories, tasks — one failing —, a narrower token, and a replica
damaged on purpose and repaired, so the timeline has a divergence in it), then signs in to
the dashboard in Debian's Chromium (headless) and saves one PNG per page. Everything it
started is stopped at the end. Use ./scripts/ui-screenshots, which sets up what it needs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synapse import Client  # noqa: E402
from tests.harness import Cluster, post_json, wait_until  # noqa: E402

PAGES = (("cluster", "cluster"), ("keys", "keys/app%2F"), ("memory", "memory/support%2Facme"), ("tasks", None),
         ("principals", "principals"))


def populate(cluster: Cluster) -> str:
    """Fills the cluster with what an operator would see on a working day; the task to show."""
    c = Client([n.url for n in cluster.nodes], cluster.token)
    c.put("app/config/db", {"host": "db.internal", "port": 5432, "pool": 16})
    c.put("app/config/cache", {"ttl_s": 300})
    c.put("app/feature/new-planner", True)
    c.put("app/name", "synapse-demo")
    c.put("app/name", "Synapse demo")
    for agent in ("planner", "critic"):
        c.put(f"agents/{agent}/status", "ready")
    c.remember_many("support/acme", [
        {"id": "refund-policy", "text": "Refunds are issued within 14 days of purchase", "metadata": {"topic": "billing"}},
        {"id": "sla", "text": "Priority tickets get an answer within one hour", "metadata": {"topic": "support"}},
        {"id": "deploy", "text": "The nightly deploy runs at 02:00 UTC", "metadata": {"topic": "ops"}},
        {"id": "contact", "text": "Acme's billing contact is Dana from finance", "metadata": {"topic": "billing"}},
    ])
    c.remember("support/globex", "Globex prefers answers in German", id="language")
    c.create_token(principal="root", scopes=["kv:read:app/", "memory:read:support/"], label="support dashboard")
    c.create_token(principal="root", scopes=["task:submit"], label="ci runner", ttl_s=86400)
    shown = c.submit_task({"command": ["python3", "-c", "print('indexed 1,204 documents'); print('done')"]})["task_id"]
    c.submit_task({"command": ["sh", "-c", "echo 'cannot open input.csv' >&2; exit 3"]})
    c.submit_task({"command": ["echo", "hello"]})
    wait_until(lambda: c.task(shown, wait=2)["state"] == "succeeded", 60, "the task to show")
    # A replica damaged on purpose, found at the next checkpoint and repaired from a peer.
    victim = next(n for n in cluster.nodes if n is not cluster.leader())
    code, body = post_json(victim, "/v1/debug/corrupt", {"key": "app/name", "value": "rot"}, cluster.token)
    assert code == 200, body
    c.checkpoint(label="daily")
    on_victim = Client(victim.url, cluster.token)
    wait_until(lambda: (ck := on_victim.status()["checkpoint"]).get("repairs", 0) >= 1 and ck["service"] == "serving",
               60, "the repair")
    c.checkpoint(label="after the repair", wait=True)
    return shown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ui", help="where the PNGs go (default docs/ui)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="synapse-ui-") as tmp:
        cluster = Cluster.create(Path(tmp), 3, extra=["--debug-fault-injection", "--checkpoint-interval", "500"]).start()
        try:
            cluster.worker("exec-1", slots=2).start()
            shown = populate(cluster)
            args.out.mkdir(parents=True, exist_ok=True)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
                page.goto(cluster.nodes[0].url + "/ui/")
                page.screenshot(path=str(args.out / "sign-in.png"))
                page.fill("#token", cluster.token)
                page.click("#login-form button[type=submit]")
                page.wait_for_selector("tr[data-node][data-reachable=true] >> nth=2")
                for name, view in PAGES:
                    page.goto(f"{cluster.nodes[0].url}/ui/#/{view or 'tasks/' + shown}")
                    if name == "keys":
                        page.click("#keys-list li[data-key='app/name'] a")
                        page.wait_for_selector("#key-value")
                    if name == "memory":
                        page.fill("#recall-query", "how long do refunds take?")
                        page.click("#memory-recall button[type=submit]")
                        page.wait_for_selector("table.results tbody tr[data-id]")
                    time.sleep(2.2)  # two refreshes: every part of the page has answered
                    page.screenshot(path=str(args.out / f"{name}.png"), full_page=True)
                    print(f"ui-screenshots: {args.out / (name + '.png')}")
                browser.close()
        finally:
            cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
