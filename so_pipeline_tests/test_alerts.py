"""Alerts: the incident state machine, messages, channels, `alert-test`, and the real daemon.

The pure tests and the channel tests (a local HTTP server stands in for the webhook, aiosmtpd
for the mail relay) take milliseconds. The daemon test (marked integration) runs
`dagster-daemon` against a test DAGSTER_HOME and makes runs fail and succeed against it.
"""

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
import pytest
from dagster_shared.error import SerializableErrorInfo

from so_pipeline import alert_channels
from so_pipeline.alert_channels import (
    Delivery,
    EmailChannel,
    channels_from_env,
    deliver,
)
from so_pipeline.alerts import (
    Transition,
    check_alert,
    error_line,
    one_line,
    run_failed_alert,
    run_recovered_alert,
    transition,
)
from so_pipeline.tooling import cli
from so_pipeline.tooling.runs import execute_job
from so_pipeline.window_checks import BacklogLimits, check_backlog
from so_pipeline_tests.helpers import (
    BIN,
    PipelineDatabases,
    Post,
    background,
    free_port,
    stop_schedule,
    wait_for,
)

if TYPE_CHECKING:
    from aiosmtpd.smtp import AuthResult  # the 'dev' extra: imported where the relay starts

PASSWORD_MARKER = "pw-MARKER-a1e7"
SMTP_USER = "alerts"
SMTP_PASSWORD = "smtp-MARKER-9c2d"
WEBHOOK_TOKEN = "T000-hook-MARKER-4f1b"
UI_BASE_URL = "http://dagster.example:3000"


# --- local receivers ----------------------------------------------------------------------------


@dataclass
class WebhookReceiver:
    """What a Slack-compatible webhook on loopback was sent; answers `status`."""

    url: str
    status: int = 200
    texts: list[str] = field(default_factory=list)
    attempts: int = 0


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            receiver.attempts += 1
            if receiver.status == 200:
                receiver.texts.append(json.loads(body)["text"])
            self.send_response(receiver.status)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_port}/hooks/{WEBHOOK_TOKEN}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()


@dataclass
class MailReceiver:
    """An SMTP relay on loopback taking SMTP_USER's login; refuses every recipient if asked."""

    port: int
    refuse: bool = False
    mails: list[Any] = field(default_factory=list)
    refusals: int = 0

    @property
    def url(self) -> str:
        return f"smtp://{SMTP_USER}:{SMTP_PASSWORD}@127.0.0.1:{self.port}"

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.refuse:
            self.refusals += 1
            return "550 5.7.1 sender refused"
        envelope.mail_from = address
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append(message_from_bytes(envelope.content, policy=policy.default))
        return "250 OK"


def _authenticate(
    server: Any, session: Any, envelope: Any, mechanism: str, data: Any
) -> "AuthResult":
    from aiosmtpd.smtp import AuthResult, LoginPassword

    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
        SMTP_USER.encode(),
        SMTP_PASSWORD.encode(),
    )
    return AuthResult(success=ok)


