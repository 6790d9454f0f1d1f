"""A site's executor: the site runs only code it installed or approved.

Flower's own executor installs whatever app (FAB) a run ships and runs its code at the
site. fedlens starts the site's SuperNode with ``--isolation process`` instead and
serves its tasks here, in the ``fedlens client start`` process:

* it takes a task from the SuperNode's local Runtime API (loopback, HMAC-authenticated
  with a secret only this process and the SuperNode know);
* it pulls the task's message and the run's app, and checks the app's SHA-256 against
  the site's approvals. By default exactly one app is approved: the code-free app that
  this site's own fedlens would submit (:mod:`fedlens.ops.fab`), so a run started with
  ``fedlens run`` from the same fedlens release is accepted;
* an approved run is handled by the *installed* ``fedlens.client.app:app``, in this
  process, which stays up between messages (the model and the site's data stay loaded);
  the app's files are never installed or imported;
* any other app is refused: the reply is an error the server reports by site name, and
  the site's log says how a person approves it (``fedlens client approve HASH``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlens.server.flower_waits import ACTIVE_S, Pacer
from fedlens.shared.errors import FedlensError
from fedlens.shared.io import atomic_write_json
from fedlens.shared.privacy import SiteRefusal

from .fab import app_pyproject

__all__ = ["AppApprovals", "AppNotApproved", "SiteExecutor", "StallGuard", "default_app_hash"]

_log = logging.getLogger("fedlens.site.executor")

APPROVALS_FILE = "approved-apps.json"
_FORMAT = "fedlens-approved-apps-v1"


class AppNotApproved(SiteRefusal):
    """A site refuses a run whose app it has not approved (its class name travels in the reply)."""


def default_app_hash() -> str:
    """SHA-256 of the app this installed fedlens submits (what ``flwr run`` would send for it)."""
    from flwr.cli.build import build_fab_from_files

    fab, _meta = build_fab_from_files({"pyproject.toml": app_pyproject().encode("utf-8")})
    return hashlib.sha256(fab).hexdigest()


class AppApprovals:
    """The apps a site runs: its own fedlens release's, and any a person approved.

    Parameters
    ----------
    state_dir : path-like
        The site's state folder; approvals live in ``approved-apps.json`` there.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / APPROVALS_FILE

    def approved(self) -> dict[str, dict[str, Any]]:
        """``{hash: {"by": ..., "at": ..., "note": ...}}`` for every approved app, the default included."""
        out = {default_app_hash(): {"by": "fedlens", "at": None, "note": "this site's installed fedlens release"}}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("format") != _FORMAT:
                    raise ValueError("unknown format")
                out.update(data["apps"])
            except (ValueError, KeyError, TypeError) as exc:
                raise FedlensError(
                    f"{self.path} is unreadable ({exc}); restore it from a backup or delete it "
                    "(the site then runs only its own installed fedlens release)"
                ) from exc
        return out

    def is_approved(self, fab_hash: str) -> bool:
        return fab_hash in self.approved()

    def approve(self, fab_hash: str, *, by: str, note: str = "") -> None:
        """Approve one app build by its SHA-256 (64 hex digits).

        Raises
        ------
        FedlensError
            For anything that is not a SHA-256 in hex.
        """
        fab_hash = fab_hash.strip().lower()
        if len(fab_hash) != 64 or any(c not in "0123456789abcdef" for c in fab_hash):
            raise FedlensError(f"{fab_hash!r} is not an app hash (64 hex digits, as the refusal in the site's log prints it)")
        apps = {k: v for k, v in self.approved().items() if v.get("by") != "fedlens"}
        apps[fab_hash] = {"by": by, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "note": note}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"format": _FORMAT, "apps": apps})


@dataclass(frozen=True)
class _Task:
    token: str
    run_id: int
    fab_hash: str


