"""The layout shared by the Ground truth, Compare pigment and Export regions docks: their
controls in a vertical scroll area, labels that wrap and drop-downs that do not widen the dock
for long layer names, so that each dock asks for at most about DOCK_WIDTH pixels and several
docks stacked or tabbed on a 1366 x 768 screen can each be scrolled to their last control.

(magicgui's own `Container(scrollable=True)` does not survive napari's docking: napari docks
the inner widget and drops the scroll area, so the scroll area is built here.)
"""

from __future__ import annotations

from magicgui.widgets import ComboBox, Container, Label
from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import QComboBox, QFrame, QScrollArea

DOCK_WIDTH = 400  # pixels the dock asks for at most (its size hint)
COMBO_CHARACTERS = 16  # a drop-down is sized for this many characters, longer names elide


class _ScrollArea(QScrollArea):
    """A vertical scroll area that asks for its content's width (room for the scroll bar
    included, at most DOCK_WIDTH) and its content's height, and can shrink to a few lines."""

    def _width(self, content: int) -> int:
        return content + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        content = self.widget().sizeHint()
        return QSize(min(DOCK_WIDTH, self._width(content.width())), content.height())

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        content = self.widget().minimumSizeHint()
        return QSize(min(DOCK_WIDTH, self._width(content.width())),
                     super().minimumSizeHint().height())


class ScrollingDock(Container):
    """A dock widget whose `widgets` sit in a vertical scroll area (`body`)."""

    def __init__(self, widgets):
        for widget in widgets:
            fit_width(widget)
        self.body = Container(widgets=widgets)
        super().__init__(widgets=[], labels=False)
        scroll = _ScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        scroll.setWidget(self.body.native)
        self.scroll_area = scroll
        self.native.layout().addWidget(scroll)
        self.native.layout().setContentsMargins(0, 0, 0, 0)

    def reset_choices(self, *_):
        """Refresh every drop-down (napari calls this when layers change)."""
        self.body.reset_choices()


def fit_width(widget) -> None:
    """Keep `widget` from widening its dock: labels wrap, drop-downs elide long names."""
    native = widget.native
    if isinstance(widget, Label):
        native.setWordWrap(True)
    elif isinstance(widget, ComboBox) and isinstance(native, QComboBox):
        native.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        native.setMinimumContentsLength(COMBO_CHARACTERS)