@pytest.fixture
def mail() -> Iterator[MailReceiver]:
    pytest.importorskip("aiosmtpd", reason="the stand-in mail relay needs the 'dev' extra")
    from aiosmtpd.controller import Controller

    receiver = MailReceiver(port=free_port())
    controller = Controller(
        receiver,
        hostname="127.0.0.1",
        port=receiver.port,
        authenticator=_authenticate,
        auth_require_tls=False,
    )
    controller.start()
    yield receiver
    controller.stop()


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries without the waits between them (their number is what the tests count)."""
    monkeypatch.setattr(alert_channels, "BACKOFF_SECONDS", (0.0, 0.0))


def _alert_env(webhook: WebhookReceiver, mail: MailReceiver) -> dict[str, str]:
    return {
        "SO_ALERT_WEBHOOK_URL": webhook.url,
        "SO_ALERT_SMTP_URL": mail.url,
        "SO_ALERT_EMAIL_TO": "oncall@example.com, data@example.com",
        "SO_ALERT_EMAIL_FROM": "so-pipeline@example.com",
        "SO_ALERT_UI_BASE_URL": UI_BASE_URL,
    }


# --- pure: the incident state machine, messages, configuration ----------------------------------


@pytest.mark.parametrize(
    ("was_failing", "is_failing", "expected"),
    [
        (False, True, Transition.OPENED),
        (True, True, None),  # the same incident: nothing new
        (True, False, Transition.RECOVERED),
        (False, False, None),
    ],
)
def test_one_message_opens_an_incident_and_one_closes_it(
    was_failing: bool, is_failing: bool, expected: Transition | None
) -> None:
    assert transition(was_failing, is_failing) == expected


def test_a_failure_message_names_job_run_step_error_and_links_the_run() -> None:
    env = {"SO_ALERT_UI_BASE_URL": UI_BASE_URL + "/"}
    alert = run_failed_alert("stackoverflow_posts_job", "abc-123", "filtered_posts", "boom", env)

    assert alert.text.splitlines() == [
        "[so_pipeline] FAILED: stackoverflow_posts_job",
        "Run abc-123 failed.",
        "Step filtered_posts: boom",
        f"{UI_BASE_URL}/runs/abc-123",
        "Further failures of this job are not reported until it succeeds again.",
    ]
    recovered = run_recovered_alert("stackoverflow_posts_job", "def-456", "abc-123", {})
    assert recovered.subject == "[so_pipeline] RECOVERED: stackoverflow_posts_job"
    assert "/runs/" not in recovered.text  # no base URL, no link


def test_a_backlog_over_the_fail_limit_is_reported_as_falling_behind() -> None:
    def evaluation(ids_behind: int) -> dg.AssetCheckEvaluation:
        backlog = check_backlog(ids_behind, BacklogLimits())
        return dg.AssetCheckEvaluation(
            asset_key=dg.AssetKey("filtered_posts"),
            check_name=backlog.check_name or "",
            passed=backlog.passed,
            severity=backlog.severity,
            metadata=backlog.metadata,
        )

    alert = check_alert(
        evaluation(12_345_678), Transition.OPENED, "stackoverflow_posts_job", "r1", {}
    )

    assert alert.text.splitlines()[:3] == [
        "[so_pipeline] FALLING BEHIND: check backlog_within_limits on filtered_posts failed "
        "(ERROR)",
        "In run r1 of stackoverflow_posts_job.",
        "The cursor is 12,345,678 ids behind the source.",
    ]
    warned = evaluation(2_000_000)  # over the warn limit only
    recovered = check_alert(warned, Transition.RECOVERED, "stackoverflow_posts_job", "r2", {})
    assert recovered.text.splitlines()[:2] == [
        "[so_pipeline] RECOVERED: check backlog_within_limits on filtered_posts",
        "Run r2 of stackoverflow_posts_job: the check now fails with WARN only.",
    ]


def test_the_error_line_is_the_root_cause_without_its_class_path() -> None:
    cause = SerializableErrorInfo(
        "so_pipeline.resources.DatabaseUnavailableError: analytical_db: cannot use PostgreSQL "
        "at 127.0.0.1:1/so: connection refused\n",
        [],
        "DatabaseUnavailableError",
    )
    wrapper = SerializableErrorInfo("Exceeded max_retries of 3\n", [], "RetryRequested", cause)

    assert error_line(wrapper) == (
        "analytical_db: cannot use PostgreSQL at 127.0.0.1:1/so: connection refused"
    )
    assert error_line(None) == "unknown error"


def test_quoted_text_loses_every_password_and_all_but_its_first_line() -> None:
    env = {"SO_ANALYTICAL_DATABASE_URL": f"postgresql://u:{PASSWORD_MARKER}@db/so"}
    text = (
        f"login as u/{PASSWORD_MARKER} refused by smtp://a:{SMTP_PASSWORD}@relay:25 " * 20
        + "\nsecond line"
    )

    line = one_line(text, env)

    assert PASSWORD_MARKER not in line
    assert SMTP_PASSWORD not in line
    assert "second line" not in line
    assert len(line) <= 300


def test_channels_are_off_unless_configured_and_bad_settings_are_named_without_secrets() -> None:
    assert channels_from_env({}).channels == ()

    settings = channels_from_env(
        {
            "SO_ALERT_WEBHOOK_URL": f"https://hooks.slack.com/services/{WEBHOOK_TOKEN}",
            "SO_ALERT_SMTP_URL": f"smtps://a%40b:{SMTP_PASSWORD}@relay.example",
            "SO_ALERT_EMAIL_TO": "x@example.com, ,y@example.com",
        }
    )
    webhook, email = settings.channels
    assert webhook.name == "webhook hooks.slack.com"
    assert isinstance(email, EmailChannel)
    assert (email.port, email.implicit_tls, email.username) == (465, True, "a@b")
    assert email.recipients == ("x@example.com", "y@example.com")

    broken = channels_from_env(
        {
            "SO_ALERT_WEBHOOK_URL": "hooks.slack.com/x",
            "SO_ALERT_SMTP_URL": f"smtp://a:{SMTP_PASSWORD}@relay:notaport",
            "SO_ALERT_EMAIL_TO": "x@example.com",
        }
    )
    assert broken.channels == ()
    assert len(broken.problems) == 2
    assert SMTP_PASSWORD not in " ".join(broken.problems)
    no_recipient = channels_from_env({"SO_ALERT_SMTP_URL": "smtp://relay:25"})
    assert no_recipient.problems == (
        "SO_ALERT_SMTP_URL is set but SO_ALERT_EMAIL_TO names no recipient; e-mail is off",
    )


@dataclass
class FlakyChannel:
    failures: int
    sent: list[str] = field(default_factory=list)
    name: str = "flaky"
    secrets: tuple[str, ...] = (SMTP_PASSWORD,)

    def send(self, subject: str, text: str) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError(f"refused for user:{SMTP_PASSWORD}")
        self.sent.append(text)


def test_a_failing_channel_is_retried_a_bounded_number_of_times_and_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    log = logging.getLogger("test_alerts")
    waits: list[float] = []

    assert deliver(FlakyChannel(failures=1), "s", "t", log, waits.append).attempts == 2
    failed = deliver(FlakyChannel(failures=5), "s", "t", log, waits.append)

    assert not failed.ok and failed.attempts == 3
    assert sum(waits[1:]) < 2  # three attempts of a dead channel wait 1.5 s in all
    assert SMTP_PASSWORD not in caplog.text + (failed.error or "")
    assert "refused for user:***" in caplog.text


# --- channels against local receivers ------------------------------------------------------------


def _send_to_both(webhook: WebhookReceiver, mail: MailReceiver) -> list[Delivery]:
    import logging

    settings = channels_from_env(_alert_env(webhook, mail))
    log = logging.getLogger("test_alerts")
    return [deliver(channel, "Subject", "Subject\nbody", log) for channel in settings.channels]


def test_both_channels_deliver_to_local_receivers(
    webhook: WebhookReceiver, mail: MailReceiver
) -> None:
    deliveries = _send_to_both(webhook, mail)

    assert [d.ok for d in deliveries] == [True, True]
    assert webhook.texts == ["Subject\nbody"]
    (message,) = mail.mails
    assert message["Subject"] == "Subject"
    assert message["To"] == "oncall@example.com, data@example.com"
    assert message.get_content().splitlines() == ["Subject", "body"]


def test_a_webhook_answering_500_and_a_refusing_relay_fail_after_three_attempts(
    webhook: WebhookReceiver,
    mail: MailReceiver,
    no_backoff: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    webhook.status, mail.refuse = 500, True

    deliveries = _send_to_both(webhook, mail)

    assert [(d.ok, d.attempts) for d in deliveries] == [(False, 3), (False, 3)]
    assert (webhook.attempts, mail.refusals) == (3, 3)
    assert "HTTP Error 500" in (deliveries[0].error or "")
    assert WEBHOOK_TOKEN not in caplog.text
    assert SMTP_PASSWORD not in caplog.text


def test_alert_test_reports_each_channel_and_exits_by_outcome(
    webhook: WebhookReceiver,
    mail: MailReceiver,
    no_backoff: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in _alert_env(webhook, mail):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["alert-test"]) == 2
    assert "no alert channel configured" in capsys.readouterr().err

    for name, value in _alert_env(webhook, mail).items():
        monkeypatch.setenv(name, value)
    assert cli.main(["alert-test"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "webhook 127.0.0.1: sent",
        f"e-mail via 127.0.0.1:{mail.port} to oncall@example.com, data@example.com: sent",
    ]
    assert "TEST" in webhook.texts[0] and "TEST" in mail.mails[0]["Subject"]

    webhook.status = 500
    assert cli.main(["alert-test"]) == 1
    captured = capsys.readouterr()
    assert "webhook 127.0.0.1: FAILED after 3 attempts: HTTPError: HTTP Error 500" in captured.out
    assert WEBHOOK_TOKEN not in captured.out + captured.err


# --- the real daemon ----------------------------------------------------------------------------

FAILURE_SENSOR = "so_pipeline_failure_alerts"
SUCCESS_SENSOR = "so_pipeline_check_and_recovery_alerts"


def _sensor_cursor(instance: dg.DagsterInstance, sensor: str) -> int | None:
    """The storage id of the last run status the sensor has seen (None: not started yet)."""
    for state in instance.all_instigator_state():
        cursor = getattr(state.instigator_data, "cursor", None)
        if state.instigator_name == sensor and cursor:
            return json.loads(cursor)["record_id"]
    return None


def _seen_by_sensor(instance: dg.DagsterInstance, sensor: str, run_id: str) -> bool:
    status = dg.DagsterEventType.RUN_FAILURE
    if sensor == SUCCESS_SENSOR:
        status = dg.DagsterEventType.RUN_SUCCESS
    (record,) = instance.get_records_for_run(run_id, of_type=status).records
    return (_sensor_cursor(instance, sensor) or -1) >= record.storage_id


@pytest.fixture
def daemon(
    dagster_home: Path,
    databases: PipelineDatabases,
    webhook: WebhookReceiver,
    mail: MailReceiver,
    tmp_path: Path,
) -> Iterator[Path]:
    """`dagster-daemon run` on the test's DAGSTER_HOME, its alerts going to the receivers.

    The 15-minute schedule is stopped first, so a quarter hour passing mid-test starts no run
    of its own. Yields the file holding the daemon's output.
    """
    env = {**os.environ, **_alert_env(webhook, mail)}
    stop_schedule(env)
    output = tmp_path / "daemon.log"
    with background([str(BIN / "dagster-daemon"), "run", "-m", "so_pipeline"], output, env):
        yield output


# One post per run and no backlog allowed: backlog_within_limits fails with ERROR.
BEHIND_CONFIG = {
    "ops": {
        "source_posts_batch": {"config": {"batch_size": 1}},
        "filtered_posts": {"config": {"warn_ids_behind": 0, "fail_ids_behind": 0}},
    }
}


@pytest.mark.integration
def test_the_daemon_alerts_once_per_incident_and_a_dead_channel_leaves_runs_green(
    daemon: Path,
    databases: PipelineDatabases,
    webhook: WebhookReceiver,
    mail: MailReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    databases.add_source_posts([Post(id=i) for i in (10, 20, 30)])
    with dg.DagsterInstance.get() as instance:
        # A run-status sensor only reports runs that finish after its first tick.
        wait_for(
            lambda: all(_sensor_cursor(instance, s) for s in (FAILURE_SENSOR, SUCCESS_SENSOR)),
            "the alert sensors' first tick",
        )

        # The analytical database unreachable: a closed port on loopback.
        unreachable = f"postgresql://so:{PASSWORD_MARKER}@127.0.0.1:{free_port()}/so"
        monkeypatch.setenv("SO_ANALYTICAL_DATABASE_URL", unreachable)
        first = execute_job(instance, {}, raise_on_error=False)
        assert not first.success
        wait_for(lambda: bool(webhook.texts and mail.mails), "the failure alert")

        second = execute_job(instance, {}, raise_on_error=False)
        monkeypatch.setenv("SO_ANALYTICAL_DATABASE_URL", databases.analytical_url)
        third = execute_job(instance, {}, raise_on_error=False)
        assert (second.success, third.success) == (False, True)
        wait_for(lambda: len(webhook.texts) >= 2 and len(mail.mails) >= 2, "'recovered'")
        wait_for(lambda: _seen_by_sensor(instance, FAILURE_SENSOR, second.run_id), "run 2")

        # The pipeline falls behind: one post per run, with a backlog limit of 0 ids.
        databases.add_source_posts([Post(id=i) for i in (40, 50, 60)])
        behind = execute_job(instance, BEHIND_CONFIG, raise_on_error=False)
        assert behind.success
        wait_for(lambda: len(webhook.texts) >= 3 and len(mail.mails) >= 3, "the check alert")

        # The webhook answers 500, the relay refuses: the next alert (the check recovered)
        # fails on both, and the runs stay green.
        webhook.status, mail.refuse = 500, True
        fixed = execute_job(instance, {}, raise_on_error=False)
        assert fixed.success
        wait_for(lambda: webhook.attempts >= 6 and mail.refusals >= 3, "three attempts each")
        wait_for(lambda: _seen_by_sensor(instance, SUCCESS_SENSOR, fixed.run_id), "the run")
        after = execute_job(instance, {}, raise_on_error=False)
        assert after.success

    failed, recovered, check = webhook.texts
    port = unreachable.rsplit(":", 1)[1].split("/")[0]
    lines = failed.splitlines()
    assert lines[:2] == [
        "[so_pipeline] FAILED: stackoverflow_posts_job",
        f"Run {first.run_id} failed.",
    ]
    assert lines[2].startswith(
        f"Step source_posts_batch: analytical_db: cannot use PostgreSQL at 127.0.0.1:{port}/so: "
    )
    assert lines[3] == f"{UI_BASE_URL}/runs/{first.run_id}"
    assert recovered.splitlines()[:2] == [
        "[so_pipeline] RECOVERED: stackoverflow_posts_job",
        f"Run {third.run_id} succeeded after run {second.run_id} failed.",
    ]
    assert check.startswith(
        "[so_pipeline] FALLING BEHIND: check backlog_within_limits on filtered_posts failed"
    )
    assert [m["Subject"].strip() for m in mail.mails] == [t.splitlines()[0] for t in webhook.texts]
    everything = "\n".join(webhook.texts + [m.as_string() for m in mail.mails])
    everything += daemon.read_text(errors="replace")
    for secret in (PASSWORD_MARKER, SMTP_PASSWORD, WEBHOOK_TOKEN, "a body"):
        assert secret not in everything
