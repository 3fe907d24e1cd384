"""deploy/monitoring/ held to real things, offline: promtool (Debian's prometheus package)
checks prometheus.yml and rules.yml and runs rules.test.yml; the Grafana dashboard parses and
every panel has a query; every metric an expression of the dashboard or the rules names is in a
real node's /metrics; and a real Prometheus, scraping that node with prometheus.yml's own
scrape job and rules, evaluates every dashboard expression (each answers, and with series
unless nothing on a healthy node can produce one), the dashboard's variable queries and the
alert rules (all evaluated, none pending or firing on a healthy node). The dashboard itself
is not rendered: Grafana cannot be installed here (deploy/monitoring/README.md)."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.harness import Cluster, free_ports, scrape, wait_until

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "synapse.json"
PROMTOOL, PROMETHEUS = Path("/usr/bin/promtool"), Path("/usr/bin/prometheus")

# What Grafana puts in place of the dashboard's variables, as a user viewing all nodes of the
# stack would get: job=synapse, every node (the variable's allValue), and a rate window
# wide enough for the test's 1 s scrapes.
VARIABLES = {"job": "synapse", "instance": ".+", "__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
# Series that only an event produces, absent on a healthy node that just started: a catch-up
# by whole dump (labelled by reason) and answers 5xx.
EVENT_ONLY = (re.compile(r"synapse_catchup_full_dumps_total"), re.compile(r'status=~"5\.\."'))


def grafana_expr(expr: str, variables: dict[str, str] = VARIABLES) -> str:
    """``expr`` with Grafana's variables ($name and ${name}) replaced."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables[m.group(1)], expr)


