"""Alerts sent by the Dagster daemon: a failed run, a failed check, a stalled pipeline, recovery.

Two run-status sensors watch every finished run of the pipeline's jobs, each named for what it
sends: `so_pipeline_failure_alerts` a failed run (FAILED, and the checks that failed in it),
`so_pipeline_check_and_recovery_alerts` what a successful run shows (CHECK FAILED, FALLING
BEHIND, RECOVERED). Each tells the channels of alert_channels.py about the run and about the checks
evaluated in it, once per incident: the first failure opens it, later failures are quiet, the
first success after it closes it with "recovered".

Whether an incident is open is read from Dagster's own history (the previous finished run of
the job, the previous evaluation of the check), not kept in the sensors' cursors: a run-status
sensor's cursor belongs to Dagster (it marks the last run status seen), and history is one
truth for both sensors, which the daemon may evaluate at the same time.
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import dagster as dg
from dagster_shared.error import SerializableErrorInfo

from so_pipeline.alert_channels import (
    SMTP_URL_VAR,
    WEBHOOK_URL_VAR,
    channels_from_env,
    deliver,
    redact_credentials,
)
from so_pipeline.database_url import InvalidDatabaseURL, parse_url, scrub
from so_pipeline.names import (
    BACKLOG_WITHIN_LIMITS,
    LAST_RESULT_OF,
    POSTS_JOB,
    RECONCILIATION_JOB,
    SENSOR_INTERVAL_SECONDS,
)

UI_BASE_URL_VAR = "SO_ALERT_UI_BASE_URL"
PREFIX = "[so_pipeline]"
# The UI's Materialize button launches __ASSET_JOB; other code locations' jobs are not ours.
WATCHED_JOBS = frozenset({POSTS_JOB, RECONCILIATION_JOB, "__ASSET_JOB"})
# Database URLs whose passwords are scrubbed from any text an alert quotes.
_DATABASE_URL_VARS = ("SO_SOURCE_DATABASE_URL", "SO_ANALYTICAL_DATABASE_URL", "DAGSTER_PG_URL")
_MAX_ERROR_CHARS = 300
# Enough history to find the previous evaluation behind the runs finished since this one.
_CHECK_HISTORY = 50
NO_CHANNEL = (
    f"No alert channel is configured (set {WEBHOOK_URL_VAR}, or {SMTP_URL_VAR} with "
    "SO_ALERT_EMAIL_TO): nothing sent."
)


class Transition(StrEnum):
    OPENED = "opened"
    RECOVERED = "recovered"


def transition(was_failing: bool, is_failing: bool) -> Transition | None:
    """One message when an incident opens and one when it closes, however many failures between.

    A flapping connection pages once, not at every 15-minute tick.
    """
    if is_failing and not was_failing:
        return Transition.OPENED
    if was_failing and not is_failing:
        return Transition.RECOVERED
    return None


@dataclass(frozen=True)
class Alert:
    """One message: its first line doubles as the e-mail subject."""

    subject: str
    lines: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return "\n".join((self.subject, *self.lines))


def run_link(run_id: str, env: Mapping[str, str]) -> tuple[str, ...]:
    base = env.get(UI_BASE_URL_VAR, "").strip().rstrip("/")
    return (f"{base}/runs/{run_id}",) if base else ()


def run_failed_alert(
    job: str, run_id: str, step: str | None, error: str, env: Mapping[str, str]
) -> Alert:
    where = f"Step {step}: " if step else ""
    return Alert(
        f"{PREFIX} FAILED: {job}",
        (
            f"Run {run_id} failed.",
            f"{where}{error}",
            *run_link(run_id, env),
            "Further failures of this job are not reported until it succeeds again.",
        ),
    )


def run_recovered_alert(job: str, run_id: str, failed_run_id: str, env: Mapping[str, str]) -> Alert:
    return Alert(
        f"{PREFIX} RECOVERED: {job}",
        (f"Run {run_id} succeeded after run {failed_run_id} failed.", *run_link(run_id, env)),
    )


def check_alert(
    evaluation: dg.AssetCheckEvaluation,
    change: Transition,
    job: str,
    run_id: str,
    env: Mapping[str, str],
) -> Alert:
    check = f"{evaluation.check_name} on {evaluation.asset_key.to_user_string()}"
    if change is Transition.RECOVERED:
        now = "passes again" if evaluation.passed else "now fails with WARN only"
        return Alert(
            f"{PREFIX} RECOVERED: check {check}",
            (f"Run {run_id} of {job}: the check {now}.", *run_link(run_id, env)),
        )
    if evaluation.check_name == BACKLOG_WITHIN_LIMITS.name:
        subject = f"{PREFIX} FALLING BEHIND: check {check} failed (ERROR)"
    else:
        subject = f"{PREFIX} CHECK FAILED: {check} (ERROR)"
    return Alert(
        subject,
        (
            f"In run {run_id} of {job}.",
            *_check_detail(evaluation, env),
            *run_link(run_id, env),
            "Further failures of this check are not reported until it passes again.",
        ),
    )


def _check_detail(evaluation: dg.AssetCheckEvaluation, env: Mapping[str, str]) -> list[str]:
    # Counts and ids only: metadata may hold previews of post content, so none is quoted but
    # the backlog's size.
    detail = []
    if evaluation.description:
        detail.append(one_line(evaluation.description, env))
    behind = evaluation.metadata.get("ids_behind_source")
    if behind is not None and isinstance(behind.value, int):
        detail.append(f"The cursor is {behind.value:,} ids behind the source.")
    return detail


def one_line(text: str, env: Mapping[str, str]) -> str:
    """The first line of `text`, short, with every password the environment knows scrubbed."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    for secret in _known_passwords(env):
        line = scrub(line, secret)
    line = redact_credentials(line)
    return line if len(line) <= _MAX_ERROR_CHARS else line[: _MAX_ERROR_CHARS - 1] + "…"


