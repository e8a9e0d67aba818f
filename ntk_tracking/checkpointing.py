"""Orbax checkpoints of one MLflow run, kept in the run's artifact store (the only Orbax user).

Layout under the run's artifacts: `checkpoints/<epoch>/` holds model variables (CV checkpoints,
kept forever); `checkpoints/resume/<epoch>/` holds the latest full training state plus a JSON
metadata dict. A local store is written in place; a remote (proxied) store is written to a local
staging directory and each finished step is uploaded by a background thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlparse

import jax
import mlflow
import orbax.checkpoint as ocp
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.utils.file_utils import local_file_uri_to_path
from orbax.checkpoint import checkpoint_managers

log = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"  # written by Orbax into a step just before its atomic rename
TMP_SUFFIX = ".orbax-checkpoint-tmp"
_ARTIFACT_DIRS = {"cv": "checkpoints", "resume": "checkpoints/resume"}
_ITEMS = {"cv": ("variables", "digest"), "resume": ("state", "meta")}
DIGEST_ITEM = "digest"  # a CV step's JSON item: the sha256 of its arrays, written with them


def arrays_digest(tree) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes (host copies), in path order."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class CheckpointError(Exception):
    """A checkpoint step is missing, incomplete or unreadable, or could not be uploaded.

    Its message is one line: the epoch, where the step is, and the cause in one sentence."""


class DamagedCheckpoint(CheckpointError):
    """A step that exists but cannot be read, or whose arrays do not match their digest."""


class _DropOrbaxInfo(logging.Filter):
    """Drops Orbax's records below `level` (INFO chatter) from the shared absl logger."""

    def __init__(self, level: int = logging.WARNING):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or f"{os.sep}orbax{os.sep}" not in record.pathname


_QUIET = _DropOrbaxInfo(logging.CRITICAL)  # a failed save is reported by the store, in one line


@contextlib.contextmanager
def _orbax_silenced():
    """While a restore's failure is turned into one line: Orbax's own error records dropped too."""
    absl = logging.getLogger("absl")
    quiet = _DropOrbaxInfo(logging.CRITICAL)
    absl.addFilter(quiet)
    try:
        yield
    finally:
        absl.removeFilter(quiet)


_SETTLE_SECONDS = 60.0  # how long a closing restore loop waits for reads still in flight


class _SettlingEventLoop(asyncio.SelectorEventLoop):
    """An event loop whose close() first lets every task still on it finish (for at most
    `_SETTLE_SECONDS`) and retrieves their exceptions; then closes.

    Orbax runs each synchronous restore on a fresh event loop of its own and closes it as soon
    as the top coroutine returns. When one array read of a restore fails (a damaged step), that
    coroutine raises at once while the reads of the other arrays are still in flight in
    TensorStore's threads; they finish after the loop is closed, and their completion callback
    (`loop.call_soon_threadsafe`) raises `RuntimeError: Event loop is closed`, unraisable, in a
    background thread, and asyncio logs "Task exception was never retrieved" for each failed
    read. A loop of this class waits for those reads before it closes."""

    def close(self) -> None:
        if not self.is_running() and not self.is_closed():
            pending = asyncio.all_tasks(self)
            if pending:
                done, _ = self.run_until_complete(asyncio.wait(pending, timeout=_SETTLE_SECONDS))
                for task in done:
                    if not task.cancelled():
                        task.exception()  # retrieved: already reported by the restore that failed
        super().close()


class _SettlingPolicy(asyncio.AbstractEventLoopPolicy):
    """The process's event loop policy, except that a loop created on one of `threads` (a thread
    inside `_settled_event_loops`) is a `_SettlingEventLoop`. Everything else goes to `inner`."""

    def __init__(self, inner: asyncio.AbstractEventLoopPolicy):
        self.inner = inner
        self.threads: dict[int, int] = {}  # thread id -> nesting depth

    def new_event_loop(self):
        if threading.get_ident() in self.threads:
            return _SettlingEventLoop()
        return self.inner.new_event_loop()

    def get_event_loop(self):
        return self.inner.get_event_loop()

    def set_event_loop(self, loop) -> None:
        self.inner.set_event_loop(loop)

    def get_child_watcher(self):  # Python < 3.14 only
        return self.inner.get_child_watcher()

    def set_child_watcher(self, watcher) -> None:  # Python < 3.14 only
        self.inner.set_child_watcher(watcher)


