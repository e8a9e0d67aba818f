"""One writer per run: claims recorded in the tracking store, with an owner and an expiry.

A claim on `(run, resource)` (resource: `training`, or `analysis/<epoch>` for one checkpoint)
is an MLflow *experiment* named `ntk_tracking.claims/<run>/<resource>`. Experiment names are
unique in every tracking store (SQLite, any SQL database, a `mlflow server`), and creating one
is atomic, so of several processes that create the same name at once exactly one succeeds: that
is the claim. Its tags say who holds it (`owner`: host, process id and a random token) and until
when (`expires`: Unix seconds); the holder renews the expiry while it works (a heartbeat) and
checks before each write that the claim is still its own. A released claim is renamed to a
unique tombstone name and deleted, so the UI's experiment list hides it and the name is free.

Guarantees and assumptions (also in docs/reliability.md):

- two live processes never hold the same claim: creation is atomic in the store;
- a killed holder's claim expires `ttl` seconds after its last heartbeat (default 60 s), and then
  the next process takes it over, so a rerun completes the work; on the holder's own machine
  (same boot and PID namespace) a holder process that no longer exists is seen at once;
- expiry compares the holder's wall clock with the taker's: clocks should agree to well within
  the ttl (NTP-synchronized machines do); otherwise two processes may work at once;
- metrics are logged through `log_points_once`, so a holder stalled past its claim at any stage
  adds no point, whatever the clocks say (the fencing).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

from mlflow.exceptions import MlflowException

PREFIX = "ntk_tracking.claims"
TTL_SECONDS = float(os.environ.get("NTK_TRACKING_CLAIM_TTL_SECONDS", "60"))


def claim_name(run_id: str, resource: str) -> str:
    return f"{PREFIX}/{run_id}/{resource}"


def _process_space() -> str | None:
    """What makes a process id meaningful here: this boot of this machine and this PID namespace
    (None where /proc does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()[:8]
        return f"{boot}/{os.readlink('/proc/self/ns/pid').strip('pid:[]')}"
    except OSError:
        return None


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}:{_process_space() or '?'}"


def _holder_is_dead(owner: str) -> bool:
    """Whether the holder is a process of this machine (same boot, same PID namespace) that no
    longer runs: its claim need not wait for its expiry (a relaunch right after a kill)."""
    parts = owner.split(":")
    space = _process_space()
    if len(parts) != 4 or space is None or parts[0] != socket.gethostname() or parts[3] != space:
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def describe(owner: str, expires: float) -> str:
    """`HOST:PID until TIME` (local time) for a claim's holder."""
    host_pid = ":".join(owner.split(":")[:2])
    return f"{host_pid} until {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(expires))}"


class Held(Exception):
    """Another live process holds the claim."""

    def __init__(self, name: str, owner: str, expires: float):
        self.owner, self.expires = owner, expires
        super().__init__(f"{name} is held by {describe(owner, expires)} unless renewed")


class Claim:
    """A held claim; `release()` when done (or use it as a context manager)."""

    def __init__(self, client, name: str, experiment_id: str, owner: str, ttl: float):
        self.client, self.name, self.experiment_id, self.owner, self.ttl = client, name, experiment_id, owner, ttl
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @classmethod
    def acquire(cls, client, run_id: str, resource: str, ttl: float = TTL_SECONDS) -> "Claim":
        """The claim, or Held naming its live holder. An expired claim is taken over."""
        name, owner = claim_name(run_id, resource), _owner()
        for _ in range(3):
            try:
                experiment_id = client.create_experiment(
                    name, tags={"owner": owner, "expires": repr(time.time() + ttl), "run_id": run_id,
                                "resource": resource})
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                current = client.get_experiment_by_name(name)
                if current is None:  # released in between: try again
                    continue
                expires = float(current.tags.get("expires", "0"))
                owner_now = current.tags.get("owner", "?")
                if current.lifecycle_stage == "active" and expires > time.time() and not _holder_is_dead(owner_now):
                    raise Held(name, owner_now, expires) from None
                _bury(client, current.experiment_id)  # expired, or its holder here is gone
                continue
            claim = cls(client, name, experiment_id, owner, ttl)
            if not claim.holds():  # verified after writing
                raise Held(name, "?", 0.0)
            return claim
        current = client.get_experiment_by_name(name)
        raise Held(name, current.tags.get("owner", "?") if current else "?",
                   float(current.tags.get("expires", "0")) if current else 0.0)

    def holds(self) -> bool:
        """Whether the claim is still this process's (not expired and taken over)."""
        try:
            current = self.client.get_experiment(self.experiment_id)
        except MlflowException:
            return False
        return (current.name == self.name and current.lifecycle_stage == "active"
                and current.tags.get("owner") == self.owner)

    def renew(self) -> bool:
        if not self.holds():
            return False
        self.client.set_experiment_tag(self.experiment_id, "expires", repr(time.time() + self.ttl))
        return True

    def start_heartbeat(self, every: float | None = None) -> "Claim":
        """Renews the expiry in a background thread every `every` seconds (ttl / 4)."""
        def beat():
            while not self._stop.wait(every or self.ttl / 4):
                try:
                    if not self.renew():
                        return
                except MlflowException:  # a store hiccup: the next beat tries again
                    pass

        self._heartbeat = threading.Thread(target=beat, name=f"claim-{self.name}", daemon=True)
        self._heartbeat.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self.holds():
            _bury(self.client, self.experiment_id)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _bury(client, experiment_id: str) -> None:
    """Rename a claim out of the way (freeing its name) and hide it; a lost race is harmless."""
    try:
        client.rename_experiment(experiment_id, f"{PREFIX}/released/{uuid.uuid4().hex}")
        client.delete_experiment(experiment_id)
    except MlflowException:
        pass


