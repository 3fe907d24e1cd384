"""The dashboard (/ui) in a real browser: Debian's Chromium, headless, driven by playwright
against a real 3-node cluster. What an operator does: sign in, see the nodes and the leader,
watch a killed node go down and a new leader come, watch a damaged replica go diverged →
repairing → serving, follow a task to its end, browse and edit keys, recall memories, list
principals and tokens — with the page updating itself (no reload)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from synapse import Client
from tests.harness import Cluster, post_json

CHROMIUM = Path("/usr/bin/chromium")
DOWN_WITHIN_MS = 3000  # the bound: a killed node is shown down within 3 s


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: ./scripts/test installs it (scripts/lib/setup.sh, PY_PACKAGES)")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (./scripts/test does, as root)")
    with sync_playwright() as p:
        # --no-sandbox: the suite runs as root, where Chromium refuses its own sandbox.
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster.create(tmp_path_factory.mktemp("ui"), 3,
                       extra=["--debug-fault-injection", "--worker-slots", "1", "--checkpoint-interval", "200"]).start()
    yield c
    c.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert errors == [], f"the page's script failed: {errors}"


def sign_in(page, node, token: str, view: str = "cluster") -> None:
    page.goto(f"{node.url}/ui/#/{view}")
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#bar:not([hidden])")
    # A marker that a full page load would drop: every check after it proves "no reload".
    page.evaluate("window.__sameDocument = true")


def still_same_document(page) -> bool:
    return page.evaluate("window.__sameDocument === true")


def test_sign_in_shows_three_nodes_and_the_leader(page, cluster):
    node = cluster.nodes[0]
    page.goto(f"{node.url}/ui/")
    page.fill("#token", "root.0000")
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#login-error:has-text('refused the token')")
    assert page.is_hidden("#bar")

    sign_in(page, node, cluster.token)
    page.wait_for_selector("tr[data-node][data-reachable=true] >> nth=2")
    leader = cluster.leader().node_id
    rows = page.locator("table.nodes tbody tr")
    assert rows.count() == 3
    assert [rows.nth(i).get_attribute("data-node") for i in range(3)] == ["n1", "n2", "n3"]
    page.wait_for_selector(f"tr[data-node={leader}][data-role=leader]")
    assert page.locator("tr[data-role=leader]").count() == 1
    assert page.inner_text("#card-leader .card-value") == leader
    assert page.inner_text("#card-answering .card-value") == "3 / 3"
    # The token is kept for the tab's session: a reload does not ask again.
    page.reload()
    page.wait_for_selector("tr[data-node][data-reachable=true] >> nth=2")
    page.click("#sign-out")
    assert page.is_visible("#login") and page.evaluate("sessionStorage.length") == 0


def test_a_killed_leader_is_marked_down_within_3_s_and_the_new_leader_shown(page, cluster):
    old = cluster.leader()
    asker = next(n for n in cluster.nodes if n is not old)
    sign_in(page, asker, cluster.token)
    page.wait_for_selector(f"tr[data-node={old.node_id}][data-role=leader]")
    old.kill()  # SIGKILL
    try:
        page.wait_for_selector(f"tr[data-node={old.node_id}][data-reachable=false]", timeout=DOWN_WITHIN_MS)
        page.wait_for_function(f"""() => {{
            const v = document.querySelector('#card-leader .card-value');
            return v && v.textContent !== 'none' && v.textContent !== '{old.node_id}'; }}""", timeout=30_000)
        new = page.inner_text("#card-leader .card-value")
        page.wait_for_selector(f"tr[data-node={new}][data-role=leader]")
        assert page.inner_text("#card-answering .card-value") == "2 / 3"
        page.wait_for_selector(f"li[data-kind=leader][data-node={asker.node_id}]:has-text('{new}')")
    finally:
        old.start()
        cluster.wait_ready(nodes=[old])
    page.wait_for_selector(f"tr[data-node={old.node_id}][data-reachable=true]", timeout=15_000)
    assert still_same_document(page)


def test_a_corrupted_replica_goes_diverged_then_repairing_then_serving(page, cluster):
    victim = next(n for n in cluster.nodes if n is not cluster.leader())
    asker = next(n for n in cluster.nodes if n is not victim)
    with Client(asker.url, cluster.token) as c:
        c.put("ui/precious", "the right value")
        code, body = post_json(victim, "/v1/debug/corrupt", {"key": "ui/precious", "value": "rot"}, cluster.token)
        assert code == 200, body
        sign_in(page, asker, cluster.token)
        c.checkpoint(label="find the damage")
    seen = []
    for service in ("diverged", "repairing", "serving"):
        item = f"li[data-kind=service][data-node={victim.node_id}][data-service={service}]"
        page.wait_for_selector(item, timeout=60_000)
        seen.append(service)
    # The timeline is newest first: serving above repairing above diverged.
    order = page.eval_on_selector_all(f"li[data-kind=service][data-node={victim.node_id}]",
                                      "els => els.map(e => e.dataset.service)")
    assert [s for s in reversed(order) if s in ("diverged", "repairing", "serving")][-3:] == seen
    page.wait_for_selector(f"tr[data-node={victim.node_id}][data-service=serving]", timeout=30_000)
    page.wait_for_selector(f"li[data-kind=repaired][data-node={victim.node_id}]")
    with Client(victim.url, cluster.token) as on_victim:
        assert on_victim.get("ui/precious", consistency="stale")["value"] == "the right value"
    assert still_same_document(page)


def test_a_task_submitted_from_the_page_is_followed_to_its_end(page, cluster):
    sign_in(page, cluster.nodes[0], cluster.token, "tasks")
    page.fill("#submit-command", "echo hello from the dashboard")
    page.click("#submit-form button[type=submit]")
    page.wait_for_url(re.compile(r".*#/tasks/[0-9a-f]+$"))
    task_id = page.url.rsplit("/", 1)[1]
    page.wait_for_selector(f"#task-view[data-task='{task_id}'][data-state=succeeded]", timeout=60_000)
    assert page.inner_text("#task-stdout").strip() == "hello from the dashboard"
    # The list is read before the task's own page in each refresh: it may show the end one later.
    page.wait_for_selector(f"#task-list tr[data-task='{task_id}'][data-state=succeeded]", timeout=5000)
    history = page.inner_text("#task-view table")
    assert "pending" in history and "succeeded" in history
    page.wait_for_selector("#task-workers tr[data-worker]")
    assert still_same_document(page)


def test_keys_are_browsed_as_a_tree_edited_and_updated_live(page, browser, cluster):
    with Client(cluster.nodes[0].url, cluster.token) as c:
        c.put("app/config/db", {"host": "db.internal", "port": 5432})
        c.put("app/name", "demo")
        reader = c.create_token(principal="root", scopes=["kv:read"], label="read-only")["token"]
        sign_in(page, cluster.nodes[1], cluster.token, "keys/app%2F")
        page.wait_for_selector("#keys-list li.folder:has-text('config/')")
        page.click("#keys-list li[data-key='app/name'] a")
        page.wait_for_selector("#key-value:has-text('demo')")
        page.click("text=Edit")
        page.fill("#key-editor", '"renamed"')
        page.click("text=Save")
        page.wait_for_selector("#key-version:has-text('2')")
        assert c.get("app/name")["value"] == "renamed"
        c.put("app/live", 1)  # written elsewhere: the open page shows it by itself
        page.wait_for_selector("#keys-list li[data-key='app/live']", timeout=3000)
        page.fill("#new-key", "app/made-here")
        page.fill("#new-value", '{"ok": true}')
        page.click("#keys-new button")
        page.wait_for_selector("#key-value:has-text('\"ok\": true')")
        assert c.get("app/made-here")["value"] == {"ok": True}
    assert still_same_document(page)

    # A token that may only read gets no way to write.
    context = browser.new_context()
    ro = context.new_page()
    sign_in(ro, cluster.nodes[1], reader, "keys/app%2F")
    ro.click("#keys-list li[data-key='app/name'] a")
    ro.wait_for_selector("#keys-detail:has-text('Read-only')")
    assert ro.locator("text=Edit").count() == 0 and ro.locator("#new-key").count() == 0
    context.close()


def test_memory_namespaces_records_and_recall_with_scores(page, cluster):
    with Client(cluster.nodes[0].url, cluster.token) as c:
        c.remember("notes", "The nightly deploy runs at midnight UTC", id="deploy")
        c.remember("notes", "Lunch is served in the blue room", id="lunch")
        c.remember("notes", "Backups are kept for thirty days", id="backups")
    sign_in(page, cluster.nodes[2], cluster.token, "memory/notes")
    page.wait_for_selector("#memory-spaces li[data-ns=notes]:has-text('3 records')")
    page.wait_for_selector("#memory-records tr[data-id] >> nth=2")
    page.fill("#recall-query", "when does the deployment happen")
    page.click("#memory-recall button[type=submit]")
    page.wait_for_selector("table.results tbody tr[data-id]")
    first = page.locator("table.results tbody tr").first
    assert first.get_attribute("data-id") == "deploy"
    score = float(first.locator("td").first.inner_text())
    assert 0 < score <= 1


def test_principals_roles_and_tokens_by_accessor_never_a_secret(page, cluster):
    with Client(cluster.nodes[0].url, cluster.token) as c:
        minted = c.create_token(principal="root", scopes=["kv:read:shown/"], label="shown on the page")
    sign_in(page, cluster.nodes[0], cluster.token, "principals")
    page.wait_for_selector("#sec-principals tr[data-principal=root]")
    page.wait_for_selector("#sec-roles tr[data-role=root]")
    page.wait_for_selector(f"#sec-tokens tr[data-accessor='{minted['accessor']}']:has-text('shown on the page')")
    text = page.content()
    for secret in (cluster.token, minted["token"]):
        assert secret.split(".", 1)[1] not in text


def test_the_page_says_when_its_node_stops_answering(page, cluster):
    """The node serving the page goes away: the page says so (and keeps what it showed)
    instead of going blank, and recovers by itself when the node is back."""
    node = cluster.nodes[2]
    sign_in(page, node, cluster.token)
    page.wait_for_selector("tr[data-node][data-reachable=true] >> nth=2")
    node.kill()
    try:
        page.wait_for_selector("#problem:not([hidden]):has-text('Cannot reach this node')", timeout=5000)
        assert page.locator("table.nodes tbody tr").count() == 3
    finally:
        node.start()
        cluster.wait_ready(nodes=[node])
    page.wait_for_selector("#problem[hidden]", state="attached", timeout=15_000)
    page.wait_for_selector(".live.ok")
    t0 = time.monotonic()
    assert still_same_document(page) and time.monotonic() - t0 < 5
