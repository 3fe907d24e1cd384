"""HTTPS on a real 3-node cluster made with `synapse tls init`, mutual TLS on: clients verify
the nodes against the cluster's CA and present a certificate; the nodes call each other
(revocation confirmations, repair) and the execution nodes call them over the same HTTPS;
plain HTTP, a missing client certificate and a certificate from another CA are refused
clearly."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time

import pytest

from synapse.client import Client, SynapseError
from synapse.security.tls import client_context, init_certificates
from tests.harness import SYNAPSE, Cluster, free_ports, wait_until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster.create(tmp_path_factory.mktemp("tls"), 3, tls=True, extra=["--debug-fault-injection",
                                                                           "--checkpoint-interval", "0"]).start()
    yield c
    c.close()


def test_writes_and_reads_go_over_https_on_every_node(cluster):
    c = cluster.client()
    c.put("tls/a", {"n": 1})
    for node in cluster.nodes:
        assert cluster.client(node).get("tls/a", consistency="linearizable")["value"] == {"n": 1}
    assert all(n.url.startswith("https://") for n in cluster.nodes)
    assert c.status()["leader_api"] in {n.api for n in cluster.nodes}


def test_a_revocation_is_confirmed_by_every_node_over_https(cluster):
    """The confirmation polls the other nodes with the node's own token and certificate: a
    node that could not reach the others over TLS would be named in nodes_not_confirmed."""
    admin = cluster.client()
    minted = admin.create_token(["kv:read:tls/"])
    answer = admin.revoke_token(minted["accessor"])
    assert answer["nodes_not_confirmed"] == [], answer


def test_plain_http_on_a_tls_node_gets_a_clear_error(cluster):
    host, port = cluster.nodes[0].api.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET /v1/cluster/status HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"] == "tls_required"
    with pytest.raises(SynapseError) as e:
        Client(f"http://{cluster.nodes[0].api}", cluster.token, timeout=2).status()
    assert e.value.status == 400 and e.value.error == "tls_required"


def test_without_a_client_certificate_or_the_cluster_ca_nothing_is_answered(cluster, tmp_path):
    url, ca = cluster.nodes[0].url, cluster.tls_dir / "ca.crt"
    with pytest.raises(SynapseError) as e:  # the node asks for a client certificate
        Client(url, cluster.token, timeout=2, tls_ca=ca).status()
    assert (e.value.status, e.value.error) == (495, "tls_error")
    with pytest.raises(SynapseError) as e:  # the node's certificate is not trusted
        Client(url, cluster.token, timeout=2).status()
    assert (e.value.status, e.value.error) == (495, "tls_error")
    # A certificate from another CA, even with a valid token, is refused in the handshake.
    init_certificates(tmp_path / "other", ["client"], [])
    with pytest.raises(SynapseError) as e:
        Client(url, cluster.token, timeout=2, tls_ca=ca, tls_cert=tmp_path / "other" / "client.crt",
               tls_key=tmp_path / "other" / "client.key").status()
    assert e.value.status == 495
    host, port = cluster.nodes[0].api.split(":")
    raw = client_context(ca, tmp_path / "other" / "client.crt", tmp_path / "other" / "client.key")
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        with socket.create_connection((host, int(port)), timeout=5) as s, raw.wrap_socket(s, server_hostname=host) as t:
            t.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            t.recv(100)


def test_a_corrupted_replica_is_repaired_from_a_peer_over_https(cluster):
    c = cluster.client()
    c.put("tls/kept", "value")
    victim = next(n for n in cluster.nodes if n.node_id != c.status()["leader"])
    on_victim = cluster.client(victim)
    before = on_victim.status()["checkpoint"].get("repairs", 0)
    on_victim.request("POST", "/v1/debug/corrupt", {"key": "tls/kept", "delete": True})
    assert on_victim.get("tls/kept", consistency="stale") is None
    c.checkpoint(label="tls check")
    wait_until(lambda: (s := on_victim.status()["checkpoint"]).get("repairs", 0) > before and s["service"] == "serving",
               30, "the repair over HTTPS")
    assert on_victim.get("tls/kept", consistency="stale")["value"] == "value"


def test_an_execution_node_joins_and_runs_a_task_over_https(cluster):
    tls = cluster.client_tls()
    w = cluster.worker("tls-w1", slots=1, extra=["--driver", "process", "--tls-ca", str(tls["tls_ca"]),
                                                  "--tls-cert", str(tls["tls_cert"]), "--tls-key", str(tls["tls_key"])])
    w.start()
    c = cluster.client()
    task = c.submit_task({"command": ["python3", "-c", "print('over tls')"]})["task_id"]
    done = c.task(task, wait=30)
    assert done["state"] == "succeeded", (done, w.log()[-2000:])


def test_a_node_refuses_to_start_with_a_key_that_does_not_fit_its_certificate(cluster, tmp_path):
    d, (api, raft) = cluster.tls_dir, free_ports(2)
    out = subprocess.run(SYNAPSE + ["node", "start", "--data-dir", str(tmp_path / "d"), "--api", f"127.0.0.1:{api}",
                                    "--raft", f"127.0.0.1:{raft}", "--worker-slots", "0",
                                    "--tls-cert", str(d / "n1.crt"), "--tls-key", str(d / "n2.key")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "does not fit the certificate" in out.stderr, out.stderr


def _raft_handshake(node, ca, cert=None, key=None) -> bool:
    """Whether a TLS client can talk to the node's Raft port (the handshake and one read)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    host, port = node.raft.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as s, \
                ctx.wrap_socket(s, server_hostname=host) as t:
            t.settimeout(1.0)
            try:
                t.recv(1)  # TLS 1.3: a refused client certificate arrives as an alert here
            except socket.timeout:
                pass  # nothing to read: the node waits for our first Raft frame
            return True
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return False