class SiteExecutor:
    """Serve a SuperNode's ClientApp tasks in this process, only for approved apps.

    Parameters
    ----------
    runtime_address : str
        The SuperNode's Runtime API, ``127.0.0.1:PORT``.
    secret : bytes
        The SuperExec secret given to the SuperNode (``--superexec-auth-secret-file``).
    approvals : AppApprovals
        Which app hashes this site runs.
    site : str
        The site's name, for logs.
    on_run : callable, optional
        Called once per run seen: ``on_run(run_id=..., app_hash=..., accepted=..., reason=...)``.
    poll_s : float, default 0.2
        Seconds between asking the SuperNode for a task while the site is at work (a task
        within the last ``active_s`` seconds).
    idle_poll_s : float, default 1.0
        Seconds between those asks once the site is idle. Each ask is a local gRPC call;
        at 0.2 s an idle executor used 2.4 % of a core (docs/benchmarks.md §17).
    active_s : float, default 120
        Seconds a task keeps the site at work.
    """

    def __init__(
        self,
        runtime_address: str,
        secret: bytes,
        approvals: AppApprovals,
        *,
        site: str,
        on_run: Callable[..., None] | None = None,
        poll_s: float = 0.2,
        idle_poll_s: float = 1.0,
        active_s: float = ACTIVE_S,
    ) -> None:
        self.runtime_address = runtime_address
        self.secret = secret
        self.approvals = approvals
        self.site = site
        self.on_run = on_run
        self.pacer = Pacer(busy_s=poll_s, idle_s=idle_poll_s, active_s=active_s)
        self._seen: set[tuple[int, str]] = set()
        self._stop = threading.Event()
        self._app: Any = None

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        """Take and handle tasks until :meth:`stop`; a task's failure never ends the loop."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        client = self._client(auth=True)
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
                    failures = 0
                except Exception as exc:  # the SuperNode is starting or restarting: try again
                    failures += 1
                    (_log.warning if failures % 30 == 1 else _log.debug)(
                        "%s: cannot take tasks from the SuperNode yet (%s)", self.site, exc
                    )
                    self._stop.wait(1.0)
                    continue
                if res.HasField("task") and res.token:
                    task = _Task(token=res.token, run_id=res.task.run_id, fab_hash=res.task.fab_hash)
                    _log.debug("%s: task %s of run %s", self.site, res.task.task_id, task.run_id)
                    try:
                        self.handle(task)
                    except (Exception, SystemExit):  # one task's failure (Flower may exit a task) never ends the loop
                        _log.exception("%s: task of run %s failed", self.site, task.run_id)
                    self.pacer.mark_busy()  # at work from the end of its last task
                else:
                    self._stop.wait(self.pacer.wait_s())
        finally:
            client.close()

    def handle(self, task: _Task) -> None:
        """Pull the task's message, answer it with the installed app or a refusal, push the reply."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        client = self._client(token=task.token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        status, details = SubStatus.FAILED, "fedlens site executor: task failed"
        try:
            message, context, run, fab = _pull_task_input(client)
            fab_hash = fab.hash_str or task.fab_hash
            if not self.approvals.is_approved(fab_hash):
                reason = self._refuse(run.run_id, fab_hash, getattr(run, "fab_id", ""))
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
                details = reason
            else:
                self._note_run(run.run_id, fab_hash, accepted=True, reason="approved app")
                try:
                    reply = self._client_app()(message=message, context=context)
                    status, details = SubStatus.COMPLETED, ""
                except Exception as exc:  # the app's own failure: reply with it, as Flower would
                    _log.error("%s: %s: %s", self.site, type(exc).__name__, exc)
                    reason = f"{type(exc)}:<'{exc}'>"
                    reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
                    details = reason
            push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=status, details=details)
        finally:
            heartbeat.stop()
            client.close()

    def _refuse(self, run_id: int, fab_hash: str, fab_id: str) -> str:
        message = (
            f"{self.site} refuses run {run_id}: its app {fab_id or '(unnamed)'} has hash {fab_hash}, which this site has not "
            "approved. A site runs only its own installed fedlens release, or an app build a person approved after "
            f"rebuilding it from its release tag (FAB builds are deterministic): `fedlens client approve {fab_hash} --state-dir DIR`"
        )
        self._note_run(run_id, fab_hash, accepted=False, reason="app not approved")
        return f"{AppNotApproved}:<'{message}'>"

    def _note_run(self, run_id: int, fab_hash: str, *, accepted: bool, reason: str) -> None:
        if (run_id, fab_hash) in self._seen:
            return
        self._seen.add((run_id, fab_hash))
        if accepted:
            _log.info("%s: run %s uses an approved app (%s...)", self.site, run_id, fab_hash[:12])
        else:
            _log.error(
                "%s: refused run %s: app %s is not approved; to run it anyway, a person at this site runs "
                "`fedlens client approve %s --state-dir DIR`",
                self.site,
                run_id,
                fab_hash,
                fab_hash,
            )
        if self.on_run is not None:
            self.on_run(run_id=str(run_id), app_hash=fab_hash, accepted=accepted, reason=reason)

    def _client_app(self) -> Any:
        if self._app is None:
            from fedlens.client.app import app

            self._app = app
        return self._app

    def _client(self, *, auth: bool = False, token: str | None = None) -> Any:
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec" if auth else "flwr-clientapp")]
        if auth:
            interceptors.append(
                SuperExecAuthHttpInterceptor(master_secret=self.secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"})
            )
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address,
            insecure=True,  # loopback only, authenticated by the HMAC secret and the task token
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=_retry_invoker(),
        )


