"""The trigger runner: customers whose behavior changed → conditions → decisions.

:meth:`TriggerRunner.step` does, in a loop:

1. reads the customers the event processor changed since the last step (the
   tile store's change feed, :meth:`~propensity.features.online.tiles.SqliteTileStore.dirty`,
   written in the same transaction as the events, so none is missed);
2. scores them as ``/score`` does (the same scorer: online features, the
   streaming tiles at the current clock, the champions), then per trigger:
   an immediate one fires where its conditions hold; a delayed one arms (or
   moves) the customer's timer to ``delay_minutes`` after now; every segment
   takes in the customers that satisfy it and lets go of those that stopped;
3. takes the timers that fell due and fires their triggers where the
   conditions still hold at that clock;
4. writes the fired decisions to the event lake as ``campaign_exposure``
   events (the outbox of :class:`~propensity.activation.state.ActivationState`),
   so the next feature build counts them as contacts and measurement finds them.
   They do not mark their customers changed: a decision is not behavior to
   evaluate again (it would fire "any recent event" triggers on itself), and
   until that build the arbitration counts the runner's own contacts live.

A firing takes the next-best-action through the same arbitration kernel as
``/score`` (eligibility, contact policy with this runner's own recent
decisions counted in, the catalog's hold-out), limited to the trigger's
actions; the trigger's own hold-out share receives nothing and is logged. The
change feed is cleaned and a timer removed only after its decisions are
recorded: a runner killed anywhere evaluates them again, and the fired marks
make the repeat harmless.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from propensity.features.online import tile_store
from propensity.models.arbitration import NO_ACTION, in_holdout
from propensity.serving.scorer import NBA

from .spec import NO_TRIGGER_ACTION, Trigger, TriggerFile, load_triggers
from .state import MARKER_FILE, ActivationState, Decision

if TYPE_CHECKING:
    from propensity.config import Settings
    from propensity.serving.scorer import ScoredBatch, Scorer

__all__ = ["RunnerStats", "TriggerRunner", "load_project_triggers", "run_triggers"]

_log = logging.getLogger(__name__)
#: Timers of a segment's membership lapse are named so (trigger names cannot start so).
_SEGMENT_TIMER = "segment:"
#: Customers (or timers) handled per step.
_BATCH = 500
#: Longest wait between retries while Redis or a store is down.
_MAX_BACKOFF = 5.0
#: Pause when a step found nothing to do.
_IDLE_SECONDS = 0.05


@dataclass
class RunnerStats:
    """Counts of a runner's life."""

    evaluated: int = 0
    timers_due: int = 0
    fired: int = 0
    delivered: int = 0
    held_out: int = 0
    repeats: int = 0
    exposures: int = 0
    retries: int = 0

    def line(self) -> str:
        """One log line."""
        return (
            f"{self.evaluated:,} evaluated, {self.timers_due:,} timers due, {self.fired:,} fired "
            f"({self.delivered:,} delivered, {self.held_out:,} held out), "
            f"{self.repeats:,} repeats skipped, {self.exposures:,} exposures to the lake, "
            f"{self.retries:,} retries"
        )


