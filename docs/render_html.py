"""Render an HTML file (the cohort report) to a PNG, to look at it and show it in the README.

Needs PyQt6-WebEngine (not a lungmets dependency) and a display (Xvfb works):

    pip install PyQt6-WebEngine
    xvfb-run -a python docs/render_html.py lungmets_demo/report/report.html docs/images/report.png
"""

from __future__ import annotations

import sys
from pathlib import Path


def render(html: Path, png: Path, width: int = 1200, height: int = 2400) -> None:
    from PyQt6.QtCore import QTimer, QUrl
    from PyQt6.QtWebEngineWidgets import QWebEngineView
    from PyQt6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(["render"])
    view = QWebEngineView()
    view.resize(width, height)

    def grab():
        view.grab().save(str(png))
        app.quit()

    view.loadFinished.connect(lambda ok: QTimer.singleShot(1500, grab))
    view.load(QUrl.fromLocalFile(str(html.resolve())))
    view.show()
    app.exec()


if __name__ == "__main__":
    render(Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:5]))
