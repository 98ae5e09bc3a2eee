"""The UI behind a login: deploy/nginx/so-pipeline.conf, run as shipped (ports and paths
substituted), with TLS from a private CA made by openssl, in front of two real
dagster-webservers on loopback: the full UI for operators, `--read-only` for viewers.

Without credentials every door answers 401: the page, /graphql (GET and POST) and its
websocket; a viewer's login does not open the operators' door. In a real headless Chromium
that trusts only this test's certificate, an operator loads the asset page (its websocket
through the proxy) and launches a run with the Materialize button; a viewer loads the same page
and cannot (the button is disabled, and the GraphQL mutation is refused by the read-only
webserver itself). Skipped, naming the Debian package, without nginx, chromium or openssl.
"""

import base64
import http.client
import json
import os
import secrets
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from so_pipeline_tests.helpers import (
    BIN,
    REPO_ROOT,
    PipelineDatabases,
    background,
    free_port,
    wait_for,
    wait_for_webserver,
)
from so_pipeline_tests.test_ui import CHROMIUM, CHROMIUM_ARGS, sync_api
from so_pipeline_tests.tls import PrivateCA, require_openssl

pytestmark = pytest.mark.integration

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
if not Path(NGINX).exists():
    pytest.skip("nginx is not installed (apt-get install nginx)", allow_module_level=True)