def _known_passwords(env: Mapping[str, str]) -> list[str]:
    passwords = []
    for name in _DATABASE_URL_VARS:
        try:
            url = parse_url(env.get(name, ""), name) if env.get(name) else None
        except InvalidDatabaseURL:
            continue
        if url is not None and url.password:
            passwords.append(str(url.password))
    return passwords


def error_line(error: SerializableErrorInfo | None) -> str:
    """What went wrong, in the words of the innermost error.

    Dagster's outer errors say how it failed ("Exceeded max_retries of 3"), the root cause
    says what failed ("analytical_db: cannot use PostgreSQL at ...").
    """
    if error is None:
        return "unknown error"
    while error.cause is not None:
        error = error.cause
    message = error.message.strip()
    # "so_pipeline.resources.DatabaseUnavailableError: analytical_db: ..." -> "analytical_db: ..."
    head, separator, rest = message.partition(": ")
    if separator and head.rsplit(".", 1)[-1] == error.cls_name:
        message = rest
    return message or error.cls_name or "unknown error"


def failed_step(
    failure_event: dg.DagsterEvent, step_failures: Sequence[dg.DagsterEvent]
) -> tuple[str | None, str]:
    """The first failed step and its error; a run that failed outside any step, its own error."""
    for event in step_failures:
        data = event.step_failure_data
        user_failure = data.user_failure_data
        if user_failure is not None and user_failure.description:
            return event.step_key, user_failure.description
        return event.step_key, error_line(data.error)
    if failure_event.event_type == dg.DagsterEventType.RUN_FAILURE:
        run_error = failure_event.job_failure_data.error
        if run_error is not None:
            return None, error_line(run_error)
    return None, failure_event.message or "the run failed"