_policy_lock = threading.Lock()


@contextlib.contextmanager
def _settled_event_loops():
    """While an Orbax restore runs on this thread: the event loops it creates here (through the
    public `asyncio.new_event_loop`) settle their tasks before closing. The process's own policy
    is wrapped for that time only, and only loops created on this thread are affected. (asyncio's
    policies are deprecated from Python 3.14; tests/test_checkpointing.py fails if Orbax's restore
    loops stop settling, whatever the cause.)"""
    ident = threading.get_ident()
    with _policy_lock:
        policy = asyncio.get_event_loop_policy()
        if not isinstance(policy, _SettlingPolicy):
            policy = _SettlingPolicy(policy)
            asyncio.set_event_loop_policy(policy)
        policy.threads[ident] = policy.threads.get(ident, 0) + 1
    try:
        yield
    finally:
        with _policy_lock:
            policy.threads[ident] -= 1
            if not policy.threads[ident]:
                del policy.threads[ident]
            if not policy.threads and asyncio.get_event_loop_policy() is policy:
                asyncio.set_event_loop_policy(policy.inner)


def _on_default_device(abstract):
    """Gives every sharding-less abstract leaf the default device, whatever device saved it."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def place(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding,
                                        weak_type=leaf.weak_type)
        return leaf

    return jax.tree.map(place, abstract)


def _why_unwritable(folder: Path, committed: bool = True) -> str | None:
    """Why nothing can be created in `folder`, or None if something can (tried for real: permission
    bits do not bind root, an immutable folder or a read-only file system do). `committed`: asked
    about a step that did not commit, so a writable folder still has a reason."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ntk-write-check-"):
            return "Orbax did not commit it" if committed else None
    except OSError as err:
        return err.strerror or type(err).__name__


def _refuse_links(step: Path, epoch: int, where: str) -> None:
    """DamagedCheckpoint if the step, or anything in it, is a symbolic link: a run's files are
    read where they are, never through a link to elsewhere (metadata included)."""
    links = [step] if step.is_symlink() else [p for p in step.rglob("*") if p.is_symlink()]
    if links:
        raise DamagedCheckpoint(f"epoch {epoch}: {where}: {links[0].relative_to(step.parent)} is a symbolic "
                                "link; a checkpoint's files are never read through links")