def test_the_raft_port_speaks_mutual_tls(cluster, tmp_path):
    d = cluster.tls_dir
    node = cluster.nodes[0]
    assert _raft_handshake(node, d / "ca.crt", d / "client.crt", d / "client.key")
    assert not _raft_handshake(node, d / "ca.crt")  # no client certificate
    init_certificates(tmp_path / "other", ["intruder"], [])
    assert not _raft_handshake(node, d / "ca.crt", tmp_path / "other" / "intruder.crt", tmp_path / "other" / "intruder.key")


def test_a_node_with_a_certificate_from_another_ca_cannot_join(cluster, tmp_path):
    """It has the cluster secret and is added as a member, but its Raft connections fail the
    TLS handshake both ways: it never connects, never applies, and the cluster goes on."""
    other = tmp_path / "other"
    init_certificates(other, ["n9"], [])
    n9 = cluster.new_node("n9")
    swap = {str(cluster.tls_dir / "n9.crt"): str(other / "n9.crt"), str(cluster.tls_dir / "n9.key"): str(other / "n9.key"),
            str(cluster.tls_dir / "ca.crt"): str(other / "ca.crt")}
    n9.args = [swap.get(a, a) for a in n9.args]
    n9.start()
    admin = cluster.client()
    try:
        admin.request("POST", "/v1/cluster/members", {"node_id": "n9", "raft": n9.raft, "api": n9.api})
        time.sleep(3)  # several reconnect attempts both ways
        members = {m["node_id"]: m for m in admin.status()["members"]}
        assert members["n9"]["connected"] is False, members
        assert all(members[n.node_id]["connected"] for n in cluster.nodes[:3])
        admin.put("tls/without-n9", 1)  # 3 of 4 voters: still a majority
    finally:
        cluster.client(cluster.leader()).request("DELETE", "/v1/cluster/members/n9")
        n9.stop()
        cluster.nodes.remove(n9)
