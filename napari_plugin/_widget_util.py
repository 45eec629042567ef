"""What the plugin's widgets share: finding lungmets result layers and a box to pick one."""

from __future__ import annotations


def result_layers_of(viewer, kind: str) -> list:
    """The viewer's layers of a lungmets result folder of one kind (``lesions``, ``cells``)."""
    return [
        lyr
        for lyr in viewer.layers
        if lyr.metadata.get("lungmets_kind") == kind and lyr.metadata.get("lungmets_results")
    ]


def refill_layer_box(box, layers: list, current) -> bool:
    """Fill a QComboBox with `layers`, keeping `current` selected if still there; returns True
    when the selection moved to another layer (the newest), so the caller reloads."""
    box.blockSignals(True)
    box.clear()
    for lyr in layers:
        box.addItem(lyr.name, lyr)
    box.blockSignals(False)
    if current in layers:
        box.setCurrentIndex(layers.index(current))
        return False
    if layers:
        box.setCurrentIndex(len(layers) - 1)
        return True
    return False


# One review session per result folder, shared by the widgets, so that a threshold applied in
# the Markers widget shows at once in the Review widget's table and counts (and the other way
# round), and undo takes back the latest change whichever widget made it.
_SESSIONS: dict = {}  # resolved folder -> ((folder, summary.json mtime), session)
_HUB = None


def _stamp(folder) -> tuple:
    from pathlib import Path

    p = Path(folder) / "summary.json"
    return (str(Path(folder).resolve()), p.stat().st_mtime_ns if p.exists() else 0)


def shared_session(folder):
    """The `histo.review.ReviewSession` of a result folder that every widget uses (a new one
    when the folder's results were written again since)."""
    from histo.review import ReviewSession

    key = _stamp(folder)
    stamp, session = _SESSIONS.get(key[0], (None, None))
    if session is None or stamp != key:
        session = ReviewSession(folder)
        _SESSIONS[key[0]] = (key, session)
    return session


def advance(pbar, done: int, total: int, message: str) -> None:
    """Move a napari progress bar to ``done`` of ``total`` (a new total starts it again)."""
    if pbar is None:
        return
    if pbar.total != total:
        pbar.total = total
        pbar.n = 0
    pbar.set_description(f"lungmets: {message}")
    pbar.update(done - pbar.n)


def drop_session(folder) -> None:
    """Forget a folder's shared session (its journal was written by someone else)."""
    _SESSIONS.pop(_stamp(folder)[0], None)


def session_hub():
    """A Qt object whose ``changed(str)`` signal carries the folder of a session that changed."""
    global _HUB
    if _HUB is None:
        from qtpy.QtCore import QObject, Signal

        class SessionHub(QObject):
            changed = Signal(str)

        _HUB = SessionHub()
    return _HUB


def session_changed(session) -> None:
    """Tell the other widgets that `session` changed (they redraw from it)."""
    session_hub().changed.emit(_stamp(session.folder)[0])


def is_session_of(session, folder: str) -> bool:
    """Whether a ``changed`` signal's `folder` is `session`'s."""
    return session is not None and _stamp(session.folder)[0] == folder


class SharedSessionMixin:
    """For widgets showing a shared session: tell the others after a change, and redraw
    (``_session_refreshed``) when another widget changed this slide's session."""

    _telling = False

    def _tell_others(self) -> None:
        self._telling = True
        try:
            session_changed(self.session)
        finally:
            self._telling = False

    def _on_session_changed(self, folder: str) -> None:
        if self._telling or not is_session_of(self.session, folder):
            return
        self.session = shared_session(self.session.folder)
        self._session_refreshed()

    def _session_refreshed(self) -> None:  # pragma: no cover - each widget redraws its way
        raise NotImplementedError