def dashboard_panels() -> list[dict]:
    """The dashboard's panels but rows (the ones inside collapsed rows too)."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        found.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return found


def metric_names(expr: str) -> set[str]:
    # Every metric of the nodes is named synapse_*; labels and functions never are.
    return set(re.findall(r"\bsynapse_[a-z0-9_]+", expr))


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((MONITORING / "rules.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


@pytest.fixture(scope="module", autouse=True)
def promtool():
    if not (PROMTOOL.exists() and PROMETHEUS.exists()):
        pytest.fail(f"{PROMTOOL} or {PROMETHEUS} is missing: these tests need Debian's prometheus package "
                    "(apt-get install prometheus)", pytrace=False)


def run_promtool(*args: str, cwd: Path = MONITORING) -> str:
    done = subprocess.run([str(PROMTOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_promtool_checks_the_config_and_the_rules():
    # As shipped (its token file is the stack's secret, absent here: syntax only) ...
    run_promtool("check", "config", "--syntax-only", "prometheus.yml")
    out = run_promtool("check", "rules", "rules.yml")
    assert "SUCCESS" in out, out
    # ... and each alert fires, or stays quiet, as rules.test.yml says.
    run_promtool("test", "rules", "rules.test.yml")


def test_the_dashboard_is_grafana_json_with_a_query_in_every_panel():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] == 39 and dashboard["uid"] == "synapse-cluster"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels()
    assert len(panels) >= 25
    ids = [p["id"] for p in dashboard["panels"]] + [p["id"] for row in dashboard["panels"] for p in row.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels:
        assert p["type"] in ("timeseries", "stat"), p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["expr"].strip() and t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
        assert {"h", "w", "x", "y"} <= p["gridPos"].keys() and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        for t in p["targets"]:
            used = set(re.findall(r"\$\{?(\w+)\}?", t["expr"]))
            assert used <= set(VARIABLES), f"{p['title']}: {used - set(VARIABLES)} is no variable Grafana or the dashboard defines"
            assert used - {"__rate_interval", "__interval", "__range"} <= variables.keys(), p["title"]
    titles = " | ".join(p["title"] for p in panels)
    for wanted in ("Leader", "Term", "Applied index lag", "Voters up", "Serving", "Checkpoints", "Repairs",
                   "Catch-up", "Requests / s", "Latency p50", "Latency p99", "Errors", "Auth denials",
                   "Memory records", "Namespaces", "Recall latency", "Vector index", "Tasks by state",
                   "Tasks ended", "Schedule wait", "Workers"):
        assert wanted in titles, f"no panel about {wanted!r}: {titles}"


def test_the_leaders_view_is_the_current_leaders_after_a_change_of_leader(tmp_path):
    """Up to a scrape after a leader change the old leader's last sample still says it leads:
    the panels of the leader's view take the leader of the highest term among those that say
    so (a partitioned node's higher term, while it only stands for election, does not
    count). Summing both leaders showed "6 of 6" voters up (a docker-mode test caught it)."""
    panels = {p["title"]: p for p in dashboard_panels()}
    up, of = (grafana_expr(t["expr"]) for t in panels["Voters up (leader's view)"]["targets"])
    contact = grafana_expr(panels["Voter last contact (leader's view)"]["targets"][0]["expr"])
    series = [
        # node1 led term 2; its last sample is from then (two voters heard, of three).
        ('synapse_is_leader{job="synapse", instance="node1"}', "1x12"),
        ('synapse_raft_term{job="synapse", instance="node1"}', "2x12"),
        ('synapse_is_leader{job="synapse", instance="node2"}', "1x12"),
        ('synapse_raft_term{job="synapse", instance="node2"}', "3x12"),
        ('synapse_is_leader{job="synapse", instance="node3"}', "0x12"),
        ('synapse_raft_term{job="synapse", instance="node3"}', "7x12"),
    ]
    for node, view in (("node1", (1, 1, 0)), ("node2", (1, 1, 1))):
        for voter, value in zip(("node1", "node2", "node3"), view):
            series.append((f'synapse_voter_up{{job="synapse", instance="{node}", node="{voter}"}}', f"{value}x12"))
            series.append((f'synapse_voter_last_contact_seconds{{job="synapse", instance="{node}", node="{voter}"}}',
                           f"{0.1 if value else 9}x12"))
    tests = {"rule_files": [], "evaluation_interval": "5s", "tests": [{
        "interval": "5s",
        "input_series": [{"series": name, "values": values} for name, values in series],
        "promql_expr_test": [
            {"expr": up, "eval_time": "30s", "exp_samples": [{"labels": "{}", "value": 3}]},
            {"expr": of, "eval_time": "30s", "exp_samples": [{"labels": "{}", "value": 3}]},
            {"expr": f"count({contact})", "eval_time": "30s", "exp_samples": [{"labels": "{}", "value": 3}]},
            {"expr": f"max({contact})", "eval_time": "30s", "exp_samples": [{"labels": "{}", "value": 0.1}]},
        ]}]}
    (tmp_path / "view.test.yml").write_text(yaml.safe_dump(tests))
    run_promtool("test", "rules", "view.test.yml", cwd=tmp_path)


def test_grafana_provisioning_points_at_the_dashboard_and_the_stack():
    grafana = MONITORING / "grafana"
    sources = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    stack = yaml.safe_load((ROOT / "deploy" / "docker" / "compose.yaml").read_text())
    assert "prometheus" in stack["services"]  # the host name the data source's url uses
    providers = yaml.safe_load((grafana / "provisioning" / "dashboards" / "synapse.yaml").read_text())
    (provider,) = providers["providers"]
    # The provider reads the directory grafana/compose.yaml mounts the dashboards at.
    mounts = yaml.safe_load((grafana / "compose.yaml").read_text())["services"]["grafana"]["volumes"]
    assert f"../monitoring/grafana/dashboards:{provider['options']['path']}:ro" in mounts, mounts
    assert "../monitoring/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts, mounts


# --- against a real node and a real Prometheus --------------------------------------------------


class Prometheus:
    """Debian's prometheus on a free loopback port, with prometheus.yml's scrape job and rules
    pointed at ``target`` (host:port) and scraping every second; stopped by ``stop``."""

    def __init__(self, root: Path, target: str, token: str) -> None:
        config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
        (self.port,) = free_ports(1)
        token_file = root / "token"
        token_file.write_text(token + "\n")  # as the stack's secret file has it, newline included
        config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        config["rule_files"] = [str(MONITORING / f) for f in config["rule_files"]]
        for job in config["scrape_configs"]:
            if job["job_name"] == "synapse":
                job["authorization"]["credentials_file"] = str(token_file)
                job["static_configs"] = [{"targets": [target]}]
            else:
                job["static_configs"] = [{"targets": [f"127.0.0.1:{self.port}"]}]
        self.config = root / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = root / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([str(PROMETHEUS), f"--config.file={self.config}",
                                          f"--storage.tsdb.path={root / 'data'}",
                                          f"--web.listen-address=127.0.0.1:{self.port}"],
                                         stdout=log, stderr=subprocess.STDOUT)

    def get(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # a bad query: 400 with Prometheus's error
            return json.loads(e.read())

    def query(self, expr: str) -> dict:
        return self.get("/api/v1/query", query=expr)

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited:\n{self.log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A local node (embedded memory index and worker), with every kind of request the
    dashboard shows made once: kv, memory and recall, a task run to its end, a checkpoint,
    an auth denial."""
    cluster = Cluster.create(tmp_path_factory.mktemp("monitoring-node"), 1).start()
    try:
        client = cluster.client()
        client.put("monitoring/a", {"n": 1})
        client.get("monitoring/a")
        client.remember("monitoring", "the cat sleeps on the warm windowsill", id="cat")
        assert client.recall("monitoring", "where does the kitten nap?", k=1)[0]["id"] == "cat"
        task_id = client.submit_task({"command": ["true"]})["task_id"]
        wait_until(lambda: client.task(task_id)["state"] == "succeeded", 60, "the task to succeed")
        client.checkpoint(wait=True)
        bad = urllib.request.Request(cluster.nodes[0].url + "/v1/kv/monitoring/a",
                                     headers={"Authorization": "Bearer not-a-token"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=10)
        assert refused.value.code == 401
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def prometheus(node, tmp_path_factory):
    p = Prometheus(tmp_path_factory.mktemp("prometheus"), node.nodes[0].api, node.token)
    try:
        wait_until(p.ready, 30, "prometheus to be ready")
        # Three scrapes of the node at least: rate() needs two samples in its window.
        wait_until(lambda: (p.query('count_over_time(up{job="synapse"}[1m]) >= 3')["data"]["result"] or [None])[0],
                   30, "three scrapes of the node")
        yield p
    finally:
        p.stop()


def test_every_metric_the_dashboard_and_the_rules_name_is_in_a_nodes_metrics(node, prometheus):
    samples = {key.split("{")[0] for key in scrape(node.nodes[0], node.token)}
    exprs = [t["expr"] for p in dashboard_panels() for t in p["targets"]] + rule_exprs()
    used = set().union(*(metric_names(e) for e in exprs))
    # A family whose only series come with an event (a labelled gauge before its first label)
    # has no sample yet; the node still declares it (# TYPE), which Prometheus's metadata shows.
    declared = set(prometheus.get("/api/v1/metadata")["data"])
    missing = {name for name in used - samples
               if not any(p.search(name) for p in EVENT_ONLY) or name not in declared}
    assert not missing, f"metrics no node exports: {sorted(missing)}"
    # The one this brief singles out: recall latency is the recall route's request histogram.
    assert any('route="/v1/memory/{ns}/recall"' in key for key in scrape(node.nodes[0], node.token))


def test_prometheus_scrapes_the_node_with_the_shipped_scrape_job(prometheus):
    # The generated config is prometheus.yml but for targets, token file and paths: check it
    # in full, rule files included.
    run_promtool("check", "config", str(prometheus.config))
    (target,) = [t for t in prometheus.get("/api/v1/targets")["data"]["activeTargets"] if t["labels"]["job"] == "synapse"]
    assert target["health"] == "up", target
    assert target["labels"]["instance"] == "127.0.0.1", target  # the relabelling drops the port


def test_every_dashboard_expression_is_valid_promql_with_series(prometheus):
    empty, errors = [], []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = grafana_expr(target["expr"])
            answer = prometheus.query(expr)
            if answer["status"] != "success":
                errors.append(f"{panel['title']}: {expr}: {answer.get('error')}")
            elif not answer["data"]["result"] and not any(p.search(expr) for p in EVENT_ONLY):
                empty.append(f"{panel['title']}: {expr}")
    assert not errors, "\n".join(errors)
    assert not empty, "no series on a healthy node:\n" + "\n".join(empty)


def test_the_dashboards_variable_queries_find_the_node(prometheus):
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    # label_values(METRIC{SELECTOR}, LABEL) is Grafana's; Prometheus answers it as /api/v1/label.
    for name, wanted in (("job", "synapse"), ("instance", "127.0.0.1")):
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", variables[name]["definition"])
        values = prometheus.get(f"/api/v1/label/{m.group(2)}/values", **{"match[]": grafana_expr(m.group(1))})["data"]
        assert values == [wanted], (name, values)


def test_the_alert_rules_evaluate_and_stay_quiet_on_a_healthy_node(prometheus):
    def evaluated():
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(not r["lastEvaluation"].startswith("0001") for r in rules) else None

    rules = wait_until(evaluated, 15, "every rule evaluated once")
    assert len(rules) == len(rule_exprs())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert prometheus.get("/api/v1/alerts")["data"]["alerts"] == []