# A task can reach the executor before its message's content has reached the SuperNode: the
# SuperNode lists the task, then pulls the content from the server. That takes well under a
# second for the default policy's updates, and over 30 s for `policy = "full"` (13.8 MB) with
# 20 sites pulling at once on one loaded 2-core machine. So the executor waits while content
# keeps arriving, and gives up when none has arrived for this long: a task whose message never
# arrives (one of a run the server lost in a restart) must not block the tasks behind it.
_PULL_STALL_S = 60.0
# An outer bound on one message's pull, however steadily it arrives (Flower's default: 2 hours).
_PULL_MAX_S = 1800.0


class StallGuard:
    """Wrap an object-pull function so that a pull fails once nothing has arrived for ``stall_s``.

    Flower's ``pull_objects`` retries an object the puller reports as not yet available
    (``ObjectUnavailableError``) until one overall deadline. The guard turns "not yet
    available" into a permanent failure (``ObjectPullError``) once ``stall_s`` seconds have
    passed since the guard was made or since any object last arrived, whichever is later.

    Parameters
    ----------
    pull : callable
        ``pull(object_id) -> bytes``, raising Flower's ``ObjectUnavailableError`` to retry.
    stall_s : float
        Seconds without any object arriving before the pull fails.
    clock : callable, default time.monotonic
    """

    def __init__(self, pull: Callable[[str], bytes], *, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.pull, self.stall_s, self._clock = pull, stall_s, clock
        self.last_arrival = clock()

    def __call__(self, object_id: str) -> bytes:
        from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError

        try:
            content = self.pull(object_id)
        except ObjectUnavailableError:
            waited = self._clock() - self.last_arrival
            if waited >= self.stall_s:
                raise ObjectPullError(object_id, f"nothing arrived from the SuperNode for {waited:.0f} s") from None
            raise
        self.last_arrival = self._clock()
        return content


def _pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """Flower's ``pull_task_input`` (message, context, run, app), with a bounded object pull."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

    res = client.PullTaskInput(PullTaskInputRequest())
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError(f"the SuperNode holds no message for task {res.task_id} of run {run.run_id}")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        StallGuard(make_pull_object_fn_protobuf(client.PullObject, node, context.run_id), stall_s=_PULL_STALL_S),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        max_time=_PULL_MAX_S,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: the id is not in the content
    return message, context, run, fab


def _retry_invoker() -> Any:
    """Retries for calls to the local SuperNode: a few seconds of transport errors, then give up.

    Flower's own invoker is made for one short-lived process per task: on a 401 it sends
    SIGINT to its own process, and it retries forever. Here one long-lived process serves
    every task, so a task whose token went stale (a restarted server) must fail alone.
    """
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    def give_up(exc: Exception) -> bool:
        return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code < 500

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=5.0),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=60.0,
        should_giveup=give_up,
    )