class TriggerRunner:
    """Evaluate a project's triggers and segments on live behavior.

    Parameters
    ----------
    settings : Settings
    triggers : TriggerFile, optional
        Default: ``activation.triggers_file``, checked against the project's
        features, scores and action catalog.
    scorer : callable, optional
        Returns the current :class:`~propensity.serving.scorer.Scorer`
        (default: a :class:`~propensity.serving.runtime.Runtime` of the
        project's champions, reloaded as they change).
    clock : callable, optional
        Now, as an aware datetime (tests move it).

    Examples
    --------
    >>> runner = TriggerRunner(load_settings())  # doctest: +SKIP
    >>> runner.step()  # doctest: +SKIP
    12
    """

    def __init__(
        self,
        settings: Settings,
        *,
        triggers: TriggerFile | None = None,
        scorer: Callable[[], Scorer | None] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        from propensity.streaming.processor import EventProcessor

        self.settings = settings
        self.spec = triggers if triggers is not None else load_project_triggers(settings)
        jobs = settings.path(settings.jobs_dir)
        jobs.mkdir(parents=True, exist_ok=True)
        (jobs / MARKER_FILE).write_text(json.dumps({"prefix": settings.activation.prefix}) + "\n")
        self.tiles = tile_store(settings)
        config = settings.activation
        self.state = ActivationState(settings.activation_url, config.prefix, config.outbound_key)
        self.processor = EventProcessor(settings, source="triggers")
        self.clock = clock or (lambda: datetime.now(UTC))
        self.stats = RunnerStats()
        self.stopping = threading.Event()
        self._noted: set[str] = set()
        self._runtime: Any = None
        if scorer is None:
            from propensity.serving.runtime import Runtime

            self._runtime = Runtime(settings).start()
            scorer = lambda: self._runtime.scorer  # noqa: E731
        self._scorer = scorer
        self._crossing_scores = sorted(
            {score for t in self.spec.triggers.values() for score in t.crossing_scores}
        )

    # -- the loop --------------------------------------------------------------

    def step(self) -> int:
        """One pass: changed customers, due timers, the exposure outbox; return the work done."""
        scorer = self._scorer()
        if scorer is None:
            self._note("no_champions", "triggers: waiting for the champions to load")
            return 0  # changes and timers wait where they are
        now = self.clock()
        marks = self.tiles.dirty(_BATCH)
        if marks:
            self._on_change(scorer, [c for c, _ in marks], now)
            self.tiles.clean(marks)
        due = self.state.due(int(now.timestamp() * 1000), _BATCH)
        if due:
            by_trigger: dict[str, list[str]] = defaultdict(list)
            for name, customer, _ in due:
                by_trigger[name].append(customer)
            for name, customers in by_trigger.items():
                if name.startswith(_SEGMENT_TIMER):
                    self._on_segment_timer(
                        scorer, name.removeprefix(_SEGMENT_TIMER), customers, now
                    )
                    continue
                spec = self.spec.triggers.get(name)
                if spec is not None:  # a trigger since removed from the file: drop its timers
                    self._on_timer(scorer, name, spec, customers, now)
            self.state.disarm(due)
            self.stats.timers_due += len(due)
        written = self.drain_exposures()
        return len(marks) + len(due) + written

    def run(self, *, stop_when_idle: bool = False, log_seconds: float = 10.0) -> RunnerStats:
        """Step until :meth:`stop` (or, with ``stop_when_idle``, a step finds nothing)."""
        from propensity.jobs.stream import retryable_errors

        next_log = time.monotonic() + log_seconds
        backoff = 0.0
        while not self.stopping.is_set():
            try:
                if not self.step():
                    if stop_when_idle:
                        break
                    self.stopping.wait(_IDLE_SECONDS)
                backoff = 0.0
            except retryable_errors() as exc:
                # Redis restarting, a store down: the changes and timers stay where they are.
                self.stats.retries += 1
                backoff = min(max(backoff * 2, 0.1), _MAX_BACKOFF)
                _log.warning("triggers: %s; retrying in %.1f s", exc, backoff)
                self.stopping.wait(backoff)
            if time.monotonic() >= next_log:
                _log.info("triggers: %s", self.stats.line())
                next_log = time.monotonic() + log_seconds
        try:
            self.drain_exposures()
        except retryable_errors() as exc:  # the outbox keeps them for the next run
            _log.warning("triggers: exposures left in the outbox (%s)", exc)
        return self.stats

    def _note(self, what: str, message: str) -> None:
        if what not in self._noted:  # once per runner: the condition lasts
            self._noted.add(what)
            _log.warning(message)

    def stop(self) -> None:
        """Stop after the step in hand."""
        self.stopping.set()

    def close(self) -> None:
        """Stop reloading models and flush the exposures to the lake."""
        if self._runtime is not None:
            self._runtime.close()
        self.processor.close()

    # -- evaluation ------------------------------------------------------------

    def _columns(self, scorer: Scorer, scored: ScoredBatch) -> dict[str, np.ndarray]:
        names = scorer.reader.feature_names
        columns = {name: scored.matrix[:, j] for j, name in enumerate(names)}
        for model, field in scorer.fields:
            if model in scored.scores:
                columns[field] = scored.scores[model]
        return columns

    def _score(self, scorer: Scorer, customers: list[str]) -> tuple[ScoredBatch, list[str]]:
        """Scores and features of the customers, and the ids the online store knows."""
        # The scorer's own next-best-action is not needed: a firing decides with the
        # trigger's actions and this runner's live contacts (:meth:`_decide`).
        scored = scorer.score_columns(customers, reasons=False, decide=False)
        return scored, [customers[i] for i in scored.rows.tolist()]

    def _previous(self, ids: list[str]) -> dict[str, np.ndarray]:
        return {score: self.state.previous(score, ids) for score in self._crossing_scores}

    def _on_change(self, scorer: Scorer, customers: list[str], now: datetime) -> None:
        scored, ids = self._score(scorer, customers)
        if not ids:
            return
        self.stats.evaluated += len(ids)
        columns = self._columns(scorer, scored)
        previous = self._previous(ids)
        due_ms = int(now.timestamp() * 1000)
        for name, trigger in self.spec.triggers.items():
            if trigger.delay_us > 0:
                # Armed on every change and checked when due: the delay runs from the
                # customer's latest event, so a new event moves the timer.
                self.state.arm(name, ids, due_ms + trigger.delay_us // 1000)
                continue
            hits = np.flatnonzero(trigger.holds(columns, previous))
            if hits.size:
                self._fire(scorer, name, trigger, scored, ids, hits, now)
        self._update_segments(ids, columns, now, list(self.spec.segments))
        for score in self._crossing_scores:
            if score in columns:
                self.state.remember(score, ids, columns[score])

    def _update_segments(
        self, ids: list[str], columns: dict[str, np.ndarray], now: datetime, names: list[str]
    ) -> None:
        """Members in while their conditions hold (segments without any: left to their ttl)."""
        membership = {}
        for name in names:
            segment = self.spec.segments[name]
            if not segment.when:
                continue  # filled by triggers only: members leave when their ttl lapses
            inside = segment.holds(columns).tolist()
            entering = [c for c, k in zip(ids, inside, strict=True) if k]
            membership[name] = (entering, [c for c, k in zip(ids, inside, strict=True) if not k])
            self._arm_lapse(name, entering, now)
        if membership:
            self.state.update_segments(membership)

    def _arm_lapse(self, segment: str, members: list[str], now: datetime) -> None:
        # Windowed conditions change with no event: a member is checked again ttl_hours
        # after it entered or was confirmed, and leaves unless the conditions still hold.
        ttl = self.spec.segments[segment].ttl_hours
        if ttl is not None and members:
            due_ms = int(now.timestamp() * 1000 + ttl * 3_600_000)
            self.state.arm(_SEGMENT_TIMER + segment, members, due_ms)

    def _on_segment_timer(
        self, scorer: Scorer, name: str, customers: list[str], now: datetime
    ) -> None:
        segment = self.spec.segments.get(name)
        if segment is None:
            return
        if not segment.when:
            self.state.update_segments({name: ([], customers)})
            return
        scored, ids = self._score(scorer, customers)
        gone = sorted(set(customers) - set(ids))
        if gone:
            self.state.update_segments({name: ([], gone)})
        if ids:
            self._update_segments(ids, self._columns(scorer, scored), now, [name])

    def _on_timer(
        self, scorer: Scorer, name: str, trigger: Trigger, customers: list[str], now: datetime
    ) -> None:
        scored, ids = self._score(scorer, customers)
        if not ids:
            return
        columns = self._columns(scorer, scored)
        hits = np.flatnonzero(trigger.still_holds(columns))
        if hits.size:
            self._fire(scorer, name, trigger, scored, ids, hits, now)

    # -- firing ----------------------------------------------------------------

    def _fire(
        self,
        scorer: Scorer,
        name: str,
        trigger: Trigger,
        scored: ScoredBatch,
        ids: list[str],
        hits: np.ndarray,
        now: datetime,
    ) -> None:
        window = trigger.window_key(int(now.timestamp() * 1_000_000))
        hits = self._unfired(name, window, ids, hits)
        if not hits.size:
            return
        chosen = [ids[i] for i in hits.tolist()]
        held = trigger.in_holdout(chosen)
        catalog = None if scorer.policy is None else scorer.policy.catalog
        if catalog is not None and trigger.action != NO_TRIGGER_ACTION:
            held |= in_holdout(chosen, catalog.holdout_share, catalog.holdout_salt)
        ttl = trigger.window_us // 1_000_000 + 3600  # the window, and an hour of clock skew
        fired_at = now.isoformat().replace("+00:00", "Z")
        versions = dict(scorer.versions)
        decisions: list[Decision] = []
        if trigger.action == NO_TRIGGER_ACTION:
            picks: list[dict[str, Any] | None] = [None] * len(chosen)
        elif scorer.policy is None:
            self._note(name, f"triggers: {name!r} needs a {NBA} champion to decide; not fired")
            return
        else:
            picks = list(self._decide(scorer, trigger, scored, hits, chosen, now))
        for customer, held_i, pick in zip(chosen, held.tolist(), picks, strict=True):
            action, value, reasons, holdout = None, None, [], bool(held_i)
            if pick is not None:
                if pick["action"] == NO_ACTION:
                    # Nothing eligible pays now: no firing (a later event may fire it).
                    # Held-out customers pass the same test, so both arms compare alike.
                    continue
                action, value = str(pick["action"]), float(pick["expected_value"])
                reasons = [pick.get("reason")]
            decisions.append(
                Decision(
                    decision_id=f"{name}:{customer}:{window}",
                    trigger=name,
                    customer_id=customer,
                    fired_at=fired_at,
                    action=action,
                    expected_value=value,
                    reasons=reasons,
                    model_versions=versions,
                    holdout=holdout,
                    window=window,
                    ttl_seconds=ttl,
                )
            )
        if not decisions:
            return
        fired = self.state.fire(decisions, now.timestamp())
        members = []
        for decision, new in zip(decisions, fired, strict=True):
            if not new:
                self.stats.repeats += 1
                continue
            self.stats.fired += 1
            self.stats.delivered += int(decision.delivered)
            self.stats.held_out += int(decision.holdout)
            members.append(decision.customer_id)
        if trigger.segment is not None and members:
            # A firing puts the customer in the segment; a repeat in the window does not.
            self.state.update_segments({trigger.segment: (members, [])})
            self._arm_lapse(trigger.segment, members, now)

    def _unfired(self, name: str, window: str, ids: list[str], hits: np.ndarray) -> np.ndarray:
        """The hits whose trigger has not fired in this window yet (the rest are repeats)."""
        # Read ahead of the firing script, which still has the last word: it spares the
        # repeats (most events are of customers fired already) the arbitration and the script.
        fired = self.state.fired(name, window, [ids[i] for i in hits.tolist()])
        self.stats.repeats += int(fired.sum())
        return hits[~fired]

    def _decide(
        self,
        scorer: Scorer,
        trigger: Trigger,
        scored: ScoredBatch,
        hits: np.ndarray,
        chosen: list[str],
        now: datetime,
    ) -> Sequence[dict[str, Any]]:
        policy = scorer.policy
        if policy is None:
            return [{"action": NO_ACTION, "holdout": False}] * len(chosen)
        names = scorer.reader.feature_names
        position = {n: j for j, n in enumerate(names)}
        X = scored.matrix[hits][:, [position[f] for f in policy.feature_names]].copy()
        self._count_live_contacts(policy, X, scored.timestamps[hits], chosen, now)
        offered = trigger.candidates(policy.catalog)
        # A trigger naming its action decided it; next-best-action sends only what pays.
        return policy.decide(
            chosen, X, offered=offered, must_pay=trigger.takes_next_best_action, holdout=False
        )

    def _count_live_contacts(
        self, policy: Any, X: np.ndarray, stamps: np.ndarray, ids: list[str], now: datetime
    ) -> None:
        """Add the decisions delivered since each row's features were built to its contacts."""
        contact = policy.catalog.contact_policy
        j7, j30, jsince = (
            policy.feature_names.index(f)
            for f in (
                contact.contacts_7d_feature,
                contact.contacts_30d_feature,
                contact.days_since_last_feature,
            )
        )
        since = np.where(np.isnan(stamps), 0.0, stamps)
        rows, times = self.state.contacts(ids, since.tolist())
        if not rows.size:
            return
        n = len(ids)
        ages = (now.timestamp() - times) / 86400.0
        contacted = np.bincount(rows, minlength=n) > 0
        for j, days in ((j7, 7), (j30, 30)):
            recent = np.bincount(rows, weights=ages < days, minlength=n)
            X[contacted, j] = np.nan_to_num(X[contacted, j]) + recent[contacted]
        youngest = np.full(n, np.inf)
        np.minimum.at(youngest, rows, ages)
        # fmin: a customer without a days-since feature (NaN) takes its live contact's.
        X[contacted, jsince] = np.fmin(X[contacted, jsince], youngest[contacted])

    # -- the lake --------------------------------------------------------------

    def drain_exposures(self) -> int:
        """Write fired decisions to the event lake as ``campaign_exposure`` events."""
        entries = self.state.exposures(_BATCH)
        if not entries:
            return 0
        control = None
        events = []
        for _, d in entries:
            if control is None:
                control = self._control()
            events.append(
                {
                    "event_id": f"exposure:{d['decision_id']}",
                    "customer_id": d["customer_id"],
                    "event_type": "campaign_exposure",
                    "event_timestamp": d["fired_at"],
                    "campaign_id": d["trigger"],
                    "action": control if d["holdout"] or d["action"] is None else d["action"],
                }
            )
        self.processor.process(events, received_at=self.clock(), changes=False)
        self.state.drop_exposures([i for i, _ in entries])
        self.stats.exposures += len(entries)
        return len(entries)

    def _control(self) -> str:
        scorer = self._scorer()
        policy = None if scorer is None else scorer.policy
        return "control" if policy is None else str(policy.catalog.control)


def run_triggers(settings: Settings, *, stop_when_idle: bool = False) -> RunnerStats:
    """Run the project's triggers until SIGTERM or SIGINT (one runner per project).

    Parameters
    ----------
    settings : Settings
    stop_when_idle : bool
        Stop after the first step that finds nothing to do.

    Returns
    -------
    RunnerStats

    Raises
    ------
    LockBusyError
        Another runner of the project is running.

    Examples
    --------
    >>> run_triggers(load_settings(), stop_when_idle=True).line()  # doctest: +SKIP
    """
    from propensity.jobs.lock import JobLock, job_dir
    from propensity.jobs.stream import stop_on_signals

    with JobLock(job_dir(settings) / "triggers.lock", "triggers").acquire():
        runner = TriggerRunner(settings)
        try:
            with stop_on_signals(runner):
                return runner.run(stop_when_idle=stop_when_idle)
        finally:
            runner.close()


def load_project_triggers(settings: Settings) -> TriggerFile:
    """The project's triggers file, checked against its features, scores and action catalog.

    Raises
    ------
    TriggerFileError
        Every problem of the file (or its absence), each naming the trigger, field and rule.
    """
    from propensity.models.arbitration import load_catalog

    catalog_path = settings.path(settings.models_dir) / "actions.yaml"
    catalog = load_catalog(catalog_path) if catalog_path.exists() else None
    return load_triggers(settings.path(settings.activation.triggers_file), catalog=catalog)
