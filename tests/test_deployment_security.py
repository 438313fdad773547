"""The loopback deployment with Flower's own security on: TLS on the SuperLink (a CA and a
server certificate made here) and SuperNode authentication (`--enable-supernode-auth`).

Two SuperNodes whose public keys were registered with `flwr supernode register` train one
FedAvg round of the tiny model (each on its own silo); a SuperNode with a key nobody registered and one with no key
at all are refused: each exits with Flower's connection error and never takes part.
About 1 minute on a 2-core CPU machine (most of it process and model start-up).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from deploy_utils import (
    BIN,
    REPO,
    Processes,
    free_port,
    needs_flower_executables,
    tail,
    wait_for_port,
    wait_run_complete,
    write_silos,
)

from fedsdr.config import load_config
from fedsdr.data.federated import load_silo_data

CONFIG = REPO / "configs" / "smoke.toml"  # FedAvg on the tiny model: the cheapest full round
FEDERATION = "fedsdr-secure"
RUN_TIMEOUT_S = 120
REFUSAL_TIMEOUT_S = 60

pytestmark = needs_flower_executables


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signs, valid for localhost and 127.0.0.1.

    Returns (CA certificate, server certificate, server key), PEM files in `folder`.
    """
    folder.mkdir()
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedsdr test CA")).issuer_name(_name("fedsdr test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(validity[0]).not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost")).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(validity[0]).not_valid_after(validity[1])
        # The SuperNodes, the CLI and the SuperLink's own SuperExec dial 127.0.0.1.
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca, cert, key = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(_pem_key(server_key))
    key.chmod(0o600)
    return ca, cert, key


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's key pair as Flower reads them: OpenSSH private key, OpenSSH `.pub`."""
    folder.mkdir(exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def flwr_cli(args: list[str], tmp_path: Path, env: dict[str, str], procs: Processes,
             timeout: float = 90) -> str:
    done = subprocess.run([str(BIN / "flwr"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        f"flwr {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n"
        f"{procs.logs()}"
    )
    return done.stdout


def test_tls_and_supernode_auth(tmp_path: Path, env: dict[str, str], procs: Processes) -> None:
    ca, cert, key = make_tls_files(tmp_path / "tls")
    keys = tmp_path / "keys"
    registered = [make_node_key(keys, f"node-{k}") for k in range(2)]
    stranger_private, _ = make_node_key(keys, "stranger")  # never registered

    app = tmp_path / "app"  # the app as `flwr run` ships it (see test_deployment.py)
    app.mkdir()
    shutil.copy(REPO / "pyproject.toml", app / "pyproject.toml")

    link_port = free_port()
    # No `insecure`: the CLI checks the SuperLink's certificate against our CA.
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n'
        f'[superlink.{FEDERATION}]\naddress = "127.0.0.1:{link_port}"\n'
        f'root-certificates = "{ca}"\n'
    )
    # Only what this test is about: the nodes train (no client evaluation, no generation).
    overrides = ("partition.num_clients=2 federation.rounds=1 lora.r=2 "
                 "eval.clients=false eval.generate=false")
    cfg = load_config(str(CONFIG), overrides.split())
    silos = write_silos(tmp_path)
    out = tmp_path / "out"

    procs.start("superlink", [
        str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
        "--ssl-keyfile", str(key), "--enable-supernode-auth",
        "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(link_port),
    ])
    wait_for_port(link_port, procs)

    # The SuperLink speaks TLS with the certificate our CA signed.
    tls = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", link_port), timeout=10) as raw:
        with tls.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            served = x509.load_der_x509_certificate(conn.getpeercert(binary_form=True))
    assert served.issuer == _name("fedsdr test CA")

    node_ids = []
    for _, public in registered:
        said = flwr_cli(["supernode", "register", str(public), FEDERATION, "--format", "json"],
                        tmp_path, env, procs)
        node_ids.append(json.loads(said[said.index("{"):])["node-id"])
    assert len(set(node_ids)) == 2

    def supernode(name: str, k: int, auth: list[str]) -> subprocess.Popen:
        return procs.start(name, [
            str(BIN / "flower-supernode"), "--root-certificates", str(ca), *auth,
            "--superlink", f"127.0.0.1:{link_port}", "--host", "127.0.0.1",
            "--port", str(free_port()),
            "--node-config",
            f"partition-id={k} num-partitions=2 data-path='{silos[k]}' "
            f"state-dir='{tmp_path / ('state-' + name)}'",
        ])

    for k, (private, _) in enumerate(registered):
        supernode(f"supernode-{k}", k, ["--auth-supernode-private-key", str(private)])
    # Same node config as a registered node: if admitted, it could train in their place.
    strangers = [
        supernode("stranger-key", 0, ["--auth-supernode-private-key", str(stranger_private),
                                      "--max-retries", "2"]),
        supernode("stranger-nokey", 1, ["--max-retries", "2"]),  # would self-register: forbidden
    ]
    deadline = time.monotonic() + REFUSAL_TIMEOUT_S
    for proc in strangers:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"an unregistered SuperNode is still running\n{procs.logs()}")
        assert proc.returncode != 0
    for name, refusal in [("stranger-key", "Failed to activate SuperNode"),
                          ("stranger-nokey", "All SuperNodes must be registered via the CLI")]:
        log = (tmp_path / f"{name}.log").read_text(errors="replace")
        assert "Failed to initialize the connection to the SuperLink" in log, tail(tmp_path / f"{name}.log")
        assert refusal in log, tail(tmp_path / f"{name}.log")

    started = flwr_cli(
        ["run", str(app), FEDERATION,
         "--run-config", f"fedsdr-config='{CONFIG}' set='{overrides}' out-dir='{out}'"],
        tmp_path, env, procs)
    assert "Successfully started run" in started

    rows = wait_run_complete(out, procs, RUN_TIMEOUT_S, client_eval=False,
                             expected_exits=tuple(strangers))
    assert (out / "checkpoints/round-001/adapter_model.safetensors").stat().st_size > 0
    assert json.loads((out / "config.json").read_text()) == json.loads(cfg.to_json())
    for k, silo in enumerate(silos):
        data = load_silo_data(str(silo), k, cfg.data, cfg.seed)
        train = [r for r in rows if r["scope"] == f"client-{k}" and r["kind"] == "train"]
        assert [r["num_examples"] for r in train] == [len(data.train)]  # its own silo
    assert {r["scope"] for r in rows} == {"global", "client-0", "client-1"}
    # The SuperLink knows the two registered nodes, both online, and no other.
    listed = flwr_cli(["supernode", "ls", FEDERATION, "--format", "json"], tmp_path, env, procs)
    nodes = json.loads(listed[listed.index("{"):])["nodes"]
    assert {(n["node-id"], n["status"]) for n in nodes} == {(str(i), "online") for i in node_ids}