class CheckpointStore:
    """Orbax checkpoints of one MLflow run, in its artifact store."""

    def __init__(self, run_id: str, client: mlflow.MlflowClient | None = None,
                 resume_interval_seconds: int | None = None):
        """`resume_interval_seconds`: save_resume writes at most one resume step per interval
        (and never while one is being written) unless forced; None writes every call."""
        self.run_id = run_id
        self.resume_interval_seconds = resume_interval_seconds
        self._client = client or mlflow.MlflowClient()
        self._artifact_uri = self._client.get_run(run_id).info.artifact_uri
        self.remote = urlparse(self._artifact_uri).scheme not in ("", "file")
        self._root = None if self.remote else Path(local_file_uri_to_path(self._artifact_uri))
        self._managers: dict[str, ocp.CheckpointManager] = {}
        # A manager is not thread-safe: its lock serialises save() with the uploader's waits.
        self._locks = {kind: threading.Lock() for kind in _ARTIFACT_DIRS}
        self._taken: dict[str, set[int]] = {}
        self._uploads: queue.Queue = queue.Queue()
        self._uploader: threading.Thread | None = None
        self._upload_error: Exception | None = None
        self._unchecked: dict[str, set[int]] = {}  # steps saved here, not yet seen committed
        self.unverified: set[int] = set()  # CV epochs restored without a digest to check
        logging.getLogger("absl").addFilter(_QUIET)

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Writing (training side).

    def save_cv(self, epoch: int, variables) -> None:
        """Starts saving model variables as the CV checkpoint of `epoch`, with the digest of its
        arrays in the same atomic step; skips an existing one."""
        digest = {"sha256": arrays_digest(variables), "algorithm": "sha256 of leaf paths, dtypes, shapes, bytes"}
        self._save("cv", epoch, ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                                                    **{DIGEST_ITEM: ocp.args.JsonSave(digest)}))

    def save_resume(self, epoch: int, state, meta: dict, force: bool = False) -> bool:
        """Starts saving the full training state and its metadata (older resume steps go), if
        the resume interval allows or `force`; returns whether it saves."""
        return self._save("resume", epoch, ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force or self.resume_interval_seconds is None)

    def latest_resume(self, abstract_state) -> tuple[object, dict] | None:
        """Restores the newest complete resume checkpoint as (state, meta), or None if none."""
        steps = self._complete_steps("resume")
        if not steps:
            return None
        restored = self._restore("resume", steps[-1], ocp.args.Composite(
            state=ocp.args.StandardRestore(_on_default_device(abstract_state)),
            meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def wait_cv(self) -> None:
        """Blocks until every CV save started so far is committed locally (CheckpointError if one
        could not be written)."""
        if "cv" in self._managers:
            with self._locks["cv"]:
                self._managers["cv"].wait_until_finished()
            self._check_written("cv")

    def _check_written(self, kind: str) -> None:
        """CheckpointError naming the folder if a save this store started (and Orbax finished) did
        not commit, or a step could not be uploaded. Orbax reports a failed asynchronous save only
        in its own log and goes on, so the store looks for the commit marker itself."""
        if self._upload_error is not None:  # kept: the uploader stops at it for good
            error = self._upload_error
            raise CheckpointError(f"could not upload checkpoints of run {self.run_id} to {self._artifact_uri} "
                                  f"({' '.join(str(error).split())[:300]})") from error
        if self.remote:  # staged steps are checked by their upload
            return
        for epoch in sorted(self._unchecked.pop(kind, set())):
            step = self._dir(kind) / str(epoch)
            if not (step / COMMIT_MARKER).is_file():
                raise CheckpointError(f"could not write the {kind} checkpoint of epoch {epoch} to {step.parent} "
                                      f"({_why_unwritable(step.parent)}); checkpoints saved before it are kept")

    def wait(self) -> None:
        """Blocks until every save is committed and, on a remote store, uploaded (CheckpointError
        naming the folder if one could not be written)."""
        for kind, manager in list(self._managers.items()):
            with self._locks[kind]:
                manager.wait_until_finished()
        self._uploads.join()
        for kind in list(self._managers):
            self._check_written(kind)

    def close(self) -> None:
        """Waits for pending saves, then releases Orbax and the staging directory."""
        try:
            self.wait()
        finally:
            if self._uploader is not None:
                self._uploads.put(None)
                self._uploader.join()
                self._uploader = None
            for manager in self._managers.values():
                manager.close()
            self._managers.clear()
        if self.remote and self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    # Reading (analyzer side).

    def cv_epochs(self) -> list[int]:
        """Sorted epochs of complete CV checkpoints."""
        return self._complete_steps("cv")

    def restore_cv(self, epoch: int, abstract_variables):
        """Restores the CV checkpoint of `epoch` into the structure of `abstract_variables` and
        checks its arrays against the digest saved with them (DamagedCheckpoint on a mismatch).
        A step saved before digests existed is restored unverified: its epoch joins `unverified`."""
        restored, digest = self._restore("cv", epoch, ocp.args.Composite(
            variables=ocp.args.StandardRestore(_on_default_device(abstract_variables))), digest=True)
        variables = restored["variables"]
        if digest is None:
            self.unverified.add(epoch)
        elif arrays_digest(variables) != digest.get("sha256"):
            raise DamagedCheckpoint(f"epoch {epoch}: {self._location('cv', epoch)}: its arrays do not match "
                                    "the digest written when it was saved (the files were changed or damaged)")
        return variables

    # Internals.

    def _dir(self, kind: str) -> Path:
        """The local directory of `kind`: in the artifact store, or in staging when remote."""
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="ntk-checkpoints-"))
        return self._root.absolute() / _ARTIFACT_DIRS[kind]

    def _manager(self, kind: str) -> ocp.CheckpointManager:
        """The writing manager of `kind`, created on first use."""
        if kind not in self._managers:
            # Locally Orbax prunes old resume steps; on a remote store the uploader removes
            # each staged step itself, so Orbax must not delete one that is being uploaded.
            keep_latest = kind == "resume" and not self.remote
            # Resume steps by wall-clock interval (Orbax's policy also skips a step while the
            # previous one is still being written): short epochs stop paying for them.
            interval = self.resume_interval_seconds if kind == "resume" else None
            options = ocp.CheckpointManagerOptions(
                preservation_policy=checkpoint_managers.LatestN(1) if keep_latest else None,
                save_decision_policy=None if interval is None else
                checkpoint_managers.ContinuousCheckpointingPolicy(minimum_interval_secs=interval))
            self._managers[kind] = ocp.CheckpointManager(
                self._dir(kind), options=options, item_names=_ITEMS[kind])
        return self._managers[kind]

    def _save(self, kind: str, epoch: int, args, force: bool = True) -> bool:
        """Starts an asynchronous save of `epoch`, unless that step exists already or (not
        `force`) the manager's save policy declines it; returns whether it saves."""
        if kind not in self._taken:
            self._taken[kind] = set(self._complete_steps(kind))
        step_dir = self._dir(kind) / str(epoch)
        if epoch in self._taken[kind] or (not self.remote and step_dir.exists()):
            log.info("%s checkpoint of epoch %d exists; not saving it again", kind, epoch)
            return False
        with self._locks[kind]:
            manager = self._manager(kind)
            if not force and not manager.should_save(epoch):
                return False
        if self.remote:  # the steps before it must have reached the store (the uploader takes the lock)
            self._uploads.join()
        with self._locks[kind]:
            manager.wait_until_finished()  # the previous step of this kind: it must have been written
            self._check_written(kind)
            # Tried before Orbax starts: a save it cannot write leaves its threads waiting for minutes.
            why = None if self.remote else _why_unwritable(self._dir(kind), committed=False)
            if why is not None:
                raise CheckpointError(f"could not write the {kind} checkpoint of epoch {epoch} to "
                                      f"{self._dir(kind)} ({why}); checkpoints saved before it are kept")
            if kind == "resume":
                # Every earlier CV step must be committed before a resume step is: a run killed
                # in between resumes from an epoch whose CV checkpoints all exist, and the
                # epochs it replays write the later ones. (Orbax commits each manager's steps
                # in order, but two managers' steps in no particular order.)
                self.wait_cv()
            # An interrupted save leaves a tmp dir that can make Orbax's save fail (openpi#566).
            for stale in self._dir(kind).glob(f"{epoch}{TMP_SUFFIX}*"):
                shutil.rmtree(stale)
            manager.save(epoch, args=args, force=True)
        self._taken[kind].add(epoch)
        self._unchecked.setdefault(kind, set()).add(epoch)
        if self.remote:
            self._start_uploader()
            self._uploads.put((kind, epoch))
        return True

    def _start_uploader(self) -> None:
        if self._uploader is None:
            self._uploader = threading.Thread(
                target=self._upload_loop, name="checkpoint-upload", daemon=True)
            self._uploader.start()

    def _upload_loop(self) -> None:
        """Uploads each queued step once Orbax has committed it."""
        while (job := self._uploads.get()) is not None:
            kind, epoch = job
            if self._upload_error is not None:  # nothing after a failed step: a resume step must not
                self._uploads.task_done()        # reach the store ahead of a CV step that did not
                continue
            try:
                with self._locks[kind]:
                    self._managers[kind].wait_until_finished()
                self._upload(kind, epoch)
            except Exception as error:  # noqa: BLE001 - raised by the next save or wait() as one line
                log.debug("uploading %s checkpoint of epoch %d failed", kind, epoch, exc_info=True)
                self._upload_error = self._upload_error or error
            finally:
                self._uploads.task_done()
        self._uploads.task_done()

    def _upload(self, kind: str, epoch: int) -> None:
        """Uploads one committed step, its commit marker last, then drops the staged copy."""
        step_dir = self._dir(kind) / str(epoch)
        dest = f"{_ARTIFACT_DIRS[kind]}/{epoch}"
        # The marker goes last so that a half-uploaded step never looks complete to readers.
        for entry in sorted(step_dir.iterdir()):
            if entry.is_dir():
                self._client.log_artifacts(self.run_id, str(entry), f"{dest}/{entry.name}")
            elif entry.name != COMMIT_MARKER:
                self._client.log_artifact(self.run_id, str(entry), dest)
        self._client.log_artifact(self.run_id, str(step_dir / COMMIT_MARKER), dest)
        shutil.rmtree(step_dir)
        if kind == "resume":
            self._prune_remote_resume(keep=epoch)

    def _prune_remote_resume(self, keep: int) -> None:
        """Deletes older remote resume steps where the store allows it; readers take the newest."""
        repo = get_artifact_repository(self._artifact_uri, tracking_uri=self._client.tracking_uri)
        for step in self._listed_steps("resume"):
            if step < keep:
                try:
                    repo.delete_artifacts(f"{_ARTIFACT_DIRS['resume']}/{step}")
                except Exception as error:  # noqa: BLE001 - stale steps are harmless
                    log.warning("could not delete old resume checkpoint %d: %s", step, error)

    def _listed_steps(self, kind: str) -> list[int]:
        """Sorted epochs with a step directory, complete or not."""
        if self.remote:
            names = [Path(f.path).name for f in self._client.list_artifacts(
                self.run_id, _ARTIFACT_DIRS[kind]) if f.is_dir]
        else:
            directory = self._dir(kind)
            names = [p.name for p in directory.iterdir() if p.is_dir()] if directory.is_dir() else []
        return sorted(int(name) for name in names if name.isdigit())

    def _complete_steps(self, kind: str) -> list[int]:
        """Sorted epochs whose step holds Orbax's commit marker."""
        return [step for step in self._listed_steps(kind) if self._is_complete(kind, step)]

    def _is_complete(self, kind: str, epoch: int) -> bool:
        if not self.remote:
            return (self._dir(kind) / str(epoch) / COMMIT_MARKER).is_file()
        files = self._client.list_artifacts(self.run_id, f"{_ARTIFACT_DIRS[kind]}/{epoch}")
        return any(Path(f.path).name == COMMIT_MARKER for f in files)

    def location(self, kind: str, epoch: int) -> str:
        """Where step `epoch` of `kind` is (or would be): a local path or an artifact URI."""
        return self._location(kind, epoch)

    def _location(self, kind: str, epoch: int) -> str:
        if self.remote:
            return f"{self._artifact_uri}/{_ARTIFACT_DIRS[kind]}/{epoch}"
        return str(self._dir(kind) / str(epoch))

    @contextlib.contextmanager
    def _readable(self, kind: str, epoch: int):
        """Yields a local directory holding step `epoch` of `kind` (downloaded if remote)."""
        if not self.remote:
            yield self._dir(kind)
            return
        with tempfile.TemporaryDirectory(prefix="ntk-restore-") as tmp:
            try:
                step_dir = self._client.download_artifacts(
                    self.run_id, f"{_ARTIFACT_DIRS[kind]}/{epoch}", dst_path=tmp)
            except Exception as error:
                raise CheckpointError(f"cannot download {kind} checkpoint of epoch {epoch} "
                                      f"from {self._location(kind, epoch)}: {error}") from error
            yield Path(step_dir).parent

    def _restore(self, kind: str, epoch: int, args, digest: bool = False):
        """Restores step `epoch` of `kind` (and, with `digest`, its digest item or None); raises
        CheckpointError (DamagedCheckpoint for a step that exists) in one line: epoch, path, cause."""
        where = self._location(kind, epoch)
        with self._readable(kind, epoch) as directory:
            if not (directory / str(epoch) / COMMIT_MARKER).is_file():
                raise CheckpointError(f"epoch {epoch}: {where}: no complete {kind} checkpoint there")
            _refuse_links(directory / str(epoch), epoch, where)
            options = ocp.CheckpointManagerOptions(create=False)
            try:
                with _orbax_silenced(), _settled_event_loops(), ocp.CheckpointManager(
                        directory, options=options, item_names=_ITEMS[kind]) as manager:
                    restored = manager.restore(epoch, args=args)
                    if not digest:
                        return restored
                    if not (directory / str(epoch) / DIGEST_ITEM).exists():
                        return restored, None
                    saved = manager.restore(epoch, args=ocp.args.Composite(
                        **{DIGEST_ITEM: ocp.args.JsonRestore()}))[DIGEST_ITEM]
                    return restored, saved
            except Exception as error:
                # The full error (TensorStore's specs and all) goes to the debug log, not the user.
                log.debug("restoring %s checkpoint %d from %s failed", kind, epoch, where, exc_info=True)
                raise DamagedCheckpoint(f"epoch {epoch}: {where}: its files cannot be read back "
                                        f"({type(error).__name__}: damaged, truncated or partly deleted)"
                                        ) from error