SITE = REPO_ROOT / "deploy" / "nginx" / "so-pipeline.conf"
LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) { __typename ... on PythonError { message } }
}
"""


@dataclass(frozen=True)
class Login:
    user: str
    password: str

    @property
    def header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()


@dataclass(frozen=True)
class Doors:
    full: str  # https://localhost:<port>, operators
    read_only: str  # viewers
    ca: Path
    spki: str  # the server certificate's key hash: the one certificate Chromium accepts
    operator: Login
    viewer: Login


def _htpasswd(path: Path, login: Login) -> None:
    """An htpasswd line with a SHA-512 crypt hash (nginx reads it through libcrypt)."""
    hashed = subprocess.run(
        [require_openssl(), "passwd", "-6", "-stdin"],
        input=login.password,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    path.write_text(f"{login.user}:{hashed}\n")


def _spki_hash(cert: Path) -> str:
    openssl = require_openssl()
    public_key = subprocess.run(
        [openssl, "x509", "-pubkey", "-noout", "-in", str(cert)], capture_output=True, check=True
    ).stdout
    der = subprocess.run(
        [openssl, "pkey", "-pubin", "-outform", "der"],
        input=public_key,
        capture_output=True,
        check=True,
    ).stdout
    digest = subprocess.run(
        [openssl, "dgst", "-sha256", "-binary"], input=der, capture_output=True, check=True
    ).stdout
    return base64.b64encode(digest).decode()


def _render_site(directory: Path, ports: dict[str, int], cert: Path, key: Path) -> Path:
    """The shipped site file with this test's ports and paths; each replaced text must be
    there, so the test breaks (rather than tests something else) if the file changes."""
    text = SITE.read_text()
    replacements = {
        "listen 443 ssl;": f"listen 127.0.0.1:{ports['full']} ssl;",
        "listen 8443 ssl;": f"listen 127.0.0.1:{ports['read_only']} ssl;",
        "http://127.0.0.1:3000;": f"http://127.0.0.1:{ports['full_webserver']};",
        "http://127.0.0.1:3001;": f"http://127.0.0.1:{ports['read_only_webserver']};",
        "/etc/ssl/so_pipeline/dagster.pem": str(cert),
        "/etc/ssl/so_pipeline/dagster.key": str(key),
        "/etc/nginx/so-pipeline-": f"{directory}/so-pipeline-",
    }
    for old, new in replacements.items():
        assert old in text, f"{SITE} no longer holds {old!r}"
        text = text.replace(old, new)
    site = directory / "so-pipeline.conf"
    site.write_text(text)
    return site


def _nginx_conf(directory: Path, site: Path) -> Path:
    """A main configuration as Debian's /etc/nginx/nginx.conf is, for one foreground nginx
    that writes only under `directory`, including the site."""
    temp = "\n".join(
        f"    {kind}_temp_path {directory}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = directory / "nginx.conf"
    conf.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")  # to read this test's 0700 directory
        + f"daemon off;\nworker_processes 1;\npid {directory}/nginx.pid;\n"
        f"error_log {directory}/error.log;\nevents {{ worker_connections 128; }}\n"
        f"http {{\n    access_log {directory}/access.log;\n{temp}\n    include {site};\n}}\n"
    )
    return conf


@pytest.fixture
def doors(dagster_home: Path, databases: PipelineDatabases, tmp_path: Path) -> Iterator[Doors]:
    """nginx with the shipped site on two free ports, in front of a full and a read-only
    dagster-webserver on two more; every process group is stopped after the test."""
    ca = PrivateCA(tmp_path / "ca")
    certificate = ca.issue("dagster", ["localhost"])
    operator = Login("operator", secrets.token_urlsafe(12))
    viewer = Login("viewer", secrets.token_urlsafe(12))
    proxy_dir = tmp_path / "nginx"
    proxy_dir.mkdir()
    _htpasswd(proxy_dir / "so-pipeline-operators.htpasswd", operator)
    _htpasswd(proxy_dir / "so-pipeline-viewers.htpasswd", viewer)
    ports = {
        name: free_port() for name in ("full", "read_only", "full_webserver", "read_only_webserver")
    }
    site = _render_site(proxy_dir, ports, certificate.cert, certificate.key)
    conf = _nginx_conf(proxy_dir, site)

    webserver = [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1"]
    with ExitStack() as stack:
        started = {
            name: stack.enter_context(
                background([*webserver, "-p", str(ports[name]), *extra], tmp_path / f"{name}.log")
            )
            for name, extra in (("full_webserver", []), ("read_only_webserver", ["--read-only"]))
        }
        for name, process in started.items():
            wait_for_webserver(f"http://127.0.0.1:{ports[name]}", process)
        proxy = stack.enter_context(
            background(
                [NGINX, "-p", str(proxy_dir), "-c", str(conf), "-e", str(proxy_dir / "error.log")],
                tmp_path / "nginx.log",
            )
        )
        result = Doors(
            full=f"https://localhost:{ports['full']}",
            read_only=f"https://localhost:{ports['read_only']}",
            ca=ca.cert,
            spki=_spki_hash(certificate.cert),
            operator=operator,
            viewer=viewer,
        )

        def answers() -> bool:
            if proxy.poll() is not None:
                raise AssertionError(f"nginx exited: {(tmp_path / 'nginx.log').read_text()}")
            return _status(result, result.full + "/server_info") == 401

        wait_for(answers, "nginx", timeout=30)
        yield result


def _status(doors: Doors, url: str, login: Login | None = None, data: bytes | None = None) -> int:
    """The HTTP status of `url`, its TLS verified against the test's CA."""
    context = ssl.create_default_context(cafile=str(doors.ca))
    request = urllib.request.Request(url, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if login is not None:
        request.add_header("Authorization", login.header)
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def _websocket_handshake(doors: Doors, base: str, login: Login | None) -> str:
    """The status line a websocket upgrade of /graphql gets (the UI's subscriptions)."""
    port = int(base.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(doors.ca))
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=30)
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(secrets.token_bytes(16)).decode(),
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Protocol": "graphql-ws",
    }
    if login is not None:
        headers["Authorization"] = login.header
    connection.request("GET", "/graphql", headers=headers)
    response = connection.getresponse()
    connection.close()
    return f"{response.status} {response.reason}"


def _graphql_launch(doors: Doors, base: str, login: Login) -> str:
    """Launch the job through `base`'s /graphql, as the Launchpad does; the answer's type."""
    params = {
        "selector": {
            "repositoryLocationName": "so_pipeline",
            "repositoryName": "__repository__",
            "pipelineName": "stackoverflow_posts_job",
        },
        "mode": "default",
    }
    body = json.dumps({"query": LAUNCH, "variables": {"params": params}}).encode()
    request = urllib.request.Request(base + "/graphql", data=body)
    request.add_header("Content-Type", "application/json")
    request.add_header("Authorization", login.header)
    context = ssl.create_default_context(cafile=str(doors.ca))
    with urllib.request.urlopen(request, context=context, timeout=60) as response:
        answer = json.loads(response.read())
    return answer["data"]["launchPipelineExecution"]["__typename"]