def clean_up(client, run_id: str) -> int:
    """Removes what a process that lost the store left behind: released claims it could not hide,
    expired claims (or claims of holders here that are gone) of `run_id`, and records it could
    not hide (a record keeps its name). Returns how many it removed."""
    removed = 0
    for prefix in (f"{PREFIX}/released/", f"{PREFIX}/{run_id}/"):
        found = client.search_experiments(filter_string=f"name LIKE '{prefix}%'")
        for experiment in found:
            if not experiment.name.startswith(prefix) or experiment.lifecycle_stage != "active":
                continue
            tags = experiment.tags
            try:
                if "owner" in tags and not prefix.endswith("released/"):
                    if float(tags.get("expires", "0")) > time.time() and not _holder_is_dead(tags["owner"]):
                        continue  # a live claim
                    _bury(client, experiment.experiment_id)
                else:
                    client.delete_experiment(experiment.experiment_id)
                removed += 1
            except MlflowException:
                pass  # another process cleaned it up first
    return removed


def log_points_once(client, run_id: str, name: str, metrics: dict[str, float], step: int) -> bool:
    """Logs `metrics` at `step` so that the run never holds two points for one (key, step), however
    many writers try and whatever pauses where: the first writer records its points (values and
    timestamp) atomically under `name`, and every writer logs the recorded points, which the
    store keeps once (it stores an identical key, value, timestamp and step once). Returns whether
    the points logged are this call's (False: another writer's, recorded first)."""
    import json

    from mlflow.entities import Metric

    mine = json.dumps({"timestamp": int(time.time() * 1000), "metrics": {k: float(v) for k, v in metrics.items()}},
                      sort_keys=True)
    kept = record_once(client, run_id, name, mine)
    points = json.loads(kept)
    batch = [Metric(key, float(value), points["timestamp"], step) for key, value in points["metrics"].items()]
    client.log_batch(run_id, metrics=batch, synchronous=True)
    return kept == mine


def holder(client, run_id: str, resource: str) -> tuple[str, float] | None:
    """(owner, expires) of a live claim, or None."""
    current = client.get_experiment_by_name(claim_name(run_id, resource))
    if current is None or current.lifecycle_stage != "active":
        return None
    expires, owner = float(current.tags.get("expires", "0")), current.tags.get("owner", "?")
    return (owner, expires) if expires > time.time() and not _holder_is_dead(owner) else None


def record_once(client, run_id: str, name: str, value: str) -> str:
    """The first value ever recorded under (run, name): `value` if this call records it.

    Like a claim, but permanent: an experiment created with the value in a tag and deleted at
    once (hidden from the UI; a deleted experiment keeps its name, so the record stays)."""
    full = f"{PREFIX}/{run_id}/{name}"
    try:
        experiment_id = client.create_experiment(full, tags={"value": value, "run_id": run_id})
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return recorded(client, run_id, name)
    try:
        client.delete_experiment(experiment_id)
    except MlflowException:  # hidden already by another process's clean_up: the name is what counts
        if client.get_experiment(experiment_id).lifecycle_stage != "deleted":
            raise
    return value


def recorded(client, run_id: str, name: str) -> str | None:
    found = client.get_experiment_by_name(f"{PREFIX}/{run_id}/{name}")
    return None if found is None else found.tags.get("value")