def _previous_run_failed(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str | None:
    """The id of the job's previous finished run if it failed (an incident is open), else None."""
    previous = instance.get_run_records(
        dg.RunsFilter(
            job_name=run.job_name,
            statuses=[dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE],
        ),
        limit=1,
        cursor=run.run_id,  # runs created before this one, newest first
    )
    if previous and previous[0].dagster_run.status == dg.DagsterRunStatus.FAILURE:
        return previous[0].dagster_run.run_id
    return None


def _is_error(evaluation: dg.AssetCheckEvaluation) -> bool:
    return not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR


def _previous_check_was_error(
    instance: dg.DagsterInstance, key: dg.AssetCheckKey, run_id: str
) -> bool:
    """Whether the evaluation of `key` before the one in `run_id` failed with ERROR."""
    history = instance.event_log_storage.get_asset_check_execution_history(key, _CHECK_HISTORY)
    after_current = False
    for record in history:  # newest first
        if record.run_id == run_id:
            after_current = True
            continue
        event = record.event.dagster_event if record.event else None
        if (
            after_current
            and event
            and event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ):
            return _is_error(event.asset_check_evaluation_data)
    return False


def run_alerts(
    context: dg.RunStatusSensorContext, env: Mapping[str, str], failed: bool
) -> list[Alert]:
    """The messages this finished run calls for: its job's incident, then its checks'."""
    run = context.dagster_run
    instance = context.instance
    alerts = []
    previous_failure = _previous_run_failed(instance, run)
    change = transition(previous_failure is not None, failed)
    if change is Transition.OPENED:
        step, error = failed_step(
            context.dagster_event, context.for_run_failure().get_step_failure_events()
        )
        alerts.append(run_failed_alert(run.job_name, run.run_id, step, one_line(error, env), env))
    elif change is Transition.RECOVERED and previous_failure:
        alerts.append(run_recovered_alert(run.job_name, run.run_id, previous_failure, env))
    for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        if entry.dagster_event is None:
            continue
        evaluation = entry.dagster_event.asset_check_evaluation_data
        if evaluation.asset_check_key in LAST_RESULT_OF:
            continue  # a repeat of a daily check's result, alerted on when that check ran
        was_error = _previous_check_was_error(instance, evaluation.asset_check_key, run.run_id)
        check_change = transition(was_error, _is_error(evaluation))
        if check_change is not None:
            alerts.append(check_alert(evaluation, check_change, run.job_name, run.run_id, env))
    return alerts


def _evaluate(context: dg.RunStatusSensorContext, failed: bool) -> dg.SkipReason | None:
    """Send what the run calls for to every channel; a dead channel is logged, never raised.

    The environment is read here, at each evaluation, so configuring a channel needs no
    redeploy of the definitions (only of the daemon's environment).
    """
    if context.dagster_run.job_name not in WATCHED_JOBS:
        return None
    env = dict(os.environ)
    settings = channels_from_env(env)
    for problem in settings.problems:
        context.log.warning(problem)
    if not settings.channels:
        return dg.SkipReason(NO_CHANNEL)
    for alert in run_alerts(context, env, failed):
        for channel in settings.channels:
            delivery = deliver(channel, alert.subject, alert.text, context.log)
            if delivery.ok:
                context.log.info("Alert '%s': %s", alert.subject, delivery.describe())
    return None


_DESCRIPTION = (
    "Tells the on-call (webhook, e-mail) about {what}, once per incident. Sends nothing "
    f"unless {WEBHOOK_URL_VAR} or {SMTP_URL_VAR} is set in the daemon's environment."
)


# Every code location is watched because runs made outside the daemon (`dagster job execute`,
# in-process runs) carry no code location; WATCHED_JOBS narrows it to the pipeline's jobs.
@dg.run_failure_sensor(
    name="so_pipeline_failure_alerts",
    monitor_all_code_locations=True,
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=_DESCRIPTION.format(what="a failed run and the checks that failed in it"),
)
def failure_alerts(context: dg.RunFailureSensorContext) -> dg.SkipReason | None:
    return _evaluate(context, failed=True)


@dg.run_status_sensor(
    name="so_pipeline_check_and_recovery_alerts",
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitor_all_code_locations=True,
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=_DESCRIPTION.format(
        what="a job or check that recovered, a failed check or a pipeline falling behind"
    ),
)
def check_and_recovery_alerts(context: dg.RunStatusSensorContext) -> dg.SkipReason | None:
    return _evaluate(context, failed=False)