@contextmanager
def _browser(doors: Doors, login: Login | None) -> Iterator[Any]:
    """A headless Chromium that accepts this test's certificate only (by its key's hash), with
    `login` for the doors' basic auth; yields a page."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={doors.spki}"],
        )
        credentials = {"username": login.user, "password": login.password} if login else None
        context = browser.new_context(
            http_credentials=credentials,
            viewport={"width": 1500, "height": 1000},
        )
        try:
            yield context.new_page()
        finally:
            browser.close()


def _open_asset_page(page: Any, base: str, screenshot: Path) -> list[str]:
    """Open filtered_posts' page; the URLs of the websockets it opened that got frames. The
    page is saved in `screenshot` if it does not show the Materialize button in time."""
    sockets: list[str] = []

    def on_websocket(socket: Any) -> None:
        socket.on("framereceived", lambda _frame: sockets.append(socket.url))

    page.on("websocket", on_websocket)
    response = page.goto(f"{base}/assets/filtered_posts", timeout=60_000)
    assert response is not None and response.status == 200
    try:
        page.get_by_role("button", name="Materialize").first.wait_for(timeout=120_000)
    except sync_api.TimeoutError:
        page.screenshot(path=str(screenshot))  # what the page showed instead
        raise
    # The first-visit newsletter dialog opens a moment after the page.
    with suppress(sync_api.TimeoutError):
        page.get_by_role("button", name="Skip").click(timeout=5_000)
    wait_for(lambda: sockets, "a websocket frame", timeout=30)
    return sockets


def test_every_door_needs_its_login(doors: Doors) -> None:
    query = b'{"query": "{ version }"}'
    for base, login, stranger in (
        (doors.full, doors.operator, doors.viewer),
        (doors.read_only, doors.viewer, doors.operator),
    ):
        for path in ("/", "/assets/filtered_posts", "/graphql", "/server_info"):
            assert _status(doors, base + path) == 401, base + path
            assert _status(doors, base + path, stranger) == 401, base + path
        assert _status(doors, base + "/graphql", data=query) == 401
        assert _websocket_handshake(doors, base, None).startswith("401")

        url = f"{base}/assets/filtered_posts"
        with _browser(doors, None) as page:
            statuses: list[tuple[str, int]] = []
            page.on(
                "response", lambda answer, seen=statuses: seen.append((answer.url, answer.status))
            )
            # Headless Chromium has no one to ask for a login: it abandons the navigation.
            with pytest.raises(sync_api.Error, match="ERR_INVALID_AUTH_CREDENTIALS"):
                page.goto(url, timeout=60_000)
        assert statuses == [(url, 401)]

        assert _status(doors, base + "/server_info", login) == 200
        assert _status(doors, base + "/graphql", login, data=query) == 200
        assert _websocket_handshake(doors, base, login) == "101 Switching Protocols"


def test_an_operator_can_launch_a_run_and_a_viewer_cannot(doors: Doors, tmp_path: Path) -> None:
    with _browser(doors, doors.viewer) as page:
        viewer_sockets = _open_asset_page(page, doors.read_only, tmp_path / "viewer.png")
        viewer_button_disabled = page.get_by_role("button", name="Materialize").first.is_disabled()
        page.screenshot(path=str(tmp_path / "viewer.png"))
    # Not only the button: the read-only webserver refuses the mutation itself.
    viewer_launch = _graphql_launch(doors, doors.read_only, doors.viewer)
    with dg.DagsterInstance.get() as instance:
        runs_after_viewer = len(instance.get_runs())

    with _browser(doors, doors.operator) as page:
        operator_sockets = _open_asset_page(page, doors.full, tmp_path / "operator.png")
        page.get_by_role("button", name="Materialize").first.click()
        # The UI asks first, since source_posts_batch was never materialized.
        page.get_by_role("button", name="Confirm").click(timeout=30_000)
        with dg.DagsterInstance.get() as instance:
            # No daemon runs in this test: the launched run waits in Dagster's run queue.
            queued = dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED])
            wait_for(lambda: instance.get_runs(queued), "the launched run, queued", timeout=60)
            (run,) = instance.get_runs()
        page.screenshot(path=str(tmp_path / "operator.png"))

    assert viewer_sockets and set(viewer_sockets) == {_socket_url(doors.read_only)}
    assert viewer_button_disabled
    assert viewer_launch == "UnauthorizedError"
    assert runs_after_viewer == 0
    assert operator_sockets and set(operator_sockets) == {_socket_url(doors.full)}
    assert run.status == dg.DagsterRunStatus.QUEUED
    assert "filtered_posts" in {key.path[-1] for key in run.asset_selection or ()}


def _socket_url(base: str) -> str:
    return base.replace("https://", "wss://") + "/graphql"
